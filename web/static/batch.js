// vlgate batch page: collect images (file picker, folder picker, drag and drop), upload them as multipart
// batches, follow progress, and fill the results table (with thumbnails) as items finish; retry the failed
// ones as a new batch; list this browser's past batches. Model answers are untrusted text: everything from
// the server reaches the page through textContent, never innerHTML. auth.js asks for the API key when the
// server requires one; the sign-in cookie then goes with every request.
// Row numbers: "#" counts the files of a run from 1; the downloads' "index" counts a batch's items from 0.

import { Access, isAuthError } from "./auth.js";
import { checkFiles, describeRefusals, formatBytes, fromDrop, serverLimits, Thumbnails } from "./batch_files.js";
import { History, runHref } from "./batch_history.js";

const THEME_KEY = "vlgate.theme"; // the chat page's key (app.js, theme.js)
const CHUNK = 500; // files per server batch: one multipart request stays well inside the server's limits
const POLL_MS = 1000;
const SNIPPET_CHARS = 240;
const STATUS_LABELS = {
  waiting: "待上传 waiting",
  uploading: "上传中 uploading",
  queued: "排队 queued",
  running: "生成中 running",
  succeeded: "成功 succeeded",
  failed: "失败 failed",
  cancelled: "已取消 cancelled",
  skipped: "未上传 not sent",
};

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("batch-form"), dropzone: $("dropzone"), fileInput: $("file-input"), folderInput: $("folder-input"),
  fileSummary: $("file-summary"), fileSample: $("file-sample"), clearFiles: $("clear-files"),
  prompt: $("prompt"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), maxTokensValue: $("max-tokens-value"), formError: $("form-error"),
  schema: $("json-schema"),
  start: $("start-button"), cancel: $("cancel-button"), progress: $("progress"), progressFill: $("progress-fill"),
  progressText: $("progress-text"), downloads: $("downloads"), body: $("results-body"),
  empty: $("results-empty"), banner: $("model-banner"), darkMode: $("dark-mode"),
  main: $("batch-main"), refused: $("file-refused"), table: $("results"), failedOnly: $("failed-only"),
  failedCount: $("failed-count"), retry: $("retry-failed"), history: $("history"), clearHistory: $("clear-history"),
};
const limits = serverLimits(ui.main);
const chunkSize = Math.min(CHUNK, limits.items);

const state = {
  files: [], // [{name, file}] sorted by name
  refused: [], // [{name, file, reason}] not taken: wrong type, empty, too large
  runFiles: [], // the files of the run on screen, by row (none after a reload): thumbnails and retry
  batches: [], // [{id, offset, total, links, counts, status, final}]
  rows: [], // per global index: {tr, cells, status, response, error, expanded}
  total: 0,
  xhr: null, // the upload in flight
  uploadNote: "",
  active: false,
  cancelled: false,
  keyId: null, // the key the page was started with
};
const access = new Access();
const thumbs = new Thumbnails();
let pastRuns = null;

