"""`xquant-delta.json`: what make-delta records beside the delta weights.

The public delta format is only config + tokenizer + weights; nothing in it says which base it
needs or whether the vocabulary tensors are stored whole. xquant adds this side file (the public
tools ignore it): the style, a fingerprint of every base tensor (32 sampled values each), and how
exactly base + delta reproduces the target. apply-delta uses it when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import CorruptFileError

RECORD_NAME = "xquant-delta.json"
FORMAT = "xquant-delta"
VERSION = 1


def new_record(style: str, base: Path, target: Path, target_dtype: str, delta_dtype: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "xquant_version": __version__,
        "style": style,
        "delta_dtype": delta_dtype,
        "target_dtype": target_dtype,
        "base_name": base.name,
        "target_name": target.name,
        # Filled while the delta streams (the dict is written after the last tensor):
        # exact: every value reproduced (a -0.0 comes back as +0.0, counted in signed_zero_elements).
        "round_trip": {"exact": None, "elements": 0, "inexact_elements": 0, "max_abs_error": 0.0,
                       "signed_zero_elements": 0, "inexact_tensors": []},
        "base_tensors": {},
    }


def read_record(delta_dir: Path) -> dict[str, Any] | None:
    """The delta's record, or None when the delta was made elsewhere."""
    path = delta_dir / RECORD_NAME
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("base_tensors"), dict):
        raise CorruptFileError(f"{path}: not an xquant delta record (expected format '{FORMAT}')")
    if int(obj.get("version", 0)) > VERSION:
        raise CorruptFileError(f"{path}: record version {obj['version']} is newer than this xquant reads ({VERSION})")
    return obj
