"""Owns: one model's request streams (one per priority band) as seen by this worker — the
consumer-group reads (gated by admission, band chosen by priority with aging), recovery of pending entries (own, then idle ones of dead workers via XAUTOCLAIM),
lease renewal of running entries, dead-lettering, the per-request checks before a start, the
cancel-set watcher, and the sink that turns a run's output into reply events.
Changed by: the worker; the wire contract is producer_sdk/protocol.py and docs/protocol.md.
Thread-safety: event-loop only. `run`, `renew_leases` and `watch_cancels` are three tasks of one
`ModelConsumer`; its state survives their restarts by the supervisor.

Life of an entry here: read (or claimed) -> too many deliveries? dead letter -> decode ->
reply stream already terminal? ack -> deadline passed? -> cancelled already? -> tokenize and
request check (request_path.prepare) -> take the request's fence, read the resume point
(publisher.py; skipped for an entry's first delivery with nothing published: its first append
takes the fence) -> engine. Every path that does not start the request
publishes exactly one terminal event (when the request id is known) and then acks the entry;
a started request acks when its terminal event is written (publisher.py). An entry is never
acked otherwise, so a worker that dies leaves it pending for another to claim.

Priority. A model's requests wait in three streams, one per band (high > 0, normal = 0,
low < 0; producer_sdk.keys.PRIORITY_BANDS). Each read is `_PICK_SCRIPT`, which looks at the
oldest undelivered entry of every band and picks the band with the highest score
`rank + age / priority_aging_s` (rank 2, 1, 0), and reads that band's entry in the same call
(when every band is empty, a blocking XREADGROUP on all three follows). One call picks and reads
as many entries as the read gate would admit one after another (at most _READ_BATCH), in the
order single picks would give; their per-request checks then go out in one pipeline. So waiting priority_aging_s is worth one band:
a request is never passed over by a request of a higher band that arrived more than
(band difference) x priority_aging_s after it, and a low-priority request always finishes.
Within a band, order is FIFO. Recovery (own pending, XAUTOCLAIM) visits the bands in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer_sdk.errors import ProtocolError
from producer_sdk.keys import CONSUMER_GROUP, PRIORITY_BANDS, Keys, check_request_id
from producer_sdk.protocol import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    RequestMessage,
    StartedEvent,
    Usage,
    decode_request,
)

from . import admission, request_path
from .admission import Denial
from .engine_driver import EngineDriver, Outcome, Run
from .metrics import Metrics
from .publisher import AckEntry, DeadLetter, Publisher, ReplyState, read_reply_state
from .settings import ModelSettings, Settings

__all__ = ["ModelConsumer", "StreamSink"]

log = logging.getLogger("layermux.worker.consumer")

# Own pending entries listed per XPENDING round trip during startup recovery.
_RECOVER_COUNT: Final = 16
# Most new entries one read takes (when the read gate admits that many): a burst of requests then
# costs a round trip per batch, not per request, and its entries' checks go out in one pipeline.
_READ_BATCH: Final = 32

_PICK_SCRIPT: Final = """
-- KEYS[1..n] the model's request streams, highest band first; ARGV[1] group, ARGV[2] aging ms,
-- ARGV[3] (optional) consumer name, ARGV[4] (optional) how many entries to read.
-- Picks the band whose oldest undelivered entry scores highest (score = (n - index) + age_ms /
-- aging_ms). Without ARGV[3] returns its 1-based index, or 0 when no band has an undelivered
-- entry. With ARGV[3] it also reads that entry for the consumer (XREADGROUP COUNT 1, saving the
-- worker a round trip per request) and returns {index, entry id, fields}, or 0. With ARGV[4] = k
-- it picks and reads up to k times (each pick sees the previous reads, so the order is that of k
-- single calls) and returns a list of such triples, empty when nothing waits.
-- Entry ids are Redis server milliseconds, so ages are read against the server's clock.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local aging = tonumber(ARGV[2])
local function pick()
  local best, best_score = 0, nil
  for i = 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local last = nil
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
        local f = {}
        for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
        if f['name'] == ARGV[1] then last = f['last-delivered-id'] end
      end
      if last then
        local head = redis.call('XRANGE', KEYS[i], '(' .. last, '+', 'COUNT', 1)
        if #head > 0 then
          local ms = tonumber(string.match(head[1][1], '^(%d+)'))
          local score = (#KEYS - i) + math.max(0, now_ms - ms) / aging
          if best_score == nil or score > best_score then best, best_score = i, score end
        end
      end
    end
  end
  return best
end
if ARGV[3] == nil then return pick() end
local out = {}
for _ = 1, tonumber(ARGV[4] or '1') do
  local best = pick()
  if best == 0 then break end
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[3], 'COUNT', 1, 'STREAMS', KEYS[best], '>')
  if not got or #got[1][2] == 0 then break end
  out[#out + 1] = {best, got[1][2][1][1], got[1][2][1][2]}
end
if ARGV[4] ~= nil then return out end
if #out == 0 then return 0 end
return out[1]
"""

_PRUNE_SCRIPT: Final = """
-- KEYS[1] request stream; ARGV[1] group, ARGV[2] min idle ms, ARGV[3] this worker's consumer name.
-- Removes the group's consumers that own no pending entry and have not touched the stream for
-- ARGV[2] ms (workers that are gone: a live one reads every read_block_ms). Atomic, so an entry
-- cannot be delivered to a consumer between the check and its removal; returns the names removed.
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
"""

_RENEW_SCRIPT: Final = """
-- KEYS[1] request stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids.
-- Resets the idle time of the entries still pending for this consumer and returns their ids;
-- an entry another consumer claimed meanwhile is left to it (never stolen back).
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


@dataclass(frozen=True, slots=True)
class _Entry:
    entry_id: str
    data: bytes | None  # None: the entry was deleted from the stream while pending
    deliveries: int
    band: str = "normal"
    fresh: bool = False  # read with XREADGROUP '>': its first delivery to any consumer
    # (request id, reply stream has events, cancel asked) fetched with the read (_fetch_checks)
    checked: tuple[str, bool, bool] | None = None

    @property
    def ref(self) -> tuple[str, str]:
        return (self.band, self.entry_id)


class StreamSink:
    """RunSink of the stream path: reply events through the publisher, ack after the terminal one."""

    def __init__(self, consumer: ModelConsumer, entry_id: str, band: str = "normal") -> None:
        self._c = consumer
        self._entry_id = entry_id
        self._band = band

    def on_tokens(self, run: Run, index: int, token_ids: list[int], text: str) -> None:
        self._c.publisher.publish_tokens(run.request_id, index, token_ids, text)

    def on_finish(self, run: Run, outcome: Outcome) -> None:
        c = self._c
        counters = c.metrics[c.name]
        event: DoneEvent | ErrorEvent | CancelledEvent
        if outcome.kind == "done":
            u = outcome.usage
            usage = Usage(prompt_tokens=int(u["prompt_tokens"]), completion_tokens=int(u["completion_tokens"]),
                          queue_ms=u["queue_ms"], prefill_ms=u["prefill_ms"], decode_ms=u["decode_ms"],
                          total_ms=u["total_ms"])
            event = DoneEvent(request_id=run.request_id, finish_reason=outcome.finish_reason,  # type: ignore[arg-type]
                              text=outcome.text, token_ids=outcome.token_ids, usage=usage)
            counters.done += 1
        elif outcome.kind == "cancelled":
            event = CancelledEvent(request_id=run.request_id, completion_tokens=len(outcome.token_ids))
            counters.cancelled += 1
            c.cancel_handled.add(run.request_id)
        else:
            event = ErrorEvent(request_id=run.request_id, code=outcome.code, message=outcome.message,
                               details=outcome.details)
            counters.errors += 1
            counters.error_codes[outcome.code] += 1
        c.running.pop(run.request_id, None)
        c.publisher.publish(event, ack=AckEntry(c.name, self._entry_id, run.request_id, band=self._band))

    def on_abandon(self, run: Run) -> None:
        # No terminal, no ack: the entry stays pending and its lease lapses, so another worker
        # (or this one, restarted) takes it over and resumes from the reply stream.
        self._c.running.pop(run.request_id, None)
        self._c.leases.pop((self._band, self._entry_id), None)
        self._c.publisher.release_fence(run.request_id)


class ModelConsumer:
    """Reads, checks and starts one model's requests. See the module docstring."""

    def __init__(
        self,
        *,
        model: ModelSettings,
        settings: Settings,
        client: aioredis.Redis,
        keys: Keys,
        driver: EngineDriver,
        publisher: Publisher,
        metrics: Metrics,
        waiting: dict[str, int],
    ) -> None:
        self.model = model
        self.name = model.name
        self.settings = settings
        self.redis = client
        self.keys = keys
        self.driver = driver
        self.publisher = publisher
        self.metrics = metrics
        self.waiting = waiting  # model -> entries not yet delivered to any worker (stats reporter)
        self.consumer_name = settings.worker_id
        self.streams: dict[str, str] = {band: keys.req(self.name, band) for band in PRIORITY_BANDS}
        self._band_of: dict[str, str] = {stream: band for band, stream in self.streams.items()}
        self._aging_ms = max(1, round(settings.priority_aging_s * 1000))
        self.running: dict[str, tuple[str, str]] = {}  # request_id -> (band, entry_id), started, not finished
        self.leases: dict[tuple[str, str], str] = {}  # (band, entry_id) -> request_id, from start until acked
        # Entries one blocking read delivered beyond the first (several bands filled at once):
        # handled next, renewed like leases meanwhile.
        self._early: list[_Entry] = []
        self.cancel_handled: set[str] = set()  # request ids to SREM from the cancel set
        self.gate_verdict = admission.ReadVerdict.OK
        self._stopping = False
        # Per band: own pending not yet recovered (exclusive bound; None when done), XAUTOCLAIM cursor.
        self._recover_after: dict[str, str | None] = {band: "-" for band in PRIORITY_BANDS}
        self._autoclaim_cursor = {band: "0-0" for band in PRIORITY_BANDS}
        self._autoclaim_due = 0.0  # loop time
        self._running_changed = asyncio.Event()
        self._renew = client.register_script(_RENEW_SCRIPT)
        self._pick = client.register_script(_PICK_SCRIPT)
        self._prune = client.register_script(_PRUNE_SCRIPT)

    # -- control ----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading (graceful shutdown); running requests go on."""
        self._stopping = True
        self._running_changed.set()

    def lease_released(self, entry: AckEntry) -> None:
        """Publisher callback: the entry is acked, stop renewing it."""
        self.leases.pop((entry.band, entry.entry_id), None)

    # -- the read loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and start requests until stop(); Redis errors propagate (the supervisor restarts us)."""
        await self.ensure_group()
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not await self._wait_gate():
                break
            entry: _Entry | None = self._early.pop(0) if self._early else None
            try:
                if entry is None and any(a is not None for a in self._recover_after.values()):
                    entry = await self._next_own_pending()
                if entry is None and loop.time() >= self._autoclaim_due:
                    entry = await self._autoclaim_one()
                    if entry is None:
                        self._autoclaim_due = loop.time() + self.settings.lease_idle_ms / 2000.0
                if entry is None:
                    entry = await self._read_new()
            except ResponseError as e:
                if not str(e).startswith("NOGROUP"):
                    raise
                log.warning("model %s: consumer group lost (%s); recreating it", self.name, e)
                await self.ensure_group()
                continue
            if entry is not None:
                await self.handle(entry)

    async def ensure_group(self) -> None:
        for stream in self.streams.values():
            try:
                await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):
                    raise

    async def _wait_gate(self) -> bool:
        """Wait until admission lets this model read; False when stopping."""
        timeout_s = self.settings.stats_interval_s
        while not self._stopping:
            waiter = self.driver.capacity.waiter()
            self.gate_verdict = admission.read_verdict(self.name, self.driver.device_view(self.waiting))
            if self.gate_verdict is admission.ReadVerdict.OK:
                return True
            # Headroom also changes inside the engine (KV grows, sequences are preempted), which
            # no event announces: re-check at least every stats interval.
            try:
                await asyncio.wait_for(waiter.wait(), timeout_s)
            except TimeoutError:
                pass
        return False

    async def _read_new(self) -> _Entry | None:
        """The next undelivered entries, in the order `_PICK_SCRIPT` chooses (as many as the read gate
        admits, at most _READ_BATCH; the first is returned, the others wait in _early with their
        checks already fetched); when every band is empty, a blocking read on all of them (entries
        that arrive together beyond the first wait in _early)."""
        streams = list(self.streams.values())
        n = self._read_allowance()
        picked = await self._pick(keys=streams, args=[CONSUMER_GROUP, self._aging_ms, self.consumer_name, n])
        # [[band index, entry id, [field, value, ...]], ...]: read by the script
        got = [_Entry(_text(entry_id), _payload(dict(zip(flat[::2], flat[1::2]))), 1,
                      self._band_of[streams[int(index) - 1]], fresh=True) for index, entry_id, flat in picked]
        if len(got) > 1:
            got = await self._fetch_checks(got)
        if not got:
            reply = await self.redis.xreadgroup(CONSUMER_GROUP, self.consumer_name, dict.fromkeys(streams, ">"),
                                                count=1, block=self.settings.read_block_ms)
            got = [_Entry(_text(entry_id), _payload(fields), 1, self._band_of[_text(stream)], fresh=True)
                   for stream, entries in reply or [] for entry_id, fields in entries]
            got.sort(key=lambda e: PRIORITY_BANDS.index(e.band))
        if not got:
            return None
        self._early.extend(got[1:])
        return got[0]

    def _read_allowance(self) -> int:
        """How many requests the read gate would admit one after another, each taking a minimum KV
        reservation and a running slot (the gate admitted the first; at most _READ_BATCH)."""
        view = self.driver.device_view(self.waiting)
        me = view.models[self.name]
        n = 1
        while n < _READ_BATCH:
            load = dataclasses.replace(me, running=me.running + n,
                                       kv_bytes=me.kv_bytes + n * me.min_reservation_bytes)
            after = admission.DeviceView(view.headroom_bytes - n * me.min_reservation_bytes,
                                         {**view.models, self.name: load})
            if admission.read_verdict(self.name, after) is not admission.ReadVerdict.OK:
                break
            n += 1
        return n

    async def _fetch_checks(self, entries: list[_Entry]) -> list[_Entry]:
        """The per-request checks of `handle` (reply stream head, cancel asked) for several entries
        in one pipeline; an entry without a readable request id is left for `handle` to refuse."""
        ids = [_recover_request_id(e.data) if e.data is not None else None for e in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in ids:
                if rid is not None:
                    pipe.xrange(self.keys.events(rid), count=1)
                    pipe.sismember(self.keys.cancel(self.name), rid)
            replies = iter(await pipe.execute())
        return [e if rid is None else dataclasses.replace(e, checked=(rid, bool(next(replies)), bool(next(replies))))
                for e, rid in zip(entries, ids)]

    async def _next_own_pending(self) -> _Entry | None:
        """Entries a previous run of this consumer (same worker_id) read but never acked."""
        for band, stream in self.streams.items():
            while (after := self._recover_after[band]) is not None:
                lo = "-" if after == "-" else "(" + after
                rows = await self.redis.xpending_range(stream, CONSUMER_GROUP, min=lo, max="+",
                                                       count=_RECOVER_COUNT, consumername=self.consumer_name)
                if not rows:
                    self._recover_after[band] = None
                    break
                for row in rows:
                    entry_id = _text(row["message_id"])
                    self._recover_after[band] = entry_id
                    if (band, entry_id) in self.leases:
                        continue  # running here right now
                    entry = await self._claim(band, entry_id, min_idle_ms=0)
                    if entry is not None:
                        log.info("model %s: recovering own pending entry %s of band %s (delivery %d)",
                                 self.name, entry_id, band, entry.deliveries)
                        return entry
        return None

    async def _autoclaim_one(self) -> _Entry | None:
        """One entry idle longer than lease_idle_ms (its worker died or lost it), claimed atomically;
        the bands are visited highest first."""
        for band, stream in self.streams.items():
            reply = await self.redis.xautoclaim(stream, CONSUMER_GROUP, self.consumer_name,
                                                min_idle_time=self.settings.lease_idle_ms,
                                                start_id=self._autoclaim_cursor[band], count=1)
            cursor, entries = _text(reply[0]), reply[1]
            self._autoclaim_cursor[band] = cursor
            for entry_id, fields in entries:
                if entry_id is None:
                    # Redis < 7 returns a pending entry deleted from the stream as nil (and keeps it
                    # pending, now ours): sweep our pending list for such entries.
                    await self._sweep_deleted(band)
                    continue
                entry_id = _text(entry_id)
                if (band, entry_id) in self.leases:
                    continue  # ours and live: the claim just renewed it
                deliveries = await self._deliveries(band, entry_id)
                log.info("model %s: claimed idle entry %s of band %s (delivery %d)", self.name, entry_id, band,
                         deliveries)
                return _Entry(entry_id, _payload(fields), deliveries, band)
        return None

    async def _claim(self, band: str, entry_id: str, min_idle_ms: int) -> _Entry | None:
        claimed = await self.redis.xclaim(self.streams[band], CONSUMER_GROUP, self.consumer_name,
                                          min_idle_time=min_idle_ms, message_ids=[entry_id])
        if not claimed:
            return None
        got_id, fields = claimed[0]
        deliveries = await self._deliveries(band, entry_id)
        if got_id is None or fields is None:
            return _Entry(entry_id, None, deliveries, band)
        return _Entry(entry_id, _payload(fields), deliveries, band)

    async def _deliveries(self, band: str, entry_id: str) -> int:
        rows = await self.redis.xpending_range(self.streams[band], CONSUMER_GROUP, min=entry_id, max=entry_id,
                                               count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _sweep_deleted(self, band: str) -> None:
        stream = self.streams[band]
        rows = await self.redis.xpending_range(stream, CONSUMER_GROUP, min="-", max="+", count=1000,
                                               consumername=self.consumer_name)
        for row in rows:
            entry_id = _text(row["message_id"])
            if (band, entry_id) in self.leases:
                continue
            if not await self.redis.xrange(stream, min=entry_id, max=entry_id, count=1):
                log.warning("model %s: pending entry %s of band %s was deleted from the stream; acking it",
                            self.name, entry_id, band)
                self.publisher.ack(AckEntry(self.name, entry_id, band=band))

    # -- one entry --------------------------------------------------------------------------------------

    async def handle(self, entry: _Entry) -> None:
        """Check one claimed/read entry and start it, or finish it with one terminal event."""
        counters = self.metrics[self.name]
        if entry.ref in self.leases:
            # Still ours: running, or its terminal event not yet acked. Read again only after the
            # consumer group was recreated; a second run here would race the first.
            return
        if entry.data is None:
            log.warning("model %s: entry %s has no payload (deleted or malformed); acking it",
                        self.name, entry.entry_id)
            self.publisher.ack(AckEntry(self.name, entry.entry_id, band=entry.band))
            return
        request_id = _recover_request_id(entry.data)
        if entry.deliveries > self.settings.max_deliveries:
            reason = (f"delivered {entry.deliveries} times (max_deliveries {self.settings.max_deliveries}); "
                      "every worker that took it stopped before finishing")
            log.error("model %s: entry %s (request %s) dead-lettered: %s", self.name, entry.entry_id,
                      request_id, reason)
            ack = AckEntry(self.name, entry.entry_id, request_id, DeadLetter(entry.data, reason, entry.deliveries),
                           band=entry.band)
            self._refuse(request_id, ack, Denial("dead_letter", f"the request was dead-lettered: {reason}",
                                                 {"deliveries": entry.deliveries,
                                                  "limit": self.settings.max_deliveries}))
            return
        try:
            msg = decode_request(entry.data)
        except ProtocolError as e:
            ack = AckEntry(self.name, entry.entry_id, request_id, None if request_id else
                           DeadLetter(entry.data, f"{e.code}: {e.message}", entry.deliveries), band=entry.band)
            self._refuse(request_id, ack, Denial(e.code, e.message))
            return
        ack = AckEntry(self.name, entry.entry_id, msg.request_id, band=entry.band)
        if msg.model != self.name:
            self._refuse(msg.request_id, ack, Denial(
                "invalid_request", f"model: the entry names model {msg.model!r} but sits in the stream of "
                                   f"{self.name!r}"))
            return
        if self.driver.run_for(msg.request_id) is not None:
            return  # already running here (an entry re-delivered to its live owner)
        # One round trip for a fresh request (none when the read fetched it): has anything been
        # published (then read where it stands), and was a cancel asked before the request was read?
        if entry.checked is not None and entry.checked[0] == msg.request_id:
            _, head, cancel_asked = entry.checked
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrange(self.keys.events(msg.request_id), count=1)
                pipe.sismember(self.keys.cancel(self.name), msg.request_id)
                head, cancel_asked = await pipe.execute()
        state = await read_reply_state(self.redis, self.keys, msg.request_id) if head else ReplyState()
        if state.terminal:
            self.publisher.ack(ack)
            return
        now = time.time()
        if msg.deadline_at is not None and now >= msg.deadline_at:
            self._refuse(msg.request_id, ack, Denial(
                "deadline_exceeded", "the request's deadline passed while it was queued",
                {"deadline_at": msg.deadline_at, "queued_ms": round((now - msg.submitted_at) * 1000.0, 3),
                 "late_ms": round((now - msg.deadline_at) * 1000.0, 3)}))
            return
        if cancel_asked:
            counters.cancelled += 1
            self.cancel_handled.add(msg.request_id)
            self.publisher.publish(CancelledEvent(request_id=msg.request_id, completion_tokens=0), ack=ack)
            self._running_changed.set()
            return
        prepared = await request_path.prepare(self.driver, msg)
        if isinstance(prepared, Denial):
            self._refuse(msg.request_id, ack, prepared)
            return
        prompt_ids = prepared.prompt_ids
        fence = f"{self.consumer_name}#{secrets.token_hex(8)}"
        if entry.fresh and not head:
            # The entry's first delivery and nothing published: no other run can hold the request, so
            # the run's first append takes the fence (_APPEND_SCRIPT sets the owner key when it is free)
            # and the two round trips below are skipped. A run that does hold it (a resubmitted lost
            # entry whose old run is still going) refuses that append: this run stops, its entry's lease
            # lapses, and the next delivery takes the slow path.
            self._start(msg, prompt_ids, entry, fence, 1, 0, 0, 0)
            return
        # Take the request's fence, then read where to resume: a previous owner still running
        # somewhere can no longer append, so this read is final (publisher.py, "fencing").
        await self.publisher.take_fence(msg.request_id, fence)
        state = await read_reply_state(self.redis, self.keys, msg.request_id)
        if state.terminal:
            self.publisher.ack(ack)
            return
        if self.driver.run_for(msg.request_id) is not None:
            return
        self._start(msg, prompt_ids, entry, fence, state.n_started + 1, state.next_index, state.text_chars,
                    state.n_events)

    def _start(self, msg: RequestMessage, prompt_ids: list[int], entry: _Entry, fence: str, attempt: int,
               resume_index: int, resume_chars: int, stream_len: int) -> None:
        sink = StreamSink(self, entry.entry_id, entry.band)
        run = request_path.start(self.driver, request_path.Prepared(msg, prompt_ids), sink,
                                 resume_index=resume_index, resume_chars=resume_chars)
        if isinstance(run, Denial):
            self._refuse(msg.request_id, AckEntry(self.name, entry.entry_id, msg.request_id, band=entry.band), run)
            return
        # Same loop tick as the submit: no engine event can be handled before "started" is queued.
        self.publisher.set_fence(msg.request_id, fence, stream_len)
        self.publisher.publish(StartedEvent(request_id=msg.request_id, worker=self.consumer_name,
                                            attempt=attempt, prompt_tokens=len(prompt_ids)))
        self.running[msg.request_id] = entry.ref
        self.leases[entry.ref] = msg.request_id
        counters = self.metrics[self.name]
        counters.admitted += 1
        counters.observe_wait(max(0.0, run.started_at - msg.submitted_at))
        self._running_changed.set()
        if resume_index:
            log.info("model %s: request %s resumed at token %d (attempt %d)", self.name, msg.request_id,
                     resume_index, attempt)
        else:
            log.debug("model %s: request %s started from band %s (attempt %d)", self.name, msg.request_id,
                      entry.band, attempt)

    def _refuse(self, request_id: str | None, ack: AckEntry, denial: Denial) -> None:
        """Finish an entry that will not run: one error event (if its request id is known), then ack."""
        counters = self.metrics[self.name]
        counters.errors += 1
        counters.error_codes[denial.code] += 1
        counters.refused[denial.code] += 1
        log.info("model %s: request %s refused: %s: %s", self.name, request_id, denial.code, denial.message)
        if request_id is None:
            self.publisher.ack(ack)
            return
        self.publisher.publish(ErrorEvent(request_id=request_id, code=denial.code, message=denial.message,
                                          details=dict(denial.details)), ack=ack)

    async def prune_consumers(self) -> list[str]:
        """XGROUP DELCONSUMER the consumer names of gone workers (nothing pending, idle for
        consumer_expiry_s) on every band's stream; returns what was removed."""
        removed: list[str] = []
        min_idle_ms = round(self.settings.consumer_expiry_s * 1000)
        for band, stream in self.streams.items():
            try:
                names = await self._prune(keys=[stream], args=[CONSUMER_GROUP, min_idle_ms, self.consumer_name])
            except ResponseError as e:
                if str(e).startswith("NOGROUP") or "no such key" in str(e).lower():
                    continue
                raise
            for name in names:
                log.info("model %s: removed consumer %s of band %s (gone: idle, nothing pending)",
                         self.name, _text(name), band)
                removed.append(_text(name))
        return removed

    # -- leases and cancellations -----------------------------------------------------------------

    async def renew_leases(self) -> None:
        """Every lease_idle_ms / 3, reset the idle time of every entry this worker is working on,
        so that XAUTOCLAIM elsewhere never takes live work. An entry no longer pending for this
        consumer was taken over (its lease lapsed, e.g. during a Redis outage) or finished by
        another worker: stop ours without a terminal (the fence already refuses its writes)."""
        period_s = self.settings.lease_idle_ms / 3000.0
        while True:
            await asyncio.sleep(period_s)
            for band, stream in self.streams.items():
                early = [e.entry_id for e in self._early if e.band == band]
                ids = [entry_id for b, entry_id in self.leases if b == band]
                if not ids and not early:
                    continue
                claimed = await self._renew(keys=[stream], args=[CONSUMER_GROUP, self.consumer_name, *ids, *early])
                kept = {_text(i) for i in claimed}
                # An early entry taken over meanwhile is another worker's now: forget it.
                self._early = [e for e in self._early if e.band != band or e.entry_id in kept]
                for entry_id in ids:
                    if entry_id not in kept and (band, entry_id) in self.leases:
                        request_id = self.leases.pop((band, entry_id))
                        if self.driver.run_for(request_id) is not None and request_id in self.running:
                            log.warning("model %s: entry %s (request %s) is no longer pending here; stopping it",
                                        self.name, entry_id, request_id)
                            self.driver.abandon(request_id)

    async def watch_cancels(self) -> None:
        """Every cancel_poll_ms while requests run, SMISMEMBER them against the model's cancel set."""
        period_s = self.settings.cancel_poll_ms / 1000.0
        key = self.keys.cancel(self.name)
        while True:
            if self.cancel_handled:
                done = list(self.cancel_handled)
                await self.redis.srem(key, *done)  # type: ignore[misc]
                self.cancel_handled.difference_update(done)
            if not self.running:
                self._running_changed.clear()
                if self._stopping:
                    return
                await self._running_changed.wait()
                continue
            ids = list(self.running)
            flags = await self.redis.smismember(key, list[Any](ids))  # type: ignore[misc]
            for request_id, flag in zip(ids, flags):
                if flag:
                    self.cancel_handled.add(request_id)
                    if self.driver.cancel(request_id, "cancelled"):
                        log.info("model %s: request %s cancelled by its producer", self.name, request_id)
            await asyncio.sleep(period_s)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _payload(fields: dict[bytes, bytes] | None) -> bytes | None:
    """An entry's `data` field. An entry without one (not written by the enqueue script) reads as
    the empty payload, which fails to decode and is dead-lettered; None only for a deleted entry."""
    if fields is None:
        return None
    return fields.get(b"data", b"")


def _recover_request_id(raw: bytes) -> str | None:
    """The request id of a payload that may not decode as a RequestMessage, if it has a valid one."""
    try:
        obj: Any = orjson.loads(raw)
        rid = obj.get("request_id") if isinstance(obj, dict) else None
        return check_request_id(rid) if isinstance(rid, str) else None
    except (orjson.JSONDecodeError, ValueError):
        return None