/** A failure the server (or the network) reported, in the API's {code, message} terms. */
class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Call the JSON API (asking for the key again if it is refused); throw ApiError with the server's message. */
async function api(method, url) {
  let response;
  try {
    response = await access.fetch(url, { method, headers: { Accept: "application/json" } });
  } catch (err) {
    throw new ApiError("network_error", `服务器无响应 The server did not answer (${err.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw errorFrom(response.status, body);
  return body;
}

function errorFrom(status, body) {
  const error = body && body.error;
  return error ? new ApiError(error.code, error.message) : new ApiError("http_error", `HTTP ${status}`);
}

// ---- collecting files ----

function addFiles(found) {
  const { accepted, refused } = checkFiles(found, limits);
  const byName = new Map(state.files.map((item) => [item.name, item]));
  for (const item of accepted) byName.set(item.name, item);
  state.files = [...byName.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  state.refused = refused;
  renderFiles();
}

function fromInput(input) {
  // A folder pick gives each file its path inside the folder; that path is the item's name.
  addFiles([...input.files].map((file) => ({ name: file.webkitRelativePath || file.name, file })));
  input.value = "";
}

function renderFiles() {
  const count = state.files.length;
  const bytes = state.files.reduce((sum, item) => sum + item.file.size, 0);
  ui.fileSummary.textContent = count
    ? `${count} 张图片 images · ${formatBytes(bytes)}${count > chunkSize
      ? ` · ${Math.ceil(count / chunkSize)} 批 batches` : ""}`
    : "未选择图片 No images selected";
  ui.refused.replaceChildren(...describeRefusals(state.refused, limits).map((line) => textElement("li", line)));
  ui.fileSample.replaceChildren(...state.files.slice(0, 5).map((item) => textElement("li", item.name)));
  if (count > 5) ui.fileSample.append(textElement("li", `… +${count - 5}`));
  ui.clearFiles.hidden = count === 0;
}

function textElement(tag, text, className) {
  const element = document.createElement(tag);
  element.textContent = text;
  if (className) element.className = className;
  return element;
}

// ---- the results table ----

function ensureRow(index, name) {
  if (state.rows[index]) return state.rows[index];
  const tr = document.createElement("tr");
  const cells = {};
  for (const kind of ["index", "thumb", "name", "status", "response", "error"]) {
    cells[kind] = document.createElement("td");
    cells[kind].className = `col-${kind}`;
    tr.append(cells[kind]);
  }
  cells.index.textContent = String(index + 1); // 1-based, like the file's place in the list
  cells.thumb.append(thumbs.make(state.runFiles[index]?.file, name || ""));
  cells.name.textContent = name || "";
  cells.response.tabIndex = 0;
  cells.response.title = "点击展开 Click to expand";
  const row = { tr, cells, status: null, response: "", error: "", expanded: false };
  cells.response.addEventListener("click", () => toggleResponse(row));
  cells.response.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      toggleResponse(row);
    }
  });
  state.rows[index] = row;
  ui.body.append(tr); // rows are created in index order
  ui.empty.hidden = true;
  return row;
}

function toggleResponse(row) {
  row.expanded = !row.expanded;
  showResponse(row);
}

function showResponse(row) {
  const text = row.response || "";
  const long = text.length > SNIPPET_CHARS;
  row.cells.response.textContent = row.expanded || !long ? text : `${text.slice(0, SNIPPET_CHARS)}…`;
  row.cells.response.classList.toggle("expanded", row.expanded);
}

function setRowStatus(row, status) {
  if (row.status === status) return;
  row.status = status;
  const badge = textElement("span", STATUS_LABELS[status] || status, "badge");
  badge.dataset.status = status;
  row.cells.status.replaceChildren(badge);
  row.tr.dataset.status = status;
}

/** Show one item of a batch's results (BatchItemResult) in its row. */
function showItem(batch, item) {
  const row = ensureRow(batch.offset + item.index, item.name);
  if (item.name && row.cells.name.textContent !== item.name) row.cells.name.textContent = item.name;
  setRowStatus(row, item.status);
  const response = item.response || "";
  if (response !== row.response) {
    row.response = response;
    showResponse(row);
  }
  const error = item.error ? `${item.error.code}: ${item.error.message}` : "";
  if (error !== row.error) {
    row.error = error;
    row.cells.error.textContent = error;
  }
}

// ---- progress ----

function renderProgress() {
  const sum = { queued: 0, running: 0, succeeded: 0, failed: 0, cancelled: 0 };
  for (const batch of state.batches) {
    for (const key of Object.keys(sum)) sum[key] += (batch.counts && batch.counts[key]) || 0;
  }
  const done = sum.succeeded + sum.failed + sum.cancelled;
  const total = Math.max(state.total, 1);
  const percent = Math.floor((100 * done) / total);
  ui.progress.setAttribute("aria-valuenow", String(percent));
  ui.progressFill.style.width = `${percent}%`;
  const parts = [`${done} / ${state.total} 完成 done (${percent}%)`, `成功 succeeded ${sum.succeeded}`,
    `失败 failed ${sum.failed}`];
  if (sum.cancelled) parts.push(`已取消 cancelled ${sum.cancelled}`);
  if (sum.running) parts.push(`生成中 running ${sum.running}`);
  if (state.uploadNote) parts.push(state.uploadNote);
  ui.progressText.textContent = parts.join(" · ");
  renderFailed();
}

/** The failed-only filter's count, and "retry failed" while their files are still selected in this page. */
function renderFailed() {
  const failed = failedRows();
  ui.failedCount.textContent = String(failed.length);
  const retryable = failed.filter((index) => state.runFiles[index]).length;
  ui.retry.hidden = state.active || retryable === 0;
  ui.retry.textContent = `重试失败的 ${retryable} 张 Retry ${retryable} failed`;
}

function failedRows() {
  return state.rows.flatMap((row, index) => (row && row.status === "failed" ? [index] : []));
}

/** Start a new batch of just the failed files, from the files this page still holds. */
function retryFailed() {
  if (state.active) return;
  const files = failedRows().map((index) => state.runFiles[index]).filter(Boolean);
  if (!files.length) return;
  state.files = files;
  state.refused = [];
  renderFiles();
  run(files);
}

function addDownloads(batch, number) {
  const item = document.createElement("li");
  // The table's "#" and a download's "index" differ by the batch's offset and one: say which rows are which.
  const rows = `# ${batch.offset + 1}–${batch.offset + batch.total} = index 0–${batch.total - 1}`;
  item.append(textElement("span", `批次 Batch ${number} `), textElement("code", batch.id), " ",
    textElement("span", `(${rows})`, "rows-note"), " ");
  for (const format of ["csv", "jsonl"]) {
    const url = new URL(batch.links.results, window.location.origin);
    url.searchParams.set("format", format);
    const link = textElement("a", format.toUpperCase());
    link.href = url.pathname + url.search;
    link.download = `${batch.id}.${format}`;
    link.className = `download-${format}`;
    item.append(" ", link);
  }
  ui.downloads.append(item);
}

// ---- running a batch ----

/** Upload one chunk as multipart (text fields first, then the files); resolve with the BatchPublic. */
function uploadChunk(chunk, number, count) {
  const form = new FormData();
  form.append("prompt", ui.prompt.value);
  form.append("temperature", ui.temperature.value);
  form.append("max_tokens", ui.maxTokens.value);
  const format = responseFormat();
  if (format) form.append("response_format", JSON.stringify(format));
  for (const item of chunk) form.append("files", item.file, item.name);
  // XMLHttpRequest rather than fetch: it reports upload progress, which a folder of photos needs.
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    state.xhr = xhr;
    xhr.open("POST", "/api/batches");
    xhr.responseType = "json";
    xhr.upload.onprogress = (event) => {
      const share = event.lengthComputable ? ` ${Math.floor((100 * event.loaded) / event.total)}%` : "";
      state.uploadNote = `上传中 uploading ${number}/${count}${share}`;
      renderProgress();
    };
    xhr.onload = () => (xhr.status === 202 || xhr.status === 200
      ? resolve(xhr.response) : reject(errorFrom(xhr.status, xhr.response)));
    xhr.onerror = () => reject(new ApiError("network_error", "上传失败 The upload failed (network error)"));
    xhr.onabort = () => reject(new ApiError("aborted", "上传已取消 Upload cancelled"));
    xhr.send(form);
  });
}

