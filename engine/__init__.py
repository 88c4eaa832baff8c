"""layermux engine: the C++ core (engine._core) behind a thin Python facade.

Reading order: core.py (Engine, EngineConfig, SamplingParams, EngineEvent),
hf_config.py (model folders -> engine spec), text.py (tokenizer, detokenizer,
chat template), errors.py (exception tree), model_factory.py (random test models).
"""

from engine.core import Engine, EngineConfig, EngineEvent, SamplingParams
from engine.errors import (
    CapacityError,
    ChatTemplateError,
    InvalidRequestError,
    LayermuxError,
    ModelFileError,
    UnsupportedModelError,
)

__all__ = [
    "CapacityError",
    "ChatTemplateError",
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "InvalidRequestError",
    "LayermuxError",
    "ModelFileError",
    "SamplingParams",
    "UnsupportedModelError",
]
