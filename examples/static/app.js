// The example's page: a live table over tornado-rt's browser client (no build step, no CDN).
//
// * REST (the example app) loads and changes rows; each change is sent with the WebSocketId
//   header, so the server skips this tab's own connection and the page applies the REST answer.
// * tornado-rt delivers everybody else's changes (rows_created / rows_updated / rows_deleted)
//   and who is viewing (the presence extension: the page asks after every subscription, then
//   follows presence_joined / presence_left; names come from the app's GET /api/users).
// * After a drop the client reconnects with backoff and subscribes again with the last position
//   it saw (positions: true, the recovery extension): the changes it missed are replayed. When
//   they are no longer held (recovery_failed: recovered false, e.g. the server restarted) the
//   page refetches the rows.
import { TornadoRT } from "/client/tornado-rt.js";

const TABLE_ID = 1;
const NAME_KEY = "tornado-rt-example-name";
const $ = (id) => document.getElementById(id);

let me = null;        // {id, name}
let token = null;
let rt = null;
const rows = new Map(); // id -> row
let editing = null;   // {id, draft}
let viewers = { users: [], anonymous: 0 }; // the presence answer, kept up to date
const names = new Map(); // user id -> name (GET /api/users)
let loaded = false;   // the rows were fetched once

// --- REST ---------------------------------------------------------------------------------
async function login(name) {
  const r = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name }) });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `sign-in failed (${r.status})`);
  me = body.user;
  token = body.access_token;
  return token;
}

async function api(method, path, body) {
  const headers = { Authorization: "JWT " + token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (rt && rt.webSocketId) headers.WebSocketId = rt.webSocketId; // skip my own connection
  let r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) { // token expired: sign in again once
    await login(me.name);
    headers.Authorization = "JWT " + token;
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  }
  if (r.status === 204) return null;
  const answer = await r.json();
  if (!r.ok) throw new Error(answer.error || `HTTP ${r.status}`);
  return answer;
}

async function refetch() {
  try {
    const list = await api("GET", `/api/tables/${TABLE_ID}/rows`);
    loaded = true;
    rows.clear();
    for (const row of list.results) rows.set(row.id, row);
    renderRows();
    showError("");
  } catch (error) {
    showError("Could not load the table: " + error.message);
  }
}

// --- connection state ---------------------------------------------------------------------
function setState(state) {
  const shown = !navigator.onLine && state !== "connected" ? "offline" : state;
  $("state").dataset.state = shown;
  $("state-text").textContent = shown;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:"; // works behind https
  rt = new TornadoRT(`${scheme}//${location.host}/ws/core/`, {
    token: () => login(me.name), // a fresh token on every (re)connect
    minDelay: 250, maxDelay: 5000,
    positions: true, // recovery: resubscribe with `since` after a drop
  });
  rt.on("state", ({ state }) => {
    setState({ connecting: "connecting", open: "connected", reconnecting: "reconnecting", closed: "offline" }[state] || state);
  });
  rt.on("subscribed", (frame) => {
    if (frame.page !== "table") return;
    if (!loaded) refetch(); // the first load; after a reconnect the missed changes are replayed
    askPresence(); // a new connection: ask again
  });
  rt.on("recovery_failed", (frame) => { if (frame.page === "table") refetch(); }); // missed changes lost
  rt.on("rows_created", (m) => { if (m.table_id === TABLE_ID) for (const row of m.rows) applyRow(row, "added", true); });
  rt.on("rows_updated", (m) => { if (m.table_id === TABLE_ID) for (const row of m.rows) applyRow(row, "changed", true); });
  rt.on("rows_deleted", (m) => { if (m.table_id === TABLE_ID) for (const row of m.rows) removeRow(row, true); });
  rt.on("presence_joined", (m) => { if (m.parameters.table_id === TABLE_ID) viewerJoined(m.user_id); });
  rt.on("presence_left", (m) => { if (m.parameters.table_id === TABLE_ID) viewerLeft(m.user_id); });
  rt.on("force_disconnect", () => showError("The server signed this tab out."));
  rt.subscribe("table", { table_id: TABLE_ID }).catch((error) => showError(error.message));
  rt.connect().catch((error) => showError("Not connected: " + error.message));
}
window.addEventListener("offline", () => setState("offline"));
window.addEventListener("online", () => setState(rt && rt.state === "open" ? "connected" : "reconnecting"));

