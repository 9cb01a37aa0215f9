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

from ..errors import UnsupportedError
from ..paths import data_dir
from .specs import (ExpertsSpec, GGUFSpec, GPTQSpec, MetaConvertSpec, MetaTensorSpec, QuantLayout, TransformersAs,
                    parse)


@dataclass(frozen=True)
class Architecture:
    """One converters/<name>.toml: its fields are the file's top-level keys and sections, typed
    (specs.py); `load` refuses any other key."""

    name: str
    hf_architectures: tuple[str, ...]
    model_type: str
    gguf_arch: str | None = None
    transformers_as: TransformersAs | None = None
    globals: dict[str, str] = field(default_factory=dict)
    layer: dict[str, str] = field(default_factory=dict)
    quant: QuantLayout = field(default_factory=QuantLayout)
    meta: dict[str, MetaTensorSpec] = field(default_factory=dict)
    meta_convert: MetaConvertSpec = field(default_factory=MetaConvertSpec)
    gguf: GGUFSpec = field(default_factory=GGUFSpec)
    experts: ExpertsSpec | None = None
    gptq: GPTQSpec = field(default_factory=GPTQSpec)
    # Buffers transformers recomputes from config.json (name -> tensor template); left out of outputs.
    derived: dict[str, str] = field(default_factory=dict)
    # Config fields a fine-tune keeps from its base -> the value transformers assumes when absent.
    base_identity: dict[str, str | int | float | bool] = field(default_factory=dict)

    @property
    def sequential(self) -> tuple[tuple[str, ...], ...]:
        return self.quant.sequential

    @property
    def layers_module(self) -> str:
        return self.quant.layers_module

    @property
    def is_moe(self) -> bool:
        """A mixture of experts: decoder layers hold routed experts (`[experts]`)."""
        return self.experts is not None

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

    def expert_count(self, config: dict) -> int:
        """The number of routed experts per layer (config key `[experts] count`); 0 for a dense model."""
        if self.experts is None:
            return 0
        n = config.get(self.experts.count)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UnsupportedError(f"config has no valid {self.experts.count} ({n!r}) for the experts of {self.name}")
        return n

    def expert_tensors(self, i: int, config: dict) -> dict[str, list[str]]:
        """role -> the routed experts' tensor names of decoder layer i, in expert order, from the
        `[experts]` templates ("{e}" = expert index); empty for a dense model."""
        if self.experts is None:
            return {}
        n = self.expert_count(config)
        return {role: [tmpl.format(i=i, e=e) for e in range(n)] for role, tmpl in self.experts.roles.items()}

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


def _raw(path: Path, seen: tuple[str, ...] = ()) -> dict:
    """A file's data with its `base` architecture's data underneath (a LLaMA-like model states
    only what differs from llama.toml). Each file's own keys and values are checked here, so an
    error names the file that holds the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UnsupportedError(f"{path}: not valid TOML ({e})") from None
    parse(Architecture, data, path, partial=True, also_known=("base",))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UnsupportedError(f"{path}: 'base' must be string, got {base!r} ({type(base).__name__})")
    if base in seen:
        raise UnsupportedError(f"{path}: architecture bases form a cycle ({' -> '.join((*seen, base))})")
    base_path = path.parent / f"{base}.toml"
    if not base_path.exists():
        raise UnsupportedError(f"{path}: base architecture '{base}' has no file {base_path.name}")
    return _merge(_raw(base_path, (*seen, base)), data)


def _check_roles(arch: Architecture, path: Path) -> None:
    """Roles one section names must exist in the section they refer to."""
    def need(roles, known, what: str, where: str) -> None:
        for role in roles:
            if role not in known:
                raise UnsupportedError(f"{path}: {what} names role '{role}', which {where} lacks "
                                       f"(known: {', '.join(known) or '-'})")

    expert_roles = list(arch.experts.roles) if arch.experts else []
    need(arch.linear_roles(), list(arch.layer), "[quant] sequential", "[layer]")
    need(arch.gguf.rope_permute, list(arch.layer), "[gguf] rope_permute", "[layer]")
    need(arch.meta_convert.rope_permute, list(arch.meta), "[meta_convert] rope_permute", "[meta]")
    for role, spec in arch.meta.items():
        if spec.dim is None and not spec.replicated:
            raise UnsupportedError(f"{path}: 'meta.{role}' needs dim (the concatenation axis) or replicated = true")
    gptq_roles = [r for g in arch.gptq.sequential or () for r in g]
    need([r for r in gptq_roles if not r.startswith("experts.")], list(arch.layer), "[gptq] sequential", "[layer]")
    need([r.removeprefix("experts.") for r in gptq_roles if r.startswith("experts.")], expert_roles,
         "[gptq] sequential", "[experts]")
    need([r for roles in arch.gptq.fused_experts.values() for r in roles], expert_roles,
         "[gptq] fused_experts", "[experts]")


def load(path: Path) -> Architecture:
    """The architecture of one converters TOML file (with its `base` underneath). Unknown keys,
    missing keys, values of the wrong type and roles that do not exist are refused in one line
    naming the file and the key."""
    path = Path(path)
    data = _raw(path)
    if isinstance(data.get("name"), str):
        data.setdefault("model_type", data["name"])
    arch = parse(Architecture, data, path)
    _check_roles(arch, path)
    return arch


@functools.cache
def _registry() -> dict[str, Architecture]:
    archs = {}
    for path in sorted(data_dir("converters").glob("*.toml")):
        arch = load(path)
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
    # One class name may cover a dense model and a mixture of experts (XverseForCausalLM is both):
    # an architecture with [experts] claims a config only when it holds the expert-count key, and
    # such a claim wins over a dense one.
    matches = [arch for arch in _registry().values() if any(n in arch.hf_architectures for n in names)
               and (arch.experts is None or arch.experts.count in config)]
    if matches:
        return next((a for a in matches if a.is_moe), matches[0])
    supported = sorted({a for arch in _registry().values() for a in arch.hf_architectures})
    got = ", ".join(names) if names else f"model_type '{config.get('model_type')}'"
    raise UnsupportedError(f"{source}: unsupported architecture {got} (supported: {', '.join(supported)})")
