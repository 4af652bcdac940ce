// The vlgate chat page: conversations, image upload, sliders, and answers streamed over WebSocket.
// Plain ES modules, no build step: conversations.js (the list), history.js (a conversation loaded back),
// branch.js (edit and resend, regenerate), view.js + actions.js (messages and their buttons), turns.js (answers
// being written), attach.js (images), status.js + health.js (the light), settings.js (theme, language, drawer,
// sliders), socket.js (connections), auth.js (the key dialog), i18n.js (words). This module owns the page's
// state and wires them together.

import { setUpActions } from "./actions.js";
import { Attachment } from "./attach.js";
import { Access, errorOf, isAuthError } from "./auth.js";
import { branchFrom, setUpBranches } from "./branch.js";
import { Conversations, storage } from "./conversations.js";
import { restoreSession, saveScroll, setUpHistory } from "./history.js";
import { t, translatePage } from "./i18n.js";
import { closeDrawer, setUpSettings, setUpSliders } from "./settings.js";
import { StatusPanel } from "./status.js";
import { ChatSocket, wsUrl } from "./socket.js";
import { addAssistantMessage, addMessage, addNote, addUserMessage, emptyConversation } from "./view.js";
import { applyJobEvent, detachTurn, endTurn, failTurn, followJob, setUpTurns, startTurn, stopGeneration,
         workerLost } from "./turns.js";

const SESSION_KEY = "vlgate.session_id";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), chat: $("chat"), scrim: $("scrim"), menu: $("menu-button"), drawerClose: $("drawer-close"),
  light: $("status-light"), statusText: $("status-text"), statusModel: $("status-model"),
  statusDevice: $("status-device"), statusMemory: $("status-memory"), statusError: $("status-error"),
  title: $("page-title"), banner: $("demo-banner"), demoText: $("demo-text"), bannerClose: $("banner-close"),
  imageInput: $("image-input"), chooseImage: $("choose-image"), attach: $("attach-button"), preview: $("preview"),
  previewImage: $("preview-image"), previewName: $("preview-name"), previewNote: $("preview-note"),
  removeImage: $("remove-image"), imageError: $("image-error"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), maxTokensValue: $("max-tokens-value"),
  newChat: $("new-chat"), settingsButton: $("settings-button"), settingsPanel: $("settings-panel"),
  darkMode: $("dark-mode"), language: $("language"),
  conversation: $("conversation"), composer: $("composer"), prompt: $("prompt"), send: $("send-button"),
  stop: $("stop-button"),
};

// The server's limits, written into the page by Flask so the client checks match the server's.
const LIMITS = {
  maxImageBytes: Number(document.body.dataset.maxImageBytes) || 10 * 1024 * 1024,
  maxTokens: Number(document.body.dataset.maxTokensLimit) || 2048,
};

const state = {
  sessionId: storage("get", SESSION_KEY),
  turn: null, // the generation in progress (see turns.js)
  restoring: false,
  keyId: null, // the key this page was started with (null in open mode)
};
const access = new Access();
const attachment = new Attachment(ui, LIMITS.maxImageBytes); // the image for the next message only
let chatSocket = null; // opened once the page may use the server (signed in, or open mode)

/**
 * Fetch JSON; never throws for HTTP errors, so callers can show the server's own message. A 401 for the key
 * opens the key dialog and sends the request again once signed in.
 */
async function api(path, options = {}) {
  const res = await access.fetch(path, { headers: { Accept: "application/json" }, cache: "no-store", ...options });
  let body = null;
  try {
    body = await res.json();
  } catch {
    /* an empty or non-JSON body: status alone has to do */
  }
  return { ok: res.ok, status: res.status, body };
}

function serverMessage(body, fallback) {
  return body?.error?.message || body?.message || fallback;
}

const status = new StatusPanel(ui, {
  generating: () => Boolean(state.turn),
  mayReadCard: () => Boolean(access.keyId || !access.required),
  onReport: (summary) => {
    if (summary.lost && state.turn) workerLost();
  },
});
const conversations = new Conversations({
  list: $("chat-list"), dialog: $("confirm-dialog"), dialogText: $("confirm-text"),
  onOpen: openConversation, onDelete: deleteConversation,
});

