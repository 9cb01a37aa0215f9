"""Where xquant keeps caches, and where its bundled data lives."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """$XQUANT_CACHE, else $XDG_CACHE_HOME/xquant, else ~/.cache/xquant."""
    if env := os.environ.get("XQUANT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xquant"


def data_dir(name: str) -> Path:
    """A bundled data folder (calibration/, converters/): inside the installed package when it
    was built as a wheel, else at the repository root beside the package."""
    inside = PACKAGE_DIR / "_data" / name
    if inside.is_dir():
        return inside
    return PACKAGE_DIR.parent / name
