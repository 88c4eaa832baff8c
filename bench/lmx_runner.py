"""Times layermux on one model: prefill, batch-1 decode, batched decode (facade) and the CLI.

Owner: benchmarks. One LayermuxRunner owns one Engine with one model loaded; not
thread-safe (one measurement at a time). Timings come from the engine's own events
(prefill_ms, decode_ms per request) and, for batched decode, from wall-clock event
arrival times, the same definition as the HF runner uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import N_THREADS, REPO, process_cpu_s, prompt_ids

from engine import Engine, EngineConfig, EventKind, MatmulPrecision, ModelLoadOptions, ResidencyMode, SamplingParams

BUDGET_BYTES = 8 << 30  # device budget: MAP_NORESERVE, so only touched pages cost RAM

class LayermuxRunner:
    def __init__(self, model_dir: Path, weights: str, n_threads: int = N_THREADS, precision: str = "exact") -> None:
        self.precision = precision
        self.eng = Engine(EngineConfig(budget_bytes=BUDGET_BYTES, n_threads=n_threads, max_seqs_per_step=64,
                                       max_batch_tokens=512,
                                       matmul_precision=MatmulPrecision.__members__[precision]))
        t0 = time.perf_counter()
        self.info = self.eng.load_model("m", str(model_dir), weights,
                                        ModelLoadOptions(residency=ResidencyMode.resident))
        self.load_s = time.perf_counter() - t0
        self._seed = 100  # every request gets fresh prompt ids: no prefix can be reused

    def close(self) -> None:
        self.eng.close()

    def cpu_s(self) -> float:
        return process_cpu_s()

    def last_logits(self, ids: list[int]) -> Any:
        """Last-position logits [n_vocab] float32 (parity check against HF)."""
        return self.eng.debug_logits("m", ids)

    def _ids(self, n: int) -> list[int]:
        self._seed += 1
        return prompt_ids(n, seed=self._seed)

    def _run_one(self, prompt: list[int], max_tokens: int) -> tuple[Any, int]:
        rid = self.eng.new_request_id()
        self.eng.submit(rid, "m", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        n_tok = 0
        while True:
            for ev in self.eng.wait_events(5.0):
                if ev.req_id != rid:
                    continue
                if ev.kind == EventKind.token:
                    n_tok += 1
                elif ev.kind == EventKind.error:
                    raise RuntimeError(f"layermux error: {ev.message}")
                else:
                    return ev, n_tok

    def prefill_tps(self, n_prompt: int = 512) -> float:
        """Prompt tokens / prefill time (the engine times prefill up to the first token)."""
        done, _ = self._run_one(self._ids(n_prompt), max_tokens=1)
        return float(n_prompt / (done.prefill_ms / 1e3))

    def decode_tps(self, n_tokens: int = 64, n_prompt: int = 8) -> float:
        """Tokens after the first / decode time, one sequence, after a short prompt."""
        done, n_tok = self._run_one(self._ids(n_prompt), max_tokens=n_tokens)
        return float((n_tok - 1) / (done.decode_ms / 1e3))

    def batched_decode_tps(self, n_seqs: int, n_tokens: int = 32, n_prompt: int = 8) -> float:
        """Aggregate tokens/s of n_seqs sequences decoding together.

        Counted from the moment the last sequence has its first token (all prefills done,
        every sequence decoding) to the last token: tokens that arrive in that window over
        its length. Event arrival is observed once per engine step, so the window edges are
        step boundaries.
        """
        rids = [self.eng.new_request_id() for _ in range(n_seqs)]
        params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
        for rid in rids:
            self.eng.submit(rid, "m", self._ids(n_prompt), params)
        pending = set(rids)
        started: set[int] = set()
        t_ready = 0.0
        n_after = 0
        t_end = 0.0
        while pending:
            evs = self.eng.wait_events(5.0)
            now = time.perf_counter()
            for ev in evs:
                if ev.req_id not in pending:
                    continue
                if ev.kind == EventKind.token:
                    if ev.req_id not in started:
                        started.add(ev.req_id)
                        if len(started) == n_seqs:
                            t_ready = now
                    elif t_ready and now > t_ready:
                        n_after += 1
                elif ev.kind == EventKind.error:
                    raise RuntimeError(f"layermux error: {ev.message}")
                else:
                    pending.discard(ev.req_id)
                    t_end = now
        return n_after / (t_end - t_ready) if t_end > t_ready and n_after else float("nan")


def cli_generate(model_dir: Path, weights: str, ids: list[int], max_tokens: int,
                 n_threads: int = N_THREADS) -> dict[str, Any]:
    """`layermux generate MODEL_DIR --prompt-ids ... --json` in a subprocess; its JSON result."""
    exe = Path(sys.executable).with_name("layermux")
    cmd = [str(exe), "generate", str(model_dir), "--prompt-ids", ",".join(map(str, ids)),
           "--max-tokens", str(max_tokens), "--weights", weights, "--threads", str(n_threads),
           "--budget", f"{BUDGET_BYTES >> 30}GiB", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"layermux generate failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


class CliRunner:
    """`layermux generate --json` as a runner: every call is a fresh process that loads the model.

    The rates are the CLI's own JSON timings (prefill_tokens_per_s, decode_tokens_per_s), so
    process start and model load are not in them. The CLI has no --ignore-eos: a run that
    stops early at an EOS id reports the rate over the tokens it made."""

    batched = False

    def __init__(self, model_dir: Path, weights: str, n_threads: int = N_THREADS) -> None:
        self.model_dir, self.weights, self.n_threads = model_dir, weights, n_threads
        self._seed = 500

    def _ids(self, n: int) -> list[int]:
        self._seed += 1
        return prompt_ids(n, seed=self._seed)

    def prefill_tps(self, n_prompt: int = 512) -> float:
        res = cli_generate(self.model_dir, self.weights, self._ids(n_prompt), max_tokens=1, n_threads=self.n_threads)
        return float(res["timings"]["prefill_tokens_per_s"])

    def decode_tps(self, n_tokens: int = 64) -> float:
        res = cli_generate(self.model_dir, self.weights, self._ids(8), max_tokens=n_tokens, n_threads=self.n_threads)
        return float(res["timings"]["decode_tokens_per_s"])

    def cpu_s(self) -> float:  # the generate subprocesses, once waited for
        t = os.times()
        return t.children_user + t.children_system

    def close(self) -> None:
        pass
