"""Delta weights: `apply-delta` and `make-delta`, in the FastChat and Fengshenbang (Ziya) styles.

A delta is a Hugging Face checkpoint whose tensors are target - base (see styles.py for the one
place the two public tools differ). Both directions stream one tensor at a time across
differently-sharded inputs, add or subtract in float32, and check before writing that the base is
the right one (checks.py).
"""

from .apply import plan_apply_delta
from .make import plan_make_delta
from ..pipeline import execute  # delta plans run like every plan (hooks on DeltaPlan)
from .run import DeltaPlan, read_expected
from .styles import DEFAULT_STYLE, STYLES, get_style

__all__ = ["plan_apply_delta", "plan_make_delta", "execute", "read_expected", "DeltaPlan", "STYLES",
           "DEFAULT_STYLE", "get_style"]
