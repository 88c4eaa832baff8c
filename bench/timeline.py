"""A picture of multiplexing: one cell of the multi-model grid (bench/multimodel.py) run with the engine's step trace
on, drawn as a timeline: one lane per model, its compute steps, the copies of its layers, the time compute waited
for them. A reader sees the turns: which model has the device when, and what the copies cost around each switch.

    .venv/bin/python bench/timeline.py                      # --small shapes, budget 50 %, 4 requests per model,
                                                            # link 1:20 -> bench/results/timeline.png
    .venv/bin/python bench/timeline.py --budget 0.75 --concurrency 16 --strategies "(a) adaptive" "(s) stream-min"
    .venv/bin/python bench/timeline.py --budget 0.75 --concurrency 1 --strategies "(a) adaptive" "(b') swap-drain" \
        --steps --out /tmp/t.png                          # every step printed: its time, wait, tokens, copies

The budget is split as the grid splits it (KV room for 16 requests per model, `--kv-room-for`), so a traced cell has
the grid's slots whatever its --concurrency. Each strategy is one panel (default: adaptive turns next to the fixed
per-step policy), all on one time axis (ms from the start of the timed run). In a lane: the upper bar is the model's steps (shade: tokens computed in the step;
red: the part of it spent blocked on a copy; a black strip above: the step ran on slots borrowed from the other
models; a vertical line: a scheduler turn begins), the lower bar the copies of its units as the copy thread (or, for
on-demand loads and whole-model swaps, the step thread) made them. On the right: steps, units copied and MiB, wait. The cell's models, budget split and requests are multimodel.py's
(its SMALL_SHAPES, ensure_models, measure_sizes, split_budget and run_one, imported); the trace comes from the
engine (Engine.trace_enable / trace_take, engine/src/trace.h) and covers the timed run only, not the warm-up.
matplotlib comes with the `bench` extra (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multimodel as mm  # bench/ is on the path when this file runs

from engine import Engine, Trace, trace_now_us
from engine._core import read_bandwidth_gbs

REPO = Path(__file__).resolve().parent.parent
TRACE_CAPACITY = 1 << 16  # records of each kind; a cell of the grid makes a few thousand
MiB = 2**20
# Adaptive turns next to the fixed per-step policy, where multimodel.py has both; else its first strategy.
DEFAULT_STRATEGIES: list[str] = [n for n in ("(a) adaptive", "(a') stream") if n in mm.STRATEGIES] or [
    next(iter(mm.STRATEGIES))]


@dataclass
class CellTrace:
    strategy: str
    result: dict[str, Any]  # run_one's figures (tok/s, TTFT, ...)
    trace: Trace
    names: dict[int, str]  # model id -> name
    t0_us: int  # the timed run's start (the stats() call run_one makes before it)
    t1_us: int
    notes: list[str] = field(default_factory=list)


class TracingEngine(Engine):
    """The Engine run_one creates, with the step trace on from construction. run_one reads stats() right before
    and right after its timed run; the last two of those calls bracket the window drawn (the warm-up before it
    is left out). The trace and the model names are kept when run_one closes the engine."""

    last: TracingEngine | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats_us: list[int] = []
        self.trace: Trace | None = None
        self.names: dict[int, str] = {}
        self.trace_enable(TRACE_CAPACITY)
        TracingEngine.last = self

    def stats(self) -> Any:
        s = super().stats()
        self.stats_us.append(trace_now_us())
        return s

    def close(self) -> None:
        if self.trace is None:
            self.trace = self.trace_take()
            self.names = {info.id: name for name, info in self.models().items()}
        super().close()


@contextmanager
def traced_engines() -> Iterator[None]:
    """multimodel's runner builds its Engine by the module-level name: TracingEngine stands in for it here."""
    names = vars(mm)
    saved = names["Engine"]
    names["Engine"] = TracingEngine
    try:
        yield
    finally:
        names["Engine"] = saved


