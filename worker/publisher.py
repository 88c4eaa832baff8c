"""Owns: every write to reply streams, every ack of a request entry (XACK + XDEL + HDEL ids, or
dead-lettering), and the read of a reply stream's state before a request (re)starts.
Changed by: the worker's protocol side only; the scripts below are part of the wire contract.
Thread-safety: event-loop only; `publish`/`ack` never block and may be called from any callback.

Order and durability. Events are queued per request in memory and written by one task, in
order, one pipeline per round (one `_APPEND_MANY_SCRIPT` call for all requests of the round, per
hash slot under Redis Cluster). Token events that queue up while a round is in flight are
coalesced into one event (index of the first, ids and text concatenated), so the stream stays
short under load and a slow Redis costs fewer, larger writes. A request's entry is acked only
after a round that wrote its terminal event succeeded (two steps: reply keys and model keys
live in different cluster slots). While Redis is unreachable the task retries with jittered
exponential backoff and keeps every event, in order, in memory: nothing is lost.

One writer per request (fencing). A worker that starts a request first takes its fence:
`take_fence` sets the request's owner key P:{r:<id>}:owner to a token of its own (same slot as
the reply stream), and only then reads the reply stream to find where to resume. Every later
append of that run carries the token, and `_APPEND_SCRIPT` refuses it once another worker has
taken the fence. So a worker that lost its request (its lease lapsed during a Redis outage, its
consumer group was lost, it was paused) can never interleave tokens with the worker that took
over: its writes are refused, `on_fenced` tells the runtime to stop its run, and it does not ack.
The token travels with each queued event, not with the request: when this same worker stops a
run and starts the request again before the stopped run's last events are written, those go out
under the old token and are refused, without stopping the new run.

Lost writes. A run knows how long its reply stream is after each of its writes; when the stream
is shorter (a Redis failover promoted a replica that lacked the run's last events), the append
writes nothing and the run stops like a fenced one (-3): resuming from the stream rewrites what
was lost, and no reader sees a gap.

Idempotence. Each request's events of one round go through `_APPEND_SCRIPT`, which also (a)
writes nothing when the stream already ends with a terminal event (a second worker that raced on
the same request cannot add a second terminal), and (b) writes nothing when the stream's last
event equals the round's last payload (the round was applied before the connection dropped and
is being retried). `_ACK_SCRIPT` dead-letters only an entry that was still pending, so replaying
it cannot duplicate a dead letter.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer_sdk.connection import TRANSIENT_ERRORS, is_transient
from producer_sdk.errors import ProtocolError
from producer_sdk.keys import CONSUMER_GROUP, Keys
from producer_sdk.protocol import (
    PROTOCOL_VERSION,
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    StartedEvent,
    TokenEvent,
    decode_event,
    encode_event,
)

__all__ = ["AckEntry", "DeadLetter", "Publisher", "ReplyState", "encode_tokens", "is_retryable", "read_reply_state"]

log = logging.getLogger("layermux.worker.publisher")

# Backoff of the write loop while Redis is unreachable: full jitter over an exponential ramp.
BACKOFF_BASE_S: Final = 0.05
BACKOFF_CAP_S: Final = 5.0
# Server replies that mean "try again later", not "this command is wrong".
_RETRYABLE_REPLIES: Final = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                             "NOSCRIPT", "NOREPLICAS")
# Reply-stream entries read per round trip when scanning a stream on (re)start.
_SCAN_COUNT: Final = 256

# One request's events of one round (the rules of the module docstring); shared by both scripts below.
_APPEND_FN: Final = """
-- ev: reply stream key, owner: owner key, ttl: seconds, fence: token or '', ARGV[first..last]: events,
-- expected: the stream's length after this run's previous writes, or '' (unknown).
-- Returns the number of events written, 0 for a replayed round, -1 if a terminal event already
-- ended the stream, -2 if another run holds the fence, -3 if the stream is shorter than expected
-- (writes this run saw acknowledged are gone: a failover promoted a replica that lacked them).
local function append(ev, owner_key, ttl, fence, first, last, expected)
  if fence ~= '' then
    local owner = redis.call('GET', owner_key)
    if owner and owner ~= fence then return -2 end
  end
  if expected ~= nil and expected ~= '' and redis.call('XLEN', ev) < tonumber(expected) then return -3 end
  local tail = redis.call('XREVRANGE', ev, '+', '-', 'COUNT', 1)
  if #tail > 0 then
    local fields = tail[1][2]
    local data = nil
    for i = 1, #fields, 2 do
      if fields[i] == 'data' then data = fields[i + 1] end
    end
    if data ~= nil then
      if data == ARGV[last] then return 0 end
      -- The event's type: encoders write it second ({"v":1,"type":...}), so it is read off the first
      -- bytes (no quote of a JSON string value can form `"type":"`); anything else is decoded.
      local kind = string.match(string.sub(data, 1, 32), '^{"v":%d+,"type":"(%a+)"')
      if kind == nil then
        local ok, e = pcall(cjson.decode, data)
        if ok and type(e) == 'table' then kind = e['type'] end
      end
      if kind == 'done' or kind == 'error' or kind == 'cancelled' then return -1 end
    end
  end
  for i = first, last do
    redis.call('XADD', ev, '*', 'data', ARGV[i])
  end
  redis.call('EXPIRE', ev, ttl)
  if fence ~= '' then
    redis.call('SET', owner_key, fence, 'EX', ttl)
  end
  return last - first + 1
