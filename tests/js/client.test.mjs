// tornado_rt/static/tornado-rt.js under Node's test runner, against real tornado-rt serve processes.
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { test } from "node:test";
import WebSocket from "ws";

import { TornadoRT, connect } from "../../tornado_rt/static/tornado-rt.js";
import { HTTP_URL, Inbox, WS_URL, api, barrier, makeToken, publish, reached, rowsCreated,
  startServer } from "./helpers.mjs";

const LIMIT = { timeout: 30000 }; // a hang fails the test instead of the whole run
const FAST = { WebSocket, minDelay: 20, maxDelay: 200 };

test("the server serves this module at /client/tornado-rt.js", LIMIT, async () => {
  const response = await fetch(new URL("client/tornado-rt.js", HTTP_URL));
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "text/javascript; charset=utf-8");
  assert.equal(response.headers.get("access-control-allow-origin"), "*");
  const file = await readFile(new URL("../../tornado_rt/static/tornado-rt.js", import.meta.url), "utf8");
  assert.equal(await response.text(), file);
});

test("subscribe, on(type), on('message'), webSocketId, unsubscribe", LIMIT, async () => {
  const rt = await connect(WS_URL, { token: makeToken(1), ...FAST });
  try {
    const inbox = new Inbox(rt);
    assert.match(rt.webSocketId, /^[0-9a-f-]{36}$/);
    const added = await rt.subscribe("table", { table_id: 1 });
    assert.deepEqual(added, { type: "page_add", page: "table", parameters: { table_id: 1 } });
    const typed = [];
    rt.on("rows_created", (message) => typed.push(message));
    const answer = await publish({ message: rowsCreated(1) });
    assert.equal(answer.published, 1);
    assert.equal(typeof answer.delivered, "number"); // the server is shared: exact counts in test_delivered.py
    assert.deepEqual(await inbox.next(), rowsCreated(1));
    assert.deepEqual(typed, [rowsCreated(1)]);
    await publish({ message: rowsCreated(2), ignore_web_socket_id: rt.webSocketId }); // not to itself
    await rt.unsubscribe("table", { table_id: 1 });
    assert.deepEqual(rt.pages, []);
    await publish({ message: rowsCreated(3) });
    await barrier(assert, inbox); // neither 2 nor 3 arrived
  } finally {
    rt.close();
  }
});

test("reconnects after a server restart and subscribes again", LIMIT, async () => {
  let server = await startServer();
  const states = [];
  const drops = [];
  const rt = new TornadoRT(server.wsUrl, { token: () => makeToken(1), ...FAST });
  rt.on("state", ({ state, closeCode }) => { states.push(state); if (state === "reconnecting") drops.push(closeCode); });
  try {
    await rt.connect();
    const inbox = new Inbox(rt);
    await rt.subscribe("table", { table_id: 1 });
    const firstId = rt.webSocketId;
    const resubscribed = new Promise((resolve) => rt.on("subscribed", resolve)); // the next page_add
    assert.equal(await server.stop(), 0);
    server = await startServer(server.port);
    await reached(states, "open", 2);
    assert.equal(drops[0], 1001); // the server went away (then attempts failed until it was back)
    assert.notEqual(rt.webSocketId, firstId);
    assert.ok(states.includes("reconnecting"));
    await resubscribed;
    assert.deepEqual(await publish({ message: rowsCreated(7) }, server.base), { published: 1, delivered: 1 }); // fresh server
    assert.deepEqual(await inbox.next(), rowsCreated(7)); // nothing before it, nothing twice
  } finally {
    rt.close();
    await server.stop();
  }
});

test("force disconnect with a fixed token is final", LIMIT, async () => {
  const states = [];
  const rt = new TornadoRT(WS_URL, { token: makeToken(5), ...FAST });
  rt.on("state", ({ state }) => states.push(state));
  const forced = new Promise((resolve) => rt.on("force_disconnect", resolve));
  await rt.connect();
  assert.deepEqual(await api("api/disconnect", { user_ids: [5] }), { disconnected: 1 });
  await forced;
  await reached(states, "closed", 1);
  assert.equal(rt.closeCode, 4003);
  assert.deepEqual(states, ["connecting", "open", "closed"]);
  assert.equal(rt._timer, null); // no reconnect scheduled
  await assert.rejects(rt.subscribe("table", { table_id: 1 }), /closed/); // at once
  assert.equal((await api("api/stats")).connections, 0);
});