/** Upload a chunk; a refused key opens the key dialog and the chunk goes again once signed in. */
async function uploadSignedIn(chunk, number, count) {
  for (;;) {
    try {
      return await uploadChunk(chunk, number, count);
    } catch (err) {
      if (!isAuthError(err.code)) throw err;
      state.uploadNote = "";
      renderProgress();
      await access.refused(err.message);
    }
  }
}

/** The response_format for the JSON Schema box: null when empty; throws on text that is not a JSON object. */
function responseFormat() {
  const text = ui.schema.value.trim();
  if (!text) return null;
  const schema = JSON.parse(text);
  if (typeof schema !== "object" || schema === null || Array.isArray(schema)) throw new SyntaxError("not an object");
  return { type: "json_schema", json_schema: { name: "result", schema, strict: true } };
}

function track(body, offset, fresh) {
  const batch = { id: body.batch_id, offset, total: body.total, links: body.links, counts: body.counts,
    status: body.status, final: false, seen: "" };
  state.batches.push(batch);
  addDownloads(batch, state.batches.length);
  const ids = state.batches.map((b) => b.id);
  const url = new URL(runHref(ids), window.location.origin);
  window.history.replaceState(null, "", url.pathname + url.search); // a reload finds the batches again
  if (fresh) pastRuns.remember(ids[0], batch.id, batch.total, ui.prompt.value.trim());
  return batch;
}

function start(event) {
  event.preventDefault();
  run(state.files);
}

