// tornado-rt.js: the browser / Node client of tornado-rt (a Baserow-compatible real-time server).
// One dependency-free ES module. Served by `tornado-rt serve` at GET /client/tornado-rt.js.
//
//   import { connect } from "/client/tornado-rt.js";
//   const rt = await connect("wss://rt.example.com/ws/core/", { token: () => getFreshJwt() });
//   rt.on("rows_created", (message) => render(message));
//   await rt.subscribe("table", { table_id: 10 });
//
// Node 20 has no global WebSocket: pass one, e.g. `{ WebSocket: (await import("ws")).default }`.
//
// Reconnects: after any drop (server restart, network, 1001, 4009 ...) the client reconnects with
// jittered exponential backoff (minDelay doubling up to maxDelay, in ms), calling the token
// function again, and subscribes every page again. Close codes 4001 (authentication failed) and
// 4003 (force disconnect) are final unless the token function gives a token that differs from
// the last one (a token fetched after a 4001 that fails too is final: no loop).
//
// Events, `on(type, fn)` (returns a function that removes the listener):
//   "<message type>"  every message of that type ("rows_created", "force_disconnect", ...)
//   "message"         every message (except the authentication answer and the page_add /
//                     page_discard answers to this client's own subscribe / unsubscribe)
//   "state"           { state: "connecting" | "open" | "reconnecting" | "closed", ... }
//   "subscribed"      the page_add answering a subscribe, or a resubscribe after a reconnect
//   "recovery_failed" a page_add with recovered: false (recovery extension): refetch that page
//
// Presence extension: `await rt.presence("table", { table_id: 10 })` asks who is looking at a
// subscribed page and resolves with the `presence` answer (null when none comes within
// subscribeTimeout ms, or when not connected); the connection then receives "presence_joined" /
// "presence_left". Ask again after every "subscribed": a reconnect is a new connection.

const FINAL_CLOSE_CODES = [4001, 4003];

function pageKey(page, params) {
  const sorted = {};
  for (const name of Object.keys(params).sort()) sorted[name] = params[name];
  return page + " " + JSON.stringify(sorted);
}

function matches(sent, echoed) {
  return Object.keys(echoed || {}).every((name) => {
    const value = name in sent ? sent[name] : null;
    return value === echoed[name];
  });
}

