"""The live admin view of the standalone server: ``GET /api/stats/live`` and the ``GET /admin`` page.

:class:`RateSampler` keeps the messages published and delivered per second over the last
``seconds`` seconds in a ring buffer. It is off the hot path: a 1 s ``PeriodicCallback`` diffs the
plain counters the server already keeps (:class:`~tornado_rt.server.Counters`); publishing and
delivering pay nothing more for it.

:func:`live_stats` assembles what the admin page shows: the numbers of ``GET /api/stats``, the
subscriptions per page type, the busiest pages, the rates, refusals by kind and reason
(:mod:`tornado_rt.refusals`), closed connections by reason (slow consumers and ping timeouts
among them) and the broker's state.

:data:`ADMIN_PAGE` is a self-contained HTML page (no CDN, no build step, inline SVG chart). The
page itself is public and holds no data; it asks for an API key, keeps it in the tab's
``sessionStorage`` only, and reads ``/api/stats/live`` with it every two seconds.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from tornado.ioloop import PeriodicCallback

from .refusals import REFUSALS, safe_params

#: How many one-second samples the ring buffer holds (the chart's width: five minutes).
HISTORY_SECONDS = 300
#: How many pages ``busiest_pages`` lists.
BUSIEST = 10


class RateSampler:
    """Messages per second, sampled once a second from the server's counters (see the module)."""

    def __init__(self, server: Any, seconds: int = HISTORY_SECONDS, interval: float = 1.0):
        self.server = server
        self.interval = interval
        # (unix time, published in that interval, delivered in that interval)
        self.samples: Deque[Tuple[float, int, int]] = collections.deque(maxlen=seconds)
        self._last: Optional[Tuple[int, int]] = None
        self._timer: Optional[PeriodicCallback] = None

    @property
    def running(self) -> bool:
        return self._timer is not None and self._timer.is_running()

    def start(self) -> None:
        """Start sampling on the current IOLoop (idempotent; call on the loop)."""
        if self.running:
            return
        self._last = self._totals()
        self._timer = PeriodicCallback(self.sample, self.interval * 1000)
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _totals(self) -> Tuple[int, int]:
        counters = self.server.counters
        return sum(counters.published.values()), sum(counters.delivered.values())

    def sample(self) -> None:
        """Record one interval: what was published and delivered since the last sample."""
        now = self._totals()
        last = self._last if self._last is not None else now
        self._last = now
        self.samples.append((round(time.time(), 3), max(0, now[0] - last[0]), max(0, now[1] - last[1])))

    def series(self) -> Dict[str, Any]:
        samples = list(self.samples)
        return {
            "interval": self.interval,
            "times": [s[0] for s in samples],
            "published": [s[1] for s in samples],
            "delivered": [s[2] for s in samples],
        }


def page_stats(hub: Any, busiest: int = BUSIEST) -> Tuple[Dict[str, int], List[Dict[str, Any]]]:
    """Subscriptions per page type and the ``busiest`` pages with the most subscribers.

    One pass over the page groups (not over every subscription): each group's subscribers share
    its page type and parameters, read from any one of them."""
    per_type: Dict[str, int] = {}
    pages: List[Tuple[int, str, Any]] = []
    for group, conns in list(hub.groups.items()):
        if not conns:
            continue
        subscription = None
        for conn in conns:
            subscription = conn.pages.get(group)
            if subscription is not None:
                break
        name = subscription.page if subscription is not None else "?"
        per_type[name] = per_type.get(name, 0) + len(conns)
        pages.append((len(conns), group, subscription))
    pages.sort(key=lambda p: (-p[0], p[1]))
    top = [{"group": group, "page": s.page if s is not None else "?",
            "parameters": safe_params(s.parameters) if s is not None else {}, "subscribers": n}
           for n, group, s in pages[:busiest]]
    return dict(sorted(per_type.items())), top


#: The Redis broker's counters the admin page shows (attributes of RedisBroker).
BROKER_COUNTERS = ("subscriptions", "gaps", "lost", "resets", "snapshots_written", "snapshot_failures")


