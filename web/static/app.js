// The vlgate chat page: status light, image upload, sliders, and a conversation streamed over WebSocket.
// Plain ES modules, no build step: markdown.js (safe rendering), socket.js (connections), health.js
// (the status light's logic), auth.js (the key dialog); this module owns the page's state and the DOM.

import { Access, errorOf, isAuthError } from "./auth.js";
import { summarizeHealth } from "./health.js";
import { renderMarkdown } from "./markdown.js";
import { backoff, ChatSocket, parseEvent, RETRY_MIN_MS, wsUrl } from "./socket.js";

const SESSION_KEY = "vlgate.session_id";
const THEME_KEY = "vlgate.theme";
const HEALTH_INTERVAL_MS = 3000;
const HEALTH_AFTER_TURN_MS = 300;
const UNFINISHED = ["queued", "running"];

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"),
  chat: $("chat"),
  light: $("status-light"),
  statusText: $("status-text"),
  statusModel: $("status-model"),
  statusDevice: $("status-device"),
  statusMemory: $("status-memory"),
  statusError: $("status-error"),
  imageInput: $("image-input"),
  chooseImage: $("choose-image"),
  preview: $("preview"),
  previewImage: $("preview-image"),
  previewName: $("preview-name"),
  removeImage: $("remove-image"),
  imageError: $("image-error"),
  temperature: $("temperature"),
  temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"),
  maxTokensValue: $("max-tokens-value"),
  clearHistory: $("clear-history"),
  settingsButton: $("settings-button"),
  settingsPanel: $("settings-panel"),
  darkMode: $("dark-mode"),
  banner: $("demo-banner"),
  conversation: $("conversation"),
  emptyHint: $("empty-hint"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send-button"),
  stop: $("stop-button"),
};

// The server's limits, written into the page by Flask so the client checks match the server's.
const LIMITS = {
  maxImageBytes: Number(document.body.dataset.maxImageBytes) || 10 * 1024 * 1024,
  maxTokens: Number(document.body.dataset.maxTokensLimit) || 2048,
};

const state = {
  sessionId: storage("get", SESSION_KEY),
  image: null, // {dataUrl, name, size}: attached to the next message only
  turn: null, // the generation in progress (see startTurn)
  restoring: false,
  health: null,
  card: null, // GET /v1/models' card: the model's name when the health report is the status-only one
  cardLoading: false,
  keyId: null, // the key this page was started with (null in open mode)
};
const access = new Access();
let chatSocket = null; // opened once the page may use the server (signed in, or open mode)

// ---------------------------------------------------------------- small helpers

/** localStorage that never throws (it does when storage is disabled). */
function storage(op, key, value) {
  try {
    if (op === "get") return localStorage.getItem(key);
    if (op === "set") localStorage.setItem(key, value);
    if (op === "remove") localStorage.removeItem(key);
  } catch {
    /* the page still works, it just forgets on reload */
  }
  return null;
}

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

const megabytes = (bytes) => (bytes / (1024 * 1024)).toFixed(1);

// ---------------------------------------------------------------- conversation view

