// Generation turns: one question being answered at a time, over /ws/chat or, after a dropped socket or a
// reload, by following the job on /ws/jobs/<id>. A turn never waits silently: when the worker is lost or
// nothing arrives for a while, a note under the answer says so, with the job's real state.

import { t } from "./i18n.js";
import { backoff, parseEvent, RETRY_MIN_MS, wsUrl } from "./socket.js";
import { addNote, scheduleRender, setAnswer } from "./view.js";

const UNFINISHED = ["queued", "running"];
const SILENCE_MS = 30_000; // no event for this long: ask the server about the job and say what it said
const HEALTH_AFTER_TURN_MS = 300;

let ctx = null; // {state, ui, api, socket(), status, serverMessage, onAccepted, onFinished, updateComposer}

export function setUpTurns(context) {
  ctx = context;
}

export function startTurn(view) {
  const turn = { jobId: null, seq: 0, text: "", view, via: "chat", sent: false, cancelRequested: false,
                 request: null, follower: null, heard: Date.now(), watchdog: null, note: null };
  ctx.state.turn = turn;
  turn.watchdog = setInterval(() => checkSilence(turn), 1000);
  ctx.updateComposer();
  ctx.status.show();
  return turn;
}

export function endTurn(turn, status) {
  if (ctx.state.turn !== turn) return false;
  ctx.state.turn = null;
  clearInterval(turn.watchdog);
  closeFollower(turn);
  if (turn.view.pending) cancelAnimationFrame(turn.view.pending);
  turn.note?.remove();
  turn.view.root.dataset.status = status;
  ctx.updateComposer();
  ctx.status.show();
  // The last report probably still says "busy"; the worker reports idle as soon as it is.
  setTimeout(() => ctx.status.refresh(), HEALTH_AFTER_TURN_MS);
  return true;
}

/** Show (or update) the turn's single status note: lost worker, silence, with the job's state. */
function setTurnNote(turn, text) {
  if (!turn.note) turn.note = addNote(turn.view.root, "error turn-note", text);
  else turn.note.textContent = text;
}

async function jobStatus(turn) {
  if (!turn.jobId) return t("connecting");
  try {
    const { ok, status, body } = await ctx.api(`/api/jobs/${encodeURIComponent(turn.jobId)}`);
    if (ok && !UNFINISHED.includes(body.status) && ctx.state.turn === turn) {
      // It ended while we did not hear: show the stored outcome instead of waiting on.
      if (body.status === "failed") failTurn(turn, ctx.serverMessage(body, "The generation failed."));
      else finishTurn(turn, body);
    }
    return ok ? body.status : `HTTP ${status}`;
  } catch {
    return "unknown";
  }
}

async function checkSilence(turn) {
  const quiet = Date.now() - turn.heard;
  if (ctx.state.turn !== turn || quiet < SILENCE_MS || turn.checking) return;
  turn.checking = true;
  const status = await jobStatus(turn);
  turn.checking = false;
  if (ctx.state.turn === turn) setTurnNote(turn, t("silentNote", { s: Math.round(quiet / 1000), status }));
}

/** The status panel found no live worker while this turn waits: say so now, with the job's state. */
export async function workerLost() {
  const turn = ctx.state.turn;
  if (!turn || turn.checking) return;
  turn.checking = true;
  const status = await jobStatus(turn);
  turn.checking = false;
  if (ctx.state.turn === turn) setTurnNote(turn, t("lostNote", { status }));
}

/** Apply one stream event (from /ws/chat or /ws/jobs/<id>) to the turn it belongs to. */
export function applyJobEvent(turn, event) {
  if (event.job_id && event.job_id !== turn.jobId) return; // a stale event from an abandoned turn
  turn.heard = Date.now();
  if (turn.note && event.type === "token") {
    turn.note.remove();
    turn.note = null;
  }
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
      failTurn(turn, ctx.serverMessage(event, "The generation failed."));
      break;
    default:
      break;
  }
}

/** The "Stopped · N tokens · tok/s" line of a finished job (a done event or GET /api/jobs/<id>). */
export function metaLine(job) {
  const parts = [];
  if (job.status === "cancelled") parts.push(t("stopped"));
  if (job.usage?.completion_tokens != null) parts.push(`${job.usage.completion_tokens} tokens`);
  const speed = job.timings?.decode_tokens_per_s;
  if (speed) parts.push(`${speed.toFixed(1)} tok/s`);
  return parts.join(" · ");
}

