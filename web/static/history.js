// A conversation brought back from the server (after a reload, or when opened from the list): its turns, the
// "Stopped · N tokens" lines of its answers, an answer still being written, and the reader's scroll position.

import { storage } from "./conversations.js";
import { followJob, metaLine, startTurn } from "./turns.js";
import { addAssistantMessage, addMessage, addNote, addUserMessage } from "./view.js";

const SCROLL_KEY = "vlgate.scroll";
const UNFINISHED = ["queued", "running"];

// {state, ui, api, serverMessage, conversations, forgetSession, updateComposer, onRestored}: app.js's
let ctx = null;

export function setUpHistory(context) {
  ctx = context;
}

/** Show the "Stopped · N tokens · tok/s" lines of finished answers again (they are not part of the turns). */
async function restoreMetaLines(views) {
  await Promise.all(views.map(async (root) => {
    const { ok, body } = await ctx.api(`/api/jobs/${encodeURIComponent(root.dataset.jobId)}`);
    const meta = ok ? metaLine(body) : "";
    if (meta && root.isConnected) addNote(root, "meta", meta);
  }));
}

/** Rebuild the conversation from the server after a reload, and re-attach to an answer still being written. */
export async function restoreSession() {
  if (!ctx.state.sessionId) return;
  const sessionId = ctx.state.sessionId;
  ctx.state.restoring = true;
  ctx.updateComposer();
  try {
    const { ok, status: code, body } = await ctx.api(`/api/sessions/${encodeURIComponent(sessionId)}`);
    if (sessionId !== ctx.state.sessionId) return; // another conversation was opened meanwhile
    if (code === 404) {
      ctx.conversations.forget(sessionId); // deleted elsewhere, or another key's: start fresh
      ctx.forgetSession();
      return;
    }
    if (!ok) {
      addNote(addMessage("assistant").root, "error", ctx.serverMessage(body, `Could not load the conversation (HTTP ${code}).`));
      return;
    }
    const first = body.messages.find((m) => m.role === "user");
    ctx.conversations.remember(sessionId, first?.text);
    const answered = [];
    for (const message of body.messages) {
      if (message.role === "user") {
        const root = addUserMessage(message.text, message.image_ids.map((id) => `/api/images/${encodeURIComponent(id)}`));
        root.dataset.jobId = message.job_id || "";
      } else {
        const root = addAssistantMessage(message.text).root;
        root.dataset.jobId = message.job_id || "";
        if (message.job_id) answered.push(root);
      }
    }
    await restoreMetaLines(answered.slice(-20));
    restoreScroll();
    const last = body.messages.at(-1);
    if (last?.role === "user" && last.job_id) await reattach(last.job_id);
  } catch (err) {
    addNote(addMessage("assistant").root, "error", `Could not load the conversation: ${err.message}`);
  } finally {
    ctx.state.restoring = false;
    ctx.updateComposer();
    ctx.onRestored();
  }
}

/** The last turn has no answer yet: follow its job if it still runs, or say why it has none. */
async function reattach(jobId) {
  const { ok, body } = await ctx.api(`/api/jobs/${encodeURIComponent(jobId)}`);
  if (!ok) return;
  if (UNFINISHED.includes(body.status)) {
    const turn = startTurn(addAssistantMessage(null, "streaming"));
    turn.jobId = jobId;
    turn.via = "follow";
    followJob(turn);
  } else if (body.status === "failed") {
    const view = addAssistantMessage(null, "error");
    view.bubble.hidden = true;
    addNote(view.root, "error", ctx.serverMessage(body, "The generation failed."));
  }
}

export function saveScroll() {
  const c = ctx.ui.conversation;
  storage("set", SCROLL_KEY, JSON.stringify({ id: ctx.state.sessionId, fromBottom: c.scrollHeight - c.scrollTop - c.clientHeight }));
}

/** Put the conversation back where the reader left it (at the bottom unless they had scrolled up). */
function restoreScroll() {
  let saved = null;
  try {
    saved = JSON.parse(storage("get", SCROLL_KEY) || "null");
  } catch {
    /* nothing saved */
  }
  const fromBottom = saved?.id === ctx.state.sessionId ? Math.max(0, Number(saved.fromBottom) || 0) : 0;
  const apply = () => {
    const c = ctx.ui.conversation;
    c.scrollTop = c.scrollHeight - c.clientHeight - (fromBottom < 80 ? 0 : fromBottom);
  };
  apply();
  // The page keeps settling for a moment (markdown, highlighting, fonts, notes): follow it for a few seconds.
  const settling = new ResizeObserver(apply);
  for (const child of ctx.ui.conversation.children) settling.observe(child);
  setTimeout(() => settling.disconnect(), 3000);
  // Images load after the text: keep the same place once they have a height.
  for (const img of ctx.ui.conversation.querySelectorAll("img")) {
    if (!img.complete) img.addEventListener("load", apply, { once: true });
  }
}