// --- rows -----------------------------------------------------------------------------------
function applyRow(row, verb, remote) {
  rows.set(row.id, row);
  if (editing && editing.id === row.id && remote) showError(`${row.updated_by} just changed the row you are editing.`);
  renderRows(row.id);
  log(remote ? row.updated_by : "you", verb, row.name);
}

function removeRow(row, remote) {
  rows.delete(row.id);
  if (editing && editing.id === row.id) editing = null;
  renderRows();
  log(remote ? "someone" : "you", "deleted", row.name);
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const child of children) node.append(child);
  return node;
}

function statusSelect(value, onchange) {
  const select = el("select", { onchange });
  for (const s of ["todo", "doing", "done"]) select.append(el("option", { value: s, textContent: s, selected: s === value }));
  return select;
}

function renderRows(flashId = null) {
  const body = $("rows").tBodies[0];
  body.replaceChildren();
  const list = [...rows.values()].sort((a, b) => a.id - b.id);
  for (const row of list) {
    const tr = el("tr", { dataset: { id: row.id } });
    if (row.id === flashId) tr.className = "flash";
    tr.append(el("td", { className: "id", textContent: row.id }));
    if (editing && editing.id === row.id) {
      const d = editing.draft;
      const save = () => saveEdit(row.id);
      const keys = (e) => { if (e.key === "Enter") save(); if (e.key === "Escape") { editing = null; renderRows(); } };
      tr.append(
        el("td", {}, el("input", { className: "edit-name", value: d.name, oninput: (e) => { d.name = e.target.value; }, onkeydown: keys })),
        el("td", {}, statusSelect(d.status, (e) => { d.status = e.target.value; })),
        el("td", {}, el("input", { className: "edit-notes", value: d.notes, oninput: (e) => { d.notes = e.target.value; }, onkeydown: keys })),
        el("td", { className: "by", textContent: row.updated_by }),
        el("td", { className: "act" }, el("button", { className: "save", textContent: "Save", type: "button", onclick: save }),
          el("button", { textContent: "Cancel", type: "button", onclick: () => { editing = null; renderRows(); } })));
    } else {
      tr.append(
        el("td", { className: "name", textContent: row.name, title: row.name }),
        el("td", {}, el("span", { className: "pill " + row.status, textContent: row.status })),
        el("td", { className: "notes", textContent: row.notes, title: row.notes }),
        el("td", { className: "by", textContent: row.updated_by, title: new Date(row.updated_at * 1000).toLocaleString() }),
        el("td", { className: "act" },
          el("button", { className: "edit", textContent: "Edit", type: "button",
            onclick: () => { editing = { id: row.id, draft: { name: row.name, status: row.status, notes: row.notes } }; renderRows(); } }),
          el("button", { className: "del", textContent: "Delete", type: "button", onclick: () => deleteRow(row.id) })));
    }
    body.append(tr);
  }
  $("empty").hidden = list.length > 0;
  const input = body.querySelector(".edit-name");
  if (input && document.activeElement?.tagName !== "INPUT") input.focus();
}

async function addRow(event) {
  event.preventDefault();
  const values = { name: $("add-name").value.trim(), status: $("add-status").value, notes: $("add-notes").value };
  if (!values.name) return;
  try {
    const row = await api("POST", `/api/tables/${TABLE_ID}/rows`, values);
    applyRow(row, "added", false); // the server does not echo it to this tab
    $("add-name").value = ""; $("add-notes").value = ""; $("add-name").focus();
    showError("");
  } catch (error) { showError(error.message); }
}

