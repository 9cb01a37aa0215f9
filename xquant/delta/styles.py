"""Delta styles: how the two public tools define a delta, as data.

Both tools compute `result = base + delta` for every tensor; they differ in the vocabulary tensors
(embedding and output head, the roles "embed" and "lm_head" of the architecture registry):

- FastChat (`fastchat/model/apply_delta.py`, `make_delta.py`; Vicuna, and most other deltas):
  every tensor is a difference. Vicuna v0 added a [PAD] token: both tools resized the base's
  embedding and head with zero rows before adding, so rows beyond the base's vocabulary are the
  target's rows as they are. xquant's default.
- Ziya (Fengshenbang-LM `fengshen/utils/apply_delta.py`, `make_delta.py`; Ziya-LLaMA-13B): the
  embedding and head are stored whole (not as differences) and copied into the result; every
  other tensor is a difference.

Both public tools load whole models in float16 (their `--low-cpu-mem` mode splits files into
4 GB pieces on disk instead); xquant always streams one tensor at a time and adds in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError

VOCAB_ROLES = ("embed", "lm_head")  # roles whose rows are the vocabulary


@dataclass(frozen=True)
class Style:
    name: str
    whole_roles: tuple[str, ...]  # roles the delta stores whole; all others are differences
    tool: str

    def is_whole(self, role: str | None) -> bool:
        return role in self.whole_roles


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style("fastchat", (), "FastChat apply_delta / make_delta (Vicuna)"),
        Style("ziya", VOCAB_ROLES, "Fengshenbang-LM apply_delta / make_delta (Ziya-LLaMA)"),
    )
}
ALIASES = {"fengshen": "ziya", "fengshenbang": "ziya", "vicuna": "fastchat"}
DEFAULT_STYLE = "fastchat"


def get_style(name: str) -> Style:
    key = ALIASES.get(name.lower(), name.lower())
    try:
        return STYLES[key]
    except KeyError:
        known = ", ".join([*STYLES, *(f"{a} (= {t})" for a, t in ALIASES.items())])
        raise UnsupportedError(f"unknown delta style '{name}' (known: {known})") from None