export class TornadoRT {
  // url: ws://host:port/ws/core/ ; options: { token (string or function, sync or async),
  // WebSocket, minDelay = 500, maxDelay = 30000, subscribeTimeout = 10000, positions = false }
  constructor(url, options = {}) {
    if (!/^wss?:\/\//.test(url)) throw new TypeError("the URL must look like ws://127.0.0.1:8000/ws/core/");
    const { token, WebSocket: Socket = globalThis.WebSocket, minDelay = 500, maxDelay = 30000,
      subscribeTimeout = 10000, positions = false } = options;
    if (typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("token must be a string or a function returning one");
    }
    if (typeof Socket !== "function") {
      throw new TypeError("no WebSocket here: pass one, e.g. { WebSocket: (await import('ws')).default }");
    }
    this.url = url;
    this.options = { minDelay, maxDelay, subscribeTimeout, positions };
    this._tokenSource = token;
    this._Socket = Socket;
    this.state = "closed";
    this.webSocketId = null;
    this.closeCode = null;
    this.closeReason = null;
    this.connections = 0;
    this.positions = new Map(); // page key -> {epoch, offset} (recovery extension hook)
    this._epochs = new Map(); // epoch -> page key
    this._pages = new Map(); // key -> {page, params}
    this._adding = new Map(); // key -> [resolve functions]
    this._removing = new Map();
    this._listeners = new Map();
    this._socket = null;
    this._timer = null;
    this._closing = false;
    this._attempt = 0;
    this._finals = 0;
    this._retried4001 = false; // the current token was fetched because the previous one got 4001
    this._token = null;
    this._opened = null;
  }

  // Start connecting; resolves once the first connection is open, rejects if the client closes
  // before that (refused token, force disconnect, close()).
  connect() {
    if (!this._opened) {
      this._closing = false;
      this._opened = {};
      this._opened.promise = new Promise((resolve, reject) => {
        this._opened.resolve = resolve;
        this._opened.reject = reject;
      });
      this._setState("connecting", { attempt: 0 });
      this._open(null);
    }
    return this._opened.promise;
  }

  // Subscribe (again after every reconnect); resolves with the page_add, rejects after
  // subscribeTimeout ms without one (unknown page, access denied, parameter missing).
  subscribe(page, params = {}) {
    if (this._finished) return Promise.reject(new Error(`the client is closed (${this.closeReason})`));
    const key = pageKey(page, params);
    this._pages.set(key, { page, params: { ...params } });
    const done = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._forget(key);
        reject(new Error(`no page_add for ${key}: unknown page, access denied, a required parameter missing, or the server is away`));
      }, this.options.subscribeTimeout);
      this._push(this._adding, key, (frame) => { clearTimeout(timer); frame ? resolve(frame) : reject(new Error("closed")); });
    });
    if (this.state === "open") this._sendSubscribe(key);
    return done;
  }

  // Unsubscribe (not subscribed again after a reconnect); resolves on the page_discard.
  unsubscribe(page, params = {}) {
    const key = pageKey(page, params);
    this._forget(key);
    if (this.state !== "open") return Promise.resolve(null);
    const done = new Promise((resolve) => {
      const timer = setTimeout(() => resolve(null), this.options.subscribeTimeout);
      this._push(this._removing, key, (frame) => { clearTimeout(timer); resolve(frame); });
      Object.assign(this._removing.get(key), { page, params: { ...params } });
    });
    this._send({ remove_page: page, ...params });
    return done;
  }

  // Presence extension: who is looking at a subscribed page (see the header).
  presence(page, params = {}) {
    if (this.state !== "open") return Promise.resolve(null);
    const done = new Promise((resolve) => {
      const answer = (frame) => {
        if (frame.page !== page || !matches(params, frame.parameters)) return;
        clearTimeout(timer);
        off();
        resolve(frame);
      };
      const off = this.on("presence", answer);
      const timer = setTimeout(() => { off(); resolve(null); }, this.options.subscribeTimeout);
    });
    this._send({ presence: page, ...params });
    return done;
  }

  get pages() {
    return [...this._pages.values()].map(({ page, params }) => ({ page, params: { ...params } }));
  }

  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const set = this._listeners.get(type);
    if (set) set.delete(fn);
  }

  // Close and stop reconnecting.
  close() {
    this._closing = true;
    clearTimeout(this._timer);
    const socket = this._socket;
    if (socket && socket.readyState <= 1) {
      socket.close(1000);
    } else {
      this._finish(this.closeCode, "closed by the client");
    }
  }

  // --- internals ---------------------------------------------------------------------------
  _emit(type, value) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try { fn(value); } catch (error) { setTimeout(() => { throw error; }); }
    }
  }

  _setState(state, info = {}) {
    this.state = state;
    this._emit("state", { state, ...info });
  }

  _push(map, key, fn) {
    if (!map.has(key)) map.set(key, []);
    map.get(key).push(fn);
  }

  async _fetchToken() {
    const source = this._tokenSource;
    if (typeof source === "string") return source;
    const value = await source();
    if (typeof value !== "string" || !value) throw new TypeError("the token function must return a non-empty string");
    return value;
  }

  async _open(token) {
    if (this._closing) return;
    if (token === null) {
      try {
        token = await this._fetchToken();
      } catch (error) {
        this._retry();
        return;
      }
    }
    if (this._closing) return;
    this._token = token;
    let url = this.url + (this.url.includes("?") ? "&" : "?") + "jwt_token=" + encodeURIComponent(token);
    if (this.options.positions) url += "&positions=1";
    let socket;
    try {
      socket = new this._Socket(url);
    } catch (error) {
      this._retry();
      return;
    }
    this._socket = socket;
    let authenticated = false;
    socket.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(typeof event.data === "string" ? event.data : String(event.data));
      } catch (error) {
        return;
      }
      if (!frame || typeof frame !== "object") return;
      if (frame.type === "authentication" && !authenticated) {
        if (frame.success !== true) return; // 4001 follows
        authenticated = true;
        this.webSocketId = frame.web_socket_id;
        this.connections += 1;
        this._attempt = 0;
        this._retried4001 = false;
        this._setState("open", { webSocketId: this.webSocketId });
        if (this._opened && this._opened.resolve) this._opened.resolve(this);
        for (const key of this._pages.keys()) this._sendSubscribe(key);
        return;
      }
      this._dispatch(frame);
    };
    socket.onerror = () => {}; // the close event follows
    socket.onclose = (event) => this._closed(socket, event.code, event.reason || "", authenticated);
  }

  async _closed(socket, code, reason, authenticated) {
    if (socket !== this._socket) return;
    this._socket = null;
    this.webSocketId = null;
    this.closeCode = code;
    this.closeReason = reason;
    if (this._closing) {
      this._finish(code, "closed by the client");
      return;
    }
    if (FINAL_CLOSE_CODES.includes(code)) {
      let fresh = null;
      if (typeof this._tokenSource === "function" && !(code === 4001 && this._retried4001)) {
        try { fresh = await this._fetchToken(); } catch (error) { fresh = null; }
      }
      if (fresh === null || fresh === this._token) {
        this._finish(code, reason || (code === 4001 ? "authentication failed" : "force disconnect"));
        return;
      }
      this._finals += 1;
      this._retried4001 = code === 4001;
      if (this._finals === 1) {
        this._setState("reconnecting", { attempt: 0, delay: 0, closeCode: code });
        this._open(fresh);
        return;
      }
      this._retry(fresh);
      return;
    }
    this._finals = 0;
    this._retry();
  }

  _retry(token = null) {
    if (this._closing) return;
    const { minDelay, maxDelay } = this.options;
    const exponent = Math.max(this._attempt, this._finals - 1);
    const delay = (0.5 + Math.random() / 2) * Math.min(maxDelay, minDelay * 2 ** exponent);
    this._attempt += 1;
    this._setState("reconnecting", { attempt: this._attempt, delay, closeCode: this.closeCode });
    this._timer = setTimeout(() => this._open(token), delay);
  }

  _finish(code, reason) {
    if (this.state === "closed" && this._finished) return;
    this._finished = true;
    this._socket = null;
    this.webSocketId = null;
    this.closeCode = code;
    this.closeReason = reason;
    this._setState("closed", { closeCode: code, reason });
    if (this._opened && this._opened.reject) {
      const error = new Error(code === 4001 ? "the server refused the token (close 4001)" : `closed before opening: ${reason}`);
      error.code = code;
      const { reject } = this._opened;
      this._opened.resolve = this._opened.reject = null;
      reject(error);
    }
    for (const map of [this._adding, this._removing]) {
      for (const fns of map.values()) for (const fn of fns) fn(null);
      map.clear();
    }
  }

  _send(frame) {
    const socket = this._socket;
    if (socket && socket.readyState === 1) socket.send(JSON.stringify(frame));
  }

  _sendSubscribe(key) {
    const entry = this._pages.get(key);
    if (!entry) return;
    const frame = { page: entry.page, ...entry.params };
    const since = this.options.positions ? this.positions.get(key) : undefined;
    if (since) frame.since = since;
    this._send(frame);
  }

  _find(page, params) {
    for (const [key, entry] of this._pages) {
      if (entry.page === page && matches(entry.params, params)) return key;
    }
    return null;
  }

  // Recovery hook: the page of a message with a position is found by its epoch (learned from
  // page_add), else by the page's parameters in the message (the most specific page wins), else
  // when only one page is subscribed.
  _keepPosition(frame) {
    const position = frame.position;
    if (!position || typeof position.epoch !== "string" || !Number.isInteger(position.offset)) return;
    let key = this._epochs.get(position.epoch) ?? null;
    if (key === null) {
      let best = [];
      let most = 0;
      for (const [candidate, { params }] of this._pages) {
        const names = Object.keys(params);
        if (!names.length || !names.every((name) => frame[name] === params[name])) continue;
        if (names.length > most) { best = [candidate]; most = names.length; } else if (names.length === most) best.push(candidate);
      }
      if (best.length === 1) key = best[0];
      else if (this._pages.size === 1) key = this._pages.keys().next().value;
      if (key === null) return;
      this._epochs.set(position.epoch, key);
    }
    this.positions.set(key, { epoch: position.epoch, offset: position.offset });
  }

  _forget(key) {
    this._pages.delete(key);
    this.positions.delete(key);
  }

  _dispatch(frame) {
    if ((frame.type === "page_add" || frame.type === "page_discard") && typeof frame.page === "string") {
      const params = frame.parameters && typeof frame.parameters === "object" ? frame.parameters : {};
      const key = this._find(frame.page, params);
      if (frame.type === "page_add" && key !== null) {
        const position = frame.position;
        if (position && typeof position.epoch === "string" && Number.isInteger(position.offset)) {
          this.positions.set(key, { epoch: position.epoch, offset: position.offset });
          this._epochs.set(position.epoch, key);
        }
        const waiting = this._adding.get(key) || [];
        this._adding.delete(key);
        for (const fn of waiting) fn(frame);
        this._emit("subscribed", frame);
        if (frame.recovered === false) this._emit("recovery_failed", frame);
        return;
      }
      if (frame.type === "page_add") return; // only ever an answer to this client: a page unsubscribed meanwhile
      if (frame.type === "page_discard") {
        for (const [removed, fns] of this._removing) {
          if (fns.page === frame.page && matches(fns.params, params)) {
            this._removing.delete(removed);
            for (const fn of fns) fn(frame);
            return;
          }
        }
        if (key !== null) this._forget(key); // revoked by the server: not subscribed again
      }
    }
    if (this.options.positions) this._keepPosition(frame);
    this._emit("message", frame);
    if (typeof frame.type === "string" && !["message", "state", "subscribed", "recovery_failed"].includes(frame.type)) {
      this._emit(frame.type, frame);
    }
  }
}

// Create a client and wait for its first connection.
export function connect(url, options) {
  const client = new TornadoRT(url, options);
  return client.connect().then(() => client);
}

export default TornadoRT;