async function saveEdit(id) {
  const draft = editing.draft;
  try {
    const row = await api("PATCH", `/api/tables/${TABLE_ID}/rows/${id}`, draft);
    editing = null;
    applyRow(row, "changed", false);
    showError("");
  } catch (error) { showError(error.message); }
}

async function deleteRow(id) {
  const row = rows.get(id);
  try {
    await api("DELETE", `/api/tables/${TABLE_ID}/rows/${id}`);
    removeRow(row, false);
    showError("");
  } catch (error) { showError(error.message); }
}

// --- viewers and activity ---------------------------------------------------------------------
const COLORS = ["#2f6fed", "#e0663a", "#1f9d55", "#8a4fd1", "#c98a09", "#d14f8a", "#12849b"];

async function askPresence() {
  const answer = await rt.presence("table", { table_id: TABLE_ID });
  if (answer) setViewers(answer);
}

// The names of these user ids, fetched from the app when one is new to this page.
async function learnNames(ids) {
  if (ids.every((id) => names.has(id))) return;
  try {
    for (const u of (await api("GET", "/api/users")).results) names.set(u.id, u.name);
  } catch (error) {
    showError("Could not load the users' names: " + error.message);
  }
}

function viewerJoined(userId) {
  if (!viewers.users.some((u) => u.user_id === userId)) viewers.users.push({ user_id: userId, connections: 1 });
  setViewers(viewers);
}

function viewerLeft(userId) {
  viewers.users = viewers.users.filter((u) => u.user_id !== userId);
  setViewers(viewers);
}

// The presence answer: {users: [{user_id, connections}], anonymous}, listed by name.
async function setViewers(list) {
  viewers = { users: [...(list.users || [])], anonymous: list.anonymous || 0 };
  await learnNames(viewers.users.map((u) => u.user_id));
  const nameOf = (u) => names.get(u.user_id) || `user ${u.user_id}`;
  const ul = $("viewers");
  ul.replaceChildren();
  for (const u of [...viewers.users].sort((a, b) => nameOf(a).localeCompare(nameOf(b)))) {
    const name = nameOf(u);
    const li = el("li", { dataset: { user: name } },
      el("span", { className: "avatar", textContent: name.slice(0, 1) }),
      el("span", { className: "n", textContent: name, title: name }));
    li.firstChild.style.background = COLORS[u.user_id % COLORS.length];
    if (me && u.user_id === me.id) li.append(el("span", { className: "you", textContent: "(you)" }));
    if (u.connections > 1) li.append(el("span", { className: "you", textContent: `×${u.connections}` }));
    ul.append(li);
  }
  if (viewers.anonymous) ul.append(el("li", { textContent: `+ ${viewers.anonymous} anonymous` }));
}

function log(who, verb, what) {
  const li = el("li", {}, el("b", { textContent: who }), ` ${verb} `, el("span", { textContent: `“${what}”` }));
  li.title = li.textContent;
  $("activity").prepend(li);
  while ($("activity").children.length > 8) $("activity").lastChild.remove();
}

function showError(text) { $("error").textContent = text; }

// --- sign in / out ------------------------------------------------------------------------------
async function start(name) {
  await login(name);
  sessionStorage.setItem(NAME_KEY, me.name); // per tab: two tabs can be two users
  $("sign-in").hidden = true;
  $("board").hidden = false;
  $("me").hidden = false; $("me").textContent = me.name;
  $("sign-out").hidden = false;
  connect();
}

$("sign-in").addEventListener("submit", async (event) => {
  event.preventDefault();
  try { await start($("name").value.trim()); } catch (error) { $("sign-in-error").textContent = error.message; }
});
for (const b of document.querySelectorAll(".quick button")) b.addEventListener("click", () => { $("name").value = b.dataset.name; });
$("sign-out").addEventListener("click", () => { sessionStorage.removeItem(NAME_KEY); if (rt) rt.close(); location.reload(); });
$("add").addEventListener("submit", addRow);

const saved = sessionStorage.getItem(NAME_KEY);
if (saved) start(saved).catch(() => { $("sign-in").hidden = false; });
else $("sign-in").hidden = false;
