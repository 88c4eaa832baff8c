"""layermux engine: the C++ core (engine._core) behind a thin Python facade.

Reading order: core.py (Engine, and the engine's types: EngineConfig, SamplingParams,
ModelLoadOptions, the enums, EngineEvent, ModelInfo, ModelFootprint, LedgerSnapshot), _core.pyi
(the compiled module's typed surface), hf_config.py (model folders -> engine spec), text.py
(tokenizer, detokenizer, chat template), errors.py (exception tree).
"""

from engine import core, errors
from engine.core import *
from engine.errors import *

__all__: list[str] = []
__all__ += core.__all__
__all__ += errors.__all__
