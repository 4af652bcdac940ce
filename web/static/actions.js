// What a reader can do with a message: copy it (or one code block), edit and resend a question, regenerate an
// answer, and see an image large. Buttons are added here; app.js says what editing and regenerating do.

import { t } from "./i18n.js";

const COPIED_MS = 1500;
let handlers = { edit: null, regenerate: null };

if (globalThis.hljs) hljs.configure({ ignoreUnescapedHTML: true, throwUnescapedHTML: false });

function button(action, text, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "action";
  b.dataset.action = action;
  b.textContent = text;
  b.title = label;
  b.setAttribute("aria-label", label);
  return b;
}

/** Add the action bar under a message ("user" or "assistant"). */
export function addActions(root, role) {
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.append(button("copy", t("copy"), t("copy")));
  if (role === "user") bar.append(button("edit", "✎", t("edit")));
  else bar.append(button("regenerate", "↻", t("regenerate")));
  root.append(bar);
}

async function copyText(text, feedbackOn) {
  try {
    await navigator.clipboard.writeText(text);
    feedbackOn.textContent = "✓";
    feedbackOn.dataset.copied = "true";
  } catch {
    feedbackOn.textContent = "✗"; // no clipboard (an insecure origin, or permission refused)
  }
  setTimeout(() => {
    feedbackOn.textContent = t("copy");
    delete feedbackOn.dataset.copied;
  }, COPIED_MS);
}

/** Highlight a finished answer's code blocks (the vendored highlight.js) and give each a copy button. */
export function decorateCode(answer) {
  for (const code of answer.querySelectorAll("pre > code")) {
    // highlightElement reads textContent and writes escaped HTML: the model's text still never runs.
    if (globalThis.hljs) hljs.highlightElement(code);
    const pre = code.parentElement;
    pre.classList.add("code-block");
    pre.append(button("copy-code", t("copy"), t("copyCode")));
  }
}

/** The message's own text: the user's words, or the answer's Markdown source. */
function messageText(root) {
  return root.classList.contains("assistant") ? root.dataset.text || "" : root.querySelector(".bubble").textContent;
}

/** Edit a question in place; `onSend(text)` resends it (on a branch of the conversation). */
function editInPlace(root) {
  const bubble = root.querySelector(".bubble");
  const original = bubble.textContent;
  const editor = document.createElement("div");
  editor.className = "editor";
  const area = document.createElement("textarea");
  area.value = original;
  area.rows = Math.min(8, original.split("\n").length + 1);
  area.setAttribute("aria-label", t("edit"));
  const send = button("edit-send", t("sendEdit"), t("sendEdit"));
  send.className = "primary small";
  const cancel = button("edit-cancel", t("cancel"), t("cancel"));
  cancel.className = "secondary small";
  editor.append(area, send, cancel);
  bubble.hidden = true;
  root.querySelector(".actions").hidden = true;
  bubble.after(editor);
  area.focus();
  const close = () => {
    editor.remove();
    bubble.hidden = false;
    root.querySelector(".actions").hidden = false;
  };
  cancel.addEventListener("click", close);
  send.addEventListener("click", () => {
    const text = area.value.trim();
    if (!text) return;
    close();
    handlers.edit(root, text);
  });
}

/** Wire the conversation's buttons and images; `edit(root, text)` and `regenerate(root)` are app.js's. */
export function setUpActions(conversation, dialog, large, { edit, regenerate }) {
  handlers = { edit, regenerate };
  conversation.addEventListener("click", (e) => {
    const img = e.target.closest(".message-images img");
    if (img) {
      large.src = img.src;
      large.alt = img.alt;
      dialog.showModal();
      return;
    }
    const b = e.target.closest("button.action");
    if (!b) return;
    const root = b.closest(".message");
    if (b.dataset.action === "copy") copyText(messageText(root), b);
    if (b.dataset.action === "copy-code") copyText(b.parentElement.querySelector("code").textContent, b);
    if (b.dataset.action === "edit") editInPlace(root);
    if (b.dataset.action === "regenerate") handlers.regenerate(root);
  });
  conversation.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.matches(".message-images img")) e.target.click();
  });
  dialog.addEventListener("click", (e) => {
    if (e.target === dialog || e.target === large) dialog.close(); // a click anywhere closes it
  });
}