end
"""

_APPEND_SCRIPT: Final = _APPEND_FN + """
-- KEYS[1] reply stream, KEYS[2] owner key; ARGV[1] ttl seconds; ARGV[2] fence token or '';
-- ARGV[3..] encoded events, in order. Returns what append() returns.
return append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], 3, #ARGV)
"""

_APPEND_MANY_SCRIPT: Final = _APPEND_FN + """
-- Several requests in one call (one round trip and one script run per write round instead of one
-- per request; all keys in one slot under Redis Cluster). KEYS[2i-1], KEYS[2i]: reply stream and
-- owner key of request i; ARGV[1] ttl seconds, then per request: fence token or '', the expected
-- stream length or '', the number n of its events, its n events. Returns one append() result per
-- request, in order.
local out = {}
local a = 2
for i = 1, #KEYS / 2 do
  local fence, expected, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  out[i] = append(KEYS[2 * i - 1], KEYS[2 * i], ARGV[1], fence, a + 3, a + 2 + n, expected)
  a = a + 3 + n
end
return out
"""
# Requests per _APPEND_MANY_SCRIPT call: bounds the time one call holds the server.
_APPEND_GROUP: Final = 128

_FENCE_SCRIPT: Final = """
-- KEYS[1] owner key; ARGV[1] fence token, ARGV[2] ttl seconds. The previous owner's appends fail from now on.
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

_ACK_SCRIPT: Final = """
-- KEYS[1] request stream, KEYS[2] ids hash, KEYS[3] dlq stream (all one model: one slot).
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] request id or '', ARGV[4] dead-letter reason or '',
-- ARGV[5] deliveries, ARGV[6] original payload.
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 and ARGV[4] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'data', ARGV[6], 'reason', ARGV[4], 'deliveries', ARGV[5],
             'entry_id', ARGV[2])
end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] ~= '' and redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[3])
end
return acked
"""

_FENCED_WHY: Final = {-1: "its reply stream already ended", -2: "another worker took it over",
                      -3: "events it wrote were lost in a Redis failover (the stream is shorter than written)"}

AnyEvent = StartedEvent | TokenEvent | DoneEvent | ErrorEvent | CancelledEvent
TERMINAL_TYPES: Final = (DoneEvent, ErrorEvent, CancelledEvent)


def is_retryable(error: BaseException) -> bool:
    """True for failures that mean Redis is (temporarily) unavailable rather than the command wrong."""
    if isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError, NoScriptError, *TRANSIENT_ERRORS)):
        return True  # NOSCRIPT: a promoted replica has no script cache; _queue_script's callers reload
    if is_transient(error):
        return True  # redis-py's Cluster client racing its own reconnect (connection.is_transient)
    return isinstance(error, ResponseError) and str(error).startswith(_RETRYABLE_REPLIES)


