// Signing the pages in when the server requires API keys (shared by the chat and batch pages).
// The key is posted once to /api/auth/login, which answers with an HttpOnly, SameSite=Strict cookie: the page
// keeps no copy of the key (no localStorage, no variable after the request), and every later fetch and
// WebSocket of this origin carries the cookie. In open mode (no keys) none of this shows.

const AUTH_CODES = new Set(["missing_api_key", "invalid_api_key", "key_revoked", "key_expired"]);

/** The {code, message} of an error body: /api's and /v1's {"error": {...}}, or a WebSocket error frame. */
export function errorOf(body) {
  const error = body && typeof body.error === "object" && body.error ? body.error : body || {};
  return { code: error.code || body?.code || null, message: error.message || body?.message || null };
}

/** Tell whether an error code means "no usable key" (the server answers these with 401). */
export function isAuthError(code) {
  return AUTH_CODES.has(code);
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    cache: "no-store",
    body: JSON.stringify(body ?? {}),
  });
  return { ok: response.ok, status: response.status, body: await readJson(response) };
}

/** One page's sign-in state: who the cookie stands for, the key dialog, and the sign-out control. */
export class Access {
  constructor() {
    const $ = (id) => document.getElementById(id);
    this.ui = {
      account: $("account"), name: $("account-name"), signIn: $("sign-in-button"), signOut: $("sign-out-button"),
      dialog: $("auth-dialog"), form: $("auth-form"), key: $("auth-key"), error: $("auth-error"),
      submit: $("auth-submit"),
    };
    this.info = null; // the last GET /api/auth/whoami (null: not known yet, e.g. the server is down)
    this.waiters = []; // resolved when the next sign-in succeeds
    this.listeners = [];
    this.ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.login();
    });
    this.ui.signIn.addEventListener("click", () => this.ask(null));
    this.ui.signOut.addEventListener("click", () => this.logout());
  }

  /** Call `listener(info, previousKeyId)` after every sign-in and sign-out. */
  onChange(listener) {
    this.listeners.push(listener);
  }

  get required() {
    return this.info?.auth === "required";
  }

  get keyId() {
    return this.info?.signed_in ? this.info.key?.id ?? null : null;
  }

  /** Learn whether keys are required; if so and this browser is not signed in, ask until it is. */
  async start() {
    await this.refresh();
    if (this.required && !this.info.signed_in) await this.ask(await this.reason());
  }

  async refresh() {
    try {
      const response = await fetch("/api/auth/whoami", { headers: { Accept: "application/json" }, cache: "no-store" });
      const body = await readJson(response);
      if (response.ok && body) this.info = body;
    } catch {
      /* unreachable: keep what we knew; the pages say the server is down */
    }
    this.render();
  }

  /**
   * Why a signed-out browser is refused, in the server's words (revoked, expired, sign-in ended), or null
   * when it simply never signed in. whoami cannot say (it answers anyone), so ask a route that needs a key.
   */
  async reason() {
    try {
      const response = await fetch("/v1/models", { headers: { Accept: "application/json" }, cache: "no-store" });
      if (response.status !== 401) return null;
      const { code, message } = errorOf(await readJson(response));
      return code === "missing_api_key" ? null : message;
    } catch {
      return null;
    }
  }

  /**
   * A request or socket was refused for its key: say why and ask for a key. Resolves once signed in again
   * (callers then retry what was refused).
   */
  refused(message) {
    this.info = { ...this.info, auth: "required", signed_in: false, key: null };
    this.render();
    return this.ask(message);
  }

  /**
   * A WebSocket closed before it opened. Browsers hide the handshake's HTTP status, so ask the server:
   * resolve true once a missing or refused key was replaced, false when the key was not the problem.
   */
  async check() {
    await this.refresh();
    if (!this.required || this.info.signed_in) return false;
    await this.ask(await this.reason());
    return true;
  }

  /** fetch() that, when the answer is a 401 for the key, asks for a key and sends the request again. */
  async fetch(url, options = {}) {
    for (;;) {
      const response = await fetch(url, options);
      if (response.status !== 401) return response;
      const { code, message } = errorOf(await readJson(response.clone()));
      if (!isAuthError(code)) return response;
      await this.refused(message);
    }
  }

  /** Show the key dialog (with the reason, if any); resolve when a key is signed in. */
  ask(message) {
    const signedIn = new Promise((resolve) => this.waiters.push(resolve));
    this.showError(message);
    if (!this.ui.dialog.open) {
      this.ui.key.value = "";
      this.ui.dialog.showModal(); // modal: focus moves into it, Escape closes it, the page behind is inert
    }
    this.ui.key.focus();
    return signedIn;
  }

  showError(message) {
    this.ui.error.textContent = message || "";
    this.ui.error.hidden = !message;
    this.ui.key.setAttribute("aria-invalid", String(Boolean(message)));
  }

  async login() {
    const key = this.ui.key.value.trim();
    if (!key) {
      this.showError("请输入密钥 Enter the key (it starts with vlg_).");
      this.ui.key.focus();
      return;
    }
    this.ui.submit.disabled = true;
    let answer;
    try {
      answer = await postJson("/api/auth/login", { key });
    } catch {
      answer = { ok: false, body: { error: { message: "服务器无响应 The server did not answer; try again." } } };
    } finally {
      this.ui.submit.disabled = false;
    }
    if (!answer.ok) {
      const { message } = errorOf(answer.body);
      this.showError(message || `登录失败 Sign-in failed (HTTP ${answer.status}).`);
      this.ui.key.select();
      return;
    }
    this.ui.key.value = ""; // the cookie remembers the key now; the page does not
    this.ui.dialog.close();
    this.changed(answer.body);
    for (const resolve of this.waiters.splice(0)) resolve();
  }

  async logout() {
    let answer = null;
    try {
      answer = await postJson("/api/auth/logout");
    } catch {
      /* the cookie may survive; the server forgets the session when it expires */
    }
    this.changed(answer?.ok ? answer.body : { ...this.info, signed_in: false, key: null });
  }

  changed(info) {
    const previous = this.keyId;
    this.info = info;
    this.render();
    for (const listener of this.listeners) listener(info, previous);
  }

  render() {
    const { account, name, signIn, signOut } = this.ui;
    account.hidden = !this.required; // open mode: nothing to show
    const key = this.info?.signed_in ? this.info.key : null;
    name.textContent = key ? `密钥 Key: ${key.name}${key.prefix ? ` (${key.prefix}…)` : ""}` : "未登录 Not signed in";
    signOut.hidden = !key;
    signIn.hidden = Boolean(key);
  }
}
