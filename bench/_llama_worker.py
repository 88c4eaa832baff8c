"""Times llama.cpp (llama-cpp-python's low-level C API) on one GGUF file and prints JSON.

Owner: benchmarks. Runs in build/llama-venv (llama-cpp-python built without AMX), started
by bench/llama_runner.py as a subprocess; single-threaded driver, llama.cpp computes with
--threads threads. The measurements mirror bench/lmx_runner.py and bench/hf_runner.py:

  prefill   one llama_decode of an n-token prompt (one sequence, logits for the last
            position only), tokens / wall time including llama_synchronize
  decode    an 8-token prompt, then n - 1 greedy single-token llama_decode calls; rate
            over those n - 1 tokens (the prompt's decode gives the first)
  batched   B sequences in one context (n_seq_max = B, unified KV), all prompts in one
            llama_decode, then n - 1 steps each decoding B tokens; aggregate B (n - 1) / time

Greedy = argmax of llama_get_logits_ith in numpy, the same for every engine.

Standalone it runs the measurements and prints one JSON object; with --serve it answers
one JSON command per stdin line ({"op": "prefill"|"decode"|"batched"|"logits"|"greedy", ...}), so
that bench/llama_runner.py can take turns with the other engines (common.measure_group).

    build/llama-venv/bin/python bench/_llama_worker.py --gguf M.gguf --repeats 3 --batch-sizes 4,16,64
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp as lc
from common import prompt_ids


@lc.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: Any) -> None:  # llama.cpp chatter off stdout
    if level >= 4:  # GGML_LOG_LEVEL_ERROR
        sys.stderr.write(text.decode(errors="replace"))


@lc.llama_progress_callback
def _no_progress(progress: float, user_data: Any) -> bool:
    return True


class LlamaCpp:
    def __init__(self, gguf: Path, n_threads: int) -> None:
        lc.llama_log_set(_quiet_log, ctypes.c_void_p())
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.progress_callback = _no_progress  # the default prints dots to stderr
        t0 = time.perf_counter()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_threads = n_threads
        self.ctx: Any = None
        self.n_seq = 0
        self.new_context(1, 1024)
        self.load_s = time.perf_counter() - t0
        self.model_bytes = int(lc.llama_model_size(self.model))
        self._seed = 300

    def new_context(self, n_seq: int, n_ctx: int) -> None:
        if self.ctx:
            lc.llama_free(self.ctx)
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = max(512, n_seq * 16)
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.kv_unified = True
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_seq={n_seq}, n_ctx={n_ctx})")
        self.n_seq = n_seq
        self.batch = lc.llama_batch_init(cp.n_batch, 0, n_seq)

    def _ids(self, n: int) -> list[int]:
        self._seed += 1
        return prompt_ids(n, seed=self._seed)

    def _clear(self) -> None:
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, pos, seq, wants logits); one llama_decode, waited for."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        lc.llama_synchronize(self.ctx)

    def _logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def prefill_tps(self, n_prompt: int) -> float:
        if self.n_seq != 1:
            self.new_context(1, 1024)
        self._clear()
        ids = self._ids(n_prompt)
        t0 = time.perf_counter()
        self._decode([(t, p, 0, p == n_prompt - 1) for p, t in enumerate(ids)])
        int(self._logits(-1).argmax())
        return n_prompt / (time.perf_counter() - t0)

    def batched_decode_tps(self, n_seqs: int, n_tokens: int, n_prompt: int = 8) -> float:
        n_ctx = max(1024, 256 * ((n_seqs * (n_prompt + n_tokens) + 255) // 256))
        if self.n_seq != n_seqs:
            self.new_context(n_seqs, n_ctx)
        self._clear()
        items = []
        for s in range(n_seqs):
            items += [(t, p, s, p == n_prompt - 1) for p, t in enumerate(self._ids(n_prompt))]
        self._decode(items)
        # llama_get_logits_ith takes the token's index in the batch: seq s's last prompt token
        nxt = [int(self._logits(s * n_prompt + n_prompt - 1).argmax()) for s in range(n_seqs)]
        t0 = time.perf_counter()
        for step in range(n_tokens - 1):
            self._decode([(nxt[s], n_prompt + step, s, True) for s in range(n_seqs)])
            nxt = [int(self._logits(i).argmax()) for i in range(n_seqs)]
        return n_seqs * (n_tokens - 1) / (time.perf_counter() - t0)

    def decode_tps(self, n_tokens: int) -> float:
        return self.batched_decode_tps(1, n_tokens)

    def greedy(self, ids: list[int], n_tokens: int, top: int = 8) -> dict[str, list[Any]]:
        """n_tokens greedy tokens after ids (EOS not special): one prefill, then one token per llama_decode.
        Also each step's `top` best (id, logit), highest first, as this incremental run computed them."""
        if self.n_seq != 1 or len(ids) + n_tokens > 1024:
            self.new_context(1, max(1024, 256 * ((len(ids) + n_tokens + 255) // 256)))
        self._clear()
        self._decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        tokens: list[int] = []
        tops: list[list[tuple[int, float]]] = []
        while True:
            row = self._logits(-1)
            best = np.argsort(-row, kind="stable")[:top]  # stable: the lowest id wins a tie, as argmax
            tokens.append(int(best[0]))
            tops.append([(int(i), float(row[i])) for i in best])
            if len(tokens) == n_tokens:
                return {"tokens": tokens, "top": tops}
            self._decode([(tokens[-1], len(ids) + len(tokens) - 1, 0, True)])

    def last_logits(self, ids: list[int]) -> np.ndarray:
        if self.n_seq != 1:
            self.new_context(1, 1024)
        self._clear()
        self._decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        return self._logits(-1).copy()


def serve(llm: LlamaCpp) -> None:
    """One JSON command per stdin line, one JSON answer per stdout line (bench/llama_runner.py)."""
    print(json.dumps({"ready": True, "load_s": llm.load_s, "model_bytes": llm.model_bytes}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "prefill":
            ans: Any = llm.prefill_tps(cmd["n"])
        elif op == "decode":
            ans = llm.decode_tps(cmd["n"])
        elif op == "batched":
            ans = llm.batched_decode_tps(cmd["n_seqs"], cmd["n"])
        elif op == "logits":
            ans = llm.last_logits(cmd["ids"]).tolist()
        elif op == "greedy":
            ans = llm.greedy(cmd["ids"], cmd["n"])
        elif op == "cpu":
            t = os.times()
            ans = t.user + t.system
        elif op == "quit":
            return
        else:
            raise ValueError(f"unknown op {op!r}")
        print(json.dumps({"result": ans}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="llama.cpp timings on one GGUF file, as JSON on stdout")
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help="answer JSON commands on stdin (used by llama_runner.py)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="", help="comma-separated, e.g. 4,16,64 ('' = none)")
    ap.add_argument("--batch-tokens", type=int, default=32, help="tokens per sequence in batched decode")
    args = ap.parse_args()

    llm = LlamaCpp(args.gguf, args.threads)
    if args.serve:
        serve(llm)
        return 0
    result: dict[str, Any] = {"load_s": llm.load_s, "model_bytes": llm.model_bytes, "n_vocab": llm.n_vocab,
                              "system_info": lc.llama_print_system_info().decode(errors="replace")}
    llm.prefill_tps(32)  # warm-up: page in the mmapped weights
    llm.decode_tps(8)
    result["prefill_tps"], result["decode_tps"] = [], []
    for r in range(args.repeats):
        result["prefill_tps"].append(llm.prefill_tps(args.prefill_tokens))
        result["decode_tps"].append(llm.decode_tps(args.decode_tokens))
        print(f"    run {r + 1}/{args.repeats}: prefill {result['prefill_tps'][-1]:.1f} tok/s, "
              f"decode {result['decode_tps'][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    result["batched_tps"] = {}
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        samples = [llm.batched_decode_tps(b, args.batch_tokens) for _ in range(args.repeats)]
        result["batched_tps"][str(b)] = samples
        print(f"    batch {b}: {max(samples):.1f} tok/s aggregate", file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
