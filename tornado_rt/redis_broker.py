"""A broker over Redis Streams, so that several tornado-rt processes (and machines) act as one.

Install the extra: ``pip install tornado-rt[redis]`` (``redis`` with ``hiredis``). Then::

    from tornado_rt.redis_broker import RedisBroker
    server = RealtimeServer(settings, broker=RedisBroker("redis://127.0.0.1:6379/0"))
    await server.start()          # connects and finds its read position before the first publish

or ``tornado-rt serve --broker redis://127.0.0.1:6379/0`` (``TORNADO_RT_BROKER``).
``docs/redis.md`` explains the design, the guarantees and the measurements; in short:

Streams
    The **control stream** (``<channel_prefix>:stream``) carries every envelope that every
    process must see — directory changes, disconnect, revoke, presence, messages to users,
    workspaces or everyone, and page messages whose type has a side effect — in one total order,
    with the ids ``<n>-0`` where ``n`` grows by exactly one per entry, so a reader knows when it
    missed some. A **plain page message** (one page group, a type without side effect) goes only
    to the **inbox** (``<channel_prefix>:inbox:<process id>``) of each process registered for its
    page group (hash ``<channel_prefix>:g:<group>``, fields: process ids; the script reads them
    from its summary key ``<channel_prefix>:r:<group>``, one ``MGET`` per call), or nowhere when none is:
    a process reads only what it has recipients for. The publisher's own inbox gets a reference
    to its envelope (its sequence number), not the bytes: it delivers the envelope it kept when
    its reader reaches the reference, at that place in the order. Publishing goes through one Lua script per
    batch (``EVALSHA``): it reads Redis's clock once, refuses each envelope whose deadline has
    passed, appends control envelopes to the control stream (fields ``t``: Redis time in ms,
    ``e``: the envelope; the first entry of a new stream also has ``r``: the highest entry id its
    publisher knew of) and, per inbox, the page messages between two control entries as one entry
    with the id ``<n>-<k>`` (``n``: the control stream's last sequence number, ``k`` > 0) and the
    field ``c`` (+1 per entry of that inbox: exact gaps); then it trims every stream it wrote to
    (``XTRIM MAXLEN ~``, about ``stream_length`` envelopes).

Registration
    The first local subscriber of a page group makes this process register it (``HSET``); its
    ``page_add`` is sent once Redis acknowledged (``Hub.ready``), so a message published after a
    client saw ``page_add`` reaches this process. The last one leaving unregisters it after
    ``UNREGISTER_DELAY``. The alive key ``<prefix>:alive:<process id>`` (TTL: the server's
    ``presence_ttl``) is refreshed every third of it; any process sweeps the registrations and
    inbox (and its mirror in ``<prefix>:itops``) of processes whose alive key expired; a process
    that stops removes its own. Routing is
    on while the key ``<prefix>:routing`` holds a time that has passed; when Redis lost its data
    (no routing key) every envelope goes on the control stream until the processes registered
    their groups again.

Reading
    Every process reads the control stream and its inbox from its own positions with one
    ``XREAD COUNT .. STREAMS <control> <inbox>`` per round trip and merges the two by id (see
    :func:`merge_replies`), so a process that stalls (a long GC, SIGSTOP, a slow loop) resumes
    exactly where it stopped: nothing is pushed at it. A lost connection also resumes where it
    stopped. A blocking read answered with inbox entries alone, none after the control entry
    read last, is delivered at once (one ``XREAD`` per publish batch of page messages; see
    :meth:`RedisBroker._read`).

Gaps
    When the next entry of the control stream is not ``position + 1`` (or the next entry of the
    inbox not ``c + 1``) the envelopes in between were trimmed before this process read them (it
    was more than ``stream_length`` entries behind): a **gap**. When the
    stream starts over (Redis restarted without persistence, ``FLUSHALL``, the key deleted) and
    this process had not read everything before (its position is below ``r``, or its last read
    did not reach the end of the stream), that is a gap too. A gap is
    counted (``gaps``, ``lost``), logged once with its numbers, and told to this process's clients:
    ``on_gap()`` sends ``page_discard`` for every page subscription, so they resubscribe and
    refetch. A stream that starts over after this process had read all of it is only counted
    (``resets``) and logged.

Publishing
    :meth:`RedisBroker.publish` returns an ``asyncio.Future``. Each publish has a deadline,
    ``publish_timeout`` seconds (default 2) after the call, also expressed in Redis's clock
    (a lower bound of the offset between the clocks, measured on every reply): the script refuses
    an envelope whose deadline has passed when Redis runs it. The future completes once the
    envelope came back through this process's read and was handed to the router (``submit()``,
    ``publish_async()`` and ``POST /api/publish`` return after local delivery, as with the
    in-process broker), at once when it was routed only to other processes' inboxes (or to
    none) — or, if Redis accepted it but this process has not read it back by the
    deadline, at the deadline (it is in the stream: delivery follows). It fails with
    :class:`~tornado_rt.BrokerUnavailable` at once when this process's reader is not connected,
    when Redis refuses the command, and at the deadline when Redis has not answered (then it is
    never applied later: the script would refuse it). A publish therefore never waits longer than
    ``publish_timeout``. :meth:`RedisBroker.publish_batch` (what an HTTP batch goes through)
    publishes a list the same way with one deadline and ONE future for all of it, completed once
    each of them would have completed its own, with the first failure among them if any.

Bytes on demand
    Redis needs an envelope's bytes only for another process's inbox, a history, or the control
    stream. A server remembers per page group (at most ``LEAN_GROUPS``) whether the script said
    the last publish to it needed none, and then sends a plain page message to it without its
    bytes (and without encoding it). The script decides whether an envelope needs its bytes
    before it applies anything of it; one that came without bytes it needs (the hint was stale)
    stops the call there: nothing of it or of the envelopes after it is applied, and the writer
    sends them again at once, with their bytes and their original deadlines, before anything
    else — so order and deadlines hold as without the hint. The script keeps the control
    stream's last sequence number in ``<prefix>:top``, and each inbox's last id and ``c`` in the
    hash ``<prefix>:itops`` (field: the process id), both checked against their stream, instead
    of reading the stream's last entry on every call, which may be a large directory envelope
    or an inbox entry of up to about 100 envelopes.

Idempotency
    An envelope ``id`` is delivered at most once per process within the dedup window; the window is
    measured in the stream's own clock (field ``t``), so every process drops the same duplicates.

The shared directory
    With ``share_directory=True`` (``tornado-rt serve`` sets it) and the in-memory
    :class:`~tornado_rt.Directory`, the hash ``<channel_prefix>:directory`` holds the cluster's
    latest directory snapshot (``s``) and the stream position it corresponds to (``p``). Directory
    changes are envelopes on the stream (``RealtimeServer.change_directory``), applied by every
    router in order; every process writes the snapshot after a change (a script keeps the one with
    the highest position: all processes hold the same snapshot at the same position). At start the
    snapshot is loaded and the stream read from ``p`` before :meth:`RedisBroker.start` returns;
    after a gap a newer snapshot is loaded; when Redis lost it, the running processes write theirs.

Publishing from elsewhere
    :class:`RedisPublisher` is a write-only, synchronous publisher (redis-py's sync client) for
    processes that are not servers: same registry, same envelope format, same script.

Connections
    Two connections of redis-py's asyncio client (hiredis parses replies when installed): one
    reading, one publishing (one batch in flight, in call order). Not the pooled ``Redis``
    client: concurrent publishes could leave on different pooled connections and overtake each
    other. A reader that gets no reply within two ``health_check_interval`` (the ``BLOCK`` time
    plus as long again) replaces its connection; the reconnect backoff is ``reconnect_min`` ..
    ``reconnect_max`` seconds. WebSocket clients are never touched by a Redis outage.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import random
import uuid
from typing import Any, Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Protocol, Sequence, Set, Tuple

import ujson

from .broker import Broker, BrokerUnavailable
from .envelope import (DIRECTORY, DISCONNECT, MESSAGE, REVOKE, Envelope, PublishError, directory_envelope,
                       id_list, individual_envelope, message_envelope)
from .redaction import redact_url
from .settings import default

try:
    from redis.asyncio.connection import ConnectionPool
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RedisBroker needs the redis extra: pip install 'tornado-rt[redis]'") from exc

log = logging.getLogger("tornado_rt.redis")

# The defaults of the constructors below: those of the settings (tornado_rt.settings declares them).
_PREFIX: str = default("redis_channel_prefix")
_STREAM_LENGTH: int = default("redis_stream_length")
_HISTORY_SIZE: int = default("history_size")
_HISTORY_TTL: float = default("history_ttl")

#: Envelopes sent in one script call to Redis at most.
MAX_BATCH = 512
#: Entries asked for by one XREAD at most, and the reply size the reader aims at (it asks for as
#: many entries as fit, at the average size of the last reply's): a process catching up after a
#: stall hands its connections about this much per loop turn, not everything at once.
READ_COUNT = 1000
READ_BYTES = 1024 * 1024
#: Safety margin (ms) taken off every deadline handed to Redis.
DEADLINE_MARGIN_MS = 5
#: A loop that did not run for this long (seconds) was stalled (GC, SIGSTOP, swapping, a long
#: loop turn): what the reader learnt just before may be stale (see ``_caught_up``).
STALL = 1.0

# KEYS[1]: the control stream. ARGV[1]: MAXLEN (approximate, every stream); ARGV[2]: the highest
# entry id ("<n>-<k>", of any stream) the publisher knows of; ARGV[3]: history size (0: no history); ARGV[4]: history
# TTL in ms; ARGV[5]: the key prefix ("<prefix>:"); ARGV[6]: the publisher's process id ("" for a
# publisher that is not a server); then the envelopes in runs (consecutive envelopes with one
# deadline sent the same way; a batch handed over at once is one or two runs): the run's deadline
# in Redis ms, its count c, then c envelopes as triples (envelope, page group or "", route) when
# c > 0, or -c plain page messages sent without their bytes (the publisher expects Redis not to
# need them, see "Bytes on demand" below) when c < 0: the first one's route, then one argument
# each, the name of its group's summary key "<prefix>r:<group>" (what the script looks up: no
# string built per envelope); their routes are consecutive (the k-th has the first + k - 1; the
# publisher starts a new run where they are not). route: for a
# plain page message — one page group, no side effect — the publisher's sequence number of the
# envelope (any value but "0"; a server's own inbox gets it as a reference instead of the
# bytes), else "0". (Each argument costs Redis about as much as a short Lua statement: a deadline
# per envelope and an empty argument per envelope without bytes were half of them.)
# Returns {Redis time in ms, the id of the last entry it wrote ("<n>-<k>", or "0-0"), n0, then
# ONE string of one character per envelope (read_codes): "+" for an envelope appended to the control stream, the k-th "+"
# of the call having the sequence number n0 + k, else the digit of the code -c below (see REPLY_*):
# -1: appended to the inboxes of the processes registered for its group, the publisher's among
# them (a reference), and the bytes were needed (another process's inbox or the history);
# -2: the same, not the publisher's (another process's inbox, or only the history);
# -3: routed to the publisher's own inbox only (a reference), no history: the bytes were not needed;
# -4: routed to no inbox, no history: nothing written, the bytes were not needed;
# -5: it came without its bytes and needs them: nothing was applied for it (nor for any later
# envelope of the call): send it again with its bytes;
# -6: not attempted (an earlier envelope of the call was -5): send it again;
# 0: refused, its deadline had passed.
# Bytes on demand (docs/redis.md "Bytes on demand"): a server sends "" instead of the envelope
# for a plain page message to a group whose last publish it made was -3 or -4 (the script said
# the bytes were not needed). Everything the script reads to decide whether an envelope needs its
# bytes (the history's HGET, routing, the control stream being empty, the group's registrations) has no
# effect, so an envelope that comes without needed bytes stops the call before anything of it
# is applied; what came before it is applied (and flushed, trimmed) as usual.
#
# Control stream: ids <n>-0, n +1 per entry (exact gaps), as before routing existed. A new stream
# starts at (Redis time in ms) * 1000 and its first entry has the field r: the highest entry id
# (of the old control stream or of any inbox) its publisher knew of. The key <prefix>top holds
# the last n this script appended (a mirror, trusted only while the stream is not empty and has
# no entry after it: ids only grow, so a stale mirror falls back to reading the stream's last
# entry).
# Routing (docs/redis.md "Routing"): while the key <prefix>routing holds a Redis time that has
# passed, a plain page message goes only to the inbox streams <prefix>inbox:<process> of the
# processes that are fields of the hash <prefix>g:<group>, read from its summary key
# <prefix>r:<group> (one MGET for all groups of the call; one HKEYS per group and call while a
# process of an older version is alive, see below). The page messages of a
# script call between two control entries that go to one inbox make ONE inbox entry (one XADD
# per inbox and control interval: XADD costs per call far more than per field), with the id
# <n>-<k>, n the control stream's last sequence number (so the two streams of a reader merge into
# publish order), k > 0 growing within n (after the inbox's last id: <a>-<b+1> when it is not
# below n); its fields: t (Redis time), c (the entry's number in
# that inbox, +1 per entry: exact gaps), then one envelope as on the control stream (e, and p, q
# when it joined a history), or several as a field per envelope (name "m", or "m<epoch>,<offset>"
# when it joined a history; value the envelope: concatenating them into one Lua string cost more
# than the XADD). The publisher's own inbox (ARGV[6]) gets instead one field R: references ended
# by ";", "<first>:<last>" for consecutive sequence numbers without a history position, else
# "<its sequence number>,<epoch>,<offset>" (parse_refs) — the publisher holds the envelope, so
# its bytes are neither copied in Lua, stored, nor read back. No registered process: no XADD.
# An inbox's last id and c: the hash <prefix>itops (field: the process id, value "<a>-<b> <c>"),
# read with one HMGET for the inboxes new to the call, written with one HSET at the end (after
# the XADDs: never ahead of its inbox), deleted with the inbox by SWEEP_SCRIPT. Trusted only
# while the inbox is not empty (XLEN) and holds no entry after it (an exclusive XREVRANGE from the
# end, COUNT 1: it looks at the last entry only, where an XRANGE from the mirror on steps over the
# entries of its node): an
# inbox deleted (XLEN 0: it starts again at c = 1) or appended to by anything that did not write
# the mirror (a publisher of the previous script version) falls back to its last entry
# (XREVRANGE: whole, up to ~100 envelopes in another process's inbox, what the mirror saves).
# The first envelope appended while the control stream is empty (it started over) goes on the
# control stream whatever its route, so that the new stream's first entry, which carries r,
# comes before any inbox entry with an id of the new stream.
# Without the routing key (a fresh Redis: registrations cannot be trusted yet) every envelope
# goes on the control stream, read by every process.
# Recovery extension (tornado_rt.history): an envelope to a page group that keeps a history (hash
# <prefix>pos:<group>: e = epoch, o = offset) gets the group's next offset and is appended to the
# group's history (stream <prefix>hist:<group>, trimmed to the history size; both keys expire
# after the history TTL); its entry carries p = epoch, q = offset. A group without it costs one HGET
# while the marker <prefix>hists exists (some page keeps a history), nothing otherwise.
PUBLISH_SCRIPT = """
local key = KEYS[1]
local prefix = ARGV[5]
local me = ARGV[6]
local mine = me ~= '' and (prefix .. 'inbox:' .. me) or false
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The control stream's last sequence number: the mirror <prefix>top (set below whenever this
-- script appends to it) when the stream is not empty and has nothing after it, else its last
-- entry (XREVRANGE returns the entry whole: with a directory load envelope of a few hundred KB
-- there, that cost Redis far more than the rest of the call). "Nothing after it" is asked from
-- the end (XREVRANGE + (<mirror>: the last entry alone is looked at) rather than from the mirror
-- on (XRANGE (<mirror> +: that steps over the entries of the mirror's node, up to 100).
local top_key = prefix .. 'top'
local mirror = redis.call('GET', top_key)
local n
local fresh = false
if mirror and redis.call('XLEN', key) > 0
    and not redis.call('XREVRANGE', key, '+', '(' .. mirror .. '-0', 'COUNT', 1)[1] then
  n = tonumber(mirror)
else
  local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if top[1] then
    n = tonumber(string.match(top[1][1], '^(%d+)'))
    redis.call('SET', top_key, string.format('%.0f', n))  -- missing or stale: right again
  else
    n = now * 1000
    fresh = true
  end
end
local since = redis.call('GET', prefix .. 'routing')
local routing = since and tonumber(since) <= now
local inboxes = {}
local touched = {}
local pend = {}
local pend_n = {}
local pend_q = {}
local pending = {}
local hi_n, hi_k = 0, 0
local n0 = n  -- the k-th control entry of this call gets n0 + k
-- one character per envelope (see REPLY_* below), returned joined: one string, not an element each
local out = {}
local o = 0  -- out's length
-- Each inbox's last entry id and counter c: the mirror <prefix>itops (a hash, field: the process
-- id, value "<a>-<b> <c>"; written below after the XADDs) when the inbox is not empty and has no
-- entry after the mirrored id, else its last entry (XREVRANGE returns it whole: up to about 100
-- envelopes in another process's inbox). An empty or missing inbox starts at {0, 0, 0}.
local itops = prefix .. 'itops'
local proc_of = {}
local function last_of(new)
  local fields = {}
  for i, inbox in ipairs(new) do fields[i] = proc_of[inbox] end
  local mirrors = redis.call('HMGET', itops, unpack(fields))
  for i, inbox in ipairs(new) do
    local last = {0, 0, 0}
    if redis.call('XLEN', inbox) > 0 then
      local a, b, c
      if mirrors[i] then a, b, c = string.match(mirrors[i], '^(%d+)-(%d+) (%d+)$') end
      if a and not redis.call('XREVRANGE', inbox, '+', '(' .. a .. '-' .. b, 'COUNT', 1)[1] then
        last = {tonumber(a), tonumber(b), tonumber(c)}
      else
        -- missing or stale (another writer appended after it): the last entry, whole
        local found = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)
        if found[1] then
          a, b = string.match(found[1][1], '^(%d+)-(%d+)')
          last[1] = tonumber(a)
          last[2] = tonumber(b)
          local entry = found[1][2]
          if entry[3] == 'c' then last[3] = tonumber(entry[4]) end
        end
      end
    end
    inboxes[inbox] = last
    touched[#touched + 1] = inbox
  end
end
-- One inbox entry per inbox for the page messages between two control entries: XADD costs per
-- call far more than per field.
-- The publisher's own references: complete tokens in pend[mine], and the range being built,
-- own_lo..own_hi (consecutive sequence numbers, no history position), written as one token
-- "<lo>:<hi>;" when a reference does not continue it and at the flush; own_count: references.
local own_lo, own_hi, own_count = false, 0, 0
local function own_close(parts)
  if own_lo then
    parts[#parts + 1] = string.format('%.0f:%.0f;', own_lo, own_hi)
    own_count = own_count + own_hi - own_lo + 1
    own_lo = false
  end
end
local function flush()
  local new = {}
  for _, inbox in ipairs(pending) do
    if not inboxes[inbox] then new[#new + 1] = inbox end
  end
  if new[1] then last_of(new) end
  for _, inbox in ipairs(pending) do
    local last = inboxes[inbox]
    local a, b = n, 1
    if last[1] > a or (last[1] == a and last[2] >= b) then
      a = last[1]
      b = last[2] + 1
    end
    last[1] = a
    last[2] = b
    last[3] = last[3] + 1
    if a > hi_n or (a == hi_n and b > hi_k) then
      hi_n = a
      hi_k = b
    end
    last[4] = (last[4] or 0) + 1
    -- envelopes in it (the publisher's own: one reference each, counted here)
    if inbox == mine then own_close(pend[inbox]) end
    last[5] = (last[5] or 0) + (inbox == mine and own_count or pend_n[inbox])
    local id = string.format('%.0f-%d', a, b)
    if inbox == mine then
      own_count = 0
      redis.call('XADD', inbox, id, 't', now, 'c', last[3], 'R', table.concat(pend[inbox]))
    elseif pend_n[inbox] > 1 then
      redis.call('XADD', inbox, id, 't', now, 'c', last[3], unpack(pend[inbox]))
    elseif pend_q[inbox][1] then
      redis.call('XADD', inbox, id, 't', now, 'c', last[3], 'e', pend[inbox][2], 'p', pend_q[inbox][1],
                 'q', pend_q[inbox][2])
    else
      redis.call('XADD', inbox, id, 't', now, 'c', last[3], 'e', pend[inbox][2])
    end
    pend[inbox] = nil
  end
  pending = {}
end
local added = false
local hsize = tonumber(ARGV[3])
if hsize > 0 and redis.call('EXISTS', prefix .. 'hists') == 0 then
  hsize = 0  -- no page keeps a history: no HGET per envelope
end
local kept = false
local nargs = #ARGV
-- The processes registered for the group of each plain page message of the call (in call order:
-- regs[k] for the k-th), read for all of them at once: one MGET of the summary keys
-- <prefix>r:<group> (the ids of the fields of the hash <prefix>g:<group>, space-separated;
-- REGISTER_SCRIPT and SWEEP_SCRIPT keep both in step, and delete r: with the last field), instead
-- of one HKEYS per group. A process of an older version writes g: only: while one is alive (a
-- member of <prefix>procs that is not one of <prefix>rprocs, which HELLO_SCRIPT fills) the hashes
-- are read as before, one HKEYS per group (regs[k]: the list instead of the string).
local regs = {}
local skip = #prefix + 3  -- a summary key's name <prefix>r:<group>: where its group starts
if routing then
  -- the summary keys (or, for an older version's hashes, the groups), in call order
  local legacy = redis.call('SDIFF', prefix .. 'procs', prefix .. 'rprocs')[1]
  local r = legacy and '' or (prefix .. 'r:')
  local keys, nk = {}, 0
  -- a lean run's keys not copied yet (ARGV[span_from..span_to]): the call's only keys, the
  -- common case, go to MGET straight from ARGV
  local span_from, span_to = false, 0
  local function copy_span()
    for j = span_from, span_to do
      nk = nk + 1
      keys[nk] = ARGV[j]
    end
    span_from = false
  end
  local i = 7
  while i <= nargs do
    local c = tonumber(ARGV[i + 1])
    i = i + 2
    if c < 0 then
      -- the first reference, then the summary keys' names: no string built here (but the group
      -- for the hashes)
      if legacy then
        for j = i + 1, i - c do
          nk = nk + 1
          keys[nk] = string.sub(ARGV[j], skip)
        end
      else
        if span_from then copy_span() end
        span_from, span_to = i + 1, i - c
        if nk > 0 then copy_span() end
      end
      i = i + 1 - c
    else
      for j = i + 1, i + 3 * c - 1, 3 do
        if ARGV[j + 1] ~= '0' then
          if span_from then copy_span() end
          nk = nk + 1
          keys[nk] = r .. ARGV[j]
        end
      end
      i = i + 3 * c
    end
  end
  if span_from then
    regs = redis.call('MGET', unpack(ARGV, span_from, span_to))
  elseif nk > 0 then
    if legacy then
      local known = {}
      for k = 1, nk do
        local g = keys[k]
        local procs = known[g]
        if not procs then
          procs = redis.call('HKEYS', prefix .. 'g:' .. g)
          known[g] = procs
        end
        regs[k] = procs
      end
    else
      regs = redis.call('MGET', unpack(keys))
    end
  end
end
-- a registration's processes (a summary key's value, or the hash's fields) -> (the list, whether
-- a process other than the publisher is in it), each value parsed once per call
local nobody = {}
local lists, elsewhere = {}, {}
local function registered(value)
  if not value then return nobody, false end
  local procs = lists[value]
  if procs then return procs, elsewhere[value] end
  if type(value) == 'table' then
    procs = value
  else
    procs = {}
    for proc in string.gmatch(value, '%S+') do procs[#procs + 1] = proc end
  end
  local other = false
  for _, proc in ipairs(procs) do
    if proc ~= me then
      other = true
      break
    end
  end
  lists[value] = procs
  elsewhere[value] = other
  return procs, other
end
local nr = 0  -- plain page messages seen so far (regs' index)
-- routed, no history anywhere: what the short path for a page message without bytes needs
local quick = routing and not fresh and hsize == 0
local function own_pend()
  local parts = {}
  pend[mine] = parts
  pend_n[mine] = 0
  pend_q[mine] = {}
  pending[#pending + 1] = mine
  proc_of[mine] = me
  return parts
end
local inbox_of = {}  -- process id -> its inbox's key
local stop = false
local i = 7
while i <= nargs do
  -- a run: its deadline, then its count c: c > 0 envelopes as (envelope, group, ref), or -c plain
  -- page messages sent without their bytes as (group, ref)
  local live = tonumber(ARGV[i]) >= now
  local c = tonumber(ARGV[i + 1])
  i = i + 2
  local lean = c < 0
  local ref0
  if lean then
    c = -c
    ref0 = tonumber(ARGV[i]) - 1  -- the run's references: consecutive, ref0 + 1 first
    i = i + 1
  end
  for k = 1, c do
    local envelope, group, ref
    if lean then
      envelope, group, ref = '', ARGV[i], ref0 + k  -- ref: a number here
      i = i + 1
      nr = nr + 1
    else
      envelope, group, ref = ARGV[i], ARGV[i + 1], ARGV[i + 2]
      i = i + 3
      if ref ~= '0' then nr = nr + 1 end
    end
    if stop then
      o = o + 1
      out[o] = '6'  -- not attempted: after an envelope that must be sent again with its bytes
    elseif not live then
      o = o + 1
      out[o] = '0'
    elseif quick and lean and regs[nr] == me then
      -- the common case, in short: sent without its bytes, registered by the publisher alone,
      -- no history anywhere: a reference in its own inbox
      if own_lo and ref == own_hi + 1 then
        own_hi = ref
      else
        own_close(pend[mine] or own_pend())
        own_lo, own_hi = ref, ref
      end
      o = o + 1
      out[o] = '3'
    elseif quick and lean and not regs[nr] then
      o = o + 1
      out[o] = '4'  -- nobody registered, no history: nothing written
    else
      if lean then group = string.sub(group, skip) end  -- its summary key's name: the group
      -- An empty control stream started over (Redis lost its data): its first entry must be a
      -- control entry carrying r, before any inbox entry of the new stream (whose ids, above the
      -- old stream's, would otherwise reach r and look like lost envelopes to every reader).
      local routed = routing and ref ~= '0' and not fresh
      local pos, epoch, procs
      if group ~= '' and hsize > 0 then
        pos = prefix .. 'pos:' .. group
        epoch = redis.call('HGET', pos, 'e')
      end
      -- Whether Redis needs the envelope's bytes: a history, the control stream, or the inbox of
      -- another process (the publisher's own inbox gets a reference).
      local needed = epoch or not routed
      if routed then
        local other
        procs, other = registered(regs[nr])
        if other then needed = true end
      end
      if needed and envelope == '' then
        -- sent without its bytes (the publisher's hint was stale): nothing applied for it nor for
        -- any later envelope of this call; the publisher sends them again, this one with its bytes
        o = o + 1
        out[o] = '5'
        stop = true
      else
        local offset
        if epoch then
          local hist = prefix .. 'hist:' .. group
          offset = redis.call('HINCRBY', pos, 'o', 1)
          redis.call('XADD', hist, 'MAXLEN', hsize, '*', 'q', offset, 't', now, 'e', envelope)
          redis.call('PEXPIRE', pos, ARGV[4])
          redis.call('PEXPIRE', hist, ARGV[4])
          kept = true
        end
        if routed then
          local result = needed and '2' or '4'
          local head
          for _, proc in ipairs(procs) do
            local inbox = inbox_of[proc]
            if not inbox then
              inbox = prefix .. 'inbox:' .. proc
              inbox_of[proc] = inbox
            end
            local parts = pend[inbox]
            if not parts then
              parts = {}
              pend[inbox] = parts
              pend_n[inbox] = 0
              pend_q[inbox] = {epoch, offset}
              pending[#pending + 1] = inbox
              proc_of[inbox] = proc
            end
            if proc == me then
              -- the publisher's own inbox: a reference, not the bytes (it kept the envelope):
              -- "<ref>,<epoch>,<offset>;" with a history position, else it joins the range
              -- being built ("<lo>:<hi>;", see own_close)
              result = needed and '1' or '3'
              local r = tonumber(ref)
              if epoch then
                own_close(parts)
                own_count = own_count + 1
                parts[#parts + 1] = string.format('%.0f,%s,%s;', r, epoch, offset)
              elseif own_lo and r == own_hi + 1 then
                own_hi = r
              else
                own_close(parts)
                own_lo, own_hi = r, r
              end
            else
              -- a field per envelope, its name carrying the position: no concatenation of envelopes
              -- into one Lua string (that cost Redis more than the XADD itself)
              if not head then
                head = epoch and ('m' .. epoch .. ',' .. offset) or 'm'
              end
              parts[#parts + 1] = head
              parts[#parts + 1] = envelope
            end
            pend_n[inbox] = pend_n[inbox] + 1
          end
          o = o + 1
          out[o] = result
        else
          flush()
          n = n + 1
          local entry = {'XADD', key, string.format('%.0f-0', n), 't', now, 'e', envelope}
          if fresh then
            entry[#entry + 1] = 'r'
            entry[#entry + 1] = ARGV[2]
            fresh = false
            quick = routing and hsize == 0
          end
          if epoch then
            entry[#entry + 1] = 'p'
            entry[#entry + 1] = epoch
            entry[#entry + 1] = 'q'
            entry[#entry + 1] = offset
          end
          redis.call(unpack(entry))
          o = o + 1
          out[o] = '+'
          hi_n = n
          hi_k = 0
          added = true
        end
      end
    end
  end
end
if added then
  redis.call('XTRIM', key, 'MAXLEN', '~', ARGV[1])
  redis.call('SET', top_key, string.format('%.0f', n))
end
if kept then
  -- the marker outlives every pos key (see redis_history.MARK)
  redis.call('SET', prefix .. 'hists', 1, 'NX', 'PX', ARGV[4])
  redis.call('PEXPIRE', prefix .. 'hists', ARGV[4], 'GT')
end
flush()
local mirrored = {}
for _, inbox in ipairs(touched) do
  -- about MAXLEN envelopes: entries hold several (field pairs: e, and p, q with a history)
  local last = inboxes[inbox]
  local per = last[5] / last[4]
  redis.call('XTRIM', inbox, 'MAXLEN', '~', math.max(1, math.ceil(tonumber(ARGV[1]) / per)))
  mirrored[#mirrored + 1] = proc_of[inbox]
  mirrored[#mirrored + 1] = string.format('%.0f-%d %d', last[1], last[2], last[3])
end
if mirrored[1] then
  -- after the XADDs: a mirror is never ahead of its inbox (an error in between leaves it behind,
  -- which the next call sees as entries after it)
  redis.call('HSET', itops, unpack(mirrored))
end
return {now, string.format('%.0f-%d', hi_n, hi_k), string.format('%.0f', n0), table.concat(out)}
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

#: The publish script's reply per envelope, besides n > 0 (its sequence number on the control
#: stream): see the comment above PUBLISH_SCRIPT.
REPLY_REFUSED = 0
REPLY_OWN = -1
REPLY_ELSEWHERE = -2
REPLY_OWN_LEAN = -3
REPLY_NOWHERE_LEAN = -4
REPLY_RESEND = -5
REPLY_NOT_TRIED = -6
#: Page groups a server remembers as "the last publish to it needed no bytes" at most (see
#: docs/redis.md "Bytes on demand"); one more and every hint is dropped at once (about 100 bytes
#: each: a few MB at most). A group without a hint is published with its bytes, as before.
LEAN_GROUPS = 65_536


_CODE_OF: List[Optional[int]] = [None] * 256  # a reply character -> its code (see read_codes)
for _c in range(7):
    _CODE_OF[ord("0") + _c] = -_c
_PLUS = ord("+")


def read_codes(codes: Any) -> Tuple[List[int], Optional[int]]:
    """The per-envelope part of a publish script reply, ``[n0, codes]`` (``codes``: one character
    per envelope, see the comment above PUBLISH_SCRIPT) -> (the codes as ints: n > 0 for an
    envelope on the control stream, the k-th such ``n0 + k``, else REPLY_*; the index of the
    envelope to send again from, or None when every envelope was attempted). Raises ValueError
    when the reply breaks the script's rules: not two elements, a character it never returns,
    anything but ``REPLY_NOT_TRIED`` after ``REPLY_RESEND``, ``REPLY_NOT_TRIED`` without one before
    it."""
    try:
        first, blob = codes
        n = int(first)
    except (TypeError, ValueError):
        raise ValueError(f"publish script reply: not [n0, codes]: {codes!r:.100}") from None
    if isinstance(blob, str):
        blob = blob.encode()
    elif not isinstance(blob, bytes):
        raise ValueError(f"publish script reply: codes not a string: {blob!r:.100}")
    of = _CODE_OF
    out: List[Any]
    if _PLUS in blob:
        out = []
        for c in blob:
            if c == _PLUS:
                n += 1
                out.append(n)
            else:
                out.append(of[c])
    else:
        out = [of[c] for c in blob]
    if None in out:
        at = out.index(None)
        raise ValueError(f"publish script reply: unexpected code {blob[at:at + 1]!r} at {at}")
    at = blob.find(b"5")
    if at == -1:
        if b"6" in blob:
            raise ValueError(f"publish script reply: code -6 without a resend before it at {blob.find(b'6')}")
        return out, None
    if b"6" in blob[:at] or blob.count(b"6", at + 1) != len(blob) - at - 1:
        raise ValueError(f"publish script reply: -6 before, or another code after, a resend at {at}")
    return out, at


# A process says it is alive (at every reader connection and every third of the liveness TTL).
# ARGV[1]: the key prefix ("<prefix>:"); ARGV[2]: the process id; ARGV[3]: the liveness TTL (ms);
# ARGV[4]: the grace (ms) before routing starts when the routing key is missing (0: a process with
# nothing to lose, at its first connection). Returns {1 if the alive key was there (then this
# process's registrations are: Redis lost nothing of it and no sweep removed them), Redis time
# in ms, the routing key's time, 1 if this call created the routing key, 1 if its inbox exists}.
# The alive key is only
# written here. When it was gone, the process registers its groups again (REGISTER_SCRIPT).
HELLO_SCRIPT = """
local prefix = ARGV[1]
local me = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local intact = redis.call('EXISTS', prefix .. 'alive:' .. me)
redis.call('SET', prefix .. 'alive:' .. me, now, 'PX', ARGV[3])
redis.call('SADD', prefix .. 'procs', me)
redis.call('SADD', prefix .. 'rprocs', me)  -- keeps the summary keys r:<group> (see PUBLISH_SCRIPT)
local since = redis.call('GET', prefix .. 'routing')
local created = 0
if not since then
  since = now + tonumber(ARGV[4])
  redis.call('SET', prefix .. 'routing', string.format('%.0f', since))
  created = 1
end
return {intact > 0 and 1 or 0, now, tonumber(since), created, redis.call('EXISTS', prefix .. 'inbox:' .. me)}
"""
# Register (+) and unregister (-) page groups of one process. ARGV[1]: the key prefix; ARGV[2]:
# the process id; then pairs (+ or -, group). Returns 1 when routing is on (page messages go to
# the registered processes only), 0 when every envelope goes on the control stream.
REGISTER_SCRIPT = """
local prefix = ARGV[1]
local me = ARGV[2]
local groups = prefix .. 'groups:' .. me
local changed = {}
for i = 3, #ARGV, 2 do
  local g = ARGV[i + 1]
  if ARGV[i] == '+' then
    redis.call('HSET', prefix .. 'g:' .. g, me, 1)
    redis.call('SADD', groups, g)
  else
    redis.call('HDEL', prefix .. 'g:' .. g, me)
    redis.call('SREM', groups, g)
  end
  changed[g] = true
end
-- the summary key of each group changed: the fields of its hash (also those another version wrote)
for g in pairs(changed) do
  local procs = redis.call('HKEYS', prefix .. 'g:' .. g)
  if procs[1] then
    redis.call('SET', prefix .. 'r:' .. g, table.concat(procs, ' '))
  else
    redis.call('DEL', prefix .. 'r:' .. g)
  end
end
local since = redis.call('GET', prefix .. 'routing')
if not since then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(since) <= now then
  return 1
end
return 0
"""
# Remove what processes left behind: ARGV[1]: the key prefix; ARGV[2]: a process id to remove
# whatever its alive key says (a process that shuts down), or "" to remove every process whose
# alive key expired (a sweep any live process runs). Returns the processes removed.
SWEEP_SCRIPT = """
local prefix = ARGV[1]
local procs
if ARGV[2] ~= '' then
  procs = {ARGV[2]}
else
  -- rprocs too: a process of an older version sweeps procs only
  procs = redis.call('SUNION', prefix .. 'procs', prefix .. 'rprocs')
end
local removed = 0
for _, p in ipairs(procs) do
  if ARGV[2] ~= '' or redis.call('EXISTS', prefix .. 'alive:' .. p) == 0 then
    for _, g in ipairs(redis.call('SMEMBERS', prefix .. 'groups:' .. p)) do
      local hash = prefix .. 'g:' .. g
      redis.call('HDEL', hash, p)
      -- the summary key, in step with the hash (see REGISTER_SCRIPT)
      local left = redis.call('HKEYS', hash)
      if left[1] then
        redis.call('SET', prefix .. 'r:' .. g, table.concat(left, ' '))
      else
        redis.call('DEL', prefix .. 'r:' .. g)
      end
    end
    redis.call('DEL', prefix .. 'groups:' .. p, prefix .. 'inbox:' .. p, prefix .. 'alive:' .. p)
    redis.call('HDEL', prefix .. 'itops', p)  -- the mirror of its inbox's last entry
    redis.call('SREM', prefix .. 'procs', p)
    redis.call('SREM', prefix .. 'rprocs', p)
    removed = removed + 1
  end
end
return removed
"""
#: Seconds an emptied page group stays registered (a client that resubscribes at once, a page
#: that flips, costs no round trip); envelopes that arrive meanwhile are dropped and counted.
UNREGISTER_DELAY = 1.0

# KEYS[1]: the directory hash. ARGV[1]: the stream position the snapshot corresponds to; ARGV[2]:
# the snapshot. Replaces the stored one only when it is older: returns 1 when written.
SNAPSHOT_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'p')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'p', ARGV[1], 's', ARGV[2], 'h', ARGV[3])
return 1
"""
# KEYS[1]: the directory hash. ARGV[1]: a stream position; ARGV[2]: the SHA-1 of the writer's
# snapshot at that position. When the stored snapshot is older and the same (same SHA-1), only
# its position moves forward (so a process that starts reads less of the stream), without sending
# the snapshot. Returns 1 when moved.
ADVANCE_SCRIPT = """
local current = redis.call('HMGET', KEYS[1], 'p', 'h')
if current[1] and tonumber(current[1]) < tonumber(ARGV[1]) and current[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'p', ARGV[1])
  return 1
end
return 0
"""
#: Stream entries read after which the snapshot's position is moved forward even without a
#: directory change (a process that starts replays at most about this many).
SNAPSHOT_EVERY = 10_000

def encode_envelope(envelope: Envelope, origin: str, seq: int) -> bytes:
    """The stream entry's ``e`` field: a JSON header line (the envelope without its message text,
    plus the publisher's origin ``o`` and its sequence number ``n``), a newline, the text."""
    wire = envelope.to_wire()
    data = wire.pop("d", None)
    wire["o"] = origin
    wire["n"] = seq
    payload = ujson.dumps(wire, ensure_ascii=False).encode()
    if data is not None:
        payload += b"\n" + data.encode()
    return payload


def route_of(envelope: Envelope, registry: Any) -> Tuple[str, bool]:
    """(the page group of a page message or "", whether it is a plain page message: one page
    group, a type without side effect — it goes only to the inboxes of the processes registered
    for the group; anything else goes on the control stream, read by every process). Without a
    registry everything goes on the control stream."""
    if envelope.kind != MESSAGE:
        return "", False
    audience = envelope.audience
    if not audience or audience[0] != "page":
        return "", False
    if registry is None:
        return audience[1], False
    mt = registry.message_type(envelope.type)
    return audience[1], mt is None or mt.effect is None


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


_EMPTY_BULK = b"$0\r\n\r\n"  # an empty argument: an envelope without its bytes, no group
_NO_REF = b"$1\r\n0\r\n"  # the sequence-number argument of an envelope that is not a plain page message
Batch = List[Tuple[int, Optional[bytes], "_Pending"]]


def pack_envelopes(parts: List[bytes], batch: Batch, offset: float, registry: Any, hints: Set[str],
                   origin: str, lean: bool, bulks: Dict[str, Tuple[bytes, bytes]],
                   key_prefix: str) -> Tuple[Batch, List[Optional[str]], int, int]:
    """Append the publish script's arguments for the envelopes of ``batch`` to ``parts``, in runs:
    consecutive envelopes with the same deadline (in Redis's clock, ``entry.deadline * 1000 +
    offset`` ms) sent the same way make one run, its deadline and its count ``c`` then its
    envelopes: ``c > 0`` envelopes as three arguments each (its bytes, its page group or "", its
    sequence number for a plain page message, else 0), or, with ``lean``, ``-c`` plain page
    messages to groups in ``hints`` sent without their bytes with consecutive sequence numbers
    (the normal case within a batch) as the first one's sequence number then one argument each,
    the name of the group's summary key ``<key_prefix>r:<group>``. What :func:`route_of` and
    :func:`encode_envelope` say, with what repeats within a batch done once: a message type's
    routing (looked up once per type), a group's two arguments (kept in ``bulks``, at most
    ``LEAN_GROUPS``). Returns ``(items, groups, omitted, count)``: ``batch``
    with each sent payload filled in (None for one sent without its bytes), the group of each plain
    page message (else None), how many were sent without their bytes, and how many arguments
    were appended."""
    items: Batch = []
    groups: List[Optional[str]] = []
    plain: Dict[str, bool] = {}  # message type -> a plain page message (no side effect)
    omitted = 0
    count = 0
    run: List[bytes] = []  # the current run's arguments
    run_ms = -1
    run_lean = False
    run_n = 0
    run_next = 0  # in a lean run: the sequence number that continues it

    def flush_run() -> int:
        """Append the current run (its deadline, its count, its arguments) to ``parts``; returns
        how many arguments that was."""
        nonlocal run
        append(b"$%d\r\n%d\r\n%s" % (len(b"%d" % run_ms), run_ms, _bulk(b"%d" % (-run_n if run_lean else run_n))))
        parts.extend(run)
        n = 3 + run_n if run_lean else 2 + 3 * run_n
        run = []
        return n
    low = limit = width = 0  # seqs in [low, limit) have ``width`` digits
    append, add_item, add_group = parts.append, items.append, groups.append
    for item in batch:
        seq, payload, entry = item
        # Redis must refuse an envelope once the publisher may have answered 503 for it:
        # offset is a lower bound of the true offset, so this is never later than that.
        ms = int(entry.deadline * 1000 + offset)
        envelope = entry.envelope
        audience = envelope.audience
        if envelope.kind == MESSAGE and audience and audience[0] == "page":
            group: str = audience[1]
            if registry is None:
                route = False
            else:
                kind = envelope.type
                known = plain.get(kind)  # type: ignore[arg-type]
                if known is None:
                    mt = registry.message_type(kind)
                    known = plain[kind] = mt is None or mt.effect is None  # type: ignore[index]
                route = known
            args = bulks.get(group)
            if args is None:
                if len(bulks) >= LEAN_GROUPS:
                    bulks.clear()
                args = bulks[group] = (_bulk(group.encode()), _bulk(f"{key_prefix}r:{group}".encode()))
            group_arg, key_arg = args
        else:
            route = False
            group_arg = key_arg = _EMPTY_BULK
        bare = False
        if route:
            # A plain page message carries its sequence number: this process's own inbox gets
            # that reference instead of the bytes (the envelope is still in _pending / _own).
            add_group(group)
            bare = lean and group in hints  # Redis did not need its bytes last time
            if bare:
                # its reference is implied: the run's first one + its place in the run
                if ms != run_ms or not run_lean or seq != run_next:
                    if run_n:
                        count += flush_run()
                    run_ms, run_lean, run_n = ms, True, 0
                    run.append(_bulk(b"%d" % seq))
                run_next = seq + 1
                run_n += 1
                run.append(key_arg)
                omitted += 1
                add_item(item)
                continue
            if not low <= seq < limit:
                width = len(b"%d" % seq)
                low, limit = 10 ** (width - 1), 10 ** width
            tail = b"%s$%d\r\n%d\r\n" % (group_arg, width, seq)
        else:
            tail = group_arg + _NO_REF
            add_group(None)
        if ms != run_ms or run_lean:
            if run_n:
                count += flush_run()
            run_ms, run_lean, run_n = ms, False, 0
        run_n += 1
        if payload is None:
            payload = encode_envelope(envelope, origin, seq)
            item = (seq, payload, entry)
        run.append(b"$%d\r\n" % len(payload))
        run.append(payload)
        run.append(b"\r\n" + tail)
        add_item(item)
    if run_n:
        count += flush_run()
    return items, groups, omitted, count


def _seq_of(entry_id: bytes) -> Tuple[int, bool]:
    """(n, whether the id is one of ours: ``<n>-0``) of a stream entry id; ValueError if no id."""
    head, _, tail = entry_id.partition(b"-")
    return int(head), tail == b"0"


def entry_key(entry_id: bytes) -> Tuple[int, int]:
    """The order of an entry of the control stream (``<n>-0``) or an inbox (``<n>-<k>``, k > 0:
    after the control entry n, before n + 1): ``(n, k)``; ``(0, 0)`` for an id that is not ours
    (sorted first, then refused as malformed)."""
    head, _, tail = entry_id.partition(b"-")
    try:
        return int(head), int(tail or b"0")
    except ValueError:
        return 0, 0


Entry = Tuple[bytes, List[bytes]]


def merge_replies(control: List[Entry], control_full: bool, inbox: List[Entry],
                  inbox_full: bool) -> Tuple[List[Tuple[bool, Entry]], List[Entry], List[Entry]]:
    """Merge what one ``XREAD`` returned from the control stream and from this process's inbox
    (each after the entries held back from earlier rounds, which come first) into publish order:
    ``(ready, held_control, held_inbox)``; ``ready`` lists ``(from the inbox?, entry)``.

    ``*_full``: that stream's part of the reply was cut at ``COUNT``, so entries after its last one
    may exist unseen in Redis. ``XREAD`` is atomic: for a stream that was not cut, everything up
    to now was returned; for a cut one, nothing after its last entry was. So every entry up to the
    smallest last id among the cut streams is in order now; entries of the other stream beyond it
    are held for the next round (an unseen entry of the cut stream may come before them)."""
    limit: Optional[Tuple[int, int]] = None
    if control_full and control:
        limit = entry_key(control[-1][0])
    if inbox_full and inbox:
        last = entry_key(inbox[-1][0])
        if limit is None or last < limit:
            limit = last
    ready: List[Tuple[bool, Entry]] = []
    i = j = 0
    nc, ni = len(control), len(inbox)
    ck = [entry_key(e[0]) for e in control]
    ik = [entry_key(e[0]) for e in inbox]
    while i < nc or j < ni:
        if j >= ni or (i < nc and ck[i] < ik[j]):
            if limit is not None and ck[i] > limit:
                break
            ready.append((False, control[i]))
            i += 1
        else:
            if limit is not None and ik[j] > limit:
                break
            ready.append((True, inbox[j]))
            j += 1
    return ready, list(control[i:]), list(inbox[j:])


def parse_refs(blob: bytes) -> Optional[Tuple[List[int], Optional[List[Optional[Tuple[str, int]]]]]]:
    """The references of an inbox entry's ``R`` field, each ended by ``;``: ``<first>:<last>``
    (the consecutive sequence numbers first..last, none with a history position: what the
    publish script writes for a run of them) or ``<seq>,<epoch>,<offset>`` (epoch and offset
    empty unless the envelope joined a history) -> ``(seqs, positions)``, ``positions`` None when
    no reference has one (the common case: parsed without a step per reference), else the
    ``(epoch, offset)`` or None of each. Text after the last ``;`` is ignored. None when a
    reference is malformed (the caller then delivers those before it, one at a time)."""
    if b"," not in blob:  # ranges only
        seqs: List[int] = []
        try:
            for ref in blob.split(b";")[:-1]:
                first, colon, last = ref.partition(b":")
                low, high = int(first), int(last)
                if not colon or not 0 < low <= high:
                    return None
                seqs += range(low, high + 1)
        except ValueError:
            return None
        return seqs, None
    parts = blob.split(b",,;")
    if b":" not in blob and len(parts) - 1 == blob.count(b";"):  # every reference "<seq>,,"
        try:
            return [int(seq) for seq in parts[:-1]], None
        except ValueError:
            return None
    seqs = []
    positions: List[Optional[Tuple[str, int]]] = []
    try:
        for ref in blob.split(b";")[:-1]:
            if b"," not in ref:
                first, colon, last = ref.partition(b":")
                low, high = int(first), int(last)
                if not colon or not 0 < low <= high:
                    return None
                seqs += range(low, high + 1)
                positions += [None] * (high - low + 1)
                continue
            seq_b, epoch, offset = ref.split(b",")
            seqs.append(int(seq_b))
            positions.append((epoch.decode(), int(offset)) if epoch else None)
    except (ValueError, UnicodeDecodeError):
        return None
    if not any(positions):
        return seqs, None
    return seqs, positions


class _Completion(Protocol):
    """What completes a publish: its own ``asyncio.Future`` (:meth:`RedisBroker.publish`) or the
    :class:`_Batch` it belongs to (:meth:`RedisBroker.publish_batch`)."""

    def done(self) -> bool: ...

    def set_result(self, result: None) -> None: ...

    def set_exception(self, exception: BaseException) -> None: ...

    def exception(self) -> Optional[BaseException]: ...


class _Batch:
    """The one future of a batch of publishes (:meth:`RedisBroker.publish_batch`), standing in
    for the future of each of them: every publish of the batch completes it once (they are
    taken out of ``_pending`` before they complete, so each exactly once), and its ``future``
    completes when the last did: with the first error one of them got, else with None.
    ``done()`` is the batch future's: while a publish of it is still pending that means only
    that the caller cancelled the batch (its unsent publishes are then not sent, as a cancelled
    single publish is not)."""

    __slots__ = ("future", "left", "error")

    def __init__(self, future: "asyncio.Future[None]", size: int):
        self.future = future
        self.left = size
        self.error: Optional[BaseException] = None

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result: None) -> None:
        self.left -= 1
        if self.left <= 0:
            self._finish()

    def set_exception(self, exception: BaseException) -> None:
        if self.error is None:
            self.error = exception
        self.left -= 1
        if self.left <= 0:
            self._finish()

    def exception(self) -> Optional[BaseException]:
        return self.error

    def _finish(self) -> None:
        future = self.future
        if future.done():  # cancelled by the caller
            return
        if self.error is None:
            future.set_result(None)
        else:
            future.set_exception(self.error)
            future.exception()  # marked retrieved, as _fail does for a single publish


class _Pending:
    """A publish of this process: what completes it (its future, or its batch), its deadline
    (loop time), the envelope, and the stream sequence number Redis gave it (0 until accepted)."""

    __slots__ = ("future", "deadline", "envelope", "accepted")

    def __init__(self, future: _Completion, deadline: float, envelope: Envelope):
        self.future = future
        self.deadline = deadline
        self.envelope = envelope
        self.accepted = 0


class RedisBroker(Broker):
    """Event bus over one Redis Stream shared by every process (see the module docstring).

    ``url``: ``redis://[[user]:[password]@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix:///path.sock`` — anything redis-py's ``ConnectionPool.from_url`` takes.
    ``channel_prefix``: processes with the same prefix on the same Redis form one server
    (default ``"tornado-rt"``; the stream is ``"<prefix>:stream"``).
    ``publish_timeout``: the longest a publish waits, in seconds (default 2.0; see the module
    docstring). ``stream_length``: entries the stream keeps at least (approximate trimming,
    default 100,000): how far behind a process may fall (a stall) before it has a gap.
    ``connect_timeout``: seconds for the TCP connect (default 1.0); ``socket_timeout``: seconds
    for the rest of a Redis exchange outside publishing — the connection handshake, finding the
    read position (default 2.0).
    ``reconnect_min`` / ``reconnect_max``: backoff of the reader between attempts (0.1 → 5 s).
    ``health_check_interval``: the reader's ``BLOCK`` time; a reader that gets no reply within
    twice this replaces its connection (default 5).
    ``start_timeout``: how long :meth:`start` keeps trying to connect before it raises
    ``BrokerUnavailable`` (default 5).
    ``share_directory``: keep the server's in-memory directory's snapshot in Redis (see
    :meth:`share_directory` and docs/redis.md); ``snapshot_every``: stream entries after which the
    stored snapshot's position is moved forward without a change (default 10,000).
    """

    #: The routing counters exposed on /metrics (``tornado_rt_redis_<name>``; counters get
    #: ``_total``): kind and help text.
    ROUTING_METRICS = {
        "control_read": ("counter", "Entries read from the Redis control stream (every process reads all of it)"),
        "inbox_read": ("counter", "Entries read from this process's Redis inbox (each holds the page messages "
                                  "of the page groups it registered from one publish call)"),
        "inbox_envelopes": ("counter", "Page messages read from this process's Redis inbox"),
        "control_pages": ("counter", "Page messages read from the control stream (routing off, or a type "
                                     "with a side effect)"),
        "dropped": ("counter", "Page messages read with no local subscriber on their page (unregistration "
                               "pending, or routing off)"),
        "registered": ("gauge", "Page groups this process is registered for in Redis"),
        "registrations": ("counter", "Page group registrations sent to Redis"),
        "unregistrations": ("counter", "Page group unregistrations sent to Redis"),
        "swept": ("counter", "Dead processes whose registrations and inbox this process removed"),
        "late_registrations": ("counter", "Registrations that landed after their subscription was "
                                          "confirmed while routing was on (the group got page_discard)"),
        "sent_with_bytes": ("counter", "Envelopes this process sent to the Redis publish script with their "
                                       "bytes (a resent one counts again)"),
        "sent_without_bytes": ("counter", "Page messages this process sent to the Redis publish script "
                                          "without their bytes (the last publish to their group needed none)"),
        "resends": ("counter", "Publish script calls sent again because an envelope sent without its "
                               "bytes needed them (another process registered its group, a history, "
                               "the control stream)"),
        "directory_in_snapshot": ("counter", "Directory changes read after a gap that the directory snapshot "
                                             "loaded then already held (not applied twice)"),
    }

    def __init__(self, url: str, channel_prefix: str = _PREFIX, *,
                 publish_timeout: float = 2.0, stream_length: int = _STREAM_LENGTH,
                 socket_timeout: float = 2.0, connect_timeout: float = 1.0,
                 reconnect_min: float = 0.1, reconnect_max: float = 5.0,
                 health_check_interval: float = 5.0, start_timeout: float = 5.0,
                 share_directory: bool = False, snapshot_every: int = SNAPSHOT_EVERY,
                 origin: Optional[str] = None):
        if not channel_prefix or not isinstance(channel_prefix, str):
            raise ValueError("channel_prefix must be a non-empty string")
        if not publish_timeout > 0:
            raise ValueError("publish_timeout must be positive")
        if not isinstance(stream_length, int) or stream_length < 1:
            raise ValueError("stream_length must be a positive integer")
        self.url = url
        self.channel_prefix = channel_prefix
        #: The recovery extension's history in Redis (size, TTL in ms); set by configure().
        self.history_size = 0
        self.history_ttl_ms = 300_000
        self.stream = f"{channel_prefix}:stream"
        #: The hash holding the directory snapshot shared by the cluster: ``p`` (the stream
        #: position it corresponds to) and ``s`` (the snapshot, JSON).
        self.directory_key = f"{channel_prefix}:directory"
        self.share_directory_snapshot = share_directory
        self.snapshot_every = snapshot_every
        # protocol=2: plain arrays. No command retries: fail fast. socket_timeout=None: redis-py
        # would arm a timer for every reply read; the broker bounds each exchange itself. TCP
        # keepalive only over TCP: redis-py's Unix socket connection refuses the option (with it,
        # a unix:// URL never connected).
        tcp = {} if url.lstrip().lower().startswith("unix:") else {"socket_keepalive": True}
        self._pool = ConnectionPool.from_url(
            url, socket_connect_timeout=connect_timeout, retry=None, client_name="tornado-rt", **tcp)
        kwargs = self._pool.connection_kwargs
        kwargs["protocol"] = 2
        kwargs["socket_timeout"] = None
        self.publish_timeout = publish_timeout
        self.stream_length = stream_length
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._script_head = (_bulk(b"EVALSHA") + _bulk(PUBLISH_SHA.encode()) + _bulk(b"1")
                             + _bulk(self.stream.encode()) + _bulk(str(stream_length).encode()))
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.health_check_interval = health_check_interval
        self.start_timeout = start_timeout
        #: This process's id (random unless given: the shards of a PartitionedRedisBroker share one).
        self.origin = origin if origin is not None else uuid.uuid4().hex[:16]
        #: This process's inbox: the plain page messages of the page groups it registered.
        self.inbox = f"{channel_prefix}:inbox:{self.origin}"
        self.key_prefix = channel_prefix + ":"
        #: Seconds a process that stopped refreshing its alive key counts as alive (its
        #: registrations and inbox are swept after): the server's ``presence_ttl``.
        self.alive_ttl = 30.0
        self._seq = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # Routing (bind_hub): the registry decides which envelopes are plain page messages; the
        # hub tells which page groups have local subscribers.
        self.registry: Any = None
        self._hub: Any = None
        self._pages: Any = None  # the router (drops a group whose registration came too late)
        self._registered: Set[str] = set()  # acknowledged by Redis
        self._wanted: Dict[str, Tuple["asyncio.Future[None]", float]] = {}  # to register (deadline)
        self._unwanted: Dict[str, float] = {}  # emptied groups -> when to unregister them
        self._unregistering: Set[str] = set()  # unregistrations in flight
        self._unconfirmed: Set[str] = set()  # confirmed to clients before Redis registered them
        self._reg_wake: Optional[asyncio.Event] = None
        self._reg_timer: Optional[asyncio.TimerHandle] = None
        self._inbox_id = b"0-0"  # the last inbox entry returned by XREAD
        self._inbox_top: Tuple[int, int] = (0, 0)  # the highest inbox entry id ever returned
        self._inbox_count = 0  # the c of the last inbox entry delivered
        self._inbox_fresh = True  # the inbox may (re)start at c = 1 without a gap
        # Whether the last read returned everything the inbox had (not cut at COUNT, no loop
        # stall since), and whether it did not at some point since the last HELLO that found
        # this process's keys intact: if the inbox was deleted meanwhile (Redis lost its data, a
        # sweep), entries this process had not read may have gone with it.
        self._inbox_caught_up = True
        self._inbox_behind = False
        self._held_control: List[Entry] = []  # returned, not delivered yet (merge_replies)
        self._held_inbox: List[Entry] = []
        self._hello_at = 0.0
        self._sweep_at = 0.0
        self._said_hello = False
        #: Routing counters: entries read from the control stream and from the inbox (an inbox
        #: entry holds the page messages of one publish call between two control entries); page
        #: messages read from the control stream (routing off, or a type with a side effect);
        #: page messages read with no local subscriber (dropped); registrations and
        #: unregistrations sent; dead processes swept by this one; registrations that came after
        #: the subscription was confirmed (their group was dropped with page_discard).
        self.control_read = 0
        self.inbox_read = 0
        self.inbox_envelopes = 0
        self.control_pages = 0
        self.dropped = 0
        self.registrations = 0
        self.unregistrations = 0
        self.swept = 0
        self.late_registrations = 0
        #: Bytes on demand (docs/redis.md): envelopes sent to the publish script with their bytes,
        #: page messages sent without them, and script calls sent again because one of those
        #: needed them; the page groups whose last publish needed no bytes (at most LEAN_GROUPS).
        self.sent_with_bytes = 0
        self.sent_without_bytes = 0
        self.resends = 0
        self._lean: Set[str] = set()
        self._group_args: Dict[str, Tuple[bytes, bytes]] = {}  # page group -> its script arguments (pack_envelopes)
        # seq -> publish; insertion order is publish order, hence deadline order.
        self._pending: Dict[int, _Pending] = {}
        # seq -> envelope of a publish routed to this process's own inbox (as a reference: field
        # R) that passed its deadline before the reader reached the reference; and the highest
        # reference read so far (references come in seq order: a lower one never comes).
        self._own: Dict[int, Envelope] = {}
        self._last_ref = 0
        self._outbox: Deque[int] = collections.deque()  # seqs of publishes to send, in call order
        #: Called by the writer with ``(n, publish)`` when Redis appended a publish of this process
        #: to the control stream as entry ``n`` (redis_partitions fences it on the other instances).
        self.on_accepted: Optional[Callable[[int, "_Pending"], None]] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._wake: Optional[asyncio.Event] = None
        self._subscribed = False
        self._ready: Optional[asyncio.Event] = None
        self._closed = False
        self._tasks: List[asyncio.Task] = []
        self._sub_conn: Any = None
        self._pub_conn: Any = None
        self._offset: float = 0.0  # a lower bound of (Redis clock - loop clock), in ms
        self._last_error: Optional[str] = None
        #: The stream sequence number this process has read up to (0: none yet).
        self.position = 0
        #: After a gap: the directory snapshot loaded holds the directory changes of the control
        #: stream up to this position; those are not applied again (the rest is delivered).
        self._directory_through = 0
        self._accepted = 0  # the highest sequence number Redis gave a publish of this process
        self._wrote: Tuple[int, int] = (0, 0)  # the highest entry id a publish of this process got
        self._last_id = b"0-0"
        self._positioned = False
        # Whether the last read reached the end of the stream (nothing was waiting unread), the
        # loop did not stall between sending that read and sending the next one (a pending XREAD
        # is answered with whatever is added later, so nothing can slip past it), and the reader
        # has not lost its connection by a timeout since (Redis may have gone on without it):
        # then a stream that starts over has lost nothing this process needed.
        self._caught_up = True
        self._stalls = 0  # loop stalls seen by _tick
        self._last_tick = 0.0
        #: Numbers for monitoring: reader connections made (1 + reconnects), gaps, envelopes known
        #: lost in gaps, streams started over.
        self.subscriptions = 0
        self.gaps = 0
        self.lost = 0
        #: Directory changes read after a gap that the directory snapshot loaded already held.
        self.directory_in_snapshot = 0
        self.resets = 0
        # The shared directory (share_directory=True and a server with the in-memory directory).
        self._directory: Any = None
        self._router: Any = None
        self._loaded: Optional[asyncio.Event] = None  # start-up snapshot loaded and caught up
        self._ready_at = 0  # the stream position to reach before start() returns
        self._snap_wake: Optional[asyncio.Event] = None
        self._snap_position = 0  # the position of the stored snapshot, as far as this process knows
        self._snap_changed = False  # a change to write (else only move the stored one forward)
        self._resync: Optional[int] = None  # a gap seen at this entry: sync the directory first
        self._deferred_gap: Optional[Tuple[Optional[int], int]] = None  # its page_discard, after
        #: Directory snapshots written to Redis by this process, and failed attempts.
        self.snapshots_written = 0
        self.snapshot_advances = 0  # ... and times only its position was moved forward
        self.snapshot_failures = 0

    def share_directory(self, directory: Any, router: Any) -> None:
        """Called by the server when it is built (with its in-memory directory and its router):
        with ``share_directory=True``, keep the cluster's directory snapshot in Redis — load it
        at start before :meth:`start` returns, write it after every change, re-seed it when Redis
        lost it, load it after a gap (see docs/redis.md)."""
        if not self.share_directory_snapshot:
            return
        self._directory = directory
        self._router = router
        directory.watch(self._directory_changed)

    def _directory_changed(self) -> None:
        """The directory changed (or Redis lost the snapshot): write it."""
        self._snap_changed = True
        if self._snap_wake is not None:
            self._snap_wake.set()

    def configure(self, settings: Any, on_gap: Any = None) -> None:
        super().configure(settings, on_gap)
        self.alive_ttl = float(getattr(settings, "presence_ttl", self.alive_ttl))

    def bind_hub(self, hub: Any, router: Any, registry: Any) -> None:
        """Called by the server when it is built: route plain page messages to the processes
        that have subscribers (``hub.register`` / ``hub.on_empty`` call :meth:`register` and
        :meth:`unregister`; see docs/redis.md "Routing")."""
        self._hub = hub
        self._pages = router
        self.registry = registry
        hub.register = self.register
        hub.on_empty = self.unregister

    def routing_stats(self) -> Dict[str, int]:
        """The routing counters (``GET /api/stats`` ``redis``, ``/metrics``)."""
        return {"control_read": self.control_read, "inbox_read": self.inbox_read,
                "inbox_envelopes": self.inbox_envelopes,
                "control_pages": self.control_pages, "dropped": self.dropped,
                "registered": len(self._registered), "registrations": self.registrations,
                "unregistrations": self.unregistrations, "swept": self.swept,
                "late_registrations": self.late_registrations, "sent_with_bytes": self.sent_with_bytes,
                "sent_without_bytes": self.sent_without_bytes, "resends": self.resends,
                "directory_in_snapshot": self.directory_in_snapshot}

    # --- registrations ------------------------------------------------------------------------------
    def register(self, group: str) -> Optional[Awaitable[None]]:
        """The first local subscriber of ``group`` is joining: None when this process is
        registered for it already, else a future that completes once Redis has registered it
        (then a message published after the client is told page_add reaches this process's
        inbox), or at ``publish_timeout`` if Redis does not answer (the group is dropped with
        page_discard when the registration lands later)."""
        self._unwanted.pop(group, None)
        if group in self._registered and group not in self._unregistering:
            return None
        wanted = self._wanted.get(group)
        if wanted is not None:
            return wanted[0]
        loop = self._loop
        if loop is None or self._reg_wake is None:  # not started: nothing to route yet
            return None
        future: "asyncio.Future[None]" = loop.create_future()
        self._wanted[group] = (future, loop.time() + self.publish_timeout)
        self._reg_wake.set()
        if not self._subscribed:
            # Redis is out of reach: nothing can be published meanwhile; confirm now, register
            # when it is back (see _register_forever).
            self._unconfirmed.add(group)
            future.set_result(None)
            return None
        return future

    def unregister(self, group: str) -> None:
        """The last local subscriber of ``group`` left: unregister it after UNREGISTER_DELAY
        (unless one joins again meanwhile)."""
        if group not in self._registered or self._loop is None or self._reg_wake is None:
            return
        at = self._loop.time() + UNREGISTER_DELAY
        self._unwanted[group] = at
        if self._reg_timer is None:
            self._reg_timer = self._loop.call_at(at, self._reg_due)

    def _reg_due(self) -> None:
        self._reg_timer = None
        if self._reg_wake is not None:
            self._reg_wake.set()

    async def _register_forever(self) -> None:
        """The one registrar: sends (un)registrations in batches, one script call in flight."""
        assert self._reg_wake is not None and self._loop is not None and self._ready is not None
        wake, loop = self._reg_wake, self._loop
        conn: Any = None
        delay = self.reconnect_min
        await self._ready.wait()  # after the first HELLO: this process is known alive
        while True:
            await wake.wait()
            wake.clear()
            now = loop.time()
            groups = self._hub.groups if self._hub is not None else {}
            adds = list(self._wanted)
            due = [g for g, at in self._unwanted.items() if at <= now]
            for g in due:  # no longer unwanted, whether it goes or a subscriber joined meanwhile
                del self._unwanted[g]
            if self._unwanted and self._reg_timer is None:
                self._reg_timer = loop.call_at(min(self._unwanted.values()), self._reg_due)
            removes = [g for g in due if g not in groups and g in self._registered]
            if not adds and not removes:
                continue
            self._unregistering.update(removes)
            args: List[Any] = [self.key_prefix, self.origin]
            for g in adds:
                args += ["+", g]
            for g in removes:
                args += ["-", g]
            try:
                async with asyncio.timeout(self.socket_timeout):
                    if conn is None:
                        conn = await self._connect()
                    await conn.send_command("EVAL", REGISTER_SCRIPT, 0, *args, check_health=False)
                    routing = await conn.read_response()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._unregistering.difference_update(removes)
                for g in removes:  # try again later
                    self._unwanted.setdefault(g, loop.time() + delay)
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError("no reply from Redis in time")
                log.warning("could not register page groups in Redis: %s; retrying in %.1f s",
                            _describe(exc), delay, exc_info=not isinstance(exc, (RedisError, OSError, TimeoutError)))
                if conn is not None:
                    await _disconnect(conn)
                    conn = None
                now = loop.time()
                for g, (future, deadline) in list(self._wanted.items()):
                    if deadline <= now + delay and not future.done():
                        # Confirm rather than hang the client; dropped (page_discard) once the
                        # registration lands, since messages may pass by until then.
                        self._unconfirmed.add(g)
                        future.set_result(None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
                wake.set()
                continue
            delay = self.reconnect_min
            self.registrations += len(adds)
            self.unregistrations += len(removes)
            self._unregistering.difference_update(removes)
            self._registered.difference_update(removes)
            for g in adds:
                self._registered.add(g)
                # Unregistered later unless a subscriber joined by then (the subscribe may have
                # been abandoned: the connection closed while Redis registered the group).
                self.unregister(g)
                wanted = self._wanted.pop(g, None)
                if wanted is not None and not wanted[0].done():
                    wanted[0].set_result(None)
                if g in self._unconfirmed:
                    self._unconfirmed.discard(g)
                    if not routing:
                        continue  # every envelope went on the control stream meanwhile: none missed
                    self.late_registrations += 1
                    log.warning("page group %r was registered in Redis after its subscription was "
                                "confirmed: its subscribers get page_discard (they resubscribe)", g)
                    if self._pages is not None:
                        self._pages.drop_group(g)
            if self._wanted:
                wake.set()

    # --- state ----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether this process is reading the stream right now (publishing is possible)."""
        return self._subscribed

    def _unavailable(self, why: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"Redis broker unavailable ({redact_url(self.url)}): {why}")

    def history_store(self, size: int, ttl: float, live: Any = tuple) -> Any:
        """Cluster-wide positions and history in the same Redis (:mod:`tornado_rt.redis_history`):
        from now on the publish script numbers page messages and keeps their history."""
        from .redis_history import RedisHistory
        self.history_size = size
        self.history_ttl_ms = max(1, int(ttl * 1000))
        return RedisHistory(self.url, self.channel_prefix, ttl, live)

    def presence_store(self, ttl: float) -> Any:
        """Cluster-wide presence in the same Redis (:mod:`tornado_rt.redis_presence`)."""
        from .redis_presence import RedisPresence
        return RedisPresence(self.url, self.channel_prefix, self.origin, ttl)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, find the read position, and start the publisher. Raises ``BrokerUnavailable``
        when Redis cannot be reached within ``start_timeout`` seconds (nothing is left running)."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._loaded = asyncio.Event()
        self._snap_wake = asyncio.Event()
        self._reg_wake = asyncio.Event()
        self._last_tick = self._loop.time()
        self._tasks = [self._loop.create_task(self._read_forever()),
                       self._loop.create_task(self._write_forever()),
                       self._loop.create_task(self._register_forever()),
                       self._loop.create_task(self._tick())]
        if self._directory is not None:
            self._tasks.append(self._loop.create_task(self._write_snapshots()))
        try:
            async with asyncio.timeout(self.start_timeout):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise self._unavailable(f"not reachable within {self.start_timeout:g} s "
                                    f"({self._last_error or 'no reply'})") from None
        if not self._loaded.is_set():
            # The directory snapshot was loaded: apply what followed it before serving anyone.
            limit = max(60.0, self.start_timeout)
            log.info("reading the Redis stream from the directory snapshot's position %d up to %d",
                     self.position, self._ready_at)
            try:
                async with asyncio.timeout(limit):
                    await self._loaded.wait()
            except TimeoutError:
                await self.close()
                raise self._unavailable(f"could not read the stream up to position {self._ready_at} "
                                        f"within {limit:g} s (at {self.position})") from None

    async def close(self) -> None:
        """Stop the reader and the publisher; pending publishes fail with BrokerUnavailable."""
        was_running = bool(self._tasks) and self._said_hello
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # gather: the tasks' own CancelledError is collected, a cancellation of close() is not.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subscribed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = self._unavailable("broker closed")
        for seq in list(self._pending):
            self._fail(seq, error)
        self._outbox.clear()
        if self._reg_timer is not None:
            self._reg_timer.cancel()
            self._reg_timer = None
        if was_running:
            await self._goodbye()
        for conn in (self._sub_conn, self._pub_conn):
            if conn is not None:
                await _disconnect(conn)
        self._sub_conn = self._pub_conn = None
        await self._pool.disconnect()

    async def _goodbye(self) -> None:
        """At shutdown: remove this process's registrations and inbox (best effort: else the
        sweep of another process does, once the alive key expired)."""
        conn: Any = None
        try:
            conn = await self._connect()
            async with asyncio.timeout(self.socket_timeout):
                await conn.send_command("EVAL", SWEEP_SCRIPT, 0, self.key_prefix, self.origin, check_health=False)
                await conn.read_response()
        except Exception as exc:
            log.info("could not remove this process's registrations from Redis at shutdown (%s): "
                     "they are swept once its alive key expires", _describe(exc))
        finally:
            if conn is not None:
                await _disconnect(conn)

    # --- publishing -----------------------------------------------------------------------------
    def publish(self, envelope: Envelope, deadline: Optional[float] = None) -> "asyncio.Future[None]":
        """Queue ``envelope`` for Redis; see the module docstring for what the future means.
        ``deadline``: the loop time it must be accepted by (default: now + ``publish_timeout``;
        one held back by a PartitionedRedisBroker keeps its original one)."""
        if not self._subscribed:
            raise self._not_ready()
        seq = next(self._seq)
        # Not encoded here: the writer encodes it only when Redis needs its bytes (see _send).
        loop = self._loop
        assert loop is not None and self._wake is not None
        future = loop.create_future()  # a failure is marked retrieved in _fail: no done callback
        if deadline is None:
            deadline = loop.time() + self.publish_timeout
        self._pending[seq] = _Pending(future, deadline, envelope)
        self._outbox.append(seq)
        self._wake.set()
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return future

    def publish_batch(self, envelopes: Sequence[Envelope],
                      deadline: Optional[float] = None) -> "asyncio.Future[None]":
        """:meth:`publish` of each envelope, in order, with ONE future for all of them (what
        ``RealtimeServer.submit_now`` awaits for an HTTP batch): it completes once every one of
        them would have completed its own future (the same deadline, the same moments), with
        None, or with the first ``BrokerUnavailable`` one of them got (the others still go
        their way). Raises ``BrokerUnavailable`` as :meth:`publish` does, then for none of them.
        Without a future, a completion, a deadline and a wake-up per envelope. ``deadline``: as
        for :meth:`publish`."""
        if not self._subscribed:
            raise self._not_ready()
        loop = self._loop
        assert loop is not None and self._wake is not None
        future = loop.create_future()
        if not envelopes:
            future.set_result(None)
            return future
        batch = _Batch(future, len(envelopes))
        if deadline is None:
            deadline = loop.time() + self.publish_timeout
        pending, outbox, seqs = self._pending, self._outbox, self._seq
        for envelope in envelopes:
            seq = next(seqs)
            pending[seq] = _Pending(batch, deadline, envelope)
            outbox.append(seq)
        self._wake.set()
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return future

    def _not_ready(self) -> BrokerUnavailable:
        """Why a publish is refused at once (this process's reader is not connected)."""
        if self._closed:
            return self._unavailable("broker closed")
        if not self._tasks:
            return self._unavailable("broker not started")
        return self._unavailable(f"not connected ({self._last_error or 'reconnecting'})")

    def _expire(self) -> None:
        """At a publish's deadline: accepted by Redis → it succeeded (delivery follows when this
        process reads it); not accepted → it failed, and Redis will refuse it if it runs it later."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        done = []
        for seq, entry in self._pending.items():
            if entry.deadline > now:
                self._timer = loop.call_at(entry.deadline, self._expire)
                break
            done.append((seq, entry))
        if not done:
            return
        error = self._unavailable(f"no answer from Redis within {self.publish_timeout:g} s "
                                  "(the publish will not be applied later)")
        for seq, entry in done:
            if entry.accepted:
                del self._pending[seq]
                if entry.accepted == -1 and seq > self._last_ref:
                    # Its inbox entry holds only a reference to it: keep the envelope until the
                    # reader reaches it (it is behind by more than publish_timeout).
                    self._own[seq] = entry.envelope
                    if len(self._own) > self.stream_length:  # lost with a trimmed/deleted inbox
                        del self._own[next(iter(self._own))]
                if not entry.future.done():
                    entry.future.set_result(None)
            else:
                self._fail(seq, error)

    async def _write_forever(self) -> None:
        """The one writer: sends queued publishes in call order, a batch per script call (and,
        when an envelope sent without its bytes needed them, the rest of the batch again with
        its bytes, before anything else)."""
        assert self._wake is not None and self._loop is not None
        wake, outbox, pending, loop = self._wake, self._outbox, self._pending, self._loop
        while True:
            await wake.wait()
            wake.clear()
            while outbox:
                batch: List[Tuple[int, Optional[bytes], _Pending]] = []
                now = loop.time()
                while outbox and len(batch) < MAX_BATCH:
                    seq = outbox.popleft()
                    entry = pending.get(seq)
                    if entry is not None and not entry.future.done() and entry.deadline > now:
                        batch.append((seq, None, entry))
                lean = True
                while batch:
                    rest = await self._attempt(batch, lean)
                    # The rest of the batch, from an envelope that came without the bytes it
                    # needed: at once, each with its bytes and its own deadline (one past it is
                    # not sent: it fails at its deadline, as if Redis had refused it).
                    now = loop.time()
                    batch = [item for item in rest if not item[2].future.done() and item[2].deadline > now]
                    lean = False

    async def _attempt(self, batch: List[Tuple[int, Optional[bytes], _Pending]],
                       lean: bool) -> List[Tuple[int, Optional[bytes], _Pending]]:
        """One script call for ``batch`` (see :meth:`_send`); on failure, fails its publishes (or
        waits out their deadlines when Redis may still run the script) and returns []."""
        loop = self._loop
        assert loop is not None
        sent = False
        try:
            # Every step is bounded by the first deadline of the batch.
            async with asyncio.timeout_at(batch[0][2].deadline):
                conn = self._pub_conn
                if conn is None:
                    conn = await self._connect_publisher()
                    self._pub_conn = conn
                sent = True  # from here on Redis may run the script (ambiguous on error)
                return await self._send(conn, batch, lean)
        except asyncio.CancelledError:
            raise
        except ResponseError as exc:  # Redis answered with an error: nothing was applied
            self._last_error = _describe(exc)
            log.warning("publish to Redis refused: %s", self._last_error)
            await self._drop_publisher()
            error = self._unavailable(f"publish refused ({self._last_error})")
            for seq, _, _ in batch:
                self._fail(seq, error)
        except Exception as exc:  # the writer must survive anything: Redis, OS, timeouts
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no reply from Redis within {self.publish_timeout:g} s")
            self._last_error = _describe(exc)
            log.warning("publish to Redis failed: %s", self._last_error,
                        exc_info=not isinstance(exc, (RedisError, OSError, TimeoutError)))
            await self._drop_publisher()
            if not sent:  # never reached Redis: certainly not applied
                error = self._unavailable(f"publish failed ({self._last_error})")
                for seq, _, _ in batch:
                    self._fail(seq, error)
            else:
                # Redis may still run the script, refusing each envelope past its deadline:
                # each fails at its deadline (_expire). Nothing more is sent before the last
                # of those deadlines, so nothing sent later can overtake these in Redis.
                await asyncio.sleep(max(0.0, batch[-1][2].deadline - loop.time()))
        return []

    async def _drop_publisher(self) -> None:
        conn, self._pub_conn = self._pub_conn, None
        if conn is not None:
            await _disconnect(conn)

    async def _connect_publisher(self) -> Any:
        """A publishing connection: connected, the script loaded, the clock offset measured."""
        conn = await self._connect()
        try:
            await conn.send_command("SCRIPT", "LOAD", PUBLISH_SCRIPT, check_health=False)
            sha = await conn.read_response()
            if (sha.decode() if isinstance(sha, bytes) else sha) != PUBLISH_SHA:
                raise _protocol_error(f"unexpected reply to SCRIPT LOAD: {sha!r}")
            await conn.send_command("TIME", check_health=False)
            reply = await conn.read_response()
            self._offset = int(reply[0]) * 1000 + int(reply[1]) / 1000 - _now(self._loop) * 1000
        except BaseException:
            await _disconnect(conn)
            raise
        return conn

    async def _connect(self) -> Any:
        conn = self._pool.make_connection()
        try:
            async with asyncio.timeout(self.connect_timeout + self.socket_timeout):
                await conn.connect()  # TCP connect, then the handshake (CLIENT SETNAME, AUTH, SELECT)
        except BaseException:
            await _disconnect(conn)
            raise
        return conn

    async def _send(self, conn: Any, batch: List[Tuple[int, Optional[bytes], _Pending]],
                    lean: bool) -> List[Tuple[int, Optional[bytes], _Pending]]:
        """One script call for the batch; marks each publish accepted or fails it (refused).

        ``lean``: a plain page message to a group whose last publish needed no bytes (``_lean``)
        goes without them (an empty argument); an envelope is encoded only when its bytes are
        sent. Returns the publishes to send again, with their bytes, in order: from the first one
        that came without the bytes Redis needed (the script applied nothing from it on), else []."""
        parts = [b"", self._script_head,
                 _bulk(b"%d-%d" % max((max(self.position, self._accepted), 0), self._wrote,
                                      self._inbox_top)),
                 _bulk(b"%d" % self.history_size),
                 _bulk(b"%d" % self.history_ttl_ms), _bulk(self.key_prefix.encode()),
                 _bulk(self.origin.encode())]
        hints = self._lean
        items, groups, omitted, count = pack_envelopes(parts, batch, self._offset - DEADLINE_MARGIN_MS,
                                                       self.registry, hints, self.origin, lean, self._group_args,
                                                       self.key_prefix)
        parts[0] = b"*%d\r\n" % (10 + count)
        self.sent_without_bytes += omitted
        self.sent_with_bytes += len(batch) - omitted
        await conn.send_packed_command([b"".join(parts)], check_health=False)
        reply = await conn.read_response()
        # Redis ran the script between sending and now: Redis time - now is a lower bound.
        self._offset = reply[0] - _now(self._loop) * 1000
        wrote = entry_key(reply[1])
        if wrote > self._wrote:
            self._wrote = wrote
        codes, resend = read_codes(reply[2:])
        if len(codes) != len(items):
            raise _protocol_error(f"publish script reply: {len(codes)} codes for {len(items)} envelopes")
        refused = None
        pending, accepted, on_accepted = self._pending, self._accepted, self.on_accepted
        for (seq, _, entry), n, routed in zip(items, codes if resend is None else codes[:resend], groups):
            if routed is not None:
                if n == REPLY_NOWHERE_LEAN or n == REPLY_OWN_LEAN:
                    if routed not in hints:
                        if len(hints) >= LEAN_GROUPS:
                            hints.clear()
                        hints.add(routed)
                elif n:
                    hints.discard(routed)
            if n == REPLY_NOWHERE_LEAN or n == REPLY_ELSEWHERE:
                # routed to other processes' inboxes only (or none): nothing comes back here
                # (completed by whoever takes it out of _pending: once, also for a _Batch)
                if pending.pop(seq, None) is not None and not entry.future.done():
                    entry.future.set_result(None)
            elif n > 0:
                entry.accepted = n
                if n > accepted:
                    accepted = n
                if on_accepted is not None:
                    on_accepted(n, entry)
            elif n:  # REPLY_OWN, REPLY_OWN_LEAN: a reference in this process's inbox
                entry.accepted = REPLY_OWN
            else:
                if refused is None:
                    refused = self._unavailable(f"Redis ran the publish after its deadline "
                                                f"({self.publish_timeout:g} s): not applied")
                self._fail(seq, refused)
        self._accepted = accepted
        if resend is None:
            return []
        # Sent without its bytes, and Redis needed them (another process registered the group,
        # a history, the control stream): nothing of it or after it was applied.
        routed = groups[resend]
        if routed is not None:
            hints.discard(routed)
        self.resends += 1
        return items[resend:]

    # --- reading ----------------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Notice loop stalls: a tick that comes more than STALL seconds late counts one."""
        loop = self._loop
        assert loop is not None
        period = STALL / 5
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            if now - self._last_tick > period + STALL:
                self._stalls += 1
            self._last_tick = now

    def _fresh(self, stalls_before: int) -> bool:
        """No loop stall since ``stalls_before`` was read, nor one going on unnoticed yet."""
        return self._stalls == stalls_before and _now(self._loop) - self._last_tick < STALL

    async def _read_forever(self) -> None:
        delay = self.reconnect_min
        while not self._closed:
            conn = None
            try:
                # inside the try: a connection that cannot even be made (a bad option for its
                # kind of socket) is logged and reported by start(), not a reader task that died
                conn = self._sub_conn = self._pool.make_connection()
                async with asyncio.timeout(self.connect_timeout + self.socket_timeout):
                    await conn.connect()  # TCP connect, then the handshake (CLIENT SETNAME, AUTH, SELECT)
                await self._check_position(conn, self.socket_timeout)
                await self._hello(conn, self.socket_timeout)
                if self._directory is not None and self.subscriptions:
                    await self._sync_directory(conn, self.socket_timeout, None)
                self._subscribed = True
                self.subscriptions += 1
                self._last_error = None
                if self.subscriptions > 1:
                    log.warning("reading the Redis stream %s again from position %d", self.stream,
                                self.position)
                else:
                    log.info("reading the Redis stream %s at %s from position %d", self.stream,
                             redact_url(self.url), self.position)
                assert self._ready is not None and self._loaded is not None
                self._ready.set()
                if self.position >= self._ready_at:
                    self._loaded.set()
                delay = self.reconnect_min
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must survive anything: Redis, OS, timeouts
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError("no reply from Redis in time")
                    self._caught_up = False  # Redis may have gone on without this process
                self._last_error = _describe(exc)
                if not isinstance(exc, (RedisError, OSError, TimeoutError)):
                    log.error("unexpected error on the Redis stream reader", exc_info=exc)
                if self._subscribed:
                    log.warning("Redis stream reader lost its connection: %s; reconnecting",
                                self._last_error)
                else:
                    # Before the first connection start() reports the failure itself.
                    log.log(logging.WARNING if self.subscriptions else logging.DEBUG,
                            "cannot read from Redis at %s: %s; retrying in %.1f s",
                            redact_url(self.url), self._last_error, delay)
            finally:
                self._subscribed = False
                self._sub_conn = None
                await _disconnect(conn)
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def _stream_top(self, conn: Any, timeout: float) -> Optional[bytes]:
        """The id of the stream's last entry, or None when it has none."""
        await conn.send_command("XREVRANGE", self.stream, "+", "-", "COUNT", 1, check_health=False)
        async with asyncio.timeout(timeout):
            reply = await conn.read_response()
        return reply[0][0] if reply else None

    async def _check_position(self, conn: Any, timeout: float) -> None:
        """At the first connection, start at the end of the stream. Later (reconnect, idle),
        notice a stream that started over below this process's position (it would never
        return an entry to this position: see _reset)."""
        top = await self._stream_top(conn, timeout)
        if not self._positioned and self._directory is not None:
            stored = await self._read_snapshot(conn, timeout)
            if stored is not None:
                position, snapshot = stored
                try:
                    self._directory.load_quietly(snapshot)
                except ValueError as exc:
                    log.error("the directory snapshot in Redis (%s) is not valid, ignored: %s",
                              self.directory_key, exc)
                else:
                    self._positioned = True
                    self.position = self._snap_position = position
                    self._last_id = b"%d-0" % position
                    self._ready_at = _seq_of(top)[0] if top is not None else 0
                    counts = {k: len(v) for k, v in snapshot.items() if isinstance(v, dict)}
                    log.info("directory loaded from Redis (%s at position %d): %s", self.directory_key,
                             position, ", ".join(f"{n} {k}" for k, n in counts.items()) or "empty")
                    return
        if not self._positioned:
            self._positioned = True
            if top is not None:
                self.position = self._snap_position = _seq_of(top)[0]
                self._last_id = top
            return
        if top is not None and _seq_of(top)[0] < self.position:
            self._reset((0, 0), self.position)
            self.position = 0
            self._last_id = b"0-0"

    def _interval(self) -> float:
        """The reader's BLOCK time: the health check interval, at most a third of the liveness
        TTL (the alive key is refreshed between two reads)."""
        return max(0.05, min(self.health_check_interval, self.alive_ttl / 3))

    async def _hello(self, conn: Any, timeout: float) -> None:
        """Refresh this process's alive key (HELLO_SCRIPT). When its registrations were gone
        (Redis lost its data, or a sweep removed them while this process was stalled longer than
        the liveness TTL), the script registered them again; page messages may have passed this
        process by meanwhile unless routing was off (no routing key: every envelope went on the
        control stream) or had not started yet: then it is a gap (page_discard)."""
        loop = self._loop
        assert loop is not None
        first = not self._said_hello
        grace = 0 if first else int(self.alive_ttl * 1000)
        await conn.send_command("EVAL", HELLO_SCRIPT, 0, self.key_prefix, self.origin,
                                int(self.alive_ttl * 1000), grace, check_health=False)
        async with asyncio.timeout(timeout):
            intact, now, since, created, inbox_exists = await conn.read_response()
        if not intact and not first and self._registered:
            # Register every group again (the routing key, re-created with a grace if it was
            # gone, keeps routing off until then; if routing was on, it is a gap below).
            args: List[Any] = [self.key_prefix, self.origin]
            for group in self._registered:
                args += ["+", group]
            await conn.send_command("EVAL", REGISTER_SCRIPT, 0, *args, check_health=False)
            async with asyncio.timeout(timeout):
                await conn.read_response()
        self._hello_at = loop.time() + self.alive_ttl / 3
        if not self._sweep_at:
            self._sweep_at = loop.time() + self.alive_ttl * (1 + random.random())
        self._said_hello = True
        if first or intact:
            self._inbox_behind = not self._inbox_caught_up
            return
        self._inbox_fresh = True  # the inbox may have been deleted with the registrations
        if not inbox_exists:
            # Deleted (swept, or Redis lost it): a new one may start with ids below this
            # process's last one (the control stream did not move meanwhile): read it from the start.
            self._inbox_id = b"0-0"
            self._inbox_count = 0
        if self._inbox_behind or not self._inbox_caught_up:
            log.warning("this process's inbox was gone from Redis (Redis lost its data, or this process "
                        "stalled longer than %g s) while it had not read all of it", self.alive_ttl)
            self._gap(None, self.position)
        elif self._registered and not created and since <= now:
            log.warning("the registrations of this process's page groups were gone from Redis while "
                        "routing was on (its alive key had expired: Redis lost its data, or this process "
                        "stalled longer than %g s); registered again", self.alive_ttl)
            self._gap(None, self.position)
        elif self._registered:
            log.warning("the registrations of this process's page groups were gone from Redis (Redis "
                        "lost its data); registered again while every envelope went on the control stream: "
                        "nothing was lost")

    async def _sweep(self, conn: Any, timeout: float) -> None:
        """Remove the registrations and inboxes of processes whose alive key expired."""
        loop = self._loop
        assert loop is not None
        self._sweep_at = loop.time() + self.alive_ttl * (1 + random.random())
        await conn.send_command("EVAL", SWEEP_SCRIPT, 0, self.key_prefix, "", check_health=False)
        async with asyncio.timeout(timeout):
            removed = await conn.read_response()
        if removed:
            self.swept += int(removed)
            log.info("removed the registrations and inboxes of %d process(es) whose alive key expired "
                     "from Redis", removed)

    async def _read(self, conn: Any) -> None:
        """Deliver every entry after this process's positions (the control stream and its inbox,
        merged into publish order) until the connection breaks."""
        interval = self._interval()
        block = str(max(1, int(interval * 1000)))
        count = READ_COUNT
        read = conn.read_response
        loop = self._loop
        assert loop is not None
        stream_name = self.stream.encode()
        # The XREAD commands, packed here (redis-py's pack_command per read cost more than the
        # read's own parsing): what follows COUNT <n> [BLOCK <ms>], then the ids.
        xread = _bulk(b"XREAD") + _bulk(b"COUNT")
        blocks = _bulk(b"BLOCK") + _bulk(block.encode())
        streams = _bulk(b"STREAMS") + _bulk(stream_name) + _bulk(self.inbox.encode())
        send = conn.send_packed_command
        # A read that finds nothing is followed by a blocking one. A blocking XREAD is answered
        # when one of its streams gets entries; Redis before 7.2 then answers with that stream
        # alone, so its reply is not a snapshot of both: entries of the other stream may come
        # before these. Such a reply is held and a non-blocking XREAD (atomic) follows.
        blocking = False
        while True:
            now = loop.time()
            if now >= self._hello_at:
                await self._hello(conn, interval)
            if now >= self._sweep_at:
                await self._sweep(conn, interval)
            stalls = self._stalls
            control_id = self._held_control[-1][0] if self._held_control else self._last_id
            ids = _bulk(control_id) + _bulk(self._inbox_id)
            if blocking:
                await send([b"*10\r\n", xread, _bulk(b"%d" % count), blocks, streams, ids], check_health=False)
            else:
                await send([b"*8\r\n", xread, _bulk(b"%d" % count), streams, ids], check_health=False)
            async with asyncio.timeout(2 * interval):
                reply = await read()
            if reply is None:  # nothing new (within the BLOCK time)
                if self._held_control or self._held_inbox:
                    self._deliver_merged([], False, [], False)
                    if self._resync is not None:
                        await self._resync_directory(conn, interval)
                        blocking = False
                        continue
                self._caught_up = self._inbox_caught_up = self._fresh(stalls)
                if blocking:
                    await self._check_position(conn, interval)
                blocking = True
                continue
            control: List[Entry] = []
            inbox: List[Entry] = []
            for name, entries in reply:
                if name == stream_name:
                    control = entries
                else:
                    inbox = entries
            if inbox:
                self._inbox_id = inbox[-1][0]
                self._inbox_top = max(self._inbox_top, entry_key(self._inbox_id))
            alone = False  # inbox entries that nothing unread on the control stream can precede
            if blocking and not (control and inbox) and (inbox or self._may_have_inbox()):
                if (inbox and not self._held_control and not self._held_inbox
                        and entry_key(inbox[-1][0])[0] <= entry_key(self._last_id)[0]):
                    # Every inbox entry here is <n>-<k> with n at most the last control entry
                    # read: an unread control entry (n + 1 or more) comes after all of them, so
                    # they are in order now, without a second XREAD (the common case: page
                    # messages with no control envelope since).
                    alone = True
                else:
                    self._held_control += control
                    self._held_inbox += inbox
                    blocking = False
                    continue
            blocking = False
            control_full = len(control) >= count
            if self._held_control or self._held_inbox or (control and inbox):
                size = self._deliver_merged(control, control_full, inbox, len(inbox) >= count)
            elif control:
                size = self._on_entries(control)
            else:
                size = self._on_inbox(inbox)
            if self._resync is not None:
                await self._resync_directory(conn, interval)
            fresh = self._fresh(stalls)
            inbox_full = len(inbox) >= count
            if not alone:  # (a reply of the inbox alone says nothing of the control stream)
                self._caught_up = not control_full and fresh
            self._inbox_caught_up = not inbox_full and fresh
            if not self._inbox_caught_up:
                self._inbox_behind = True
            got = len(control) + len(inbox)
            count = max(1, min(READ_COUNT, READ_BYTES * got // max(1, size)))
            # After inbox entries alone, not cut at COUNT: the next read may block at once (it
            # returns at once when there is more); after anything else a non-blocking read
            # follows, as a blocking one answered with one stream would be read again.
            blocking = alone and not inbox_full

    async def _resync_directory(self, conn: Any, timeout: float) -> None:
        """After a gap in the control stream (reading stopped before it): sync the directory
        with its snapshot, then tell the clients (the deferred page_discard)."""
        at, self._resync = self._resync, None
        assert at is not None
        try:
            await self._sync_directory(conn, timeout, at)
        finally:
            deferred, self._deferred_gap = self._deferred_gap, None
            if deferred is not None:
                self._discard(*deferred)

    def _may_have_inbox(self) -> bool:
        """Whether this process may have subscribers whose page messages come through its
        inbox (registered, or registering, or unregistering): else a reply of the control
        stream alone needs no second read."""
        return bool(self._registered or self._wanted or self._unregistering or self._unconfirmed)

    def _deliver_merged(self, control: List[Entry], control_full: bool, inbox: List[Entry],
                        inbox_full: bool) -> int:
        """Deliver the entries of both streams (after those held back) in publish order."""
        ready, held_control, held_inbox = merge_replies(self._held_control + control, control_full,
                                                        self._held_inbox + inbox, inbox_full)
        self._held_control, self._held_inbox = held_control, held_inbox
        size = 0
        i, n = 0, len(ready)
        while i < n:
            from_inbox = ready[i][0]
            j = i
            while j < n and ready[j][0] == from_inbox:
                j += 1
            run = [entry for _, entry in ready[i:j]]
            if from_inbox:
                size += self._on_inbox(run)
            else:
                size += self._on_entries(run)
                if self._resync is not None:
                    # Stopped at a gap to sync the directory: the control stream is read again
                    # from its position; the inbox entries not delivered yet are held.
                    self._held_control = []
                    self._held_inbox = [entry for from_i, entry in ready[j:] if from_i] + self._held_inbox
                    break
            i = j
        return size

    def _on_inbox(self, entries: List[Entry]) -> int:
        """Deliver entries of this process's inbox (fields ``t``, ``c``, then ``e`` [``p``, ``q``]:
        one envelope, or ``E``: several, each ``<length>,<epoch>,<offset>;`` then the envelope);
        returns the bytes of envelope text."""
        size = 0
        on_envelope = self._on_envelope
        for entry_id, fields in entries:
            try:
                if (len(fields) < 6 or fields[0] != b"t" or fields[2] != b"c"
                        or (fields[4] not in (b"e", b"E", b"R") and fields[4][:1] != b"m")):
                    raise ValueError("not an envelope entry")
                at = int(fields[1]) / 1000
                c = int(fields[3])
            except (ValueError, TypeError, IndexError):
                log.error("ignored a malformed entry %r on Redis stream %s", entry_id, self.inbox)
                continue
            expected = self._inbox_count + 1
            self._inbox_count = c
            if c != expected and not (c == 1 and self._inbox_fresh):
                # Trimmed before this process read it (c > expected), or the inbox was deleted
                # and started over (c < expected): page messages lost (entries, each one or more).
                self._gap(c - expected if c > expected else None, expected - 1, self.inbox)
            self._inbox_fresh = False
            self.inbox_read += 1
            if fields[4] == b"e":  # one envelope, written as on the control stream
                payload = fields[5]
                position = None
                if len(fields) >= 10 and fields[6] == b"p":
                    try:
                        position = (fields[7].decode(), int(fields[9]))
                    except (ValueError, UnicodeDecodeError):
                        position = None
                size += len(payload)
                self.inbox_envelopes += 1
                on_envelope(payload, at, position, True)
                continue
            blob = fields[5]
            if fields[4] == b"R":  # references to this process's own publishes
                self._on_refs(entry_id, blob, at)
                continue
            if fields[4] != b"E":  # a field per envelope: "m" or "m<epoch>,<offset>", the envelope
                try:
                    for j in range(4, len(fields) - 1, 2):
                        name, payload = fields[j], fields[j + 1]
                        if name[:1] != b"m":
                            raise ValueError("not an envelope field")
                        if len(name) > 1:
                            epoch, offset = name[1:].split(b",")
                            position = (epoch.decode(), int(offset))
                        else:
                            position = None
                        size += len(payload)
                        self.inbox_envelopes += 1
                        on_envelope(payload, at, position, True)
                except (ValueError, UnicodeDecodeError):
                    log.error("ignored the rest of a malformed entry %r on Redis stream %s", entry_id, self.inbox)
                continue
            pos, stop = 0, len(blob)
            try:
                while pos < stop:
                    cut = blob.index(b";", pos)
                    length, epoch, offset = blob[pos:cut].split(b",")
                    pos = cut + 1 + int(length)
                    payload = blob[cut + 1:pos]
                    position = (epoch.decode(), int(offset)) if epoch else None
                    size += len(payload)
                    self.inbox_envelopes += 1
                    on_envelope(payload, at, position, True)
            except (ValueError, UnicodeDecodeError):
                log.error("ignored the rest of a malformed entry %r on Redis stream %s", entry_id, self.inbox)
        return size

    def _on_refs(self, entry_id: bytes, blob: bytes, at: float) -> None:
        """Deliver this process's own page messages named by an inbox entry's ``R`` field
        (:func:`parse_refs`: ranges ``<first>:<last>;``, or ``<seq>,<epoch>,<offset>;``). The
        envelope is this process's: still pending, or kept in ``_own`` past its deadline."""
        pending, own = self._pending, self._own
        try:
            refs = parse_refs(blob)
        except (ValueError, UnicodeDecodeError):
            refs = None
        if refs is None:  # malformed somewhere: deliver the refs before the first bad one
            self._on_refs_slowly(entry_id, blob, at)
            return
        seqs, positions = refs
        if not seqs:
            return
        self.inbox_envelopes += len(seqs)
        if seqs[-1] > self._last_ref:  # in seq order: the last is the highest
            self._last_ref = seqs[-1]
        hand, take = self._hand, self._take
        for i, seq in enumerate(seqs):
            entry = pending.pop(seq, None)
            envelope = entry.envelope if entry is not None else take(seq, entry_id)
            if envelope is not None:
                hand(envelope, at, positions[i] if positions is not None else None, entry)

    def _take(self, seq: int, entry_id: bytes) -> Optional[Envelope]:
        """The envelope of this process's publish ``seq`` that its reference names, once its
        publish was completed (kept in ``_own``); None (logged) when it is no longer held."""
        own = self._own
        envelope = own.pop(seq, None)
        while own and next(iter(own)) < seq:  # their references were lost
            del own[next(iter(own))]
        if envelope is None:
            log.error("inbox entry %r on Redis stream %s names publish %d of this process, "
                      "which it no longer holds: not delivered here", entry_id, self.inbox, seq)
        return envelope

    def _on_refs_slowly(self, entry_id: bytes, blob: bytes, at: float) -> None:
        """:meth:`_on_refs` one reference (or range) at a time: those before a malformed one are delivered,
        the rest of the entry is logged and ignored."""
        pending, own = self._pending, self._own
        try:
            for ref in blob.split(b";")[:-1]:
                named: Sequence[int]
                if b"," in ref:
                    seq_b, epoch, offset = ref.split(b",")
                    named = (int(seq_b),)
                    position = (epoch.decode(), int(offset)) if epoch else None
                else:  # a range "<first>:<last>"
                    first, colon, last = ref.partition(b":")
                    if not colon or not 0 < int(first) <= int(last):
                        raise ValueError("not a range of references")
                    named = range(int(first), int(last) + 1)
                    position = None
                for seq in named:
                    self.inbox_envelopes += 1
                    if seq > self._last_ref:
                        self._last_ref = seq
                    entry = pending.pop(seq, None)
                    envelope = entry.envelope if entry is not None else self._take(seq, entry_id)
                    if envelope is None:
                        continue
                    self._hand(envelope, at, position, entry)
        except (ValueError, UnicodeDecodeError):
            log.error("ignored the rest of a malformed entry %r on Redis stream %s", entry_id, self.inbox)

    def _on_entries(self, entries: List[Any]) -> int:
        """Deliver stream entries in order; returns the bytes of envelope text they held."""
        size = 0
        for entry_id, fields in entries:
            previous = self._last_id
            self._last_id = entry_id
            try:
                seq, ours = _seq_of(entry_id)
                if not ours or len(fields) < 4 or fields[0] != b"t" or fields[2] != b"e":
                    raise ValueError("not an envelope entry")
                at = int(fields[1]) / 1000
                payload = fields[3]
            except (ValueError, TypeError, IndexError):
                log.error("ignored a malformed entry %r on Redis stream %s", entry_id, self.stream)
                continue
            size += len(payload)
            self.control_read += 1
            position = None
            for j in range(4, len(fields) - 1, 2):
                if fields[j] == b"p":
                    try:
                        position = (fields[j + 1].decode(), int(fields[j + 3]))
                    except (ValueError, IndexError, UnicodeDecodeError):
                        position = None
            expected = self.position + 1
            self.position = seq
            if seq != expected and expected != 1:
                troubles = self.gaps + self.resets
                if self._directory is not None:
                    self._resync = seq  # defers the gap's page_discard (see _gap)
                if len(fields) > 5 and fields[4] == b"r":
                    self._reset(entry_key(fields[5]), expected - 1)
                elif seq > expected:
                    self._gap(seq - expected, expected - 1)
                if self.gaps + self.resets == troubles:
                    self._resync = None
                elif self._directory is not None:
                    # Directory changes may be among what was lost (or Redis lost the snapshot):
                    # sync the directory with the snapshot before going on (_sync_directory).
                    self.position, self._last_id = expected - 1, previous
                    break
            self._on_envelope(payload, at, position, held_by_snapshot=seq <= self._directory_through)
        if self._loaded is not None and not self._loaded.is_set() and self.position >= self._ready_at:
            self._loaded.set()
        if self._directory is not None and self.position - self._snap_position >= self.snapshot_every:
            self._snap_position = self.position  # once per snapshot_every, whatever the write does
            if self._snap_wake is not None:
                self._snap_wake.set()
        return size

    def _on_envelope(self, payload: bytes, at: float, position: Optional[Tuple[str, int]] = None,
                     from_inbox: bool = False, held_by_snapshot: bool = False) -> None:
        entry = None
        try:
            cut = payload.find(b"\n")
            wire = ujson.loads(payload if cut < 0 else payload[:cut])
            if wire.get("o") == self.origin:
                entry = self._pending.pop(wire.get("n"), None)
            if entry is not None:
                envelope = entry.envelope  # our own: the original, no need to decode it
            else:
                if cut >= 0:
                    wire["d"] = payload[cut + 1:].decode()
                envelope = Envelope.from_wire(wire)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            log.error("ignored a malformed envelope on Redis stream %s", self.stream)
            return
        if not from_inbox and envelope.kind == MESSAGE:
            audience = envelope.audience
            if audience is not None and audience[0] == "page":
                self.control_pages += 1
        elif held_by_snapshot and envelope.kind == DIRECTORY:
            # Already in the directory loaded after a gap (_sync_directory): not applied twice.
            self.directory_in_snapshot += 1
            if entry is not None and not entry.future.done():
                entry.future.set_result(None)
            return
        self._hand(envelope, at, position, entry)

    def _hand(self, envelope: Envelope, at: float, position: Optional[Tuple[str, int]],
              entry: Optional[_Pending]) -> None:
        """Hand one envelope read from Redis to the router (once per id), then complete its
        publish's future when it is this process's."""
        envelope.position = position
        audience = envelope.audience
        if audience is not None and audience[0] == "page" and envelope.kind == MESSAGE:
            hub = self._hub
            if hub is not None and audience[1] not in hub.groups:
                self.dropped += 1
        key = envelope.id
        held: Any = None
        if key is not None and self.recent.seen(key, at):
            self.duplicates += 1
        else:
            deliver: Any = self._deliver
            if deliver is not None:
                try:
                    # None: handed to the router. A PartitionedRedisBroker's gate that holds the
                    # envelope back returns what takes its publish, to complete it once delivered.
                    held = deliver(envelope)
                except Exception:
                    log.exception("delivery of %r failed", envelope)
        if entry is not None and not entry.future.done():
            if held is None:
                entry.future.set_result(None)
            else:
                held(entry)

    def _gap(self, lost: Optional[int], position: int, stream: Optional[str] = None) -> None:
        """Envelopes this process never received: count, log once, drop every page subscription."""
        self.gaps += 1
        if lost:
            self.lost += lost
        if stream is not None:  # the inbox: page messages only, nothing for the directory
            self._discard(lost, position, stream)
            return
        if self._directory is not None and self._resync is not None:
            # The directory is synced first (_sync_directory), then the clients are told: their
            # resubscriptions are answered with the synced directory.
            self._deferred_gap = (lost, position)
            return
        self._discard(lost, position)

    def _discard(self, lost: Optional[int], position: int, stream: Optional[str] = None) -> None:
        # Every page is dropped: nothing unread in the inbox matters to anyone now.
        self._inbox_behind = False
        self._inbox_caught_up = True
        discarded = 0
        if self.on_gap is not None:
            try:
                discarded = self.on_gap() or 0
            except Exception:
                log.exception("the gap handler failed")
        what = "an unknown number of envelopes" if lost is None else f"{lost} envelopes"
        directory = ("the directory is synced with its snapshot in Redis" if self._directory is not None
                     else "directory events among them were not applied here either: PUT "
                     "/api/directory again if they may have been published")
        log.warning("Redis stream %s: %s after position %d were lost before this process read them "
                    "(gap %d, %d envelopes lost in gaps so far); sent page_discard for %d page "
                    "subscriptions so that clients resubscribe and refetch; %s.", stream or self.stream, what,
                    position, self.gaps, self.lost, discarded,
                    "only page messages were lost" if stream is not None else directory)

    def _reset(self, known_id: Tuple[int, int], position: int) -> None:
        """The stream started over (Redis restarted without persistence, FLUSHALL, key deleted).
        ``known``: the highest sequence number of the old stream that the publisher who started
        the new one knew of (0: unknown); ``position``: where this process had read up to."""
        self.resets += 1
        self._hello_at = 0.0  # Redis may have lost the registrations too: say hello again now
        known = known_id[0]
        if known > position:
            self._gap(known - position, position)
        elif self._registered and known_id > self._inbox_top:
            # Entries were written after this process's last inbox read (to some inbox: maybe
            # this one); the inbox went with the stream.
            self._gap(None, position)
        elif not self._caught_up:
            self._gap(None, position)
        elif self._inbox_behind or not self._inbox_caught_up:
            self._gap(None, position)  # the inbox went too, with entries this process had not read
        else:
            log.warning("Redis stream %s started over (Redis restarted without persistence, FLUSHALL "
                        "or the stream deleted); this process had read all of it (position %d): "
                        "nothing was lost here", self.stream, position)

    # --- the shared directory ----------------------------------------------------------------------
    async def _read_snapshot(self, conn: Any, timeout: float) -> Optional[Tuple[int, Dict[str, Any]]]:
        """(position, snapshot) of the directory kept in Redis, or None when there is none. A
        snapshot that is not JSON is logged and treated as none."""
        await conn.send_command("HMGET", self.directory_key, "p", "s", check_health=False)
        async with asyncio.timeout(timeout):
            position, text = await conn.read_response()
        if position is None or text is None:
            return None
        try:
            snapshot = ujson.loads(text)
            if not isinstance(snapshot, dict):
                raise ValueError("not a JSON object")
            return int(position), snapshot
        except ValueError as exc:
            log.error("the directory snapshot in Redis (%s) is not valid JSON, ignored: %s",
                      self.directory_key, exc)
            return None

    async def _sync_directory(self, conn: Any, timeout: float, gap_at: Optional[int]) -> None:
        """After a reconnect (``gap_at`` None) or a gap / a stream that started over, seen at the
        entry ``gap_at`` (this process has read up to ``position``, before it): Redis has no
        snapshot → write this process's (re-seed: Redis restarted without persistence). A
        snapshot newer than ``position`` after a gap → load it and go on from the later of its
        position and the gap's end: the changes this process missed are in it. Every process writes
        the snapshot after each change, so a gap that holds a change is covered by a newer one."""
        directory = self._directory
        stored = await self._read_snapshot(conn, timeout)
        if stored is None:
            log.warning("Redis has no directory snapshot (%s): writing this process's directory "
                        "(position %d)", self.directory_key, self.position)
            self._directory_changed()
        elif gap_at is not None and stored[0] > self.position:
            position, snapshot = stored
            try:
                directory.load_quietly(snapshot)
            except ValueError as exc:
                log.error("the directory snapshot in Redis (%s) is not valid, ignored: %s",
                          self.directory_key, exc)
            else:
                # The entries from gap_at on are still in the stream: reading goes on from there
                # and delivers them, except the directory changes the snapshot already holds
                # (up to its position), which are not applied twice. (Skipping those entries
                # whole would lose page messages that were never lost: after a stream started
                # over, the snapshot another process wrote is past entries this one never read.)
                self._directory_through = position
                log.warning("directory loaded from Redis after the gap (%s at position %d): the "
                            "directory changes up to it are in it, the rest of the stream from "
                            "position %d is delivered", self.directory_key, position, gap_at)
        if gap_at is not None and self.position < gap_at - 1:
            # Go on from the entry after the gap (the gap is counted; not seen again).
            self.position = gap_at - 1
            self._last_id = b"%d-0" % self.position

    async def _write_snapshots(self) -> None:
        """Write this process's directory to Redis after changes (coalesced: one write in
        flight), with the stream position it corresponds to. The script keeps the snapshot with
        the highest position: every process applies the same changes at the same positions, so
        whichever writes first, the snapshot at a position is the same."""
        wake, loaded, router = self._snap_wake, self._loaded, self._router
        assert wake is not None and loaded is not None
        delay = self.reconnect_min
        conn: Any = None
        while True:
            await wake.wait()
            await loaded.wait()  # never before the start-up snapshot is loaded and caught up
            while router is not None and router.busy:  # an envelope half-applied: wait for it
                await router.wait_idle()
            wake.clear()
            changed, self._snap_changed = self._snap_changed, False
            try:
                if conn is None:
                    conn = await self._connect()
                async with asyncio.timeout(self.socket_timeout):
                    # Is a newer snapshot there already (another process wrote it)? Then this
                    # one need not even be serialized.
                    await conn.send_command("HMGET", self.directory_key, "p", "h", check_health=False)
                    current, digest = await conn.read_response()
                    if router is not None and router.busy:  # changed meanwhile: start over
                        self._snap_changed |= changed
                        wake.set()
                        continue
                    if current is None and not changed:
                        continue  # only moving forward, and there is nothing to move: no seeding
                    # The state and its position, taken together (no await in between).
                    position = self.position
                    if current is None or int(current) < position:
                        text = ujson.dumps(self._directory.snapshot(), ensure_ascii=False, sort_keys=True)
                        mine = hashlib.sha1(text.encode()).hexdigest().encode()
                        if digest == mine:  # the same directory: only move its position forward
                            await conn.send_command("EVAL", ADVANCE_SCRIPT, 1, self.directory_key, position,
                                                    mine, check_health=False)
                        else:
                            await conn.send_command("EVAL", SNAPSHOT_SCRIPT, 1, self.directory_key, position,
                                                    text, mine, check_health=False)
                        if await conn.read_response():
                            if digest == mine:
                                self.snapshot_advances += 1
                            else:
                                self.snapshots_written += 1
                    self._snap_position = max(position, int(current or 0))
                delay = self.reconnect_min
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.snapshot_failures += 1
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError("no reply from Redis in time")
                self._snap_changed |= changed
                log.warning("could not write the directory snapshot to Redis: %s; retrying in %.1f s",
                            _describe(exc), delay,
                            exc_info=not isinstance(exc, (RedisError, OSError, TimeoutError)))
                if conn is not None:
                    await _disconnect(conn)
                    conn = None
                wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)

    # --- pending publishes ----------------------------------------------------------------------
    def _fail(self, seq: int, error: BaseException) -> None:
        entry = self._pending.pop(seq, None)
        if entry is not None and not entry.future.done():
            future = entry.future
            future.set_exception(error)
            # A caller may drop the future: marked retrieved now, so asyncio does not log "Future
            # exception was never retrieved" (awaiting it still raises). Not a done callback per
            # publish: a callback costs a loop callback for every publish that succeeds, too.
            future.exception()


def _now(loop: Optional[asyncio.AbstractEventLoop]) -> float:
    assert loop is not None
    return loop.time()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _protocol_error(text: str) -> Exception:
    from redis.exceptions import ConnectionError as RedisConnectionError
    return RedisConnectionError(text)


async def _disconnect(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:  # already closed, or the loop is going away
        pass


class _Publishing:
    """What the sync and the asyncio write-only publishers share: the registry, validation and
    serialization, the script's arguments and the reading of its reply."""

    #: One publisher per Redis instance, this one first (several: page groups partitioned).
    _parts: List[Any]

    def __init__(self, url: str, channel_prefix: str, plugins: Any, registry: Any,
                 load_entry_points: bool, types: Optional[str], publish_timeout: float,
                 stream_length: int, history_size: int = _HISTORY_SIZE, history_ttl: float = _HISTORY_TTL):
        from .registry import Registry, entry_point_plugins
        from .server import builtin_plugins

        if not channel_prefix or not isinstance(channel_prefix, str):
            raise ValueError("channel_prefix must be a non-empty string")
        if not publish_timeout > 0:
            raise ValueError("publish_timeout must be positive")
        if not isinstance(stream_length, int) or stream_length < 1:
            raise ValueError("stream_length must be a positive integer")
        if registry is None:
            chosen = builtin_plugins() + list(plugins)
            if load_entry_points:
                chosen += entry_point_plugins(exclude=[p.name for p in chosen])
            if types is not None:
                from .typesconfig import load_types_file

                known = {pt.name: pt for p in chosen for pt in p.page_types}
                taken = [n for p in chosen for mt in p.message_types for n in (mt.name, *mt.aliases)]
                # Webhook-guarded pages: who may subscribe does not matter to a publisher.
                chosen.append(load_types_file(types, webhook=lambda name: _deny, known_pages=known,
                                              known_messages=taken))
            registry = Registry(chosen)
        self.registry = registry
        self.url = url
        self.stream = f"{channel_prefix}:stream"
        self.publish_timeout = publish_timeout
        self.stream_length = stream_length
        if not isinstance(history_size, int) or history_size < 0 or not history_ttl > 0:
            raise ValueError("history_size must be an integer >= 0 and history_ttl positive")
        # The recovery extension: a page message gets its page's next offset and joins its history
        # in the same script call as when a server publishes it (the servers' settings).
        self.history_size = history_size
        self.history_ttl_ms = int(history_ttl * 1000)
        self.key_prefix = channel_prefix + ":"
        self.origin = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)
        self._known: Tuple[int, int] = (0, 0)  # the highest entry id Redis gave this publisher
        self._offset: Optional[float] = None  # a lower bound of (Redis clock - monotonic), in ms

    def _unavailable(self, why: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"Redis broker unavailable ({redact_url(self.url)}): {why}")

    # --- envelopes ---------------------------------------------------------------------------------
    def _message(self, message: Any, to: Any, ignore_web_socket_id: Optional[str], exclude_user_ids: Any,
                 id: Optional[str]) -> Envelope:
        return message_envelope(self.registry, message, to, ignore_web_socket_id, exclude_user_ids,
                                id=id if id is not None else str(uuid.uuid4()))

    def _many(self, items: Any) -> List[Envelope]:
        envelopes = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "message" not in item:
                raise PublishError("an item must be an object with a message", f"[{i}]")
            extra = set(item) - {"message", "to", "ignore_web_socket_id", "exclude_user_ids", "id"}
            if extra:
                name = sorted(extra)[0]
                raise PublishError(f"unexpected key {name!r}", f"[{i}].{name}")
            # None (or no id) gets a fresh one; anything else is validated like the other paths
            # (an empty id is refused naming [i].id, never silently replaced).
            key = item.get("id")
            if key is None:
                key = str(uuid.uuid4())
            envelopes.append(message_envelope(self.registry, item["message"], item.get("to"),
                                              item.get("ignore_web_socket_id"), item.get("exclude_user_ids"),
                                              prefix=f"[{i}].", id=key))
        return envelopes

    def _individual(self, payloads: Any, ignore_web_socket_id: Optional[str], id: Optional[str]) -> Envelope:
        return individual_envelope(self.registry, payloads, ignore_web_socket_id,
                                   id=id if id is not None else str(uuid.uuid4()))

    @staticmethod
    def _disconnect(user_ids: Any, ignore_web_socket_ids: Any) -> Envelope:
        users = id_list(list(user_ids), "user_ids", None)
        spared = [w for w in ignore_web_socket_ids if isinstance(w, str)]
        return Envelope(DISCONNECT, user_ids=users, ignore=spared)

    @staticmethod
    def _revoke(user_ids: Any, permission_group: str) -> Envelope:
        users = id_list(list(user_ids), "user_ids", None)
        if not isinstance(permission_group, str) or not permission_group:
            raise PublishError("permission_group must be a non-empty string", "permission_group")
        return Envelope(REVOKE, user_ids=users, permission_group=permission_group)

    # --- the script ------------------------------------------------------------------------------------
    def _args(self, chunk: List[Envelope], began: float) -> List[Any]:
        assert self._offset is not None
        deadline = int((began + self.publish_timeout) * 1000 + self._offset - DEADLINE_MARGIN_MS)
        args: List[Any] = [self.stream_length, "%d-%d" % self._known, self.history_size, self.history_ttl_ms,
                           self.key_prefix, ""]  # "": not a server (never reads an inbox)
        args += [deadline, len(chunk)]  # one run: one deadline, every envelope with its bytes
        for env in chunk:
            group, route = route_of(env, self.registry)
            args += [encode_envelope(env, self.origin, next(self._seq)), group, "1" if route else "0"]
        return args

    def _clock(self, reply: Any) -> None:
        """TIME's reply, read just now: a lower bound of the offset between the clocks."""
        import time

        self._offset = int(reply[0]) * 1000 + int(reply[1]) / 1000 - time.monotonic() * 1000

    def _accepted(self, reply: Any) -> List[int]:
        """Read the script's reply (Redis ran it just now); raise unless every envelope was taken.
        Returns each envelope's code (n > 0: its control stream entry)."""
        import time

        self._offset = int(reply[0]) - time.monotonic() * 1000
        self._known = max(self._known, entry_key(reply[1]))
        try:
            accepted, resend = read_codes(reply[2:])
        except ValueError as exc:
            raise self._unavailable(str(exc)) from None
        if resend is not None:  # never: this publisher always sends the bytes
            raise self._unavailable(f"the publish script asked for the bytes of envelope {resend} of "
                                    f"{len(accepted)}, which it was sent: not applied from there on")
        if not all(accepted):
            raise self._unavailable(f"Redis ran the publish after its deadline ({self.publish_timeout:g} s): "
                                    f"{accepted.count(0)} of {len(accepted)} envelopes not applied")
        return accepted

    # --- several Redis instances (redis_partitions) -------------------------------------------------------
    def _runs(self, envelopes: List[Envelope]) -> List[Tuple[int, List[Envelope]]]:
        """``envelopes`` in call order as runs ``(instance, envelopes)``: a run of control
        envelopes is ``(-1, ...)`` (instance 0, then a fence on every other); between two, the
        page messages per instance (their order across instances does not matter, within one
        it is kept)."""
        from .redis_partitions import shard_of

        count = len(self._parts)
        runs: List[Tuple[int, List[Envelope]]] = []
        pages: Dict[int, List[Envelope]] = {}
        controls: List[Envelope] = []
        for env in envelopes:
            group, plain = route_of(env, self.registry)
            if plain:
                if controls:
                    runs.append((-1, controls))
                    controls = []
                pages.setdefault(shard_of(group, count), []).append(env)
            else:
                runs.extend(pages.items())
                pages = {}
                controls.append(env)
        runs.extend(pages.items())
        if controls:
            runs.append((-1, controls))
        return runs

    def _partition_check(self, index: int, found: Any) -> None:
        from .redis_partitions import PartitionMismatch

        expected = f"{index}/{len(self._parts)}"
        found = found.decode() if isinstance(found, bytes) else str(found)
        if found != expected:
            raise PartitionMismatch(
                f"{redact_url(self.url)} is partition {found} but listed as {expected}: every process and "
                "publisher must list the same Redis URLs in the same order")

    def _fence_failed(self, part: "_Publishing", n: int, exc: BrokerUnavailable) -> BrokerUnavailable:
        return part._unavailable(f"control entry {n} was applied on the first instance, but its fence was not "
                                 f"written here ({exc}); the servers write it themselves after their fence "
                                 "timeout, and page messages published meanwhile may overtake it there")

    def _failed(self, exc: BaseException) -> BrokerUnavailable:
        self._offset = None
        if isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError":
            return self._unavailable(f"no reply from Redis within {self.publish_timeout:g} s (it may "
                                     "have applied the publish: retry with the same id)")
        return self._unavailable(_describe(exc))


class RedisPublisher(_Publishing):
    """A write-only publisher for processes that are not servers (a Celery worker, a Django view,
    a script): it validates and serializes with the same registry as the servers and appends the
    same envelopes to the same stream with the same script, so every server process of the
    namespace delivers them, with no HTTP hop. No event loop is needed: it uses redis-py's sync
    client (thread-safe; one pooled connection per concurrent caller). :class:`AsyncRedisPublisher`
    is the same for asyncio code.

    ``url`` / ``channel_prefix``: as for :class:`RedisBroker` (the same Redis and prefix as the
    servers). ``plugins``: plugins beyond the built-in ones (the installed ``tornado_rt.plugins``
    entry points are loaded too unless ``load_entry_points=False``); ``types``: a TOML file of
    configured message and page types (``--types FILE`` of the servers); or pass a ready
    ``registry``. ``publish_timeout``: the longest a publish waits (default 2 s; Redis refuses an
    envelope whose deadline passed, as for the servers). ``stream_length``: as the servers'
    ``--redis-stream-length``; ``history_size`` / ``history_ttl``: as the servers' (the recovery
    extension: page messages join their page's history like the servers' own publishes).

    Every publish gets an idempotency ``id`` (a random UUID unless given; methods return the ids
    used). A ``BrokerUnavailable`` after the command left (a timeout, a broken connection) is
    ambiguous: Redis may have applied it. Retry with the same ``id`` (pass it) and no process
    delivers it twice within the servers' dedup window.

    Raises :class:`~tornado_rt.PublishError` (naming the field) before anything is sent, and
    :class:`~tornado_rt.BrokerUnavailable` when Redis cannot be reached, refuses the command, or
    does not answer within ``publish_timeout``.
    """

    def __init__(self, url: str, channel_prefix: str = _PREFIX, *, plugins: Any = (),
                 registry: Any = None, load_entry_points: bool = True, types: Optional[str] = None,
                 publish_timeout: float = 2.0, connect_timeout: float = 1.0,
                 stream_length: int = _STREAM_LENGTH, history_size: int = _HISTORY_SIZE, history_ttl: float = _HISTORY_TTL):
        import redis as redis_sync

        urls = _url_list(url)
        super().__init__(urls[0], channel_prefix, plugins, registry, load_entry_points, types, publish_timeout,
                         stream_length, history_size, history_ttl)
        self._redis = redis_sync.Redis.from_url(urls[0], socket_connect_timeout=connect_timeout,
                                                socket_timeout=publish_timeout, retry=None, protocol=2,
                                                client_name="tornado-rt-publisher")
        self._parts: List[Any] = [self] + [
            RedisPublisher(other, channel_prefix, registry=self.registry, publish_timeout=publish_timeout,
                           connect_timeout=connect_timeout, stream_length=stream_length, history_size=history_size,
                           history_ttl=history_ttl) for other in urls[1:]]
        self._checked = len(urls) == 1

    def publish(self, message: Any, to: Any = None, *, ignore_web_socket_id: Optional[str] = None,
                exclude_user_ids: Any = None, id: Optional[str] = None) -> str:
        """Publish one message to its type's default audience or to ``to`` (as
        ``RealtimeServer.publish``); returns its id."""
        env = self._message(message, to, ignore_web_socket_id, exclude_user_ids, id)
        self.send([env])
        return str(env.id)

    def publish_many(self, items: Any) -> List[str]:
        """Several publishes in one script call: ``items`` are dicts with the keys of
        :meth:`publish` (``message``, ``to``, ``ignore_web_socket_id``, ``exclude_user_ids``,
        ``id``). All are validated before any is sent (errors name ``[i].field``); returns the ids."""
        envelopes = self._many(items)
        self.send(envelopes)
        return [str(env.id) for env in envelopes]

    def publish_individual(self, payloads: Any, *, ignore_web_socket_id: Optional[str] = None,
                           id: Optional[str] = None) -> str:
        """Send each user its own message: ``{user_id: message}``; returns the id."""
        env = self._individual(payloads, ignore_web_socket_id, id)
        self.send([env])
        return str(env.id)

    def disconnect(self, user_ids: Any, ignore_web_socket_ids: Any = ()) -> None:
        """Force-disconnect (4003) every connection of these users on every server process."""
        self.send([self._disconnect(user_ids, ignore_web_socket_ids)])

    def revoke(self, user_ids: Any, permission_group: str) -> None:
        """Drop these users' pages in ``permission_group`` (with page_discard) on every process."""
        self.send([self._revoke(user_ids, permission_group)])

    def change_directory(self, operation: str, *args: Any) -> None:
        """A directory change applied by every server process (``RealtimeServer.change_directory``)."""
        self.send([directory_envelope(operation, args)])

    def close(self) -> None:
        for part in self._parts:
            part._redis.close()

    def __enter__(self) -> "RedisPublisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, envelopes: List[Envelope]) -> None:
        """Append prepared envelopes in one script call (at most MAX_BATCH per call). Raises
        ``BrokerUnavailable`` unless Redis accepted every one of them. With several Redis
        instances: each page message on its group's instance, control envelopes on the first one,
        each run of them followed by a fence on every other instance, in call order, all within
        one ``publish_timeout`` (docs/redis.md "Partitioning over several Redis instances")."""
        if len(self._parts) == 1:
            self._send_here(envelopes)
            return
        import time

        from .redis_partitions import fence_envelope

        if not self._checked:
            for i, part in enumerate(self._parts):
                key = part.key_prefix + "partition"
                try:
                    part._redis.set(key, f"{i}/{len(self._parts)}", nx=True)
                    found = part._redis.get(key)
                except (RedisError, OSError) as exc:
                    raise part._failed(exc) from None
                self._partition_check(i, found)
            self._checked = True
        began = time.monotonic()
        for index, run in self._runs(envelopes):
            if index >= 0:
                self._parts[index]._send_here(run, began)
                continue
            n = max(self._send_here(run, began))
            for part in self._parts[1:]:
                try:
                    part._send_here([fence_envelope(n)], began)
                except BrokerUnavailable as exc:
                    raise self._fence_failed(part, n, exc) from None

    def _send_here(self, envelopes: List[Envelope], began: Optional[float] = None) -> List[int]:
        """Append envelopes to this instance; returns their codes (see :meth:`_accepted`)."""
        import time

        from redis.exceptions import NoScriptError

        codes: List[int] = []
        for start in range(0, len(envelopes), MAX_BATCH):
            chunk = envelopes[start:start + MAX_BATCH]
            if began is None:
                began = time.monotonic()
            try:
                if self._offset is None:
                    self._clock(self._redis.time())
                args = self._args(chunk, began)
                try:
                    reply = self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
                except NoScriptError:  # not run: load the script and send again
                    self._redis.script_load(PUBLISH_SCRIPT)
                    reply = self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
            except (RedisError, OSError) as exc:
                raise self._failed(exc) from None
            codes += self._accepted(reply)
            began = None
        return codes


class AsyncRedisPublisher(_Publishing):
    """:class:`RedisPublisher` for asyncio code (FastAPI, aiohttp, Tornado): the same arguments;
    the publishing methods are coroutines. Uses redis-py's asyncio client (a pool)."""

    def __init__(self, url: str, channel_prefix: str = _PREFIX, *, plugins: Any = (),
                 registry: Any = None, load_entry_points: bool = True, types: Optional[str] = None,
                 publish_timeout: float = 2.0, connect_timeout: float = 1.0,
                 stream_length: int = _STREAM_LENGTH, history_size: int = _HISTORY_SIZE, history_ttl: float = _HISTORY_TTL):
        import redis.asyncio as redis_async

        urls = _url_list(url)
        super().__init__(urls[0], channel_prefix, plugins, registry, load_entry_points, types, publish_timeout,
                         stream_length, history_size, history_ttl)
        self._redis = redis_async.Redis.from_url(urls[0], socket_connect_timeout=connect_timeout,
                                                 socket_timeout=publish_timeout, retry=None, protocol=2,
                                                 client_name="tornado-rt-publisher")
        self._parts: List[Any] = [self] + [
            AsyncRedisPublisher(other, channel_prefix, registry=self.registry, publish_timeout=publish_timeout,
                                connect_timeout=connect_timeout, stream_length=stream_length,
                                history_size=history_size, history_ttl=history_ttl) for other in urls[1:]]
        self._checked = len(urls) == 1

    async def publish(self, message: Any, to: Any = None, *, ignore_web_socket_id: Optional[str] = None,
                      exclude_user_ids: Any = None, id: Optional[str] = None) -> str:
        env = self._message(message, to, ignore_web_socket_id, exclude_user_ids, id)
        await self.send([env])
        return str(env.id)

    async def publish_many(self, items: Any) -> List[str]:
        envelopes = self._many(items)
        await self.send(envelopes)
        return [str(env.id) for env in envelopes]

    async def publish_individual(self, payloads: Any, *, ignore_web_socket_id: Optional[str] = None,
                                 id: Optional[str] = None) -> str:
        env = self._individual(payloads, ignore_web_socket_id, id)
        await self.send([env])
        return str(env.id)

    async def disconnect(self, user_ids: Any, ignore_web_socket_ids: Any = ()) -> None:
        await self.send([self._disconnect(user_ids, ignore_web_socket_ids)])

    async def revoke(self, user_ids: Any, permission_group: str) -> None:
        await self.send([self._revoke(user_ids, permission_group)])

    async def change_directory(self, operation: str, *args: Any) -> None:
        await self.send([directory_envelope(operation, args)])

    async def close(self) -> None:
        for part in self._parts:
            await part._redis.aclose()

    async def __aenter__(self) -> "AsyncRedisPublisher":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def send(self, envelopes: List[Envelope]) -> None:
        """:meth:`RedisPublisher.send`, awaited."""
        if len(self._parts) == 1:
            await self._send_here(envelopes)
            return
        import time

        from .redis_partitions import fence_envelope

        if not self._checked:
            for i, part in enumerate(self._parts):
                key = part.key_prefix + "partition"
                try:
                    async with asyncio.timeout(self.publish_timeout):
                        await part._redis.set(key, f"{i}/{len(self._parts)}", nx=True)
                        found = await part._redis.get(key)
                except (RedisError, OSError, TimeoutError) as exc:
                    raise part._failed(exc) from None
                self._partition_check(i, found)
            self._checked = True
        began = time.monotonic()
        for index, run in self._runs(envelopes):
            if index >= 0:
                await self._parts[index]._send_here(run, began)
                continue
            n = max(await self._send_here(run, began))
            for part in self._parts[1:]:
                try:
                    await part._send_here([fence_envelope(n)], began)
                except BrokerUnavailable as exc:
                    raise self._fence_failed(part, n, exc) from None

    async def _send_here(self, envelopes: List[Envelope], began: Optional[float] = None) -> List[int]:
        import time

        from redis.exceptions import NoScriptError

        codes: List[int] = []
        for start in range(0, len(envelopes), MAX_BATCH):
            chunk = envelopes[start:start + MAX_BATCH]
            if began is None:
                began = time.monotonic()
            try:
                async with asyncio.timeout(self.publish_timeout):
                    if self._offset is None:
                        self._clock(await self._redis.time())
                    args = self._args(chunk, began)
                    try:
                        reply = await self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
                    except NoScriptError:  # not run: load the script and send again
                        await self._redis.script_load(PUBLISH_SCRIPT)
                        reply = await self._redis.evalsha(PUBLISH_SHA, 1, self.stream, *args)
            except (RedisError, OSError, TimeoutError) as exc:
                raise self._failed(exc) from None
            codes += self._accepted(reply)
            began = None
        return codes


def _url_list(url: Any) -> List[str]:
    """A publisher's ``url``: one Redis URL, or several (a list, or separated by commas) when the
    page groups are partitioned over several instances, in the servers' order."""
    urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else list(url))]
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise ValueError("url must be a Redis URL, or several (a list, or separated by commas)")
    if len(set(urls)) != len(urls):
        raise ValueError("the same Redis URL is listed twice: each instance holds one partition")
    return urls


def _deny(*args: Any) -> bool:
    return False
