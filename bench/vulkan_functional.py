"""The Vulkan device's functional row: three models through one device budget, resident then streamed.

    python bench/vulkan_functional.py                 # lavapipe here (or the first Vulkan device); ~2 minutes
    python bench/vulkan_functional.py --budgets 1.0 0.4 --requests 4 --tokens 16 --device-index 0

Lavapipe (Mesa's Vulkan on the CPU) runs what CI runs: its speed says nothing about a GPU, so tok/s is printed
only as "functional". What transfers to a GPU is what the row is for: the bytes copied per generated token
(stats.residency.bytes_copied / tokens) and the copy-wait fraction (stats.residency.copy_wait_ms / step time):
on the Vulkan device that wait is measured on the GPU with timestamp queries (the compute queue's idle gap
before each layer whose copy was still in flight; the host-measured fallback where the queue has no timestamps,
docs/vulkan.md). Multiply the bytes per token by 1 / bus bandwidth for a GPU's copy time per token.

The three models are the reference case's architectures (Llama with GQA and Llama 3 RoPE scaling, tied SmolLM2-like,
Qwen2 with q/k/v biases) at toy size, random weights; each row serves every model's requests at once. Budget
fraction f: the ledger cap holds f x all weights + the workspaces beside the engine's KV reserve (kv_reserve_fraction
of the cap); at 100 % every model is resident, below it the models stream through layer slots (engine/src/
footprint.h's equal-share plan). The same rows run on the CPU device for reference: bytes per token follow the same
residency policy, but the scheduler's turns take measured compute and copy times into account, so they need not
be equal.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine import (
    Engine,
    EngineConfig,
    EventKind,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
)
from engine.errors import LayermuxError
from tools.model_factory import make_model

SHAPES: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama", "hidden": 256, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "intermediate": 768,
              "vocab": 2048, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
    "smol": {"arch": "llama", "hidden": 192, "n_layers": 12, "n_heads": 6, "n_kv_heads": 2, "intermediate": 512,
             "vocab": 2048, "tie_embeddings": True},
    "qwen2": {"arch": "qwen2", "hidden": 224, "n_layers": 8, "n_heads": 7, "n_kv_heads": 1, "intermediate": 640,
              "vocab": 2048, "tie_embeddings": True},
}
KV_RESERVE = EngineConfig().kv_reserve_fraction  # of the cap, kept for KV by the residency plan


def make_models(root: Path) -> dict[str, Path]:
    return {name: make_model(root / name, seed=i + 1, max_position_embeddings=1024, **kw)
            for i, (name, kw) in enumerate(SHAPES.items())}


def cap_for(paths: dict[str, Path], frac: float, kind: str, index: int) -> int:
    """The ledger cap of a row: frac of the weights and all the workspaces beside the KV reserve."""
    with Engine(EngineConfig(budget_bytes=1 << 30, device_kind=kind, device_index=index)) as probe:
        fps = [probe.footprint(p) for p in paths.values()]
    weights = sum(f.head_bytes + f.n_layer * f.layer_bytes for f in fps)
    return int((frac * weights + sum(f.workspace_bytes for f in fps)) / (1.0 - KV_RESERVE)) + (1 << 20)


def run_row(paths: dict[str, Path], frac: float, kind: str, index: int, n_req: int, n_tok: int) -> dict[str, Any]:
    cap = cap_for(paths, frac, kind, index)
    cfg = EngineConfig(budget_bytes=int(cap / 0.9) + 1, cap_fraction=0.9, device_kind=kind, device_index=index)
    with Engine(cfg) as eng:
        plan = eng.plan_residency([(name, p, "auto") for name, p in paths.items()])
        if plan is None:
            raise SystemExit(f"budget {frac:.0%}: even the three models' minimums do not fit {cap} bytes")
        for pl in plan:
            opts = ModelLoadOptions(residency=ResidencyMode.resident) if pl.residency == ResidencyMode.resident else \
                ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=pl.n_slots)
            eng.load_model(pl.name, paths[pl.name], options=opts)
        params = SamplingParams(temperature=0.0, max_tokens=n_tok, ignore_eos=True)
        # One warm-up request per model (pipelines, first copies), then the timed run.
        for warm in (True, False):
            st0 = eng.stats()
            ids = {}
            t0 = time.perf_counter()
            for name in paths:
                for i in range(1 if warm else n_req):
                    rid = eng.new_request_id()
                    ids[rid] = name
                    eng.submit(rid, name, [(7 * i + j) % 1000 + 3 for j in range(5 + 9 * i)],
                               SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True) if warm else params)
            n_tokens, open_ids = 0, set(ids)
            while open_ids:
                for ev in eng.wait_events(10.0):
                    if ev.kind == EventKind.token:
                        n_tokens += 1
                    elif ev.kind == EventKind.error:
                        raise SystemExit(f"request failed: {ev.message}")
                    else:
                        open_ids.discard(ev.req_id)
            wall = time.perf_counter() - t0
        st1 = eng.stats()
        streamed = sum(1 for pl in plan if pl.residency != ResidencyMode.resident)
        step_ms = st1.step_ms_total - st0.step_ms_total
        return {
            "kind": kind, "frac": frac, "streamed": streamed, "tok_s": n_tokens / wall,
            "bytes_per_tok": (st1.residency.bytes_copied - st0.residency.bytes_copied) / max(1, n_tokens),
            "wait_frac": (st1.residency.copy_wait_ms - st0.residency.copy_wait_ms) / max(1e-9, step_ms),
            "steps": st1.n_steps - st0.n_steps, "summary": eng.device_summary(),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.4], help="fractions of the weights")
    ap.add_argument("--requests", type=int, default=4, help="concurrent requests per model")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--device-index", type=int, default=0)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    args = ap.parse_args()
    try:
        with Engine(EngineConfig(budget_bytes=16 << 20, device_kind="vulkan", device_index=args.device_index)) as e:
            summary = e.device_summary()
    except LayermuxError as e:
        raise SystemExit(f"vulkan_functional: no Vulkan device: {e}") from None
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    functional = "llvmpipe" in summary or "lavapipe" in summary
    print(f"# Vulkan device, functional row ({summary})")
    print(f"# {args.requests} concurrent requests per model x 3 models, {args.tokens} tokens each, greedy; "
          f"uptime: {uptime}")
    print("| device | budget (of weights) | models streamed | tok/s | bytes copied / token | copy wait / step time | "
          "steps |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="lmx-vkfunc-") as tmp:
        paths = make_models(Path(tmp))
        kinds = ["vulkan"] + ([] if args.no_cpu else ["cpu"])
        for frac in args.budgets:
            for kind in kinds:
                r = run_row(paths, frac, kind, args.device_index, args.requests, args.tokens)
                label = ("vulkan, functional (lavapipe)" if functional else "vulkan") if kind == "vulkan" else "cpu"
                tok_s = f"{r['tok_s']:.1f}" + (" (functional)" if kind == "vulkan" and functional else "")
                print(f"| {label} | {frac:.0%} | {r['streamed']}/3 | {tok_s} | {r['bytes_per_tok'] / 1024:.1f} KiB | "
                      f"{100 * r['wait_frac']:.1f} % | {r['steps']} |", flush=True)
    if functional:
        print("# lavapipe runs on the CPU: tok/s and copy-wait fraction reflect this machine, not a GPU; bytes per "
              "token transfer as they are (docs/vulkan.md, 'Measuring on a real GPU').")


if __name__ == "__main__":
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    main()