def _queue_script(pipe: aioredis.client.Pipeline, script: AsyncScript, keys: list[str],
                  args: list[str | bytes | int]) -> None:
    """Queue one EVALSHA on a pipeline. Not `script(..., client=pipe)`: a standalone pipeline then
    checks SCRIPT EXISTS before every execute (a round trip per round), and redis-py's Cluster
    pipeline refuses it. A NOSCRIPT result (a new or promoted server) is retried after _load."""
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def encode_tokens(request_id: str, index: int, token_ids: list[int], text: str) -> bytes:
    """A token event's wire bytes, exactly as `encode_event(TokenEvent(...))` writes them (same fields in
    the same order; tests/test_worker_publisher.py checks the bytes) without building and validating
    the pydantic model: every field comes from this worker's own run, and this runs once per event
    written. The replay check of _APPEND_FN compares payload bytes, so they must not differ."""
    return orjson.dumps({"v": PROTOCOL_VERSION, "type": "token", "request_id": request_id, "index": index,
                         "token_ids": token_ids, "text": text})


def backoff_s(attempt: int) -> float:
    """Full-jitter exponential backoff for retry number `attempt` (0-based)."""
    return random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** min(attempt, 16))))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    data: bytes  # the entry's original payload, raw
    reason: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class AckEntry:
    """A request entry to retire: XACK + XDEL, HDEL its ids field, and optionally dead-letter it."""

    model: str
    entry_id: str
    request_id: str | None = None
    dead_letter: DeadLetter | None = None
    band: str = "normal"  # the priority band whose stream holds the entry


@dataclass(slots=True)
class _Tokens:
    index: int
    token_ids: list[int]
    text: str


@dataclass(slots=True)
class _Queued:
    event: AnyEvent | _Tokens
    ack: AckEntry | None = None
    fence: str = ""  # the token of the run that queued it, captured when queued ('' outside a run)


@dataclass(slots=True)
class _Round:
    """One request's share of a write round: encoded events, and the ack due after them."""

    request_id: str
    payloads: list[bytes]
    terminal: bool
    ack: AckEntry | None
    fence: str  # '' for events written outside a run (refusals)


@dataclass(slots=True)
class PublisherStats:
    rounds: int = 0
    events_written: int = 0
    tokens_coalesced: int = 0  # token events merged away
    retries: int = 0
    acks: int = 0
    dead_letters: int = 0
    fenced: int = 0  # rounds refused because another run took the request over