// ---------------------------------------------------------------- conversations

function rememberSession(sessionId) {
  state.sessionId = sessionId;
  storage("set", SESSION_KEY, sessionId);
}

function forgetSession() {
  state.sessionId = null;
  storage("remove", SESSION_KEY);
  conversations.select(null);
}

/** Leave the shown conversation (it stays in the list, and on the server) for an empty one. */
function newChat() {
  if (state.turn) detachTurn(state.turn);
  forgetSession();
  emptyConversation();
  closeDrawer(ui);
  ui.prompt.focus();
}

async function openConversation(sessionId) {
  closeDrawer(ui);
  if (sessionId === state.sessionId && !state.restoring) return;
  if (state.turn) detachTurn(state.turn); // its job goes on; reopening the conversation follows it again
  emptyConversation();
  rememberSession(sessionId);
  conversations.select(sessionId);
  await restoreSession();
}

/** Delete a conversation on the server; resolve true once it is gone there (or was already). */
async function deleteConversation(sessionId) {
  let answer = null;
  try {
    answer = await api(`/api/sessions/${encodeURIComponent(sessionId)}`, { method: "DELETE" });
  } catch {
    /* unreachable server: handled below */
  }
  if (!answer?.ok && answer?.status !== 404) {
    const message = serverMessage(answer?.body, "Could not reach the server to delete the conversation; try again.");
    addNote(addMessage("assistant").root, "error", message);
    return false;
  }
  if (sessionId === state.sessionId) {
    if (state.turn) endTurn(state.turn, "cancelled"); // the server cancels the session's jobs on DELETE
    forgetSession();
    emptyConversation();
  }
  return true;
}

// ---------------------------------------------------------------- sending

async function sendMessage() {
  if (state.turn) return; // typing on while an answer streams is fine; sending waits for the answer
  if (!chatSocket || state.restoring) {
    state.sendWhenReady = true; // Enter while the page is still loading the conversation: send right after
    return;
  }
  const image = attachment.image;
  const prompt = ui.prompt.value.trim();
  if (!prompt && !image) {
    ui.prompt.focus();
    return;
  }
  ui.prompt.value = "";
  autoGrow();
  attachment.clear();
  await submit(prompt, image);
}

/** Send one question (an image alone asks the stated default question) in the open conversation. */
async function submit(typed, image) {
  const prompt = typed || t("defaultPrompt");
  const request = {
    type: "chat",
    prompt,
    temperature: Number(ui.temperature.value),
    max_tokens: Number(ui.maxTokens.value),
  };
  if (state.sessionId) request.session_id = state.sessionId;
  if (image) request.image = image.dataUrl;

  const userRoot = addUserMessage(prompt, image ? [image.dataUrl] : []);
  if (!typed) addNote(userRoot, "meta", t("defaultPromptNote", { prompt }));
  const turn = startTurn(addAssistantMessage(null, "streaming"));
  turn.request = { prompt: typed, image };
  turn.userRoot = userRoot;
  try {
    // Checked again once connected: a turn abandoned meanwhile (another conversation opened) is never sent.
    await chatSocket.send(request, () => state.turn === turn);
    turn.sent = true;
  } catch {
    failTurn(turn, t("cannotReach"));
  }
}

/** Refused before it was accepted: give the user back what they wrote instead of making them type it again. */
function giveBack(request) {
  if (!ui.prompt.value) ui.prompt.value = request.prompt;
  if (request.image && !attachment.image) attachment.set(request.image);
}

// ---------------------------------------------------------------- WebSockets