test("force disconnect reconnects when the token function gives a new token", LIMIT, async () => {
  const states = [];
  let calls = 0;
  const rt = new TornadoRT(WS_URL, { token: async () => { calls += 1; return makeToken(6); }, ...FAST });
  rt.on("state", ({ state }) => states.push(state));
  try {
    await rt.connect();
    const inbox = new Inbox(rt);
    const firstId = rt.webSocketId;
    await api("api/disconnect", { user_ids: [6] });
    assert.deepEqual(await inbox.next(), { type: "force_disconnect" });
    await reached(states, "open", 2);
    assert.equal(calls, 2);
    assert.notEqual(rt.webSocketId, firstId);
    await publish({ message: { type: "user_data_updated", user_data: { x: 1 } }, to: { user_ids: [6] } });
    assert.deepEqual(await inbox.next(), { type: "user_data_updated", user_data: { x: 1 } });
  } finally {
    rt.close();
  }
});

test("a refused token is final; a token function gets one more chance", LIMIT, async () => {
  const states = [];
  const bad = new TornadoRT(WS_URL, { token: makeToken(1, { secret: "not-the-secret-but-long-enough" }), ...FAST });
  bad.on("state", ({ state }) => states.push(state));
  await assert.rejects(bad.connect(), /refused the token/);
  assert.deepEqual(states, ["connecting", "closed"]);
  assert.equal(bad.closeCode, 4001);

  const tokens = [makeToken(1, { secret: "a-stale-secret-long-enough" }), makeToken(1)];
  const good = new TornadoRT(WS_URL, { token: () => tokens.shift(), ...FAST });
  await good.connect();
  assert.equal(good.connections, 1);
  good.close();

  let calls = 0;
  const alwaysBad = new TornadoRT(WS_URL, {
    token: () => { calls += 1; return makeToken(1, { secret: "always-wrong-secret-long-enough" }); }, ...FAST });
  await assert.rejects(alwaysBad.connect(), /refused the token/);
  assert.equal(calls, 2); // one new token tried, then no loop
  assert.equal(alwaysBad.state, "closed");
});

test("Node without a WebSocket constructor gets a clear error", LIMIT, (t) => {
  if (globalThis.WebSocket) return t.skip("this Node has a global WebSocket");
  assert.throws(() => new TornadoRT(WS_URL, { token: "t", WebSocket: undefined }), /no WebSocket here/);
});

test("recovery hook: positions kept per page (no sockets)", LIMIT, () => {
  const rt = new TornadoRT(WS_URL, { token: "t", WebSocket, positions: true });
  rt._pages.set("table", { page: "table", params: { table_id: 1 } });
  rt._pages.set("row", { page: "row", params: { table_id: 1, row_id: 2 } });
  rt._dispatch(rowsCreated(1)); // no position: nothing kept
  assert.equal(rt.positions.size, 0);
  rt._dispatch({ type: "page_add", page: "table", parameters: { table_id: 1 }, position: { epoch: "e1", offset: 4 } });
  rt._dispatch({ ...rowsCreated(1), position: { epoch: "e1", offset: 5 } });
  assert.deepEqual(rt.positions.get("table"), { epoch: "e1", offset: 5 });
  rt._dispatch({ type: "row_comment", table_id: 1, row_id: 2, position: { epoch: "e2", offset: 9 } });
  assert.deepEqual(rt.positions.get("row"), { epoch: "e2", offset: 9 });
  const failed = [];
  rt.on("recovery_failed", (frame) => failed.push(frame.page));
  rt._dispatch({ type: "page_add", page: "table", parameters: { table_id: 1 }, recovered: false,
    position: { epoch: "e3", offset: 0 } });
  assert.deepEqual(failed, ["table"]);
  assert.deepEqual(rt.positions.get("table"), { epoch: "e3", offset: 0 });
});