class Publisher:
    """Writes reply events in order and acks request entries after their terminal event. See module doc."""

    def __init__(self, client: aioredis.Redis, keys: Keys, reply_ttl_s: int) -> None:
        assert reply_ttl_s >= 1
        self._redis = client
        self._keys = keys
        self._ttl_s = reply_ttl_s
        self._queues: dict[str, deque[_Queued]] = {}  # insertion order = first-dirty order
        self._acks: deque[AckEntry] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # request_id -> fence token of the run publishing it now. Each queued event carries the token
        # of the run that queued it, so what a stopped run left in the queue is written (and refused)
        # under its own token, never under the token of the run that took the request over.
        self._fences: dict[str, str] = {}
        # request_id -> reply stream length after the current run's last write (see set_fence).
        self._stream_len: dict[str, int] = {}
        self._append = client.register_script(_APPEND_SCRIPT)
        self._append_many = client.register_script(_APPEND_MANY_SCRIPT)
        # Cluster: a script's keys must share one slot, so only requests of one slot share a call.
        self._group_by_slot = isinstance(client, aioredis.RedisCluster)
        self._ack = client.register_script(_ACK_SCRIPT)
        self._fence = client.register_script(_FENCE_SCRIPT)
        self.stats = PublisherStats()
        # Called once per entry when this worker is done with it: acked, or its ack given up.
        self.on_acked: Callable[[AckEntry], None] | None = None
        # Called when a run's writes are refused (another run took the fence, or the stream
        # ended): the run must stop without a terminal event and without acking.
        self.on_fenced: Callable[[str], None] | None = None

    # -- fencing ----------------------------------------------------------------------------------------

    async def take_fence(self, request_id: str, token: str) -> None:
        """Make this run the request's only writer (before reading where to resume); see module doc."""
        await self._fence(keys=[owner_key(self._keys, request_id)], args=[token, self._ttl_s])

    def set_fence(self, request_id: str, token: str, stream_len: int | None = None) -> None:
        """Every event of `request_id` published from now on carries `token` (until its terminal).
        `stream_len`: the reply stream's length when the run starts; the run's appends then check that
        nothing they wrote was lost (a failover), and stop the run if it was (-3, "lost writes")."""
        self._fences[request_id] = token
        if stream_len is None:
            self._stream_len.pop(request_id, None)
        else:
            self._stream_len[request_id] = stream_len

    def release_fence(self, request_id: str) -> None:
        """The run stopped without a terminal event: forget its token (what it queued keeps its own)."""
        self._fences.pop(request_id, None)
        self._stream_len.pop(request_id, None)

    # -- producers of work (never block) ------------------------------------------------------------

    def publish(self, event: AnyEvent, ack: AckEntry | None = None) -> None:
        """Queue `event` on its request's reply stream; `ack` (terminal events only) runs after it is written."""
        assert ack is None or isinstance(event, TERMINAL_TYPES), "only a terminal event retires an entry"
        q = self._queues.setdefault(event.request_id, deque())
        q.append(_Queued(event, ack, self._fences.get(event.request_id, "")))
        self._kick()

    def publish_tokens(self, request_id: str, index: int, token_ids: list[int], text: str) -> None:
        """Queue tokens [index, index + len(token_ids)); merged with queued tokens of the same request."""
        assert token_ids, "a token event carries at least one token"
        q = self._queues.get(request_id)
        if q is None:
            q = self._queues[request_id] = deque()
        fence = self._fences.get(request_id, "")
        if q:
            tail = q[-1]
            ev = tail.event
            if type(ev) is _Tokens and tail.fence == fence:
                assert ev.index + len(ev.token_ids) == index, "token indices must be contiguous"
                ev.token_ids += token_ids
                ev.text += text
                self.stats.tokens_coalesced += 1
                return  # the queue was not empty: the write loop is already due to take it
        q.append(_Queued(_Tokens(index, list(token_ids), text), fence=fence))
        self._kick()

    def ack(self, entry: AckEntry) -> None:
        """Retire an entry that needs no event first (its stream already ended, or it has no request id)."""
        self._acks.append(entry)
        self._kick()

    def pending_requests(self) -> int:
        return len(self._queues)

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is written and acked; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _kick(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    # -- the write loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """The single writer task. Runs until cancelled; what is still queued then stays unwritten
        (its entries stay pending in Redis, so another worker redoes them)."""
        while True:
            if not self._queues and not self._acks:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            rounds = self._take_rounds()
            acks = list(self._acks)
            self._acks.clear()
            if rounds:
                await self._write_events(rounds)
            acks.extend(r.ack for r in rounds if r.ack is not None)
            if acks:
                await self._write_acks(acks)

    def _take_rounds(self) -> list[_Round]:
        """Pop everything queued: per request, one _Round per run (fence token) in queue order,
        consecutive token events merged."""
        rounds: list[_Round] = []
        queues, self._queues = self._queues, {}
        for request_id, q in queues.items():
            ended: set[str] = set()  # fences whose run queued its terminal: what follows of that run goes
            current: _Round | None = None
            for item in q:
                if item.fence in ended:
                    log.error("request %s: event %r after its terminal event dropped", request_id, item.event)
                    if item.ack is not None:  # give the entry back, or its lease would be renewed forever
                        self._released(item.ack)
                    continue
                if current is None or current.fence != item.fence:
                    current = _Round(request_id, [], False, None, item.fence)
                    rounds.append(current)
                ev = item.event
                if isinstance(ev, _Tokens):
                    current.payloads.append(encode_tokens(request_id, ev.index, ev.token_ids, ev.text))
                else:
                    current.payloads.append(encode_event(ev))
                    if isinstance(ev, TERMINAL_TYPES):
                        current.terminal = True
                        current.ack = item.ack
                        ended.add(item.fence)
        return rounds

    async def _write_events(self, rounds: list[_Round]) -> None:
        attempt = 0
        while True:
            try:
                groups = self._groups(rounds)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for group in groups:
                        keys: list[str] = []
                        args: list[str | bytes | int] = [self._ttl_s]
                        for r in group:
                            keys += [self._keys.events(r.request_id), owner_key(self._keys, r.request_id)]
                            expected = self._expected_len(r)
                            args += [r.fence, "" if expected is None else expected, len(r.payloads), *r.payloads]
                        _queue_script(pipe, self._append_many, keys, args)
                    replies = await pipe.execute(raise_on_error=False)
                await self._load_if_missing(replies)
                results: list[Any] = []
                for group, reply in zip(groups, replies):
                    results += [reply] * len(group) if isinstance(reply, Exception) else list(reply)
                rounds = [r for group in groups for r in group]
            except Exception as e:  # classified just below
                if not is_retryable(e):
                    raise
                self.stats.retries += 1
                delay = backoff_s(attempt)
                log.warning("reply write failed (%s); retrying in %.2f s with %d requests' events kept",
                            e, delay, len(rounds))
                attempt += 1
                await asyncio.sleep(delay)
                continue
            failed = [(r, res) for r, res in zip(rounds, results) if isinstance(res, Exception)]
            retry = [(r, res) for r, res in failed if is_retryable(res)]
            for r, res in failed:
                if not is_retryable(res):
                    log.error("request %s: reply stream write refused, %d events dropped: %s",
                              r.request_id, len(r.payloads), res)
                    if r.ack is not None:  # its terminal is not durable: leave the entry pending
                        self._released(r.ack)
                        r.ack = None
            for r, res in zip(rounds, results):
                if isinstance(res, Exception):
                    continue
                self.stats.events_written += max(0, int(res))
                expected = self._expected_len(r)
                if expected is not None and int(res) >= 0:  # written now (> 0) or by the replayed try (0)
                    self._stream_len[r.request_id] = expected + len(r.payloads)
                if int(res) in (-2, -3) or (int(res) == -1 and r.fence and not r.terminal):
                    self._fenced(r, int(res))
                elif r.terminal and r.fence and self._fences.get(r.request_id) == r.fence:
                    self._fences.pop(r.request_id, None)  # the run ended
                    self._stream_len.pop(r.request_id, None)
            self.stats.rounds += 1
            if not retry:
                return
            rounds = [r for r, _ in retry]
            self.stats.retries += 1
            delay = backoff_s(attempt)
            log.warning("reply write of %d requests refused (%s); retrying in %.2f s",
                        len(rounds), retry[0][1], delay)
            attempt += 1
            await asyncio.sleep(delay)

    def _groups(self, rounds: list[_Round]) -> list[list[_Round]]:
        """Rounds in _APPEND_MANY_SCRIPT calls: by hash slot under Cluster, else together; at most _APPEND_GROUP."""
        by_slot: dict[int, list[_Round]] = {}
        for r in rounds:
            slot = key_slot(self._keys.events(r.request_id).encode()) if self._group_by_slot else 0
            by_slot.setdefault(slot, []).append(r)
        return [g[i:i + _APPEND_GROUP] for g in by_slot.values() for i in range(0, len(g), _APPEND_GROUP)]

    async def _write_acks(self, acks: list[AckEntry]) -> None:
        attempt = 0
        while acks:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for a in acks:
                        dl = a.dead_letter
                        _queue_script(
                            pipe, self._ack,
                            [self._keys.req(a.model, a.band), self._keys.ids(a.model), self._keys.dlq(a.model)],
                            [CONSUMER_GROUP, a.entry_id, a.request_id or "",
                             dl.reason if dl else "", dl.deliveries if dl else 0, dl.data if dl else b""])
                    results = await pipe.execute(raise_on_error=False)
                await self._load_if_missing(results)
            except Exception as e:  # classified just below
                if not is_retryable(e):
                    raise
                results = [e] * len(acks)
            again: list[AckEntry] = []
            for a, res in zip(acks, results):
                if isinstance(res, Exception):
                    if is_retryable(res):
                        again.append(a)
                    else:
                        log.error("entry %s of model %s: ack refused: %s", a.entry_id, a.model, res)
                        self._released(a)
                else:
                    self.stats.acks += 1
                    if a.dead_letter is not None and res == 1:
                        self.stats.dead_letters += 1
                    self._released(a)
            if again:
                self.stats.retries += 1
                delay = backoff_s(attempt)
                log.warning("ack of %d entries failed (%s); retrying in %.2f s", len(again),
                            next(r for r in results if isinstance(r, Exception)), delay)
                attempt += 1
                await asyncio.sleep(delay)
            acks = again

    async def _load_if_missing(self, results: list[object]) -> None:
        """SCRIPT LOAD the pipelined scripts when a server answered NOSCRIPT (every master of a Cluster)."""
        if any(isinstance(res, NoScriptError) for res in results):
            for script in (self._append_many, self._ack):
                await self._redis.script_load(script.script)

    def _expected_len(self, r: _Round) -> int | None:
        """The stream length the round's run expects before it, if known (its current run only)."""
        if not r.fence or self._fences.get(r.request_id) != r.fence:
            return None
        return self._stream_len.get(r.request_id)

    def _fenced(self, r: _Round, result: int) -> None:
        """Another run owns the request (-2), its stream ended while this run was still going (-1), or
        writes of this run were lost in a failover (-3): the run stops without a terminal and without
        an ack, so its entry's lease lapses and the request resumes from what the stream still holds."""
        self.stats.fenced += 1
        if r.ack is not None:  # not ours to ack: the owner acks when it finishes
            self._released(r.ack)
            r.ack = None
        # What the refused run queued meanwhile goes too; a newer run's events (another token) stay.
        # That may be the run's terminal event (it finished while this round was in flight): its
        # ack is given back like r.ack, or the consumer would renew the entry's lease for a run
        # that no longer exists and no worker would ever take the request over.
        q = self._queues.get(r.request_id)
        if q is not None:
            for item in q:
                if item.fence == r.fence and item.ack is not None:
                    self._released(item.ack)
            kept = deque(item for item in q if item.fence != r.fence)
            if kept:
                self._queues[r.request_id] = kept
            else:
                del self._queues[r.request_id]
        current = self._fences.get(r.request_id)
        if current is not None and current != r.fence:
            # A run of this worker that already stopped (its request was taken over, possibly by this
            # very worker again): the run publishing now is not the one refused.
            log.info("request %s: a stopped run's leftover events were refused (%s)", r.request_id,
                     _FENCED_WHY.get(result, "refused"))
            return
        log.warning("request %s: %s; stopping this worker's run without a terminal event", r.request_id,
                    _FENCED_WHY.get(result, "refused"))
        self._fences.pop(r.request_id, None)
        self._stream_len.pop(r.request_id, None)
        if self.on_fenced is not None:
            try:
                self.on_fenced(r.request_id)
            except Exception:
                log.exception("on_fenced callback failed for request %s", r.request_id)

    def _released(self, entry: AckEntry) -> None:
        if self.on_acked is not None:
            try:
                self.on_acked(entry)
            except Exception:
                log.exception("on_acked callback failed for entry %s", entry.entry_id)


# -- reading a reply stream before a (re)start ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyState:
    """What a reply stream already holds: the resume point of a request taken over from another worker."""

    terminal: bool = False  # a done/error/cancelled event ends the stream: only ack the entry
    n_started: int = 0  # started events so far; the next attempt number is n_started + 1
    next_index: int = 0  # first token index not yet published
    text_chars: int = 0  # characters of completion text already published (with tokens < next_index)
    n_events: int = 0


async def read_reply_state(client: aioredis.Redis, keys: Keys, request_id: str) -> ReplyState:
    """Scan the request's reply stream (empty for a fresh request: one round trip)."""
    key = keys.events(request_id)
    n_started = next_index = text_chars = n_events = 0
    start = "-"
    while True:
        entries = await client.xrange(key, min=start, max="+", count=_SCAN_COUNT)
        for entry_id, fields in entries:
            n_events += 1
            try:
                ev = decode_event(fields.get(b"data", b""))
            except ProtocolError:
                log.warning("request %s: unreadable event %s in reply stream ignored", request_id, entry_id)
                continue
            if isinstance(ev, TERMINAL_TYPES):
                return ReplyState(True, n_started, next_index, text_chars, n_events)
            if isinstance(ev, StartedEvent):
                n_started += 1
            elif isinstance(ev, TokenEvent) and ev.index == next_index:
                # The same rule as the SDK: an event that does not continue the sequence is a duplicate.
                next_index += len(ev.token_ids)
                text_chars += len(ev.text)
        if len(entries) < _SCAN_COUNT:
            return ReplyState(False, n_started, next_index, text_chars, n_events)
        last = entries[-1][0]
        last = last.decode() if isinstance(last, bytes) else last
        start = "(" + last


def owner_key(keys: Keys, request_id: str) -> str:
    """P:{r:<request_id>}:owner, the fence of the run publishing the request (the reply stream's slot)."""
    return keys.events(request_id).removesuffix(":events") + ":owner"
