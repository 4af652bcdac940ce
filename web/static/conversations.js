// The browser's list of conversations: session ids with titles (the first prompt), kept in localStorage per
// key, and the sidebar list that opens, renames and deletes them. The server keeps the turns; this keeps names.

import { t } from "./i18n.js";

const TITLE_CHARS = 60;

/** localStorage that never throws (it does when storage is disabled). */
export function storage(op, key, value) {
  try {
    if (op === "get") return localStorage.getItem(key);
    if (op === "set") localStorage.setItem(key, value);
    if (op === "remove") localStorage.removeItem(key);
  } catch {
    /* the page still works, it just forgets on reload */
  }
  return null;
}

/** A conversation's default title: its first prompt on one line, shortened. */
export function titleFrom(prompt) {
  const line = String(prompt || "").replace(/\s+/g, " ").trim();
  return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line || t("untitled");
}

/**
 * The list and its sidebar view. `onOpen(id)` switches to a conversation, `onDelete(id)` deletes it on the
 * server (resolving true once gone); both are the page's (app.js) business.
 */
export class Conversations {
  constructor({ list, dialog, dialogText, onOpen, onDelete }) {
    this.ui = { list, dialog, dialogText };
    this.onOpen = onOpen;
    this.onDelete = onDelete;
    this.key = "vlgate.conversations.open";
    this.items = [];
    this.current = null;
  }

  /** Load the list of this key's conversations (another key in the same browser has its own list). */
  load(keyId) {
    this.key = `vlgate.conversations.${keyId || "open"}`;
    try {
      const items = JSON.parse(storage("get", this.key) || "[]");
      this.items = Array.isArray(items) ? items.filter((i) => i && typeof i.id === "string") : [];
    } catch {
      this.items = [];
    }
    this.render();
  }

  save() {
    storage("set", this.key, JSON.stringify(this.items));
  }

  find(id) {
    return this.items.find((item) => item.id === id);
  }

  /** Note a conversation (new ones go on top with `title`); mark it current. */
  remember(id, title) {
    if (!this.find(id)) this.items.unshift({ id, title: titleFrom(title), at: Date.now() });
    this.current = id;
    this.save();
    this.render();
  }

  /** A conversation just got a new message: move it to the top. */
  touch(id) {
    const item = this.find(id);
    if (!item) return;
    item.at = Date.now();
    this.items = [item, ...this.items.filter((i) => i !== item)];
    this.save();
    this.render();
  }

  forget(id) {
    this.items = this.items.filter((item) => item.id !== id);
    if (this.current === id) this.current = null;
    this.save();
    this.render();
  }

  select(id) {
    this.current = id;
    this.render();
  }

  rename(id, title) {
    const item = this.find(id);
    if (item && title.trim()) item.title = titleFrom(title);
    this.save();
    this.render();
  }

  render() {
    const list = this.ui.list;
    list.replaceChildren();
    for (const item of this.items) list.append(this.row(item));
    if (!this.items.length) {
      const empty = document.createElement("li");
      empty.className = "chat-empty";
      empty.textContent = t("noChats");
      list.append(empty);
    }
  }

  row(item) {
    const li = document.createElement("li");
    li.className = "chat-item";
    li.dataset.sessionId = item.id;
    if (item.id === this.current) li.setAttribute("aria-current", "true");
    const open = button("chat-open", item.title, item.title);
    open.addEventListener("click", () => this.onOpen(item.id));
    const rename = button("chat-rename", "✎", t("rename"));
    rename.addEventListener("click", () => this.editTitle(li, item));
    const remove = button("chat-delete", "×", t("delete"));
    remove.addEventListener("click", () => this.confirmDelete(item));
    li.append(open, rename, remove);
    return li;
  }

  /** Rename in place: Enter (or leaving the field) keeps the new title, Escape keeps the old one. */
  editTitle(li, item) {
    const input = document.createElement("input");
    input.className = "chat-title-input";
    input.value = item.title;
    input.setAttribute("aria-label", t("rename"));
    li.replaceChildren(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      if (keep) this.rename(item.id, input.value);
      else this.render();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.isComposing) finish(true);
      if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  /** Ask before deleting: the server deletes the turns for good. */
  confirmDelete(item) {
    const { dialog, dialogText } = this.ui;
    dialogText.textContent = t("confirmDelete", { title: item.title });
    dialog.returnValue = "";
    dialog.onclose = async () => {
      if (dialog.returnValue !== "delete") return;
      if (await this.onDelete(item.id)) this.forget(item.id);
    };
    dialog.showModal();
  }
}

function button(className, text, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.title = label;
  b.setAttribute("aria-label", label);
  return b;
}
