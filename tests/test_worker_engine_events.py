"""The engine driver's event path on the real engine: a batch of events (what one drain of the
engine's queue returns) reaches each run's sink as one piece of tokens, always before the run's
terminal outcome; and the publisher's token encoding is byte-for-byte the protocol's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from engine import Engine, EngineEvent
from producer_sdk.protocol import SamplingParamsModel, TokenEvent, encode_event
from tools.model_factory import make_model
from worker.engine_driver import EngineDriver, Outcome, Run, engine_config
from worker.publisher import encode_tokens
from worker.settings import Settings, load_settings

WAIT_S = 120.0  # an upper bound for waits only; nothing asserts on time


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("driver-model")
    return make_model(root / "tiny", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128,
                      init_std=0.1, max_position_embeddings=4096, seed=1)


class HeldEngine(Engine):
    """The real engine, whose events reach the driver only once the test releases them: so that one
    drain hands the driver many tokens of a run and its terminal event together, as a busy loop sees
    them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(engine_config(settings))
        self.held: list[EngineEvent] = []
        self.release = False

    def drain_events(self) -> list[EngineEvent]:
        self.held += super().drain_events()
        if not self.release:
            return []
        out, self.held = self.held, []
        return out


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_tokens(self, run: Run, index: int, token_ids: list[int], text: str) -> None:
        self.calls.append(("tokens", (index, list(token_ids), text)))

    def on_finish(self, run: Run, outcome: Outcome) -> None:
        self.calls.append(("finish", outcome))

    def on_abandon(self, run: Run) -> None:
        self.calls.append(("abandon", None))


async def _until(check: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, "the engine did not get there"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("end", ["cancelled", "length"])
def test_a_batch_of_tokens_reaches_the_sink_in_one_piece_before_the_terminal(model: Path, end: str) -> None:
    settings = load_settings(None, redis_url="redis://unused", device={"budget": "64MiB", "n_threads": 1},
                             models=[{"name": "m", "path": str(model), "max_tokens_limit": 4096}])

    async def body() -> None:
        engines: list[HeldEngine] = []

        def factory(s: Settings) -> Engine:
            engines.append(HeldEngine(s))
            return engines[0]

        driver = EngineDriver(settings, engine_factory=factory)
        await driver.start()
        try:
            eng = engines[0]
            sink = RecordingSink()
            max_tokens = 2000 if end == "cancelled" else 40
            params = SamplingParamsModel.model_validate({"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True,
                                                  "seed": 1})
            driver.begin("r1", "m", [5, 6, 7, 8], params, sink, submitted_at=time.time())
            if end == "cancelled":
                await _until(lambda: len(eng.held) >= 20)
                driver.cancel("r1")
            await _until(lambda: any(ev.token_id < 0 for ev in eng.held))
            n_tokens = sum(1 for ev in eng.held if ev.token_id >= 0)
            eng.release = True
            driver._on_readable()  # the held batch, as the loop's reader would hand it over
        finally:
            await driver.close()
        kinds = [k for k, _ in sink.calls]
        assert kinds == ["tokens", "finish"], kinds  # one piece, then the outcome
        (index, ids, text), outcome = sink.calls[0][1], sink.calls[1][1]
        assert outcome.kind == ("cancelled" if end == "cancelled" else "done")
        assert len(outcome.token_ids) == n_tokens and index == 0
        if end == "length":
            assert ids == outcome.token_ids and text == outcome.text
        else:  # no final flush on cancel: a last id whose bytes the detokenizer still holds stays unsent
            assert n_tokens - 1 <= len(ids) <= n_tokens and ids == outcome.token_ids[:len(ids)]
            assert outcome.text.startswith(text)

    asyncio.run(body())


def test_token_events_are_encoded_byte_for_byte_as_the_protocol_encodes_them() -> None:
    texts = ["", "a", " hello", "é世界🙂", 'quote " and \\ backslash', "tab\tnew\nline\r\x00\x1f\x7f", "\u2028\u2029"]
    for i, text in enumerate(texts):
        for ids in ([0], [1, 2, 3], list(range(200)), [2**31 - 1]):
            rid = f"req-{i}-{len(ids)}"
            index = (i * 977) % 100_000
            expected = encode_event(TokenEvent(request_id=rid, index=index, token_ids=ids, text=text))
            assert encode_tokens(rid, index, ids, text) == expected, (text, ids)
