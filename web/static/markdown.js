// Render the model's answers as Markdown, safely. marked and DOMPurify are the vendored globals
// loaded by index.html before this module (see vendor/README.md).

export function escapeHtml(text) {
  const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return String(text).replace(/[&<>"']/g, (c) => entities[c]);
}

// The model's text is untrusted. Two independent guards: marked renders raw HTML as visible text
// (so `<img onerror=…>` is shown, not parsed), and DOMPurify sanitises whatever marked produced.
// Markdown images become links, so an answer cannot make the browser fetch arbitrary URLs.
const markdown = new marked.Marked({
  gfm: true,
  breaks: true, // the model's single newlines are meant as line breaks
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Return sanitised HTML for a Markdown answer. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(markdown.parse(text), { FORBID_TAGS: ["img", "style", "form", "input", "button"] });
}
