"""Owns: the worker's configuration (pydantic-settings), its TOML file, and byte-size parsing.
Changed by: whoever adds a setting; keep docs and deploy/ examples in step.
Thread-safety: `Settings` objects are frozen; `load_settings` reads the file and the environment only.

Precedence, highest first: keyword overrides given to `load_settings`, environment variables
(prefix ``LAYERMUX_``, nested fields joined with ``__``: ``LAYERMUX_DEVICE__BUDGET=8GiB``;
lists such as ``LAYERMUX_MODELS`` are JSON), then the TOML file (path given to
`load_settings`, else env ``LAYERMUX_CONFIG``), then defaults. A bad value is a `ConfigError`
whose message names the field and where it came from (the file, or the environment variable).

A TOML file looks like::

    redis_url = "redis://:secret@redis:6379/0"     # unset: start an embedded redis-server
    key_prefix = "lmx"
    [device]
    budget = "8GiB"
    cap_fraction = 0.9
    [[models]]
    name = "smol"
    path = "/models/SmolLM2-360M-Instruct"
    weights = "q8_0"
    max_running = 32
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeAlias, cast

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from engine import EngineConfig, ModelLoadOptions
from producer_sdk.connection import RedisMode, check_redis_target
from producer_sdk.keys import MODEL_NAME_PATTERN, PREFIX_PATTERN

__all__ = ["ConfigError", "DeviceSettings", "GatewaySettings", "ModelSettings", "Settings", "load_settings",
           "parse_bytes"]

ENV_PREFIX: Final = "LAYERMUX_"
ENV_CONFIG: Final = "LAYERMUX_CONFIG"


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names the field and its source."""


# -- byte sizes ---------------------------------------------------------------------------------

# Binary units (KiB, Ki) are powers of 1024, SI units (KB, K) powers of 1000, like Kubernetes
# quantities; a bare number is bytes.
_UNITS: Final = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_SIZE_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def parse_bytes(value: object) -> int:
    """'8GiB' -> 8589934592, '600MiB', '1.5GB' -> 1500000000, 4096 -> 4096. Raises ValueError."""
    # ValueError, not TypeError, throughout: pydantic turns only ValueError into a field error.
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size such as 8GiB, found {value!r}")  # noqa: TRY004
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"expected a whole number of bytes, found {value!r}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"expected a byte size such as 8GiB, 600MiB, 1.5GB or 4096, found {value!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"expected a byte size such as 8GiB, found {type(value).__name__}")  # noqa: TRY004
    if n <= 0:
        raise ValueError(f"expected a positive byte size, found {value!r}")
    return n


ByteSize = Annotated[int, BeforeValidator(parse_bytes)]


# -- the settings tree ----------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The engine's defaults (engine/src/engine.h), the only place they are written.
_ENGINE: Final = EngineConfig()
_LOAD: Final = ModelLoadOptions()
EvictionName: TypeAlias = Literal["belady", "lru"]
PrecisionName: TypeAlias = Literal["exact", "fast"]
ResidencyName: TypeAlias = Literal["auto", "resident", "streamed"]


