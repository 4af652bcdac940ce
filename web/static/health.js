// Turn a GET /api/health report into what the status panel shows. Pure: no DOM, easy to reason about.

const gigabytes = (mb) => (mb / 1024).toFixed(1);

/** Return the demo banner's text when a worker serves the demo checkpoint, else null. */
function demoNotice(workers) {
  const demo = workers.find((w) => w.is_demo || /demo/i.test(w.model_label || ""));
  if (!demo) return null;
  const reason = demo.fallback_reason ? ` — ${demo.fallback_reason}` : "";
  return `Demo model: random weights, answers are random text${reason}`;
}

/** Which light to show: busy while anything generates, else ready, error, or grey (nothing usable). */
function lightFor(health, ready, broken, generating) {
  if (health.status === "down") return ["error", "服务异常 Service down"];
  if (generating || ready.some((w) => w.state === "busy")) return ["busy", "生成中 Busy"];
  if (ready.length) return ["ready", "就绪 Ready"];
  // A broken worker beside a working one is a note below the light, not a red light.
  if (broken.length) return ["error", "错误 Worker error"];
  if (health.workers.length) return ["none", "加载模型中 Loading model…"];
  return ["none", "无 worker · No worker running"];
}

/**
 * Summarise a health report (null when the server did not answer) for the status panel:
 * {light: "ready"|"busy"|"error"|"none", text, model, device, memory, errors: [..], demo}.
 */
export function summarizeHealth(health, generating) {
  if (!health) {
    return { light: "none", text: "服务不可达 Server unreachable", model: "", device: "", memory: "", errors: [],
             demo: null };
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
  return {
    light,
    text,
    model: worker ? `模型 Model: ${worker.model_label || worker.model}` : "",
    device: device ? `设备 Device: ${device}${more}` : "",
    memory: used != null && total != null ? `显存 Memory: ${gigabytes(used)} / ${gigabytes(total)} GB` : "",
    errors,
    demo: demoNotice(workers),
  };
}
