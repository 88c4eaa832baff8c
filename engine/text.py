"""Text in and out: HF `tokenizers`, incremental detokenization, sandboxed chat templates.

Owner: engine text. A Tokenizer is immutable after loading (safe to share across
threads); an IncrementalDetokenizer belongs to one request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import orjson
from tokenizers import Tokenizer as HfTokenizer
from tokenizers.decoders import DecodeStream

from engine.errors import ChatTemplateError, ModelFileError

# Prompt tokens kept as left context when decoding generated ones: some decoders
# (SentencePiece's leading-space rule) render a token differently at the start.
_CONTEXT_TOKENS = 5


def _token_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _default_template(template: Any) -> str | None:
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """The chat template, where Hugging Face puts it: chat_template.jinja (transformers >= 4.47 writes
    it there, and it wins over the others as in transformers), chat_template.json's "chat_template",
    then tokenizer_config.json's "chat_template"."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{jinja}: cannot be read as UTF-8 text ({e})") from e
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        try:
            loaded = orjson.loads(as_json.read_bytes())
        except orjson.JSONDecodeError as e:
            raise ModelFileError(f"{as_json}: not valid JSON ({e})") from e
        template = _default_template(loaded.get("chat_template") if isinstance(loaded, dict) else None)
        if template is not None:
            return template
    return _default_template(config.get("chat_template"))


class _DecodeStream:
    """`tokenizers.decoders.DecodeStream` bound to one tokenizer."""

    def __init__(self, tok: HfTokenizer, context_ids: list[int]) -> None:
        self._tok = tok
        self._stream = DecodeStream(ids=list(context_ids), skip_special_tokens=True)

    def step(self, token_id: int) -> str | None:
        piece = self._stream.step(self._tok, token_id)
        return None if piece is None else str(piece)


class Tokenizer:
    """A model's tokenizer (tokenizer.json) with its chat template (chat_template.jinja or
    tokenizer_config.json)."""

    def __init__(self, tok: HfTokenizer, config: dict[str, Any], eos_ids: list[int], source: str,
                 chat_template: str | None = None) -> None:
        self._tok = tok
        self._config = config
        self._source = source
        self.eos_token_ids = eos_ids
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.chat_template: str | None = (
            chat_template if chat_template is not None else _default_template(config.get("chat_template")))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer:
        if str(model_dir).lower().endswith(".gguf"):  # a GGUF file carries its tokenizer in its metadata
            from engine.gguf_tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(model_dir)
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(f"{path}: file not found; expected a Hugging Face tokenizer.json")
        try:
            tok = HfTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ModelFileError(f"{path}: cannot be loaded by the tokenizers library: {e}") from e
        config: dict[str, Any] = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                loaded = orjson.loads(cfg_path.read_bytes())
            except orjson.JSONDecodeError as e:
                raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from e
            if isinstance(loaded, dict):
                config = loaded
        eos: list[int] = []
        from engine.hf_config import eos_token_ids  # local: avoids a cycle at import

        model_cfg = model_dir / "config.json"
        if model_cfg.is_file():
            try:
                model_doc = orjson.loads(model_cfg.read_bytes())
            except orjson.JSONDecodeError as e:
                raise ModelFileError(f"{model_cfg}: not valid JSON ({e}); expected a Hugging Face config.json") from e
            if not isinstance(model_doc, dict):
                raise ModelFileError(f"{model_cfg}: expected a JSON object, found {type(model_doc).__name__}")
            eos = eos_token_ids(model_dir, model_doc)
        eos_str = _token_str(config.get("eos_token"))
        if eos_str is not None:
            eos_id = tok.token_to_id(eos_str)
            if eos_id is not None and eos_id not in eos:
                eos.append(eos_id)
        return cls(tok, config, eos, str(model_dir), _read_chat_template(model_dir, config))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def decode_stream(self, context_ids: list[int]) -> _DecodeStream:
        """Incremental decoding after `context_ids` (special tokens skipped): `step(id)` returns the
        text the token completes, or None while a UTF-8 character is still incomplete."""
        return _DecodeStream(self._tok, context_ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders messages with the model's own template in a jinja2 sandbox."""
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self._source}: the model has no chat template (no chat_template.jinja, and no chat_template "
                "in tokenizer_config.json); send a plain prompt instead (without --chat)"
            )
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined, autoescape=False
        )

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return str(
                template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                )
            )
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{self._source}: chat template tried to leave its sandbox: {e}") from e
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self._source}: chat template failed: {e}") from e


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces, never splitting a UTF-8 character.

    The pieces are those of decoding a small window [prefix_offset:] and keeping what it adds
    beyond the already-emitted [prefix_offset:read_offset] part; a window that ends in U+FFFD (an
    incomplete byte sequence) is held back until a later token completes it, so a piece never
    carries a broken character. `tokenizers`' DecodeStream runs exactly that per token in one
    native call (seeded with the last prompt tokens, so a first piece keeps its leading space);
    the offsets are kept here too, for `flush`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._n_context = len(self._ids)
        self._pieces: list[str] = []
        self._stream = tokenizer.decode_stream(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        piece = self._stream.step(token_id)
        if piece:
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pieces.append(piece)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of generation (may hold U+FFFD: the bytes were invalid)."""
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        piece = full[len(prefix) :] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._n_context :]