class DeviceSettings(_Section):
    """The one device this worker owns (EngineConfig; the defaults are the engine's)."""

    budget: ByteSize = Field(default=_ENGINE.budget_bytes, description="device memory the engine may book")
    cap_fraction: float = Field(default=_ENGINE.cap_fraction, gt=0.0, le=1.0)
    n_threads: int = Field(default=_ENGINE.n_threads, ge=0, description="0 = one per core")
    prefetch_depth: int = Field(default=_ENGINE.prefetch_depth, ge=0, description="0 = load layers on demand")
    eviction: EvictionName = Field(default=cast(EvictionName, _ENGINE.eviction.name))
    kv_block_tokens: int = Field(default=_ENGINE.kv_block_tokens, ge=1)
    max_batch_tokens: int = Field(default=_ENGINE.max_batch_tokens, ge=1)
    kind: Literal["cpu", "vulkan"] = Field(
        default="cpu", description="cpu: the RAM arena and SIMD kernels; vulkan: a GPU through Vulkan (docs/vulkan.md)")
    index: int = Field(default=_ENGINE.device_index, ge=0, description="which Vulkan device, when several")
    kv_dtype: Literal["f32", "f16"] = Field(
        default=cast(Literal["f32", "f16"], _ENGINE.kv_dtype),
        description="KV pages: f16 (half the KV bytes), or f32")
    link_gbps: float | None = Field(
        default=None, gt=0.0,
        description="cpu device: pace every host->device copy at this many GB/s (1e9 bytes/s), so the CPU "
                    "reproduces a GPU's copy-to-compute ratio; unset = unthrottled; vulkan ignores it")
    max_turn_steps: int = Field(
        default=_ENGINE.max_turn_steps, ge=0,
        description="adaptive turns: the most steps a model keeps the device while others have work (it streams "
                    "on its own slots or borrows theirs, whichever copies fewer bytes per token); a model with "
                    "work waits at most (models with work - 1) x this many steps; 0 = no turns (per-step streaming)")
    max_wait_ms: float = Field(
        default=_ENGINE.max_wait_ms, gt=0.0,
        description="adaptive turns: a turn ends once another model with work has waited this long")
    first_token_ms: float = Field(
        default=_ENGINE.first_token_ms, ge=0.0,
        description="adaptive turns: while a model has requests that have not started, another model's turn "
                    "drains only if its timed length (copies over the link, steps at its recent step time) plus "
                    "their wait so far stays within this; else it runs only its prefill, so every model gets "
                    "first tokens after one round. Lower: lower time to first token; higher: fewer copies. "
                    "0 = always first tokens first")
    matmul_precision: PrecisionName = Field(
        default=cast(PrecisionName, _ENGINE.matmul_precision.name),
        description="exact: same tokens on every CPU; fast: bf16 dot products where the CPU has them, and "
                    "int8 dot products for q8_0 / q4_0 and every GGUF block format (activations rounded to int8 per "
                    "32 values)")


class ModelSettings(_Section):
    """One served model and its limits."""

    name: Annotated[str, Field(pattern=f"^{MODEL_NAME_PATTERN}$")]
    path: str = Field(min_length=1)
    weights: Literal["auto", "f32", "f16", "bf16", "q8_0", "q4_0"] = "auto"
    sched_weight: float = Field(default=_LOAD.sched_weight, gt=0.0)
    max_running: int = Field(default=_LOAD.max_running, ge=1)
    max_backlog: int = Field(default=1000, ge=1)
    max_tokens_limit: int = Field(default=4096, ge=1)
    residency: ResidencyName = Field(default=cast(ResidencyName, _LOAD.residency.name))