function nearBottom() {
  const c = ui.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

/** Keep following the newest text, unless the reader scrolled up to read something older. */
function withScroll(change) {
  const follow = nearBottom();
  change();
  if (follow) ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function addMessage(role) {
  ui.emptyHint.hidden = true;
  const root = document.createElement("div");
  root.className = `message ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  root.append(bubble);
  withScroll(() => ui.conversation.append(root));
  return { root, bubble };
}

function addUserMessage(text, imageSources) {
  const { root, bubble } = addMessage("user");
  if (imageSources.length) {
    const images = document.createElement("div");
    images.className = "message-images";
    for (const src of imageSources) {
      const img = document.createElement("img");
      img.src = src;
      img.alt = "用户图片 Your image";
      images.append(img);
    }
    root.prepend(images);
  }
  bubble.textContent = text; // the user's own text, shown verbatim (never parsed as HTML)
  return root;
}

/** Add an assistant bubble; `text === null` means the answer has not started («思考中…»). */
function addAssistantMessage(text = null, status = "done") {
  const { root, bubble } = addMessage("assistant");
  const answer = document.createElement("div");
  answer.className = "answer";
  bubble.append(answer);
  const view = { root, bubble, answer, pending: 0 };
  setAnswer(view, text);
  root.dataset.status = status;
  return view;
}

function setAnswer(view, text) {
  withScroll(() => {
    if (text === null || text === "") {
      view.answer.innerHTML = '<span class="thinking">思考中…</span>';
    } else {
      view.answer.innerHTML = renderMarkdown(text);
    }
  });
}

/** Tokens can arrive faster than the screen refreshes: render at most once per animation frame. */
function scheduleRender(turn) {
  if (turn.view.pending) return;
  turn.view.pending = requestAnimationFrame(() => {
    turn.view.pending = 0;
    setAnswer(turn.view, turn.text);
  });
}

function addNote(root, className, text) {
  const note = document.createElement("div");
  note.className = className;
  note.textContent = text;
  withScroll(() => root.append(note));
}

function emptyConversation() {
  for (const node of [...ui.conversation.children]) {
    if (node !== ui.emptyHint) node.remove();
  }
  ui.emptyHint.hidden = false;
}

// ---------------------------------------------------------------- session

function rememberSession(sessionId) {
  state.sessionId = sessionId;
  storage("set", SESSION_KEY, sessionId);
}

function forgetSession() {
  state.sessionId = null;
  storage("remove", SESSION_KEY);
}

/** Rebuild the conversation from the server after a reload, and re-attach to an answer still being written. */
async function restoreSession() {
  if (!state.sessionId) return;
  state.restoring = true;
  updateComposer();
  try {
    const { ok, status, body } = await api(`/api/sessions/${encodeURIComponent(state.sessionId)}`);
    if (status === 404) {
      forgetSession(); // cleared elsewhere, or a different database: start fresh
      return;
    }
    if (!ok) {
      addNote(addMessage("assistant").root, "error", serverMessage(body, `Could not load the conversation (HTTP ${status}).`));
      return;
    }
    for (const message of body.messages) {
      if (message.role === "user") {
        addUserMessage(message.text, message.image_ids.map((id) => `/api/images/${encodeURIComponent(id)}`));
      } else {
        addAssistantMessage(message.text).root.dataset.jobId = message.job_id || "";
      }
    }
    const last = body.messages.at(-1);
    if (last?.role === "user" && last.job_id) await reattach(last.job_id);
  } catch (err) {
    addNote(addMessage("assistant").root, "error", `Could not load the conversation: ${err.message}`);
  } finally {
    state.restoring = false;
    updateComposer();
  }
}

/** The last turn has no answer yet: follow its job if it still runs, or say why it has none. */
async function reattach(jobId) {
  const { ok, body } = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
  if (!ok) return;
  if (UNFINISHED.includes(body.status)) {
    const turn = startTurn(addAssistantMessage(null, "streaming"));
    turn.jobId = jobId;
    turn.via = "follow";
    followJob(turn);
  } else if (body.status === "failed") {
    const view = addAssistantMessage(null, "error");
    view.bubble.hidden = true;
    addNote(view.root, "error", serverMessage(body, "The generation failed."));
  }
}

// ---------------------------------------------------------------- generation turns

/** A turn is one question being answered; only one runs at a time on this page. */
function startTurn(view) {
  const turn = { jobId: null, seq: 0, text: "", view, via: "chat", sent: false, cancelRequested: false,
                 request: null, follower: null };
  state.turn = turn;
  updateComposer();
  showHealth(state.health);
  return turn;
}

function endTurn(turn, status) {
  if (state.turn !== turn) return false;
  state.turn = null;
  closeFollower(turn);
  if (turn.view.pending) cancelAnimationFrame(turn.view.pending);
  turn.view.root.dataset.status = status;
  updateComposer();
  showHealth(state.health);
  // The last report probably still says "busy"; the worker reports idle as soon as it is.
  setTimeout(refreshHealth, HEALTH_AFTER_TURN_MS);
  return true;
}

/** Apply one stream event (from /ws/chat or /ws/jobs/<id>) to the turn it belongs to. */
function applyJobEvent(turn, event) {
  if (event.job_id && event.job_id !== turn.jobId) return; // a stale event from an abandoned turn
  switch (event.type) {
    case "token":
      if (event.seq <= turn.seq) return; // already shown (the server resumes after our seq anyway)
      turn.text += event.text;
      turn.seq = event.seq;
      scheduleRender(turn);
      break;
    case "reset": // a worker died and another started over: drop what was shown
      turn.seq = event.seq ?? turn.seq;
      turn.text = "";
      scheduleRender(turn);
      break;
    case "done":
      finishTurn(turn, event);
      break;
    case "error":
      failTurn(turn, serverMessage(event, "The generation failed."));
      break;
    default:
      break;
  }
}

function finishTurn(turn, event) {
  const status = event.status === "cancelled" ? "cancelled" : "done";
  if (!endTurn(turn, status)) return;
  const text = event.response ?? turn.text; // the server's final text is authoritative
  if (text) setAnswer(turn.view, text);
  else if (status === "cancelled") turn.view.bubble.hidden = true; // stopped before a word: the note says so
  else turn.view.answer.textContent = "(空回答 empty answer)";
  const parts = [];
  if (status === "cancelled") parts.push("已停止 Stopped");
  if (event.usage?.completion_tokens != null) parts.push(`${event.usage.completion_tokens} tokens`);
  const speed = event.timings?.decode_tokens_per_s;
  if (speed) parts.push(`${speed.toFixed(1)} tok/s`);
  if (parts.length) addNote(turn.view.root, "meta", parts.join(" · "));
}

function failTurn(turn, message) {
  if (!endTurn(turn, "error")) return;
  if (turn.text) setAnswer(turn.view, turn.text);
  else turn.view.bubble.hidden = true; // nothing was written: the error alone says it
  addNote(turn.view.root, "error", message);
  // Refused before it was accepted (image too large, no worker): nothing was stored, so give the
  // user back what they wrote instead of making them type it again.
  if (turn.request && !turn.jobId) {
    if (!ui.prompt.value) ui.prompt.value = turn.request.prompt;
    if (turn.request.image && !state.image) setImage(turn.request.image);
  }
}

async function sendMessage() {
  const prompt = ui.prompt.value.trim();
  if (state.turn || state.restoring) return;
  if (!prompt) {
    ui.prompt.focus();
    return;
  }
  const image = state.image;
  const request = {
    type: "chat",
    prompt,
    temperature: Number(ui.temperature.value),
    max_tokens: Number(ui.maxTokens.value),
  };
  if (state.sessionId) request.session_id = state.sessionId;
  if (image) request.image = image.dataUrl;

  addUserMessage(prompt, image ? [image.dataUrl] : []);
  const turn = startTurn(addAssistantMessage(null, "streaming"));
  turn.request = { prompt, image };
  ui.prompt.value = "";
  autoGrow();
  clearImage();
  try {
    // Checked again once connected: a turn abandoned meanwhile (history cleared) is never sent.
    await chatSocket.send(request, () => state.turn === turn);
    turn.sent = true;
  } catch {
    failTurn(turn, "无法连接服务器 Cannot reach the server (the WebSocket is not connected); try again shortly.");
  }
}

/** Ask the server to stop; the stream then ends with a "done" whose status is "cancelled". */
async function stopGeneration() {
  const turn = state.turn;
  if (!turn || turn.cancelRequested) return;
  turn.cancelRequested = true;
  ui.stop.disabled = true;
  if (!turn.jobId) return; // sent as soon as the job is accepted
  if (turn.via === "chat" && chatSocket.trySend({ type: "cancel", job_id: turn.jobId })) return;
  let answer = null;
  try {
    answer = await api(`/api/jobs/${encodeURIComponent(turn.jobId)}`, { method: "DELETE" });
  } catch {
    /* unreachable server: handled below */
  }
  if (!answer?.ok && state.turn === turn) {
    turn.cancelRequested = false; // let the user try again
    updateComposer();
    addNote(turn.view.root, "error", serverMessage(answer?.body, "Could not reach the server to stop it; try again."));
  }
}

// ---------------------------------------------------------------- WebSockets

function onChatEvent(event) {
  const turn = state.turn;
  if (event.type === "accepted") {
    if (!turn || turn.jobId) {
      // The turn was abandoned (history cleared) before the server accepted it: stop the orphan.
      chatSocket.trySend({ type: "cancel", job_id: event.job_id });
      return;
    }
    turn.jobId = event.job_id;
    turn.view.root.dataset.jobId = event.job_id;
    rememberSession(event.session_id);
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
    if ((event.code || event.error?.code) === "session_not_found") forgetSession();
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
    failTurn(turn, "连接中断 The connection was lost before the server accepted the message; please send it again.");
  }
}

/**
 * Follow a job on /ws/jobs/<id>?after=<seq>: the server sends only what comes after the text already
 * shown (all of it when seq is 0). On an early close, check the job and follow again with backoff.
 */
function followJob(turn, retryMs = RETRY_MIN_MS) {
  const ws = new WebSocket(wsUrl(`/ws/jobs/${encodeURIComponent(turn.jobId)}?after=${turn.seq}`));
  turn.follower = ws;
  ws.onopen = () => {
    retryMs = RETRY_MIN_MS;
  };
  ws.onmessage = (message) => {
    if (state.turn === turn) applyJobEvent(turn, parseEvent(message.data));
  };
  ws.onclose = () => {
    if (state.turn !== turn || turn.follower !== ws) return;
    setTimeout(() => resumeFollowing(turn, ws, backoff(retryMs)), retryMs);
  };
  if (turn.cancelRequested) {
    turn.cancelRequested = false;
    stopGeneration();
  }
}

async function resumeFollowing(turn, oldSocket, retryMs) {
  if (state.turn !== turn || turn.follower !== oldSocket) return;
  try {
    const { ok, status, body } = await api(`/api/jobs/${encodeURIComponent(turn.jobId)}`);
    if (status === 404) return failTurn(turn, "This answer's job no longer exists.");
    if (ok && !UNFINISHED.includes(body.status)) {
      if (body.status === "failed") return failTurn(turn, serverMessage(body, "The generation failed."));
      return finishTurn(turn, body);
    }
  } catch {
    /* the server is down too: keep trying */
  }
  if (state.turn === turn && turn.follower === oldSocket) followJob(turn, retryMs);
}

function closeFollower(turn) {
  const ws = turn.follower;
  turn.follower = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
}

// ---------------------------------------------------------------- status light

/** Without an admin key the report is only {status, model_ready}: the light from those, the name from /v1. */
function summarizeStatus(health, card, generating) {
  const down = health.status === "down";
  const [light, text] = down ? ["error", "服务异常 Service down"]
    : !health.model_ready ? ["none", "模型未就绪 Model not ready"]
    : generating ? ["busy", "生成中 Busy"] : ["ready", "就绪 Ready"];
  const name = card?.label || card?.id;
  return { light, text, model: name ? `模型 Model: ${name}` : "", device: "", memory: "", errors: [],
           demo: card?.demo ? "Demo model: random weights, answers are random text" : null };
}

/** Read the served model's card once (it needs the key, so only when signed in or open). */
async function loadModelCard() {
  if (state.cardLoading || (state.card?.label && state.health?.model_ready)) return;
  state.cardLoading = true;
  try {
    const response = await fetch("/v1/models", { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = response.ok ? await response.json() : null;
    if (body?.data?.length) state.card = body.data[0];
  } catch {
    /* no name then; the light still works */
  } finally {
    state.cardLoading = false;
  }
  showHealth(state.health);
}

function showHealth(health) {
  const generating = Boolean(state.turn);
  const summary = health && !Array.isArray(health.workers) ? summarizeStatus(health, state.card, generating)
    : summarizeHealth(health, generating);
  ui.light.dataset.state = summary.light;
  ui.light.setAttribute("aria-label", summary.text);
  ui.statusText.textContent = summary.text;
  ui.statusModel.textContent = summary.model;
  ui.statusDevice.textContent = summary.device;
  ui.statusMemory.textContent = summary.memory;
  ui.statusError.textContent = summary.errors.join("\n");
  ui.statusError.hidden = !summary.errors.length;
  ui.light.title = ui.statusError.textContent || summary.text; // the error on hover, too
  ui.banner.textContent = summary.demo || "";
  ui.banner.hidden = !summary.demo;
}

let healthTimer = null;

/** Poll /api/health now and then every few seconds; calling it early just restarts the cycle. */
async function refreshHealth() {
  clearTimeout(healthTimer);
  try {
    // 503 still carries the report: the full one for an admin (or in open mode), else the status only.
    const response = await fetch("/api/health", { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = await response.json();
    state.health = body && (Array.isArray(body.workers) || body.status) ? body : null;
  } catch {
    state.health = null;
  }
  showHealth(state.health);
  if (state.health && !state.health.workers && (access.keyId || !access.required)) loadModelCard();
  clearTimeout(healthTimer); // an overlapping call may have armed one meanwhile: keep a single cycle
  healthTimer = setTimeout(refreshHealth, HEALTH_INTERVAL_MS);
}

// ---------------------------------------------------------------- image attachment

function showImageError(message) {
  ui.imageError.textContent = message;
  ui.imageError.hidden = !message;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function acceptImageFile(file) {
  showImageError("");
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showImageError(`不是图片 "${file.name}" is not an image.`);
    return;
  }
  if (file.size > LIMITS.maxImageBytes) {
    showImageError(`图片太大 Image too large: ${megabytes(file.size)} MB; the limit is ${megabytes(LIMITS.maxImageBytes)} MB.`);
    return;
  }
  let dataUrl;
  try {
    dataUrl = await readAsDataUrl(file);
    // Browsers read every format the server accepts, so a file they cannot decode is refused here,
    // before it is sent (the server would answer invalid_image).
    const probe = new Image();
    probe.src = dataUrl;
    await probe.decode();
  } catch {
    showImageError(`无法读取 "${file.name}" is not a readable PNG, JPEG, BMP, WEBP or GIF image.`);
    return;
  }
  setImage({ dataUrl, name: file.name || "pasted image", size: file.size });
}

function setImage(image) {
  state.image = image;
  ui.previewImage.src = image.dataUrl;
  ui.previewName.textContent = `${image.name} · ${megabytes(image.size)} MB`;
  ui.preview.hidden = false;
  ui.chooseImage.hidden = true;
}

function clearImage() {
  state.image = null;
  ui.imageInput.value = ""; // so choosing the same file again still fires "change"
  ui.previewImage.removeAttribute("src");
  ui.preview.hidden = true;
  ui.chooseImage.hidden = false;
}

function setUpImageInputs() {
  ui.chooseImage.addEventListener("click", () => ui.imageInput.click());
  ui.imageInput.addEventListener("change", () => acceptImageFile(ui.imageInput.files[0]));
  ui.removeImage.addEventListener("click", () => {
    clearImage();
    showImageError("");
  });
  for (const target of [ui.sidebar, ui.chat]) {
    const zone = target === ui.sidebar ? $("dropzone") : ui.chat;
    target.addEventListener("dragover", (e) => {
      if (![...e.dataTransfer.types].includes("Files")) return;
      e.preventDefault();
      zone.classList.add("dragging");
    });
    target.addEventListener("dragleave", (e) => {
      if (!target.contains(e.relatedTarget)) zone.classList.remove("dragging");
    });
    target.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      acceptImageFile(e.dataTransfer.files[0]);
    });
  }
  // A file dropped anywhere else must not navigate away from the conversation.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return; // ordinary text pastes into the input as usual
    e.preventDefault();
    acceptImageFile(item.getAsFile());
  });
}

// ---------------------------------------------------------------- controls

function updateComposer() {
  const busy = Boolean(state.turn);
  ui.prompt.disabled = busy || state.restoring;
  ui.send.hidden = busy;
  ui.send.disabled = state.restoring;
  ui.stop.hidden = !busy;
  ui.stop.disabled = Boolean(state.turn?.cancelRequested);
  if (!busy && !state.restoring) ui.prompt.focus();
}

function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${ui.prompt.scrollHeight}px`;
}

async function clearHistory() {
  const sessionId = state.sessionId;
  const turn = state.turn;
  if (turn) endTurn(turn, "cancelled"); // the server cancels the session's jobs on DELETE
  if (sessionId) {
    let answer = null;
    try {
      answer = await api(`/api/sessions/${encodeURIComponent(sessionId)}`, { method: "DELETE" });
    } catch {
      /* unreachable server: handled below */
    }
    if (!answer?.ok && answer?.status !== 404) {
      const message = serverMessage(answer?.body, "Could not reach the server to clear the history; try again.");
      addNote(addMessage("assistant").root, "error", message);
      return;
    }
  }
  forgetSession();
  emptyConversation();
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  ui.darkMode.checked = theme === "dark";
}

function setUpSettings() {
  const system = window.matchMedia("(prefers-color-scheme: dark)");
  applyTheme(storage("get", THEME_KEY) || (system.matches ? "dark" : "light"));
  // Until the user picks a theme here, follow the system's.
  system.addEventListener("change", () => {
    if (!storage("get", THEME_KEY)) applyTheme(system.matches ? "dark" : "light");
  });
  ui.darkMode.addEventListener("change", () => {
    const theme = ui.darkMode.checked ? "dark" : "light";
    applyTheme(theme);
    storage("set", THEME_KEY, theme);
  });
  const toggle = (open) => {
    ui.settingsPanel.hidden = !open;
    ui.settingsButton.setAttribute("aria-expanded", String(open));
  };
  ui.settingsButton.addEventListener("click", () => toggle(ui.settingsPanel.hidden));
  document.addEventListener("click", (e) => {
    if (!ui.settingsPanel.hidden && !e.target.closest(".settings")) toggle(false);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !ui.settingsPanel.hidden) {
      toggle(false);
      ui.settingsButton.focus();
    }
  });
}

function setUpControls() {
  ui.maxTokens.max = String(Math.min(Number(ui.maxTokens.max), LIMITS.maxTokens));
  const bindSlider = (input, output, format) => {
    const show = () => { output.textContent = format(Number(input.value)); };
    input.addEventListener("input", show);
    show();
  };
  bindSlider(ui.temperature, ui.temperatureValue, (v) => v.toFixed(1));
  bindSlider(ui.maxTokens, ui.maxTokensValue, (v) => String(v));

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
  ui.clearHistory.addEventListener("click", clearHistory);
}

// ---------------------------------------------------------------- start

/** Signed out, or signed in with another key: start over (no socket or conversation of the old key stays). */
function onKeyChanged(info) {
  if (!chatSocket) return; // the page's first sign-in: it is still starting
  const keyId = info?.signed_in ? info.key?.id : null;
  if (keyId && keyId === state.keyId) return; // the same key again (the sign-in had expired): carry on
  location.reload();
}

setUpSettings();
setUpControls();
setUpImageInputs();
updateComposer();
refreshHealth();
access.onChange(onKeyChanged);
await access.start(); // asks for the key first when the server requires one and this browser has none
state.keyId = access.keyId;
chatSocket = new ChatSocket(wsUrl("/ws/chat"), { onEvent: onChatEvent, onLost: onChatSocketLost,
                                                   checkAccess: () => access.check() });
refreshHealth(); // as this key sees it
restoreSession();
