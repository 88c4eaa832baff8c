"""layermux engine: the C++ core (engine._core) behind a thin Python facade.

Reading order: core.py (Engine, and the engine's types: EngineConfig, SamplingParams,
ModelLoadOptions, the enums, EngineEvent, ModelInfo, ModelFootprint, LedgerSnapshot), _core.pyi
(the compiled module's typed surface), hf_config.py (model folders -> engine spec), text.py
(tokenizer, detokenizer, chat template), errors.py (exception tree). Random test models are made
by tools/model_factory.py, outside the product packages.
"""

from engine.core import (
    MIN_SLOTS,
    Engine,
    EngineConfig,
    EngineEvent,
    EngineHealth,
    EngineStats,
    ErrorCode,
    EventKind,
    Eviction,
    FinishReason,
    LedgerSnapshot,
    MatmulPrecision,
    ModelFootprint,
    ModelInfo,
    ModelLoadOptions,
    ModelPlacement,
    OwnerUsage,
    ResidencyMode,
    ResidencyStats,
    SamplingParams,
    kernels_isa,
    plan_slots,
)
from engine.errors import (
    CapacityError,
    ChatTemplateError,
    InvalidRequestError,
    LayermuxError,
    ModelFileError,
    RequestFailedError,
    UnsupportedModelError,
)

__all__ = [
    "MIN_SLOTS",
    "CapacityError",
    "ChatTemplateError",
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "EngineHealth",
    "EngineStats",
    "ErrorCode",
    "EventKind",
    "Eviction",
    "FinishReason",
    "InvalidRequestError",
    "LayermuxError",
    "LedgerSnapshot",
    "MatmulPrecision",
    "ModelFileError",
    "ModelFootprint",
    "ModelInfo",
    "ModelLoadOptions",
    "ModelPlacement",
    "OwnerUsage",
    "RequestFailedError",
    "ResidencyMode",
    "ResidencyStats",
    "SamplingParams",
    "UnsupportedModelError",
    "kernels_isa",
    "plan_slots",
]
