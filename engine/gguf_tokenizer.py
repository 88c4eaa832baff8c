"""A GGUF file's tokenizer (`tokenizer.ggml.*` metadata) built into a Hugging Face `tokenizers` Tokenizer.

Owner: engine text (GGUF). The result is an engine.text.Tokenizer: immutable, thread-safe.

Two vocabulary kinds, as llama.cpp names them in `tokenizer.ggml.model`:
- "gpt2": byte-level BPE. Tokens are spelled in GPT-2's byte alphabet; `tokenizer.ggml.merges`
  lists the merges in rank order; `tokenizer.ggml.pre` names the split that runs before BPE.
  The splits are llama.cpp's for each name (llama-bpe / llama3, qwen2, smollm / starcoder /
  refact with every digit on its own, as the original tokenizers' Digits pre-tokenizer does);
  an unknown name falls back to GPT-2's regex, as llama.cpp and transformers do.
- "llama": SentencePiece BPE with byte fallback (Llama 2, Gemma). The file has scores but no
  merges: a merge of two pieces into a token is ranked by the token's place in the vocabulary
  (llama.cpp merges by score, and Gemma's scores fall in vocabulary order; ties by the pieces'
  ids). Spaces become U+2581; `tokenizer.ggml.add_space_prefix` says whether one is prepended.
  Gemma files spell the tokens of 2+ spaces with real spaces; they are respelled with U+2581.
Special tokens: tokens of type 3 (control) match whole in the text and are special (skipped
when decoding with skip_special_tokens); type 4 (user-defined) match whole and are plain text.
BOS is prepended when `tokenizer.ggml.add_bos_token` says so (llama.cpp's default: true for
"llama" vocabularies, false for "gpt2"). The chat template is `tokenizer.chat_template`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HfTokenizer

from engine.errors import ModelFileError, UnsupportedModelError
from engine.gguf_config import gguf_eos_ids, read_gguf_metadata
from engine.text import Tokenizer

_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex splits applied in order before byte-level BPE (llama.cpp's table).
_PRE_SPLITS: dict[str, list[str]] = {
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "dbrx": [_LLAMA3_SPLIT], "falcon3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT], "refact": [r"\p{N}", _GPT2_SPLIT],
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _strings(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ModelFileError(f"{path}: metadata '{key}': expected an array of strings, found {type(value).__name__}")
    return value


def _special_tokens(tok: HfTokenizer, tokens: list[str], types: Any, allowed: set[str] | None) -> None:
    if types is None:
        return
    control = [t for t, ty in zip(tokens, types) if int(ty) == _CONTROL and (allowed is None or set(t) <= allowed)]
    user = [t for t, ty in zip(tokens, types) if int(ty) == _USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _gpt2(meta: dict[str, Any], tokens: list[str], path: Path) -> HfTokenizer:
    alphabet = _byte_alphabet()
    allowed = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        spelled = t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode("utf-8"))
        vocab.setdefault(spelled, i)
    merges = []
    for m in _strings(meta, "tokenizer.ggml.merges", path):
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelFileError(f"{path}: metadata 'tokenizer.ggml.merges': expected 'left right', found {m!r}")
        merges.append((left, right))
    tok = HfTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    splits = _PRE_SPLITS.get(str(meta.get("tokenizer.ggml.pre", "default")))
    if splits is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    _special_tokens(tok, tokens, meta.get("tokenizer.ggml.token_type"), allowed)
    return tok


def _spm(meta: dict[str, Any], tokens: list[str], path: Path) -> HfTokenizer:
    space = "\u2581"
    spelled = [space * len(t) if t and " " in t and not t.strip() else t for t in tokens]
    vocab: dict[str, int] = {}
    for i, t in enumerate(spelled):
        vocab.setdefault(t, i)
    types = meta.get("tokenizer.ggml.token_type")
    ranked: list[tuple[int, int, int, str, str]] = []
    for i, t in enumerate(spelled):
        if len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = vocab.get(t[:k]), vocab.get(t[k:])
            if a is not None and b is not None:
                ranked.append((i, a, b, t[:k], t[k:]))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = spelled[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(spelled) else None
    tok = HfTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    norm: list[normalizers.Normalizer] = []
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)):
        norm.append(normalizers.Prepend(space))
    norm.append(normalizers.Replace(" ", space))
    tok.normalizer = normalizers.Sequence(norm)
    dec: list[decoders.Decoder] = [decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)):
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    _special_tokens(tok, spelled, types, None)
    return tok


def tokenizer_from_gguf(path: str | Path, meta: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer, BOS/EOS and chat template of a GGUF model file."""
    path = Path(path)
    md = meta if meta is not None else read_gguf_metadata(path)[0]
    kind = md.get("tokenizer.ggml.model")
    tokens = _strings(md, "tokenizer.ggml.tokens", path)
    if kind == "gpt2":
        tok = _gpt2(md, tokens, path)
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        tok = _spm(md, tokens, path)
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise UnsupportedModelError(f"{path}: metadata 'tokenizer.ggml.model': expected 'gpt2' or 'llama', "
                                    f"found {kind!r}")

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if add_bos and bos is not None:
        bos_id = int(md["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    config: dict[str, Any] = {"bos_token": bos, "eos_token": eos}
    template = md.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return Tokenizer(tok, config, gguf_eos_ids(md), str(path))
