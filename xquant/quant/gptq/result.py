"""What a GPTQ run returns, whichever engine ran it (run.py: xquant; optimum_engine.py: optimum)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class GPTQResult:
    out: Path
    engine: str
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: int | None = None  # first layer computed by this run when it continued a state
    experts: dict[str, Any] | None = None  # mixture of experts: walk.expert_summary()