def broker_details(broker: Any) -> Dict[str, Any]:
    """What the admin page adds to the broker's health: a Redis broker's (redacted) URL and the
    counts it keeps (reader connections, gaps, envelopes lost in them, streams started over,
    snapshot writes and failures)."""
    if not hasattr(broker, "connected") or not hasattr(broker, "url"):
        return {"url": None}
    from .redis_broker import redact_url
    details: Dict[str, Any] = {"url": redact_url(broker.url)}
    for name in BROKER_COUNTERS:
        details[name] = getattr(broker, name, None)
    return details


def live_stats(server: Any, sampler: Optional[RateSampler], started: float,
               broker: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON of ``GET /api/stats/live``; ``broker`` is the broker's health (as ``/healthz``)."""
    per_type, busiest = page_stats(server.hub)
    closed = dict(sorted(server.counters.closed.items()))
    refusals = [{"kind": kind, "reason": reason, "count": n}
                for (kind, reason), n in sorted(REFUSALS.counts().items(), key=lambda kv: (-kv[1], kv[0]))]
    return {
        **server.stats(),
        "time": round(time.time(), 3),
        "uptime": round(time.monotonic() - started, 1),
        "subscriptions_per_page_type": per_type,
        "busiest_pages": busiest,
        "rates": sampler.series() if sampler is not None else {"interval": 1.0, "times": [], "published": [],
                                                                "delivered": []},
        "refusals": refusals,
        "closed": closed,
        "drops": {"slow_consumer": closed.get("slow_consumer", 0), "ping_timeout": closed.get("ping_timeout", 0)},
        "auth_failures": server.counters.auth_failures,
        "connections_opened": server.counters.connections_opened,
        "broker": {**broker, **broker_details(server.broker)},
    }


ADMIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tornado-rt admin</title>
<style>
:root { --bg:#f5f6f8; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#e2e5eb; --accent:#2f6fed;
        --green:#1f9d55; --red:#d64545; --amber:#c98a09; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:16px; padding:14px 24px; background:#1d2330; color:#fff; }
header h1 { font-size:17px; margin:0; font-weight:600; }
header .grow { flex:1; }
header button { background:transparent; color:#cfd6e4; border:1px solid #475066; border-radius:6px; padding:4px 10px; cursor:pointer; }
#status { font-size:13px; color:#cfd6e4; }
#status.bad { color:#ffb3b3; }
main { max-width:1200px; margin:0 auto; padding:20px 24px 40px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(160px,1fr)); gap:12px; }
.card, section { background:var(--card); border:1px solid var(--line); border-radius:10px; }
.card { padding:12px 14px; }
.card .v { font-size:26px; font-weight:650; font-variant-numeric:tabular-nums; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(340px,1fr)); gap:16px; margin-top:16px; }
section { padding:14px 16px; min-width:0; }
section h2 { font-size:13px; margin:0 0 10px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
section.wide { margin-top:16px; }
table { width:100%; border-collapse:collapse; table-layout:fixed; }
td, th { text-align:left; padding:5px 6px; border-bottom:1px solid var(--line); overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
th { font-weight:600; color:var(--muted); font-size:12px; }
td.n, th.n { text-align:right; width:110px; font-variant-numeric:tabular-nums; }
.empty { color:var(--muted); font-style:italic; }
#chart { width:100%; height:180px; display:block; }
.legend { display:flex; gap:16px; font-size:12px; color:var(--muted); margin-top:6px; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px; vertical-align:-1px; }
.pill { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600; }
.ok { background:#e3f5ea; color:var(--green); } .down { background:#fde8e8; color:var(--red); }
.warn td { color:var(--red); font-weight:600; }
#login { max-width:420px; margin:80px auto; background:var(--card); border:1px solid var(--line); border-radius:12px; padding:24px; }
#login h2 { margin:0 0 6px; font-size:18px; }
#login p { color:var(--muted); margin:0 0 16px; }
#login input { width:100%; padding:9px 10px; border:1px solid var(--line); border-radius:8px; font:inherit; }
#login button { margin-top:12px; width:100%; padding:9px; border:0; border-radius:8px; background:var(--accent); color:#fff; font:inherit; font-weight:600; cursor:pointer; }
#login .error { color:var(--red); min-height:1.4em; margin-top:8px; }
[hidden] { display:none !important; }
</style></head>
<body>
<header><h1>tornado-rt admin</h1><span class="grow"></span><span id="status">not signed in</span>
<button id="forget" hidden>forget key</button></header>
<form id="login"><h2>API key</h2>
<p>This page reads <code>/api/stats/live</code> with one of the server's API keys. The key stays in this tab's session storage only.</p>
<input id="key" type="password" autocomplete="off" placeholder="API key" required>
<button type="submit">Show live stats</button><div class="error" id="login-error"></div></form>
<main id="dash" hidden>
<div class="cards">
 <div class="card"><div class="v" id="connections">0</div><div class="k">connections</div></div>
 <div class="card"><div class="v" id="authenticated_users">0</div><div class="k">authenticated users</div></div>
 <div class="card"><div class="v" id="anonymous_connections">0</div><div class="k">anonymous connections</div></div>
 <div class="card"><div class="v" id="subscriptions">0</div><div class="k">subscriptions</div></div>
 <div class="card"><div class="v" id="rate-now">0</div><div class="k">delivered / s</div></div>
 <div class="card"><div class="v" id="messages_published">0</div><div class="k">published (total)</div></div>
</div>
<section class="wide"><h2>Messages per second, last <span id="span">minute</span></h2>
<svg id="chart" viewBox="0 0 600 180" preserveAspectRatio="none" role="img" aria-label="messages per second"></svg>
<div class="legend"><span><i style="background:#2f6fed"></i>delivered</span><span><i style="background:#e08a00"></i>published</span><span id="peak"></span></div>
</section>
<div class="grid">
<section><h2>Subscriptions per page type</h2><table id="types"></table></section>
<section><h2>Busiest pages</h2><table id="busiest"></table></section>
<section><h2>Refusals by reason</h2><table id="refusals"></table></section>
<section><h2>Closed connections by reason</h2><table id="closed"></table></section>
<section><h2>Broker</h2><table id="broker"></table></section>
</div>
</main>
<script>
"use strict";
const KEY = "tornado-rt-admin-key";
const $ = (id) => document.getElementById(id);
let timer = null;

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}
function rows(id, head, list, empty) {
  const body = list.length ? list.map((r) => "<tr" + (r.cls ? ` class="${r.cls}"` : "") + ">" +
      r.cells.map((c, i) => `<td${i === r.cells.length - 1 ? ' class="n"' : ""} title="${esc(c)}">${esc(c)}</td>`).join("") + "</tr>").join("")
    : `<tr><td class="empty" colspan="${head.length}">${esc(empty)}</td></tr>`;
  $(id).innerHTML = "<thead><tr>" + head.map((h, i) => `<th${i === head.length - 1 ? ' class="n"' : ""}>${esc(h)}</th>`).join("") +
    "</tr></thead><tbody>" + body + "</tbody>";
}
// The x axis spans max(60 s, what was sampled): the newest sample on the right edge.
function line(values, max, w, h, span) {
  const n = values.length;
  return values.map((v, i) => `${(w * (1 - (n - 1 - i) / (span - 1))).toFixed(1)},${(h - 8 - (h - 16) * v / max).toFixed(1)}`).join(" ");
}
function chart(rates) {
  const w = 600, h = 180, pub = rates.published, del = rates.delivered;
  const max = Math.max(1, ...pub, ...del);
  const span = Math.max(60, del.length);
  const x0 = (w * (1 - (del.length - 1) / (span - 1))).toFixed(1);
  $("span").textContent = span >= 120 ? `${Math.round(span / 60)} minutes` : `${span} seconds`;
  let svg = "";
  for (const f of [0.25, 0.5, 0.75, 1]) {
    const y = (h - 8 - (h - 16) * f).toFixed(1);
    svg += `<line x1="0" x2="${w}" y1="${y}" y2="${y}" stroke="#e2e5eb" stroke-width="1" vector-effect="non-scaling-stroke"/>`;
  }
  if (del.length) {
    svg += `<polygon points="${x0},${h - 8} ${line(del, max, w, h, span)} ${w},${h - 8}" fill="#2f6fed" fill-opacity="0.12"/>`;
    svg += `<polyline id="published-line" points="${line(pub, max, w, h, span)}" fill="none" stroke="#e08a00" stroke-width="2" stroke-dasharray="5 4" vector-effect="non-scaling-stroke"/>`;
    svg += `<polyline id="delivered-line" points="${line(del, max, w, h, span)}" fill="none" stroke="#2f6fed" stroke-width="2" vector-effect="non-scaling-stroke"/>`;
  }
  $("chart").innerHTML = svg;
  $("chart").dataset.samples = String(del.length);
  $("chart").dataset.peak = String(Math.max(0, ...del, ...pub));
  $("peak").textContent = `peak ${Math.max(0, ...del, ...pub)}/s · ${del.length} s sampled`;
}
function render(s) {
  for (const k of ["connections", "authenticated_users", "anonymous_connections", "subscriptions", "messages_published"]) {
    $(k).textContent = s[k].toLocaleString();
  }
  const del = s.rates.delivered;
  $("rate-now").textContent = (del.length ? del[del.length - 1] : 0).toLocaleString();
  chart(s.rates);
  rows("types", ["page type", "subscribers"], Object.entries(s.subscriptions_per_page_type).map(([k, v]) => ({cells: [k, v]})), "no subscriptions");
  rows("busiest", ["page", "subscribers"], s.busiest_pages.map((p) => ({cells: [p.page + " " +
    Object.entries(p.parameters).map(([k, v]) => `${k}=${v}`).join(" "), p.subscribers]})), "no pages");
  rows("refusals", ["kind", "reason", "count"], s.refusals.map((r) => ({cells: [r.kind, r.reason, r.count]})), "nothing refused");
  rows("closed", ["reason", "count"], Object.entries(s.closed).map(([k, v]) => ({cells: [k, v],
    cls: (k === "slow_consumer" || k === "ping_timeout") ? "warn" : ""})), "no connection closed yet");
  const b = s.broker;
  $("broker").innerHTML = `<tbody><tr><td>kind</td><td class="n" style="width:auto">${esc(b.kind)}</td></tr>` +
    `<tr><td>state</td><td class="n" style="width:auto"><span id="broker-state" class="pill ${b.connected ? "ok" : "down"}">${b.connected ? "connected" : "down"}</span></td></tr>` +
    (b.url ? `<tr><td>url</td><td class="n" style="width:auto">${esc(b.url)}</td></tr>` : "") +
    [["subscriptions", "reader connections"], ["gaps", "gaps"], ["lost", "envelopes lost"], ["resets", "streams started over"],
     ["snapshots_written", "snapshots written"], ["snapshot_failures", "snapshot failures"]].map(([k, label]) =>
      b[k] != null ? `<tr><td>${label}</td><td class="n" style="width:auto">${esc(b[k])}</td></tr>` : "").join("") +
    `<tr><td>uptime</td><td class="n" style="width:auto">${esc(Math.round(s.uptime))} s</td></tr></tbody>`;
}
async function refresh() {
  const key = sessionStorage.getItem(KEY);
  if (!key) return showLogin("");
  let r;
  try {
    r = await fetch("/api/stats/live", {headers: {Authorization: "Bearer " + key}, cache: "no-store"});
  } catch (e) {
    setStatus("server unreachable, retrying", true);
    return schedule();
  }
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    return showLogin("That key was refused (401).");
  }
  if (!r.ok) {
    setStatus(`HTTP ${r.status}, retrying`, true);
    return schedule();
  }
  const s = await r.json();
  $("login").hidden = true; $("dash").hidden = false; $("forget").hidden = false;
  render(s);
  setStatus("live · updated " + new Date(s.time * 1000).toLocaleTimeString(), false);
  schedule();
}
function schedule() { clearTimeout(timer); timer = setTimeout(refresh, 2000); }
function setStatus(text, bad) { $("status").textContent = text; $("status").className = bad ? "bad" : ""; }
function showLogin(error) {
  clearTimeout(timer);
  $("dash").hidden = true; $("forget").hidden = true; $("login").hidden = false;
  $("login-error").textContent = error; setStatus("not signed in", false); $("key").focus();
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  refresh();
});
$("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });
refresh();
</script>
</body></html>
"""