class GatewaySettings(_Section):
    """`layermux serve`: the OpenAI-compatible HTTP gateway (worker/gateway/)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Bearer keys accepted on every route but /health; none = no check")
    api_keys_file: str | None = Field(default=None, description="one key per line, added to api_keys")
    cors_origins: list[str] = Field(default_factory=list, description="empty = CORS off; ['*'] = any origin")
    max_body_bytes: ByteSize = Field(default=4 * 2**20, description="larger request bodies get 413")
    default_max_tokens: int = Field(default=512, ge=1, description="when a request gives none (capped by "
                                    "the model's max_tokens limit)")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 429 (the model's queue is full)")
    worker_stale_s: float = Field(default=10.0, gt=0.0, description="a worker silent this long is not live")


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# The TOML document of the current load_settings call (a source of lower precedence than env).
_TOML_DATA: ContextVar[Mapping[str, Any] | None] = ContextVar("layermux_toml_data", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        data = _TOML_DATA.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_TOML_DATA.get() or {})


class Settings(BaseSettings):
    """Everything a worker process needs. Build it with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True,
    )

    redis_url: str | None = Field(default=None, description="None: start an embedded redis-server")
    redis_mode: RedisMode = Field(default="standalone", description="standalone | cluster (redis_url and "
                                  "redis_urls are seed nodes) | sentinel (they are Sentinels; see sentinel_master)")
    redis_urls: list[str] = Field(default_factory=list, description="more Cluster seed nodes or Sentinels")
    sentinel_master: str | None = Field(default=None, description="the Sentinel master set's name")
    key_prefix: Annotated[str, Field(pattern=f"^{PREFIX_PATTERN}$")] = "lmx"
    worker_id: Annotated[str, Field(min_length=1, max_length=200)] = Field(default_factory=_default_worker_id)
    device: DeviceSettings = DeviceSettings()
    gateway: GatewaySettings = GatewaySettings()
    models: list[ModelSettings] = Field(default_factory=list)
    reply_ttl_s: int = Field(default=3600, ge=1)
    max_deliveries: int = Field(default=5, ge=1)
    lease_idle_ms: int = Field(default=30000, ge=100)
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    stats_interval_s: float = Field(default=1.0, gt=0.0)
    heartbeat_ttl_s: float = Field(
        default=30.0, gt=0.0,
        description="the heartbeat key lives this long; refreshed (every ttl/4) only while the engine thread "
                    "makes progress or has nothing to do, so a stuck engine lets it expire")
    cancel_poll_ms: int = Field(default=200, ge=10)
    read_block_ms: int = Field(default=1000, ge=10, description="XREADGROUP BLOCK; bounds shutdown latency")
    consumer_expiry_s: float = Field(
        default=3600.0, gt=0.0,
        description="a consumer-group member idle this long with nothing pending (a gone worker) is removed")
    priority_aging_s: float = Field(
        default=5.0, gt=0.0,
        description="waiting this long is worth one priority band: a queued request is never passed over by "
                    "a request of a higher band that arrived more than (band difference) x this later")

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, url: str | None) -> str | None:
        if url is None or url == "":
            return None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, found {url!r}")
        return url

    @field_validator("worker_id")
    @classmethod
    def _worker_id_printable(cls, worker_id: str) -> str:
        if not worker_id.isprintable() or " " in worker_id:
            raise ValueError(f"expected printable characters without spaces, found {worker_id!r}")
        return worker_id

    @model_validator(mode="after")
    def _redis_target(self) -> Settings:
        if self.redis_url is None:
            if self.redis_mode != "standalone" or self.redis_urls:
                raise ValueError(f"redis_url: redis_mode {self.redis_mode!r} needs redis_url (the embedded "
                                 "redis-server is standalone only)")
            return self
        check_redis_target(self.redis_mode, [self.redis_url, *self.redis_urls], self.sentinel_master)
        return self

    @model_validator(mode="after")
    def _model_names_unique(self) -> Settings:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"models: model name {m.name!r} appears twice")
            seen.add(m.name)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def model(self, name: str) -> ModelSettings:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from `config_path` (else env LAYERMUX_CONFIG, else no file), the environment and overrides.

    Raises ConfigError naming the field and the file or environment variable it came from.
    """
    if config_path is None:
        config_path = os.environ.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    where = "the environment"
    if config_path is not None:
        path = Path(config_path)
        where = str(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path}: not found") from e
        except OSError as e:
            raise ConfigError(f"config file {path}: cannot read ({e.strerror or e})") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from e
    token = _TOML_DATA.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(_describe(e, data, where)) from e
    finally:
        _TOML_DATA.reset(token)


def _describe(error: ValidationError, toml_data: Mapping[str, Any], where: str) -> str:
    lines = []
    for d in error.errors(include_url=False):
        loc = [p for p in d["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        source = _source_of(loc, toml_data, where)
        msg = d["msg"].removeprefix("Value error, ")
        shown = "" if d["type"] in ("missing", "extra_forbidden") or "found" in msg else f" (found {d['input']!r})"
        if d["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{field or 'settings'}: {msg}{shown} [{source}]")
    return "invalid settings: " + "; ".join(lines)


def _source_of(loc: list[int | str], toml_data: Mapping[str, Any], where: str) -> str:
    """The environment variable that set this field, else the config file (or 'defaults')."""
    names = [str(p) for p in loc if isinstance(p, str)]
    for n in range(len(names), 0, -1):
        var = ENV_PREFIX + "__".join(names[:n]).upper()
        if any(k.upper() == var for k in os.environ):
            return f"environment variable {var}"
    if where != "the environment":
        return f"config file {where}"
    return "the environment"
