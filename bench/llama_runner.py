"""llama.cpp from the project's venv: GGUF files of our random models, timings in a subprocess.

Owner: benchmarks. llama-cpp-python lives in its own venv (build/llama-venv; it is built
from source with AMX disabled, see bench/README.md), so everything llama.cpp runs in a
child process of that venv's python: bench/_gguf_write.py writes the GGUF files (cached
next to the model folders), bench/_llama_worker.py --serve times them on request.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from common import BENCH_MODELS, LLAMA_VENV, N_THREADS, log

BENCH_DIR = Path(__file__).resolve().parent
LLAMA_PY = LLAMA_VENV / "bin" / "python"


def llama_available() -> str | None:
    """None when llama-cpp-python and gguf import in the llama venv, else why not."""
    if not LLAMA_PY.exists():
        return f"no llama venv at {LLAMA_VENV} (see bench/README.md to build it)"
    p = subprocess.run([str(LLAMA_PY), "-c", "import llama_cpp, gguf"], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        return f"llama venv incomplete: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    return None


def ensure_gguf(model_dir: Path, outtype: str) -> Path:
    """The GGUF file of model_dir in outtype (f16 | bf16 | q8_0 | q4_0 | f32), written once and cached."""
    out = BENCH_MODELS / "gguf" / f"{model_dir.name}-{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"writing {out.name} (gguf package, see bench/_gguf_write.py)")
    subprocess.run([str(LLAMA_PY), str(BENCH_DIR / "_gguf_write.py"), str(model_dir), str(out), "--outtype", outtype],
                   check=True)
    return out


class LlamaRunner:
    """A serving _llama_worker.py process on one GGUF file, with the runner interface of
    lmx_runner.LayermuxRunner and hf_runner.HfRunner (one timed run per call)."""

    def __init__(self, gguf: Path, n_threads: int = N_THREADS) -> None:
        cmd = [str(LLAMA_PY), str(BENCH_DIR / "_llama_worker.py"), "--gguf", str(gguf),
               "--threads", str(n_threads), "--serve"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.load_s = float(hello["load_s"])
        self.model_bytes = int(hello["model_bytes"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama worker exited ({self.proc.wait()}); its stderr is above")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _ask(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()["result"]

    def prefill_tps(self, n_prompt: int = 512) -> float:
        return float(self._ask(op="prefill", n=n_prompt))

    def decode_tps(self, n_tokens: int = 64) -> float:
        return float(self._ask(op="decode", n=n_tokens))

    def batched_decode_tps(self, n_seqs: int, n_tokens: int = 32) -> float:
        return float(self._ask(op="batched", n_seqs=n_seqs, n=n_tokens))

    def cpu_s(self) -> float:  # the worker process's CPU seconds
        return float(self._ask(op="cpu"))

    def last_logits(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self._ask(op="logits", ids=ids), dtype=np.float32)

    def greedy(self, ids: list[int], n_tokens: int) -> tuple[list[int], list[dict[int, float]]]:
        """n_tokens greedy tokens after ids (EOS ignored), incremental decode as in serving; and each
        step's 8 best {id: logit} as that run computed them."""
        ans = self._ask(op="greedy", ids=ids, n=n_tokens)
        return [int(t) for t in ans["tokens"]], [{int(i): float(v) for i, v in step} for step in ans["top"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._ask(op="quit")
            except (RuntimeError, BrokenPipeError, KeyError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