function onChatEvent(event) {
  const turn = state.turn;
  if (event.type === "accepted") {
    if (!turn || turn.jobId || turn.via !== "chat") {
      // The turn was abandoned before the server accepted it: stop the orphan.
      chatSocket.trySend({ type: "cancel", job_id: event.job_id });
      return;
    }
    turn.jobId = event.job_id;
    turn.view.root.dataset.jobId = event.job_id;
    if (turn.userRoot) turn.userRoot.dataset.jobId = event.job_id;
    rememberSession(event.session_id);
    conversations.remember(event.session_id, turn.request.prompt || t("defaultPrompt"));
    conversations.touch(event.session_id);
    if (turn.cancelRequested) chatSocket.trySend({ type: "cancel", job_id: turn.jobId });
    return;
  }
  if (event.type === "error" && isAuthError(errorOf(event).code)) {
    // The key was refused on this socket (revoked meanwhile): say so, and reconnect once signed in again.
    if (turn && turn.via === "chat" && !turn.jobId) failTurn(turn, errorOf(event).message);
    access.refused(errorOf(event).message).then(() => chatSocket.restart());
    return;
  }
  if (!turn || turn.via !== "chat") return;
  if (event.type === "error" && !event.job_id) {
    // Refused before acceptance (validation, image, no worker); a stale session starts over next time.
    if (turn.jobId) return;
    if ((event.code || event.error?.code) === "session_not_found") {
      conversations.forget(state.sessionId);
      forgetSession();
    }
    failTurn(turn, serverMessage(event, "The message was refused."));
    return;
  }
  applyJobEvent(turn, event);
}

/** The chat socket dropped: an accepted job keeps running on the server, so follow it by id instead. */
function onChatSocketLost() {
  const turn = state.turn;
  // A turn still waiting to be sent is not lost: sendMessage waits for the reconnection.
  if (!turn || turn.via !== "chat" || !turn.sent) return;
  if (turn.jobId) {
    turn.via = "follow";
    followJob(turn);
  } else {
    failTurn(turn, t("connectionLost"));
  }
}

// ---------------------------------------------------------------- controls

function updateComposer() {
  const busy = Boolean(state.turn);
  ui.send.hidden = busy;
  ui.send.disabled = state.restoring;
  ui.stop.hidden = !busy;
  ui.stop.disabled = Boolean(state.turn?.cancelRequested);
}

function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${ui.prompt.scrollHeight}px`;
}

function setUpControls() {
  setUpSliders(ui, LIMITS.maxTokens);

  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    // isComposing: Enter that confirms an IME candidate (Chinese input) must not send the message.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  ui.prompt.addEventListener("input", autoGrow);
  ui.stop.addEventListener("click", stopGeneration);
  ui.newChat.addEventListener("click", newChat);
  window.addEventListener("pagehide", saveScroll);
}

// ---------------------------------------------------------------- start

/** Signed out, or signed in with another key: start over (no socket or conversation of the old key stays). */
function onKeyChanged(info) {
  if (!chatSocket) return; // the page's first sign-in: it is still starting
  const keyId = info?.signed_in ? info.key?.id : null;
  if (keyId && keyId === state.keyId) return; // the same key again (the sign-in had expired): carry on
  location.reload();
}

setUpTurns({ state, ui, api, status, serverMessage, giveBack, updateComposer, socket: () => chatSocket,
             onFinished: (turn) => state.sessionId && conversations.touch(state.sessionId) });
setUpHistory({ state, ui, api, serverMessage, conversations, forgetSession, updateComposer, onRestored: () => {
  if (state.sendWhenReady && !state.turn) {
    state.sendWhenReady = false;
    sendMessage();
  }
} });
setUpBranches({ state, api, access, serverMessage, conversations, openConversation, submit });
translatePage();
setUpSettings(ui, { onLanguage: () => {
  conversations.render();
  status.show();
} });
setUpControls();
attachment.setUp($("dropzone"));
setUpActions(ui.conversation, $("image-dialog"), $("image-large"), {
  edit: (root, text) => branchFrom(root, text),
  regenerate: (root) => branchFrom(root),
});
updateComposer();
status.refresh();
access.onChange(onKeyChanged);
await access.start(); // asks for the key first when the server requires one and this browser has none
state.keyId = access.keyId;
conversations.load(state.keyId);
conversations.select(state.sessionId);
chatSocket = new ChatSocket(wsUrl("/ws/chat"), { onEvent: onChatEvent, onLost: onChatSocketLost,
                                                   checkAccess: () => access.check() });
status.refresh(); // as this key sees it
await restoreSession();
if (state.sendWhenReady) {
  state.sendWhenReady = false;
  sendMessage();
}
ui.prompt.focus();
