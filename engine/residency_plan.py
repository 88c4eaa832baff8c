"""Owns: the equal-share residency plan — how many layer slots each of several models gets when their
weights do not all fit the device. Used by the worker (every model `residency = "auto"`) and by
bench/multimodel.py.
Changed by: residency policy changes only.
Thread-safety: pure functions, except measure_footprints (it runs a probe engine).

Why a plan. The engine decides `auto` residency one load at a time: it cannot know the models
still to come, so the first large model may take slots a later one needed to load at all (at the
reference case — SmolLM2-360M, Qwen2-0.5B, Llama-3.2-1B under half their weight bytes — loading
smallest first refuses Llama-3.2-1B). Knowing every model up front, the plan gives each one its
head, its workspace and MIN_SLOTS layer slots first, then deals the rest of the cap (less the room
kept for KV) out one slot at a time to the model with the smallest share of its layers on device.
A model that gets every layer is loaded resident. Copies per round do not depend on who holds a
slot (a slot of any model saves its own layer's bytes once per round), so the equal share costs
nothing in bytes copied and starves no model's latency for another's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["MIN_SLOTS", "Footprint", "measure_footprints", "plan_residency"]

# Double buffering: one slot computes while the copy thread fills the other.
MIN_SLOTS: Final = 2


@dataclass(frozen=True, slots=True)
class Footprint:
    """A model's device bytes, as the engine books them."""

    n_layer: int
    layer_bytes: int  # one layer unit = one slot
    head_bytes: int  # final norm + lm_head (+ embedding), resident whenever the model is loaded
    workspace_bytes: int

    @property
    def weight_bytes(self) -> int:
        return self.head_bytes + self.n_layer * self.layer_bytes

    def device_bytes(self, slots: int) -> int:
        """Weights on device with `slots` layer slots (n_layer slots = resident), plus the workspace."""
        return self.head_bytes + min(slots, self.n_layer) * self.layer_bytes + self.workspace_bytes


def plan_residency(footprints: Mapping[str, Footprint], cap_bytes: int, kv_room_bytes: int,
                   min_slots: int = MIN_SLOTS) -> dict[str, int] | None:
    """Layer slots per model (== n_layer: resident). None when even the minimums do not fit:
    every model's head, workspace and min(min_slots, n_layer) slots, plus kv_room_bytes, under cap_bytes."""
    assert cap_bytes >= 0 and kv_room_bytes >= 0 and min_slots >= 1
    slots = {n: min(min_slots, f.n_layer) for n, f in footprints.items()}
    used = kv_room_bytes + sum(f.device_bytes(slots[n]) for n, f in footprints.items())
    if used > cap_bytes:
        return None
    while True:
        candidates = [n for n, f in footprints.items()
                      if slots[n] < f.n_layer and used + f.layer_bytes <= cap_bytes]
        if not candidates:
            return slots
        n = min(candidates, key=lambda n: (slots[n] / footprints[n].n_layer, footprints[n].layer_bytes, n))
        slots[n] += 1
        used += footprints[n].layer_bytes


def measure_footprints(models: Sequence[tuple[str, str | Path, str]], *, n_threads: int, max_batch_tokens: int,
                       max_seqs_per_step: int = 64, matmul_precision: str = "exact",
                       max_context: int | None = None) -> dict[str, Footprint]:
    """Footprints of (name, path, weights) models, read off a probe engine that loads each one streamed
    with one slot (its head is copied once; no layer is). n_threads, max_batch_tokens and
    max_seqs_per_step must be the real engine's (the workspace depends on them), and
    matmul_precision too (under "fast", q8_0 / q4_0 matrices are held repacked)."""
    from engine.core import Engine, EngineConfig  # a cycle otherwise: engine/__init__ imports core

    out: dict[str, Footprint] = {}
    # The arena is MAP_NORESERVE: untouched bytes of a large budget cost address space only.
    config = EngineConfig(budget_bytes=256 << 30, n_threads=n_threads, max_batch_tokens=max_batch_tokens,
                          max_seqs_per_step=max_seqs_per_step, matmul_precision=matmul_precision)
    with Engine(config) as probe:
        for name, path, weights in models:
            info = probe.load_model(name, path, weights=weights, residency="streamed", stream_slots=1,
                                    max_context=max_context)
            n_layer = int(info["n_layer"])
            weight_bytes, on_device = int(info["weight_bytes"]), int(info["device_weight_bytes"])
            # streamed with one slot: on_device = head + 1 layer; weight_bytes = head + n_layer layers
            # (a one-layer model cannot be told apart: all of it counts as its layer)
            layer = (weight_bytes - on_device) // (n_layer - 1) if n_layer > 1 else on_device
            head = on_device - layer if n_layer > 1 else 0
            out[name] = Footprint(n_layer=n_layer, layer_bytes=layer, head_bytes=head,
                                  workspace_bytes=int(info["workspace_bytes"]))
            probe.unload_model(name)
    return out
