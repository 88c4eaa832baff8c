"""Times Hugging Face transformers (torch, CPU) on one model: prefill, batch-1 and batched decode.

Owner: benchmarks. One HfRunner holds one model; not thread-safe. torch runs with
torch.set_num_threads(N_THREADS). Decoding is a plain greedy loop over the model's
forward with its KV cache (no generate(), no sampling overhead), so what is timed is
the forward pass, as for the other engines. Prefill asks for the last position's
logits only (logits_to_keep=1), as the engines compute them.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from common import N_THREADS, process_cpu_s, prompt_ids

_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class HfRunner:
    def __init__(self, model_dir: Path, weights: str, n_threads: int = N_THREADS) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(n_threads)
        t0 = time.perf_counter()
        self.model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[weights])
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        # transformers 5.x renamed past_key_values to cache (argument and output field).
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._seed = 200

    def close(self) -> None:
        del self.model

    def cpu_s(self) -> float:
        return process_cpu_s()

    def _ids(self, n_seqs: int, n: int) -> torch.Tensor:
        rows = []
        for _ in range(n_seqs):
            self._seed += 1
            rows.append(prompt_ids(n, seed=self._seed))
        return torch.tensor(rows, dtype=torch.long)

    @torch.inference_mode()
    def prefill_tps(self, n_prompt: int = 512) -> float:
        ids = self._ids(1, n_prompt)
        t0 = time.perf_counter()
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1)
        return n_prompt / (time.perf_counter() - t0)

    @torch.inference_mode()
    def _decode(self, n_seqs: int, n_tokens: int, n_prompt: int) -> float:
        """Aggregate tokens/s of the n_tokens - 1 steps after the prefill (which gives token 1)."""
        ids = self._ids(n_seqs, n_prompt)
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        past = getattr(out, self._cache_arg)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n_tokens - 1):
            out = self.model(nxt, use_cache=True, **{self._cache_arg: past})
            past = getattr(out, self._cache_arg)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return n_seqs * (n_tokens - 1) / (time.perf_counter() - t0)

    def decode_tps(self, n_tokens: int = 64, n_prompt: int = 8) -> float:
        return self._decode(1, n_tokens, n_prompt)

    def batched_decode_tps(self, n_seqs: int, n_tokens: int = 32, n_prompt: int = 8) -> float:
        return self._decode(n_seqs, n_tokens, n_prompt)

    @torch.inference_mode()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        """Last-position logits in float32 (parity reference for the other engines)."""
        out = self.model(torch.tensor([ids], dtype=torch.long), use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].float()