async function run(files) {
  if (state.active) return;
  if (!files.length) return showFormError("请先选择图片 Choose some images first.");
  if (!ui.prompt.value.trim()) return showFormError("请输入提示词 Enter a prompt.");
  try {
    responseFormat();
  } catch {
    return showFormError("JSON Schema 不是有效的 JSON 对象 The JSON Schema box must hold a JSON object.");
  }
  showFormError("");
  resetRun(files.length, files);
  files.forEach((item, index) => setRowStatus(ensureRow(index, item.name), "waiting"));
  const polling = pollLoop();
  const chunks = [];
  for (let i = 0; i < files.length; i += chunkSize) chunks.push(files.slice(i, i + chunkSize));
  let offset = 0;
  try {
    for (const [i, chunk] of chunks.entries()) {
      if (state.cancelled) break;
      chunk.forEach((_, j) => setRowStatus(state.rows[offset + j], "uploading"));
      const body = await uploadSignedIn(chunk, i + 1, chunks.length);
      track(body, offset, true);
      chunk.forEach((_, j) => setRowStatus(state.rows[offset + j], "queued"));
      offset += chunk.length;
    }
  } catch (err) {
    if (err.code !== "aborted") showFormError(`${err.code}: ${err.message}`);
  } finally {
    state.xhr = null;
    state.uploadNote = "";
    // Files that never reached the server say so, instead of waiting forever.
    for (let i = offset; i < files.length; i += 1) setRowStatus(state.rows[i], "skipped");
    state.total = offset || files.length;
  }
  await polling;
}

function resetRun(total, files = []) {
  state.batches = [];
  state.rows = [];
  thumbs.clear();
  state.runFiles = files;
  ui.failedOnly.checked = false;
  ui.table.classList.remove("only-failed");
  state.total = total;
  state.cancelled = false;
  state.active = true;
  ui.body.replaceChildren();
  ui.downloads.replaceChildren();
  ui.empty.hidden = false;
  ui.start.disabled = true;
  ui.cancel.hidden = false;
  ui.cancel.disabled = false;
  renderProgress();
}

/** Poll every unfinished batch; fetch its results whenever its counts moved. */
async function pollLoop() {
  for (;;) {
    for (const batch of state.batches.filter((b) => !b.final)) {
      try {
        await refresh(batch);
      } catch (err) {
        showFormError(`${err.code}: ${err.message}`);
      }
    }
    renderProgress();
    if (!state.xhr && state.batches.every((b) => b.final) && (state.batches.length || state.cancelled
        || !ui.formError.hidden)) break;
    await sleep(POLL_MS);
  }
  state.active = false;
  ui.start.disabled = false;
  ui.cancel.hidden = true;
  renderProgress();
  pastRuns.render();
}

async function refresh(batch) {
  const body = await api("GET", batch.links.self);
  batch.counts = body.counts;
  batch.status = body.status;
  const counts = body.counts;
  const moved = [counts.running, counts.succeeded, counts.failed, counts.cancelled].join("/");
  const settled = counts.queued + counts.running === 0;
  if (moved !== batch.seen || settled) {
    const results = await api("GET", `${batch.links.results}?format=json`);
    for (const item of results.results) showItem(batch, item);
    batch.seen = moved;
  }
  batch.final = settled;
}

async function cancel() {
  state.cancelled = true;
  ui.cancel.disabled = true;
  if (state.xhr) state.xhr.abort();
  for (const batch of state.batches.filter((b) => !b.final)) {
    try {
      await api("DELETE", batch.links.self);
    } catch (err) {
      showFormError(`${err.code}: ${err.message}`);
    }
  }
}

/** Reopen the batches named in the address (?batch=…), e.g. after a reload. */
async function resume(ids) {
  resetRun(0);
  let offset = 0;
  for (const id of ids) {
    try {
      const body = await api("GET", `/api/batches/${encodeURIComponent(id)}`);
      track(body, offset, false);
      offset += body.total;
    } catch (err) {
      showFormError(`${id}: ${err.code}: ${err.message}`);
    }
  }
  state.total = offset;
  await pollLoop();
}

function showFormError(message) {
  ui.formError.textContent = message;
  ui.formError.hidden = !message;
}

// ---- model status and theme ----

