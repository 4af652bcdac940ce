// Past batches of this browser: each run (one or more server batches) is remembered in localStorage and
// listed with its live status from GET /api/batches/<id>, a link that reopens it and its downloads.
// The list is the browser's, not the key's: a batch of another key (or a deleted one) shows as unavailable.

const STORAGE_KEY = "vlgate.batch-history";
const KEEP = 30; // runs remembered
const SHOWN_CHARS = 80;
const STATUS_LABELS = {
  queued: "排队 queued", running: "运行中 running", completed: "完成 completed",
  cancelled: "已取消 cancelled", unavailable: "不可用 unavailable",
};

function load() {
  try {
    const runs = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
    return Array.isArray(runs) ? runs.filter((run) => run && Array.isArray(run.ids) && run.ids.length) : [];
  } catch {
    return [];
  }
}

function save(runs) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(runs.slice(0, KEEP)));
  } catch {
    // storage disabled or full: the list lasts for this page only
  }
}

/** The address that reopens a run's batches on this page. */
export function runHref(ids) {
  return `/batch?${new URLSearchParams(ids.map((id) => ["batch", id]))}`;
}

export class History {
  /** ``api(method, url)`` is the page's JSON caller (it asks for the key when refused). */
  constructor(list, clearButton, api) {
    this.list = list;
    this.clearButton = clearButton;
    this.api = api;
    clearButton.addEventListener("click", () => {
      save([]);
      this.render();
    });
  }

  /** Remember a run's batch ids (the first id names the run; later chunks are added to it). */
  remember(runId, batchId, total, prompt) {
    const runs = load();
    let run = runs.find((r) => r.ids[0] === runId);
    if (!run) {
      run = { ids: [], total: 0, prompt: prompt.slice(0, SHOWN_CHARS), created: new Date().toISOString() };
      runs.unshift(run);
    }
    if (!run.ids.includes(batchId)) {
      run.ids.push(batchId);
      run.total += total;
    }
    save(runs);
  }

  /** Draw the list, then fill in each run's status from the server. */
  async render() {
    const runs = load();
    this.clearButton.hidden = runs.length === 0;
    const rows = runs.map((run) => this.row(run));
    this.list.replaceChildren(...rows.map((row) => row.li));
    if (!runs.length) this.list.append(text("li", "还没有批次 No batches yet", "empty"));
    await Promise.all(rows.map((row) => this.fill(row)));
  }

  row(run) {
    const li = document.createElement("li");
    li.className = "history-item";
    li.dataset.batch = run.ids[0];
    const link = text("a", run.prompt || run.ids[0], "history-open");
    link.href = runHref(run.ids);
    const when = new Date(run.created);
    const meta = text("span", `${Number.isNaN(when.getTime()) ? "" : when.toLocaleString()} · ${run.total} 张 images`,
      "history-meta");
    const status = text("span", "…", "badge history-status");
    const downloads = text("span", "", "history-downloads");
    run.ids.forEach((id, n) => {
      const csv = text("a", run.ids.length > 1 ? `CSV ${n + 1}` : "CSV");
      csv.href = `/api/batches/${encodeURIComponent(id)}/results?format=csv`;
      csv.download = `${id}.csv`;
      downloads.append(csv, " ");
    });
    li.append(link, meta, status, downloads);
    return { li, run, status };
  }

  async fill(row) {
    const counts = { succeeded: 0, failed: 0, cancelled: 0, queued: 0, running: 0 };
    const states = [];
    for (const id of row.run.ids) {
      try {
        const batch = await this.api("GET", `/api/batches/${encodeURIComponent(id)}`);
        states.push(batch.status);
        for (const key of Object.keys(counts)) counts[key] += batch.counts?.[key] || 0;
      } catch {
        states.push("unavailable"); // deleted, expired, or another key's
      }
    }
    const status = ["unavailable", "running", "queued", "cancelled"].find((s) => states.includes(s)) || "completed";
    row.status.dataset.status = status;
    row.li.dataset.status = status;
    const detail = status === "unavailable" ? "" : ` · ✓${counts.succeeded} ✗${counts.failed}`;
    row.status.textContent = `${STATUS_LABELS[status] || status}${detail}`;
  }
}

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value;
  if (className) element.className = className;
  return element;
}
