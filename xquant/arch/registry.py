"""Architectures are data: one TOML file per architecture in converters/, loaded into this registry.

A file names the Hugging Face `architectures` it covers, its tensors by role as name templates
("{i}" = layer index), the true-sequential groups of linear roles for GPTQ, and optional sections
for other layouts (Meta's original checkpoints, GGUF). Code elsewhere asks for roles, never for
hard-coded tensor names, so a LLaMA-like model is one small file.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnsupportedError
from ..paths import data_dir


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_architectures: tuple[str, ...]
    model_type: str
    globals: dict[str, str]
    layer: dict[str, str]
    sequential: tuple[tuple[str, ...], ...]
    layers_module: str = "model.layers"
    gguf_arch: str | None = None
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def layer_tensor(self, role: str, i: int) -> str:
        return self.layer[role].format(i=i)

    def layer_tensors(self, i: int) -> dict[str, str]:
        """role -> tensor name for decoder layer i."""
        return {role: tmpl.format(i=i) for role, tmpl in self.layer.items()}

    def linear_roles(self) -> list[str]:
        return [role for group in self.sequential for role in group]

    def layer_of(self, name: str) -> int | None:
        """The decoder layer index a tensor name belongs to, or None for global tensors."""
        prefix = self.layers_module + "."
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
        return None

    def expert_tensors(self, i: int, config: dict) -> dict[str, list[str]]:
        """role -> the routed experts' tensor names of decoder layer i, in expert order, from the
        `[experts]` section ("{e}" = expert index, `count` = the config key of the expert count);
        empty for a dense model."""
        spec = self.extra.get("experts")
        if not spec:
            return {}
        n = config.get(spec["count"])
        if not isinstance(n, int) or n < 1:
            raise UnsupportedError(f"config has no valid {spec['count']} ({n!r}) for the experts of {self.name}")
        return {role: [tmpl.format(i=i, e=e) for e in range(n)]
                for role, tmpl in spec.items() if role not in ("count", "used")}

    def num_layers(self, config: dict) -> int:
        value = config.get("num_hidden_layers", config.get("n_layers"))
        if value is None:
            raise UnsupportedError("config has no num_hidden_layers")
        return int(value)


def _merge(base: dict, over: dict) -> dict:
    """Tables merge key by key; any other value in `over` replaces the base's."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw(path: Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A file's data with its `base` architecture's data underneath (a LLaMA-like model states
    only what differs from llama.toml)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    base = data.pop("base", None)
    if base is None:
        return data
    if base in seen:
        raise UnsupportedError(f"{path}: architecture bases form a cycle ({' -> '.join((*seen, base))})")
    base_path = path.parent / f"{base}.toml"
    if not base_path.exists():
        raise UnsupportedError(f"{path}: base architecture '{base}' has no file {base_path.name}")
    return _merge(_raw(base_path, (*seen, base)), data)


def _load(path: Path) -> Architecture:
    data = _raw(path)
    quant = data.pop("quant", {})
    known_keys = {"name", "hf_architectures", "model_type", "gguf_arch", "globals", "layer", "meta"}
    return Architecture(
        name=data["name"],
        hf_architectures=tuple(data["hf_architectures"]),
        model_type=data.get("model_type", data["name"]),
        globals=dict(data.get("globals", {})),
        layer=dict(data.get("layer", {})),
        sequential=tuple(tuple(g) for g in quant.get("sequential", [])),
        layers_module=quant.get("layers_module", "model.layers"),
        gguf_arch=data.get("gguf_arch"),
        meta=dict(data.get("meta", {})),
        extra={k: v for k, v in data.items() if k not in known_keys},
    )


@functools.cache
def _registry() -> dict[str, Architecture]:
    archs = {}
    for path in sorted(data_dir("converters").glob("*.toml")):
        arch = _load(path)
        archs[arch.name] = arch
    return archs


def known() -> list[str]:
    return sorted(_registry())


def get(name: str) -> Architecture:
    try:
        return _registry()[name]
    except KeyError:
        raise UnsupportedError(f"unknown architecture '{name}' (known: {', '.join(known())})") from None


def for_config(config: dict, source: str = "config.json") -> Architecture:
    """The architecture of a Hugging Face config; unsupported ones fail with the supported list."""
    names = config.get("architectures") or []
    for arch in _registry().values():
        if any(n in arch.hf_architectures for n in names):
            return arch
    supported = sorted(a for arch in _registry().values() for a in arch.hf_architectures)
    got = ", ".join(names) if names else f"model_type '{config.get('model_type')}'"
    raise UnsupportedError(f"{source}: unsupported architecture {got} (supported: {', '.join(supported)})")
