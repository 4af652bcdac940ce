// The conversation's DOM: user and assistant messages, notes under them, scrolling, and each message's
// actions (copy, regenerate, edit and resend, enlarge an image). The page (app.js) decides what they do.

import { addActions, decorateCode } from "./actions.js";
import { t } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const emptyHint = $("empty-hint");

export function nearBottom() {
  return conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
}

/** Keep following the newest text, unless the reader scrolled up to read something older. */
export function withScroll(change) {
  const follow = nearBottom();
  change();
  if (follow) conversation.scrollTop = conversation.scrollHeight;
}

export function addMessage(role) {
  emptyHint.hidden = true;
  const root = document.createElement("div");
  root.className = `message ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  root.append(bubble);
  withScroll(() => conversation.append(root));
  return { root, bubble };
}

export function addUserMessage(text, imageSources) {
  const { root, bubble } = addMessage("user");
  if (imageSources.length) {
    const images = document.createElement("div");
    images.className = "message-images";
    for (const src of imageSources) {
      const img = document.createElement("img");
      img.src = src;
      img.alt = t("yourImage");
      img.tabIndex = 0;
      images.append(img);
    }
    root.prepend(images);
  }
  bubble.textContent = text; // the user's own text, shown verbatim (never parsed as HTML)
  addActions(root, "user");
  return root;
}

/** Add an assistant bubble; `text === null` means the answer has not started («thinking»). */
export function addAssistantMessage(text = null, status = "done") {
  const { root, bubble } = addMessage("assistant");
  const answer = document.createElement("div");
  answer.className = "answer";
  bubble.append(answer);
  const view = { root, bubble, answer, pending: 0 };
  root.dataset.status = status;
  setAnswer(view, text);
  addActions(root, "assistant");
  return view;
}

export function setAnswer(view, text) {
  withScroll(() => {
    if (text === null || text === "") {
      view.answer.innerHTML = `<span class="thinking">${t("thinking")}</span>`;
    } else {
      view.answer.innerHTML = renderMarkdown(text);
      if (view.root.dataset.status !== "streaming") decorateCode(view.answer); // once, when it is final
    }
    view.root.dataset.text = text || "";
  });
}

/** Tokens can arrive faster than the screen refreshes: render at most once per animation frame. */
export function scheduleRender(turn) {
  if (turn.view.pending) return;
  turn.view.pending = requestAnimationFrame(() => {
    turn.view.pending = 0;
    setAnswer(turn.view, turn.text);
  });
}

/** Add (or with `className` already there, replace) a note under a message. */
export function addNote(root, className, text) {
  const note = document.createElement("div");
  note.className = className;
  note.textContent = text;
  withScroll(() => root.append(note));
  return note;
}

export function emptyConversation() {
  for (const node of [...conversation.children]) {
    if (node !== emptyHint) node.remove();
  }
  emptyHint.hidden = false;
}