test("recovery: resubscribes with since after a reconnect, then recovery_failed after a restart", LIMIT, async () => {
  let server = await startServer();
  const states = [];
  const failed = [];
  let calls = 0;
  // The second token is fetched after the force disconnect, before reconnecting: 3 and 4 are
  // published while the client is away.
  const token = async () => {
    calls += 1;
    if (calls === 2) for (const n of [3, 4]) await publish({ message: rowsCreated(n) }, server.base);
    return makeToken(1);
  };
  const rt = new TornadoRT(server.wsUrl, { token, positions: true, ...FAST });
  rt.on("state", ({ state }) => states.push(state));
  rt.on("recovery_failed", (frame) => failed.push(frame));
  try {
    await rt.connect();
    const inbox = new Inbox(rt);
    const added = await rt.subscribe("table", { table_id: 1 });
    const { epoch } = added.position;
    assert.deepEqual(added, { type: "page_add", page: "table", parameters: { table_id: 1 },
      position: { epoch, offset: 0 } });
    for (const n of [1, 2]) {
      await publish({ message: rowsCreated(n) }, server.base);
      assert.deepEqual(await inbox.next(), { ...rowsCreated(n), position: { epoch, offset: n } });
    }
    await api("api/disconnect", { user_ids: [1] }, server.base);
    assert.deepEqual(await inbox.next(), { type: "force_disconnect" });
    for (const n of [3, 4, 5]) {
      if (n === 5) await publish({ message: rowsCreated(n) }, server.base);
      assert.deepEqual(await inbox.next(), { ...rowsCreated(n), position: { epoch, offset: n } });
    }
    assert.equal(calls, 2);
    assert.deepEqual(failed, []);
    assert.deepEqual([...rt.positions.values()], [{ epoch, offset: 5 }]);

    const recovering = new Promise((resolve) => rt.on("recovery_failed", resolve));
    assert.equal(await server.stop(), 0); // a restart: the in-process history is gone
    server = await startServer(server.port);
    const frame = await recovering;
    assert.equal(frame.recovered, false);
    assert.notEqual(frame.position.epoch, epoch);
    await publish({ message: rowsCreated(6) }, server.base);
    assert.deepEqual(await inbox.next(), { ...rowsCreated(6), position: { epoch: frame.position.epoch, offset: 1 } });
    assert.equal(failed.length, 1);
  } finally {
    rt.close();
    await server.stop();
  }
});

test("presence(page, params) resolves with the presence answer of that page", LIMIT, async () => {
  const server = await startServer(); // its own server: nobody else is on its table 1
  const offline = new TornadoRT(server.wsUrl, { token: makeToken(1), ...FAST });
  assert.equal(await offline.presence("table", { table_id: 1 }), null); // not connected: nothing sent
  const a = await connect(server.wsUrl, { token: makeToken(1), ...FAST });
  const b = await connect(server.wsUrl, { token: makeToken(1), ...FAST });
  try {
    await a.subscribe("table", { table_id: 1 });
    const events = [];
    a.on("presence", (frame) => events.push(frame));
    const first = await a.presence("table", { table_id: 1 });
    assert.deepEqual(first, { type: "presence", page: "table", parameters: { table_id: 1 },
      users: [{ user_id: 1, connections: 1 }], anonymous: 0 });
    assert.deepEqual(events, [first]); // also an ordinary event
    await b.subscribe("table", { table_id: 1 });
    const second = await a.presence("table", { table_id: 1 });
    assert.deepEqual(second.users, [{ user_id: 1, connections: 2 }]);
    await b.unsubscribe("table", { table_id: 1 });
    assert.deepEqual((await a.presence("table", { table_id: 1 })).users, [{ user_id: 1, connections: 1 }]);
  } finally {
    a.close();
    b.close();
    await server.stop();
  }
});