def run_cell(strategy: str, dirs: dict[str, Path], sizes: dict[str, mm.Sizes], budget: int, sp: mm.Split,
             args: argparse.Namespace) -> CellTrace:
    TracingEngine.last = None
    with traced_engines():
        result = mm.run_one(dirs, sizes, budget, sp.slots, mm.STRATEGIES[strategy], args.concurrency,
                            args.max_tokens, args.prompt_len, args.threads, args.max_batch_tokens, args.link_gbps,
                            args.kv_dtype, args.first_token_ms)
    eng = TracingEngine.last
    if "error" in result or eng is None or eng.trace is None:
        raise SystemExit(f"{strategy}: the cell did not run: {result.get('error', 'no engine was made')}")
    notes = []
    if eng.trace.n_dropped:
        notes.append(f"{eng.trace.n_dropped} trace records dropped (ring of {TRACE_CAPACITY})")
    if len(eng.stats_us) >= 2:
        t0, t1 = eng.stats_us[-2], eng.stats_us[-1]
    else:  # the runner changed how it reads stats: draw everything
        t0 = min((s.start_us for s in eng.trace.steps), default=0)
        t1 = max((s.end_us for s in eng.trace.steps), default=0)
        notes.append("timed window unknown: warm-up included")
    return CellTrace(strategy, result, eng.trace, eng.names, t0, t1, notes)


# --------------------------------------------------------------------------- summary and drawing

def turns(steps: list[Any]) -> list[tuple[int, int]]:
    """The scheduler's turns as the steps record them (StepTrace.new_turn): (model id, steps in the turn)."""
    out: list[tuple[int, int]] = []
    for s in steps:
        if out and out[-1][0] == s.model and not s.new_turn:
            out[-1] = (s.model, out[-1][1] + 1)
        else:
            out.append((s.model, 1))
    return out


def window(c: CellTrace) -> tuple[list[Any], list[Any], list[Any]]:
    def inside(r: Any) -> bool:
        return bool(r.end_us >= c.t0_us and r.start_us <= c.t1_us)
    return ([s for s in c.trace.steps if inside(s)], [x for x in c.trace.copies if inside(x)],
            [w for w in c.trace.waits if inside(w)])


def summary(c: CellTrace, order: list[str]) -> list[str]:
    steps, copies, waits = window(c)
    r = c.result
    lines = [(f"{c.strategy}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.0f} ms / p99 {r['ttft_p99']:.0f} ms, "
              f"{len(steps)} steps, copy wait {r['wait_frac']:.0%} of step time")]
    t = turns(steps)
    for name in order:
        mid = next((k for k, v in c.names.items() if v == name), -1)
        runs = [n for m, n in t if m == mid]
        mc = [x for x in copies if x.model == mid]
        n_borrowed = sum(1 for s in steps if s.model == mid and s.borrowed)
        lines.append(f"  {name:<14} {sum(1 for s in steps if s.model == mid):3d} steps in {len(runs):3d} turns "
                     f"(longest {max(runs, default=0)}, {n_borrowed} steps on borrowed slots), "
                     f"{sum(x.n_units for x in mc):4d} units copied "
                     f"({sum(x.n_bytes for x in mc) / MiB:6.1f} MiB), waited "
                     f"{sum(w.end_us - w.start_us for w in waits if w.model == mid) / 1e3:6.1f} ms")
    return lines + [f"  note: {n}" for n in c.notes]