/** The served model's card from /v1/models (needs the key), or null. */
async function modelCard() {
  try {
    const response = await fetch("/v1/models", { headers: { Accept: "application/json" } });
    return response.ok ? (await response.json()).data?.[0] || null : null;
  } catch {
    return null;
  }
}

function showBanner(note) {
  ui.banner.textContent = note;
  ui.banner.hidden = !note;
}

/** Not an admin: the report is only {status, model_ready}; the model's name comes from /v1/models. */
async function showStatusOnly(health) {
  if (!health.model_ready) return showBanner("模型未加载 The model is not loaded yet.");
  const card = await modelCard();
  showBanner(card?.demo ? `演示模型，回答是随机文本 · ${card.label || card.id} · Demo model: answers are random text.`
    : "");
}

async function showModelStatus() {
  let health;
  try {
    const response = await fetch("/api/health");
    health = await response.json();
  } catch {
    return;
  }
  if (!Array.isArray(health.workers)) return showStatusOnly(health);
  const ready = (health.workers || []).find((w) => w.loaded && w.state !== "error");
  let note = "";
  if (!health.model_ready || !ready) {
    const reasons = (health.workers || []).map((w) => `${w.worker_id}: ${w.error || w.state}`).join("; ");
    note = `模型未加载 The model is not loaded${reasons ? ` (${reasons})` : " (no worker is running)"}.`;
  } else if (ready.is_demo) {
    note = `演示模型，回答是随机文本 · ${ready.model_label || ready.model} · Demo model: answers are random text.`;
  }
  showBanner(note);
}

function setupTheme() {
  ui.darkMode.checked = document.documentElement.dataset.theme === "dark";
  ui.darkMode.addEventListener("change", () => {
    const theme = ui.darkMode.checked ? "dark" : "light";
    document.documentElement.dataset.theme = theme;
    try {
      localStorage.setItem(THEME_KEY, theme);
    } catch {
      // storage disabled: the choice lasts for this page only
    }
  });
}

// ---- wiring ----

function setup() {
  setupTheme();
  const showValue = (input, output) => {
    output.textContent = input.value;
    input.addEventListener("input", () => { output.textContent = input.value; });
  };
  showValue(ui.temperature, ui.temperatureValue);
  showValue(ui.maxTokens, ui.maxTokensValue);
  ui.fileInput.addEventListener("change", () => fromInput(ui.fileInput));
  ui.folderInput.addEventListener("change", () => fromInput(ui.folderInput));
  ui.clearFiles.addEventListener("click", () => {
    state.files = [];
    state.refused = [];
    renderFiles();
  });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      ui.dropzone.classList.add("dragging");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) ui.dropzone.classList.remove("dragging");
  });
  document.addEventListener("drop", async (event) => {
    event.preventDefault();
    ui.dropzone.classList.remove("dragging");
    // Entries must be taken while the event runs; the DataTransfer is emptied afterwards.
    const items = [...(event.dataTransfer.items || [])].filter((item) => item.kind === "file");
    const entries = items.map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
    addFiles(await fromDrop(entries, [...event.dataTransfer.files]));
  });
  ui.form.addEventListener("submit", start);
  ui.cancel.addEventListener("click", cancel);
  ui.retry.addEventListener("click", retryFailed);
  ui.failedOnly.addEventListener("change", () => ui.table.classList.toggle("only-failed", ui.failedOnly.checked));
  pastRuns = new History(ui.history, ui.clearHistory, api);
  window.addEventListener("beforeunload", (event) => {
    if (!state.xhr) return;
    event.preventDefault(); // leaving now would cut the upload short
    event.returnValue = "";
  });
  access.onChange(onKeyChanged);
}

/** Signed out, or signed in with another key: reload, so nothing of the old key's batches stays on screen. */
function onKeyChanged(info) {
  const keyId = info?.signed_in ? info.key?.id : null;
  if (state.keyId === undefined || (keyId && keyId === state.keyId)) return;
  window.location.reload();
}

async function main() {
  setup();
  state.keyId = undefined; // starting: the first sign-in is expected
  await access.start(); // asks for the key first when the server requires one and this browser has none
  state.keyId = access.keyId;
  showModelStatus();
  pastRuns.render();
  const ids = new URLSearchParams(window.location.search).getAll("batch");
  if (ids.length) resume(ids);
}

main();
