// The status panel: polls GET /api/health, shows the light, the model and the demo banner, and tells the
// page when the worker its answer waits on is gone (so the page never shows an endless «thinking»).

import { summarizeHealth, summarizeStatus } from "./health.js";
import { storage } from "./conversations.js";

const HEALTH_INTERVAL_MS = 3000;
const BANNER_KEY = "vlgate.demo_banner_dismissed";

export class StatusPanel {
  /** `generating()` says whether an answer is awaited; `onReport(summary)` hears every report. */
  constructor(ui, { generating, mayReadCard, onReport }) {
    this.ui = ui;
    this.generating = generating;
    this.mayReadCard = mayReadCard;
    this.onReport = onReport;
    this.health = null;
    this.card = null; // GET /v1/models' card: the model's name when the health report is the status-only one
    this.cardLoading = false;
    this.timer = null;
    ui.bannerClose.addEventListener("click", () => {
      storage("set", BANNER_KEY, "1");
      ui.banner.hidden = true;
    });
  }

  /** Read the served model's card once (it needs the key, so only when signed in or open). */
  async loadModelCard() {
    if (this.cardLoading || (this.card?.label && this.health?.model_ready)) return;
    this.cardLoading = true;
    try {
      const response = await fetch("/v1/models", { headers: { Accept: "application/json" }, cache: "no-store" });
      const body = response.ok ? await response.json() : null;
      if (body?.data?.length) this.card = body.data[0];
    } catch {
      /* no name then; the light still works */
    } finally {
      this.cardLoading = false;
    }
    this.show();
  }

  show() {
    const { ui, health } = this;
    const generating = this.generating();
    const summary = health && !Array.isArray(health.workers) ? summarizeStatus(health, this.card, generating)
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
    if (summary.name) ui.title.textContent = document.title = `vlgate · ${summary.name}`; // the model really served
    ui.demoText.textContent = summary.demo || "";
    ui.banner.hidden = !summary.demo || storage("get", BANNER_KEY) === "1";
    this.onReport(summary);
  }

  /** Poll /api/health now and then every few seconds; calling it early just restarts the cycle. */
  async refresh() {
    clearTimeout(this.timer);
    try {
      // 503 still carries the report: the full one for an admin (or in open mode), else the status only.
      const response = await fetch("/api/health", { headers: { Accept: "application/json" }, cache: "no-store" });
      const body = await response.json();
      this.health = body && (Array.isArray(body.workers) || body.status) ? body : null;
    } catch {
      this.health = null;
    }
    this.show();
    if (this.health && !this.health.workers && this.mayReadCard()) this.loadModelCard();
    clearTimeout(this.timer); // an overlapping call may have armed one meanwhile: keep a single cycle
    this.timer = setTimeout(() => this.refresh(), HEALTH_INTERVAL_MS);
  }
}
