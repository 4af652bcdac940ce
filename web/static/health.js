// Turn a GET /api/health report into what the status panel shows. Pure: no DOM, easy to reason about.

import { t } from "./i18n.js";

const gigabytes = (mb) => (mb / 1024).toFixed(1);

/** Return the demo banner's text when a worker serves the demo checkpoint, else null (no raw exception). */
function demoNotice(workers) {
  return workers.some((w) => w.is_demo || /demo/i.test(w.model_label || "")) ? t("demo") : null;
}

/**
 * Which light to show. While this page waits for an answer and no worker is alive, the worker was lost:
 * a frozen or killed worker drops out of the report once its liveness mark lapses (a few seconds).
 */
function lightFor(health, ready, broken, generating) {
  if (health.status === "down") return ["error", t("down")];
  if (generating && !health.workers.length) return ["error", t("workerLost")];
  if (generating || ready.some((w) => w.state === "busy")) return ["busy", t("busy")];
  if (ready.length) return ["ready", t("ready")];
  // A broken worker beside a working one is a note below the light, not a red light.
  if (broken.length) return ["error", t("workerError")];
  if (health.workers.length) return ["none", t("loading")];
  return ["none", t("noWorker")];
}

/**
 * Summarise a health report (null when the server did not answer) for the status panel:
 * {light: "ready"|"busy"|"error"|"none", text, model, device, memory, errors: [..], demo, lost}.
 */
export function summarizeHealth(health, generating) {
  if (!health) {
    return { light: "none", text: t("unreachable"), model: "", device: "", memory: "", errors: [], demo: null,
             lost: false };
  }
  const workers = health.workers;
  const ready = workers.filter((w) => w.loaded && w.state !== "error");
  const broken = workers.filter((w) => w.state === "error");
  const errors = broken.map((w) => `${w.worker_id}: ${w.error || "error"}`);
  for (const [name, check] of [["Database", health.database], ["Redis", health.redis]]) {
    if (check && !check.ok) errors.push(`${name}: ${check.error || "unavailable"}`);
  }
  const [light, text] = lightFor(health, ready, broken, generating);
  const worker = ready[0] || broken[0] || workers[0]; // the one whose details are shown
  const more = workers.length > 1 ? ` (+${workers.length - 1})` : "";
  const device = worker?.gpu_name || worker?.device;
  const used = worker?.memory_used_mb;
  const total = worker?.memory_total_mb;
  const reason = workers.find((w) => w.is_demo)?.fallback_reason;
  return {
    light,
    text,
    name: worker ? worker.model_label || worker.model : "",
    model: worker ? `${t("model")}: ${worker.model_label || worker.model}` : "",
    device: device ? `${t("device")}: ${device}${more}` : "",
    memory: used != null && total != null ? `${t("memory")}: ${gigabytes(used)} / ${gigabytes(total)} GB` : "",
    errors: reason ? [...errors, reason] : errors,
    demo: demoNotice(workers),
    lost: generating && !workers.length && health.status !== "down",
  };
}

/** Without an admin key the report is only {status, model_ready}: the light from those, the name from /v1. */
export function summarizeStatus(health, card, generating) {
  const down = health.status === "down";
  const [light, text] = down ? ["error", t("down")]
    : !health.model_ready ? [generating ? "error" : "none", generating ? t("workerLost") : t("notReady")]
    : generating ? ["busy", t("busy")] : ["ready", t("ready")];
  const name = card?.label || card?.id || "";
  return { light, text, name, model: name ? `${t("model")}: ${name}` : "", device: "", memory: "", errors: [],
           demo: card?.demo ? t("demo") : null, lost: generating && !down && !health.model_ready };
}