def step_lines(c: CellTrace) -> list[str]:
    """Every step of the timed window, in order: when it began (ms from the window's start), its model, its time
    (wall, blocked on copies, the rest), tokens and sequences, T = a turn begins, B = on borrowed slots, and the
    MiB of copies that landed during it."""
    steps, _, _ = window(c)
    head = (f"  {'at ms':>8} {'model':<14} {'step ms':>8} {'wait ms':>8} {'compute':>8} {'tokens':>6} {'seqs':>5}    "
            f"{'MiB in':>6}")
    out = [head]
    for s in steps:
        d = (s.end_us - s.start_us) / 1e3
        w = s.copy_wait_us / 1e3
        out.append(f"  {(s.start_us - c.t0_us) / 1e3:8.1f} {c.names.get(s.model, '?'):<14} {d:8.2f} {w:8.2f} "
                   f"{d - w:8.2f} {s.n_tokens:6d} {s.n_seqs:5d} {'T' if s.new_turn else ' '}{'B' if s.borrowed else ' '} "
                   f"{s.bytes_copied / MiB:6.1f}")
    return out


def draw(cells: list[CellTrace], order: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    lane_h = 1.0
    fig, axes = plt.subplots(len(cells), 1, figsize=(13, 1.6 + 1.3 * len(order) * len(cells)), squeeze=False,
                             sharex=True)
    t_end = max((c.t1_us - c.t0_us) / 1e3 for c in cells)
    for ax, c in zip(axes[:, 0], cells, strict=True):
        steps, copies, waits = window(c)
        max_tok = max((s.n_tokens for s in steps), default=1)
        for i, name in enumerate(order):
            mid = next((k for k, v in c.names.items() if v == name), -1)
            y = (len(order) - 1 - i) * lane_h
            color = colors[i % len(colors)]
            ms = [s for s in steps if s.model == mid]
            for s in ms:  # the upper bar: compute steps, darker for more tokens
                alpha = 0.35 + 0.65 * s.n_tokens / max_tok
                ax.broken_barh([((s.start_us - c.t0_us) / 1e3, (s.end_us - s.start_us) / 1e3)], (y + 0.45, 0.4),
                               facecolors=color, alpha=alpha, edgecolor="none")
            for s in ms:
                x0 = (s.start_us - c.t0_us) / 1e3
                if s.borrowed:  # a dark strip over the step: it runs on slots borrowed from the other models
                    ax.broken_barh([(x0, (s.end_us - s.start_us) / 1e3)], (y + 0.87, 0.08), facecolors="black",
                                   edgecolor="none")
                if s.new_turn:  # a turn begins
                    ax.plot([x0, x0], [y + 0.02, y + 0.97], color="black", linewidth=0.7)
            wspans = [((w.start_us - c.t0_us) / 1e3, (w.end_us - w.start_us) / 1e3) for w in waits if w.model == mid]
            ax.broken_barh(wspans, (y + 0.45, 0.4), facecolors="red", alpha=0.75, edgecolor="none")
            cspans = [((x.start_us - c.t0_us) / 1e3, max((x.end_us - x.start_us) / 1e3, 0.02))
                      for x in copies if x.model == mid]
            ax.broken_barh(cspans, (y + 0.08, 0.3), facecolors=color, alpha=0.9, edgecolor="black", linewidth=0.2,
                           hatch="////")
            mc = [x for x in copies if x.model == mid]
            wait_ms = sum(w[1] for w in wspans)
            ax.text(1.005, (y + 0.5) / (len(order) * lane_h), f"{len(ms)} steps\n{sum(x.n_units for x in mc)} units, "
                    f"{sum(x.n_bytes for x in mc) / MiB:.0f} MiB\nwait {wait_ms:.0f} ms", transform=ax.transAxes,
                    va="center", fontsize=7.5)
        ax.set_yticks([(len(order) - 1 - i) * lane_h + 0.5 for i in range(len(order))], order)
        ax.set_ylim(-0.1, len(order) * lane_h)
        r = c.result
        ax.set_title(f"{c.strategy}: {r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50']:.0f} ms, p99 "
                     f"{r['ttft_p99']:.0f} ms, {r['copied_per_tok'] / MiB:.1f} MiB copied/token, copy wait "
                     f"{r['wait_frac']:.0%} of step time, {len(turns(steps))} turns in {len(steps)} steps",
                     fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, t_end * 1.01)
    axes[-1, 0].set_xlabel("ms since the timed run began (all requests submitted at 0)")
    legend = [Patch(facecolor="grey", alpha=0.8, label="compute step (darker: more tokens)"),
              Patch(facecolor="red", alpha=0.75, label="compute blocked on a copy"),
              Patch(facecolor="grey", hatch="////", edgecolor="black", label="copy of this model's units"),
              Line2D([0], [0], color="black", linewidth=0.7, label="a turn begins"),
              Patch(facecolor="black", label="step on slots borrowed from the other models")]
    fig.legend(handles=legend, loc="lower center", fontsize=8, ncol=5, frameon=False, bbox_to_anchor=(0.45, 0.0))
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.04, 0.91, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.5, help="device budget as a share of all weights")
    ap.add_argument("--concurrency", type=int, default=4, help="requests per model")
    ap.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, choices=list(mm.STRATEGIES),
                    help="one panel each (multimodel.py's strategy names)")
    ap.add_argument("--link-ratio", type=float, default=20.0, help="copy:read bandwidth 1:R (0 = unthrottled)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=64)
    ap.add_argument("--kv-dtype", default="f16", choices=["f32", "f16"])
    ap.add_argument("--kv-room-for", type=int, default=16,
                    help="plan the budget's KV room for this many requests per model (the grid's largest concurrency, "
                         "so a traced cell has the grid's slots)")
    ap.add_argument("--first-token-ms", type=float, default=mm.EngineConfig().first_token_ms,
                    help="(a)'s EngineConfig.first_token_ms (multimodel.py's option)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--models-dir", type=Path, default=REPO / "build" / "bench-models")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "timeline.png")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 request per model, 4 tokens")
    ap.add_argument("--steps", action="store_true", help="also print every step of each panel (step_lines)")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens = 1, 4

    dirs = mm.ensure_models(args.models_dir, False, args.dtype, small=True)
    max_context = args.prompt_len + args.max_tokens + 16
    sizes = mm.measure_sizes(dirs, max_context, args.prompt_len + args.max_tokens, args.threads,
                             args.max_batch_tokens, args.kv_dtype)
    total = sum(s.weight_bytes for s in sizes.values())
    budget = int(total * args.budget)
    sp = mm.split_budget(budget, sizes, max(args.concurrency, args.kv_room_for))
    if sp is None:
        print(f"budget {args.budget:.0%} of the weights: the streaming minimums plus KV do not fit; raise --budget",
              file=sys.stderr)
        return 2
    args.link_gbps = 0.0
    read_gbs = 0.0
    if args.link_ratio > 0:
        read_gbs = read_bandwidth_gbs(256 << 20, args.threads)
        args.link_gbps = read_gbs / args.link_ratio
    link = (f"link 1:{args.link_ratio:g} ({read_gbs:.1f} GB/s read, copies at {args.link_gbps:.2f} GB/s)"
            if args.link_gbps else "link unthrottled")
    head = (f"small shapes, budget {args.budget:.0%} of {total / MiB:.0f} MiB of weights, {args.concurrency} "
            f"requests per model (prompt {args.prompt_len}, {args.max_tokens} generated)\n{link}, KV {args.kv_dtype}, "
            f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"# layermux timeline: {head}".replace("\n", "; "))
    print("\n".join(mm.describe_split(sp, sizes)))
    cells = []
    for strategy in args.strategies:
        print(f"[{time.strftime('%H:%M:%S')}] running {strategy} ...", file=sys.stderr, flush=True)
        cell = run_cell(strategy, dirs, sizes, budget, sp, args)
        print("\n".join(summary(cell, list(mm.MODELS))))
        if args.steps:
            print("\n".join(step_lines(cell)))
        cells.append(cell)
    draw(cells, list(mm.MODELS), f"layermux step trace: {head}", args.out)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
