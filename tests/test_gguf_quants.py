"""GGUF block formats: the engine's dequantisation equals the gguf package's, bit for bit.

transformers loads a GGUF file through the same arithmetic, so equal values here mean the
engine and transformers multiply by identical float32 weights (the parity tests rely on it).
Random blocks: every quant byte random, the f16 scales random finite values of both signs.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from engine import _core

# engine name -> (gguf type, byte offsets of the f16 fields that must be finite)
FORMATS = {
    "q8_0": ("Q8_0", (0,)),
    "q4_0": ("Q4_0", (0,)),
    "q4_1": ("Q4_1", (0, 2)),
    "q5_0": ("Q5_0", (0,)),
    "q5_1": ("Q5_1", (0, 2)),
    "q2_k": ("Q2_K", (80, 82)),
    "q3_k": ("Q3_K", (108,)),
    "q4_k": ("Q4_K", (0, 2)),
    "q5_k": ("Q5_K", (0, 2)),
    "q6_k": ("Q6_K", (208,)),
}


def _random_blocks(rng: np.random.Generator, qtype: gguf.GGMLQuantizationType, f16_at: tuple[int, ...],
                   n_blocks: int) -> np.ndarray:
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in f16_at:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_engine_dequantization_equals_gguf_package_bit_for_bit(name: str) -> None:
    qname, f16_at = FORMATS[name]
    qtype = gguf.GGMLQuantizationType[qname]
    block_elems, _ = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(14)
    for n_blocks in (1, 3, 64):
        raw = _random_blocks(rng, qtype, f16_at, n_blocks)
        want = gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(-1).astype(np.float32)
        got = _core.dequantize(name, raw.tobytes(), n_blocks * block_elems)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
            f"{name}: {int(np.sum(got != want))} of {got.size} values differ, first at "
            f"{int(np.argmax(got != want))}: {got[np.argmax(got != want)]!r} vs {want[np.argmax(got != want)]!r}"
        )


def test_dequantize_refuses_ragged_rows_and_unknown_formats() -> None:
    with pytest.raises(Exception, match="whole blocks"):
        _core.dequantize("q4_k", bytes(144), 100)
    with pytest.raises(Exception, match="'q9_9'"):
        _core.dequantize("q9_9", bytes(18), 32)
