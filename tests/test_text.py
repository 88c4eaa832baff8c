"""engine.text: tokenizer, incremental detokenizer and chat template against HF's own behaviour.

The factory's tokenizer is byte-level BPE: a multi-byte character (emoji, CJK)
may be split over several tokens, each of which decodes alone to U+FFFD. The
detokenizer must hold such bytes back until the character is complete, so no
piece ever carries a broken character and the pieces join to decode(all ids).
Chat templates are the model's own, rendered in a sandbox that refuses to leave.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import hf_reference as ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ChatTemplateError, InvalidRequestError
from engine.text import IncrementalDetokenizer, Tokenizer
from tools.model_factory import make_model

TEXTS = [
    "emoji 🦀🚀 and 日本語 and ✨ café",
    "🙂👍🏽🇫🇷",  # skin-tone modifier and flag: several code points per glyph
    "Привет, мир! Ελληνικά — 한국어 العربية עברית",
    "naïve déjà vu; crème brûlée. 東京タワー",
    "plain ASCII only, with numbers 12345 and tabs\tand\nnewlines",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama folder (SmolLM2's byte-level pipeline) and a qwen2 one (Qwen2's: NFC, its own split)."""
    return make_model(tmp_path_factory.mktemp("text") / request.param, arch=request.param)


def normalized(model_dir: Path, text: str) -> str:
    """What decode(encode(text)) gives: the text itself, NFC-normalised for Qwen2's tokenizer."""
    return unicodedata.normalize("NFC", text) if model_dir.name == "qwen2" else text


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(model_dir)


def with_template(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of src whose tokenizer_config.json carries template (None: no chat_template key)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def detokenize(tok: Tokenizer, prompt: list[int], ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.text


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_agree_with_hf(tok: Tokenizer, model_dir: Path, text: str) -> None:
    hf = ref.hf_tokenizer(model_dir)
    for special in (False, True):
        assert tok.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
    assert tok.decode(tok.encode(text)) == text == hf.decode(hf.encode(text))  # TEXTS are NFC already


def test_eos_ids_come_from_the_model_folder(tok: Tokenizer) -> None:
    assert 2 in tok.eos_token_ids and set(tok.eos_token_ids) <= {0, 2}  # <|im_end|>, <|endoftext|>


# ---------------------------------------------------------------------------
# Incremental detokenization
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_pieces_never_split_a_character_and_join_to_the_full_decode(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode("Hello there:")
    ids = tok.encode(text, add_special_tokens=False)
    pieces, full = detokenize(tok, prompt, ids)
    bad = [(i, p) for i, p in enumerate(pieces) if "\ufffd" in p]
    assert not bad, f"pieces with a broken character: {bad}"
    assert "".join(pieces) == full == tok.decode(ids) == text


def test_the_texts_really_split_characters_across_tokens(tok: Tokenizer) -> None:
    """Precondition of the test above: without holding bytes back it would fail."""
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    ids = tok.encode("🦀", add_special_tokens=False)
    pieces, _ = detokenize(tok, [], ids)
    assert len(ids) > 1 and pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🦀"


def test_detokenizer_without_prompt_context(tok: Tokenizer) -> None:
    ids = tok.encode(" leading space, then 日本", add_special_tokens=False)
    pieces, full = detokenize(tok, [], ids)
    assert "".join(pieces) == full == " leading space, then 日本"


# Text spelling a special token ("<|im_end|>") encodes to that token, which decode skips: not this test's subject.
ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\ufffd"),
                   max_size=40).filter(lambda t: "<|" not in t)


@settings(max_examples=150, deadline=None)
@given(ANY_TEXT)
def test_any_text_detokenizes_incrementally_without_broken_characters(tok: Tokenizer, model_dir: Path,
                                                                      text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces, full = detokenize(tok, tok.encode("ok "), ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == full == tok.decode(ids) == normalized(model_dir, text)


# ---------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour, ça va? 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "日本語で?"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_like_hf(tok: Tokenizer, model_dir: Path, messages: list[dict[str, str]],
                                      add_generation_prompt: bool) -> None:
    hf = ref.hf_tokenizer(model_dir)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want
    assert want.startswith("<|im_start|>system\n")


LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_chat_template_is_the_models_own(model_dir: Path, tmp_path: Path) -> None:
    path = with_template(model_dir, tmp_path / "llama3", LLAMA3_STYLE)
    messages = [{"role": "user", "content": "  Hi  "}]
    got = Tokenizer.from_model_dir(path).apply_chat_template(messages, add_generation_prompt=True)
    assert got == ref.hf_tokenizer(path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == ("<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_raise_exception_is_a_clear_request_error(model_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_model_dir(with_template(model_dir, tmp_path / "llama3", LLAMA3_STYLE))
    with pytest.raises(InvalidRequestError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_model_without_template_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_model_dir(with_template(model_dir, tmp_path / "none", None))
    with pytest.raises(ChatTemplateError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template, attribute", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "__class__"),
    ("{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}", "__class__"),
    ("{{ cycler.__init__.__globals__.os.system('touch MARKER') }}", "__init__"),
    ("{{ messages.append({'role': 'system', 'content': 'injected'}) }}", "append"),
])
def test_template_escaping_the_sandbox_raises_a_clear_error(model_dir: Path, tmp_path: Path, template: str,
                                                           attribute: str) -> None:
    marker = tmp_path / "MARKER"
    path = with_template(model_dir, tmp_path / "evil", template.replace("MARKER", str(marker)))
    tok = Tokenizer.from_model_dir(path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as info:
        tok.apply_chat_template(messages)
    assert isinstance(info.value, InvalidRequestError)
    assert attribute in str(info.value) and re.search("sandbox|unsafe", str(info.value), re.IGNORECASE), str(info.value)
    assert not marker.exists(), "the template ran a shell command"
    assert messages == [{"role": "user", "content": "hi"}], "the template modified the caller's messages"


def saved_by_transformers(src: Path, dst: Path) -> Path:
    """src's weights and config with the tokenizer as the installed transformers saves it (save_pretrained):
    transformers 5 writes the chat template to chat_template.jinja, not into tokenizer_config.json."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (dst / name).unlink(missing_ok=True)
    hf = AutoTokenizer.from_pretrained(str(src))
    hf.save_pretrained(str(dst))
    return dst


def test_chat_template_saved_by_transformers_is_read_and_renders_like_hf(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    saved = saved_by_transformers(model_dir, tmp_path / "saved")
    tok = Tokenizer.from_model_dir(saved)
    assert tok.chat_template is not None
    messages = [{"role": "user", "content": "Hello there"}]
    hf = AutoTokenizer.from_pretrained(str(saved))
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_a_broken_config_json_is_named_not_blamed_on_the_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    from engine.errors import ModelFileError

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], oops}')
    with pytest.raises(ModelFileError, match=re.escape(str(broken / "config.json")) + ": not valid JSON"):
        Tokenizer.from_model_dir(broken)
