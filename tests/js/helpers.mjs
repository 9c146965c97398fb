// Helpers of the JS client tests: tokens, the HTTP API, a tornado-rt serve subprocess, and a
// queue of received messages. The server details come from tests/test_js_client.py.
import { spawn } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { createInterface } from "node:readline";

export const SECRET = process.env.RT_SECRET;
export const API_KEY = process.env.RT_API_KEY;
export const WS_URL = process.env.RT_WS_URL;
export const HTTP_URL = process.env.RT_HTTP_URL; // http://127.0.0.1:PORT/
const PYTHON = process.env.RT_PYTHON;
if (!SECRET || !API_KEY || !WS_URL || !HTTP_URL || !PYTHON) {
  throw new Error("run these tests through pytest tests/test_js_client.py (it starts the server)");
}

const b64url = (value) => Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");

export function makeToken(userId, { secret = SECRET, lifetime = 300, ...claims } = {}) {
  const payload = { user_id: userId, exp: Math.floor(Date.now() / 1000) + lifetime, token_type: "access",
    jti: randomUUID(), ...claims };
  const body = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(payload)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

export async function api(path, body, base = HTTP_URL) {
  const response = await fetch(new URL(path, base), {
    method: body === undefined ? "GET" : "POST",
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  if (response.status !== 200) throw new Error(`HTTP ${response.status}: ${JSON.stringify(answer)}`);
  return answer;
}

export const publish = (envelope, base) => api("api/publish", envelope, base);

export function rowsCreated(id, tableId = 1) {
  return { type: "rows_created", table_id: tableId, rows: [{ id }], metadata: {}, before_row_id: null };
}

// Every "message" event of a client, in order; next() waits (bounded) for the following one.
export class Inbox {
  constructor(client) {
    this.items = [];
    this.waiters = [];
    client.on("message", (message) => {
      const waiter = this.waiters.shift();
      if (waiter) waiter(message); else this.items.push(message);
    });
  }

  next(timeout = 10000) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no message in time")), timeout);
      this.waiters.push((message) => { clearTimeout(timer); resolve(message); });
    });
  }
}

// Resolves when the client has entered `state` for the count-th time.
export function reached(states, state, count, timeout = 30000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const check = () => {
      if (states.filter((s) => s === state).length >= count) return resolve();
      if (Date.now() - started > timeout) return reject(new Error(`state ${state} x${count} not reached: ${states}`));
      setTimeout(check, 10); // barrier-ok: bounded polling for a condition
    };
    check();
  });
}

let markers = 0;
// A marker to everybody must be the next message of each inbox: nothing else came before it.
export async function barrier(assert, ...inboxes) {
  const marker = { type: "user_data_updated", user_data: { marker: ++markers } };
  const answer = await publish({ message: marker, to: { all_users: true } });
  assert.equal(answer.published, 1);
  assert.equal(typeof answer.delivered, "number");
  for (const inbox of inboxes) assert.deepEqual(await inbox.next(), marker);
}

// `tornado-rt serve --dev` (directory: user 1 in workspace 1, table 1) as a subprocess.
export async function startServer(port = 0) {
  const child = spawn(PYTHON, ["-m", "tornado_rt", "serve", "--dev", "--port", String(port), "--jwt-secret",
    SECRET, "--api-key", API_KEY], { stdio: ["ignore", "pipe", "ignore"] });
  const lines = createInterface({ input: child.stdout });
  const started = await new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      const match = /^tornado-rt listening: (ws:\/\/\S+)  (http:\/\/\S+)$/.exec(line);
      if (match) resolve({ wsUrl: match[1], base: match[2].replace(/api\/$/, "") });
    });
    child.on("exit", (code) => reject(new Error(`tornado-rt serve exited with ${code} before starting`)));
  });
  const exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
  return {
    ...started,
    port: Number(new URL(started.base).port),
    stop: async () => { child.kill("SIGTERM"); return exited; },
  };
}
