// WebSocket plumbing: the URL of an endpoint, event parsing, and the long-lived /ws/chat connection.

const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 10000;
const SEND_TIMEOUT_MS = 5000;

export function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
}

export function parseEvent(data) {
  try {
    return JSON.parse(data);
  } catch {
    return { type: "invalid" };
  }
}

/** The next wait before reconnecting: doubled each time, capped, with jitter so tabs do not stampede. */
export function backoff(ms) {
  return Math.min(ms * 2, RETRY_MAX_MS) * (0.8 + Math.random() * 0.4);
}

export { RETRY_MIN_MS };

/**
 * One socket for every chat turn, reconnected with backoff whenever it closes.
 *
 * `checkAccess` (optional) is asked after a socket closes without ever opening: a server that refuses the
 * key answers the handshake with HTTP 401, which browsers report as a bare close. It resolves true once a
 * refused key was replaced (reconnect at once), false when the key was not the problem (back off as usual).
 */
export class ChatSocket {
  constructor(url, { onEvent, onLost, checkAccess = null }) {
    this.url = url;
    this.onEvent = onEvent;
    this.onLost = onLost; // called when an open (or opening) socket closes
    this.checkAccess = checkAccess;
    this.checking = false;
    this.ws = null;
    this.retryMs = RETRY_MIN_MS;
    this.retryTimer = null;
    this.waiters = [];
    this.connect();
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const ws = new WebSocket(this.url);
    let opened = false;
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this.retryMs = RETRY_MIN_MS;
      for (const resolve of this.waiters.splice(0)) resolve();
    };
    ws.onmessage = (message) => this.onEvent(parseEvent(message.data));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onLost();
      this.retry(opened);
    };
  }

  async retry(opened) {
    if (!opened && this.checkAccess && !this.checking) {
      this.checking = true;
      let replaced = false;
      try {
        replaced = await this.checkAccess();
      } catch {
        /* could not tell: retry as after any other failure */
      } finally {
        this.checking = false;
      }
      if (this.ws || this.retryTimer) return; // restarted meanwhile
      if (replaced) return this.connect();
    }
    this.retryTimer = setTimeout(() => this.connect(), this.retryMs);
    this.retryMs = backoff(this.retryMs);
  }

  /** Drop the current socket and open a new one now (the key it was opened with changed). */
  restart() {
    if (this.checking) return; // it reconnects by itself once the key question is settled
    const ws = this.ws;
    this.ws = null;
    ws?.close();
    this.connect();
  }

  isOpen() {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  /** Send now if connected; return whether it was sent. */
  trySend(message) {
    if (!this.isOpen()) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Send, waiting briefly for the connection first; rejects if it does not open in time, or if
   * `stillWanted()` says the message is no longer wanted by the time it has.
   */
  async send(message, stillWanted = () => true) {
    if (!this.isOpen()) {
      if (this.retryTimer) this.connect(); // someone is waiting: do not sit out the backoff
      await new Promise((resolve, reject) => {
        this.waiters.push(resolve);
        setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== resolve);
          reject(new Error("the chat connection did not open"));
        }, SEND_TIMEOUT_MS);
      });
    }
    if (!stillWanted()) throw new Error("no longer wanted");
    if (!this.trySend(message)) throw new Error("the chat connection closed");
  }
}