export function finishTurn(turn, event) {
  const status = event.status === "cancelled" ? "cancelled" : "done";
  if (!endTurn(turn, status)) return;
  const text = event.response ?? turn.text; // the server's final text is authoritative
  if (text) setAnswer(turn.view, text);
  else if (status === "cancelled") turn.view.bubble.hidden = true; // stopped before a word: the note says so
  else turn.view.answer.textContent = t("emptyAnswer");
  const meta = metaLine({ ...event, status });
  if (meta) addNote(turn.view.root, "meta", meta);
  ctx.onFinished(turn);
}

export function failTurn(turn, message) {
  if (!endTurn(turn, "error")) return;
  if (turn.text) setAnswer(turn.view, turn.text);
  else turn.view.bubble.hidden = true; // nothing was written: the error alone says it
  addNote(turn.view.root, "error", message);
  // Refused before it was accepted (image too large, no worker): nothing was stored, so give the
  // user back what they wrote instead of making them type it again.
  if (turn.request && !turn.jobId) ctx.giveBack(turn.request);
}

/** Ask the server to stop; the stream then ends with a "done" whose status is "cancelled". */
export async function stopGeneration() {
  const turn = ctx.state.turn;
  if (!turn || turn.cancelRequested) return;
  turn.cancelRequested = true;
  ctx.ui.stop.disabled = true;
  if (!turn.jobId) return; // sent as soon as the job is accepted
  if (turn.via === "chat" && ctx.socket().trySend({ type: "cancel", job_id: turn.jobId })) return;
  let answer = null;
  try {
    answer = await ctx.api(`/api/jobs/${encodeURIComponent(turn.jobId)}`, { method: "DELETE" });
  } catch {
    /* unreachable server: handled below */
  }
  if (!answer?.ok && ctx.state.turn === turn) {
    turn.cancelRequested = false; // let the user try again
    ctx.updateComposer();
    addNote(turn.view.root, "error", ctx.serverMessage(answer?.body, "Could not reach the server to stop it; try again."));
  }
}

/**
 * Follow a job on /ws/jobs/<id>?after=<seq>: the server sends only what comes after the text already
 * shown (all of it when seq is 0). On an early close, check the job and follow again with backoff.
 */
export function followJob(turn, retryMs = RETRY_MIN_MS) {
  const ws = new WebSocket(wsUrl(`/ws/jobs/${encodeURIComponent(turn.jobId)}?after=${turn.seq}`));
  turn.follower = ws;
  ws.onopen = () => {
    retryMs = RETRY_MIN_MS;
  };
  ws.onmessage = (message) => {
    if (ctx.state.turn === turn) applyJobEvent(turn, parseEvent(message.data));
  };
  ws.onclose = () => {
    if (ctx.state.turn !== turn || turn.follower !== ws) return;
    setTimeout(() => resumeFollowing(turn, ws, backoff(retryMs)), retryMs);
  };
  if (turn.cancelRequested) {
    turn.cancelRequested = false;
    stopGeneration();
  }
}

async function resumeFollowing(turn, oldSocket, retryMs) {
  if (ctx.state.turn !== turn || turn.follower !== oldSocket) return;
  try {
    const { ok, status, body } = await ctx.api(`/api/jobs/${encodeURIComponent(turn.jobId)}`);
    if (status === 404) return failTurn(turn, "This answer's job no longer exists.");
    if (ok && !UNFINISHED.includes(body.status)) {
      if (body.status === "failed") return failTurn(turn, ctx.serverMessage(body, "The generation failed."));
      return finishTurn(turn, body);
    }
  } catch {
    /* the server is down too: keep trying */
  }
  if (ctx.state.turn === turn && turn.follower === oldSocket) followJob(turn, retryMs);
}

export function closeFollower(turn) {
  const ws = turn.follower;
  turn.follower = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
}

/** Leave a turn without stopping its job (switching conversations): the server keeps generating. */
export function detachTurn(turn) {
  if (ctx.state.turn !== turn) return;
  ctx.state.turn = null;
  clearInterval(turn.watchdog);
  closeFollower(turn);
  if (turn.view.pending) cancelAnimationFrame(turn.view.pending);
  ctx.updateComposer();
  ctx.status.show();
}
