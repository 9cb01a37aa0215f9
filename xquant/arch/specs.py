"""Typed sections of an architecture's TOML file, and the loader that checks them.

Each section of converters/<arch>.toml is one frozen dataclass; `parse` builds it from the TOML
table and refuses, in one line naming the file and the key, a key the dataclass does not have
(a misspelt key would otherwise be silently ignored) or a value of the wrong type. Tables whose
keys are free names (tensor roles, config fields) are typed `dict[str, T]`: any key, typed values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnsupportedError


@dataclass(frozen=True)
class QuantLayout:
    """`[quant]`: the nn.Linear roles quantized together, in true-sequential order (inputs of a
    later group are recomputed with the earlier groups already quantized), and where the decoder
    layers live."""

    sequential: tuple[tuple[str, ...], ...] = ()
    layers_module: str = "model.layers"
    # The routed experts are one nn.Linear each in the model class that loads the checkpoint (not
    # fused parameters), so bitsandbytes quantizes every expert's gate/up/down too.
    experts: bool = False


@dataclass(frozen=True)
class MetaTensorSpec:
    """One `[meta]` entry: a role's tensor name in Meta's original checkpoint ("{i}" = layer) and
    how model-parallel shards combine: concatenated along `dim`, or `replicated` (equal in every shard)."""

    name: str
    dim: int | None = None
    replicated: bool = False


@dataclass(frozen=True)
class MetaConvertSpec:
    """`[meta_convert]`: roles whose q/k rows are permuted from Meta's interleaved rotary pairs
    (role -> the params.json key holding their head count), and Meta tensors with nothing to convert."""

    rope_permute: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class GGUFSpec:
    """`[gguf]`: llama.cpp's layout. `rope_permute`: role -> config key of its head count (the
    writer undoes Hugging Face's q/k permutation); `skip`: tensor-name suffixes left out; `f32`:
    GGUF tensor kinds kept F32 (routers); `require`: config values llama.cpp's graph hard-codes;
    `hparams`: extra GGUF keys `<arch>.KEY` from config keys; `constants`: extra GGUF keys with a
    fixed value (an integer is written as uint32, a number as float32, a boolean as bool): what the
    llama.cpp architecture reads but this checkpoint's config has no field for; `vocab`: the
    vocabulary reader."""

    rope_permute: dict[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    f32: tuple[str, ...] = ()
    require: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, str] = field(default_factory=dict)
    constants: dict[str, int | float | bool] = field(default_factory=dict)
    vocab: str | None = None


@dataclass(frozen=True)
class ExpertsSpec:
    """`[experts]`: a mixture of experts' routed experts, one Linear weight each on disk ("{i}" =
    layer, "{e}" = expert); `count` / `used` are the config keys holding the number of experts
    and how many each token is routed to; `width` the key of one expert's feed-forward width and
    `shared_count` the key of the number of always-on shared experts (for `inspect`; None: the
    config has no such key)."""

    count: str
    used: str
    gate: str
    up: str
    down: str
    width: str | None = None
    shared_count: str | None = None

    @property
    def roles(self) -> dict[str, str]:
        """role -> tensor-name template of each routed expert's linears."""
        return {"gate": self.gate, "up": self.up, "down": self.down}


@dataclass(frozen=True)
class GPTQSpec:
    """`[gptq]`: the transformers classes that run one decoder layer on its own (None: LLaMA's),
    the routed experts' module inside a layer, GPTQ's own true-sequential groups (None: `[quant]`'s;
    "experts.<role>" = that role of every routed expert), and how transformers fuses the experts
    (fused parameter -> the roles concatenated into it)."""

    config_class: str | None = None
    decoder_layer: str | None = None
    rotary_embedding: str | None = None
    experts_module: str | None = None
    sequential: tuple[tuple[str, ...], ...] | None = None
    fused_experts: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class TransformersAs:
    """`transformers_as`: an architecture shipped as remote code whose math is that of a class
    transformers has, or one xquant implements itself (`module`: the Python module that registers
    its config and model with transformers' Auto classes when imported); evaluation loads it with
    these config.json fields."""

    architectures: tuple[str, ...]
    model_type: str | None = None
    module: str | None = None

    def register(self) -> None:
        """Import `module` (it registers its classes with transformers), if there is one."""
        if self.module is not None:
            import importlib

            importlib.import_module(self.module)

    def config_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": list(self.architectures)}
        if self.model_type is not None:
            out["model_type"] = self.model_type
        return out


# ---------------------------------------------------------------- the typed loader

def _key(keys: tuple[str, ...]) -> str:
    return ".".join(keys)


_NAMES = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("a boolean", "booleans")}


def _describe(tp: Any, plural: bool = False) -> str:
    """'a list of strings', 'a table', ... for an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args if a is not type(None))
    if origin is tuple:
        return ("lists" if plural else "a list") + f" of {_describe(args[0], True)}"
    if origin is dict:
        return ("tables" if plural else "a table") + f" of {_describe(args[1], True)}"
    if tp is Any:
        return "values" if plural else "a value"
    if dataclasses.is_dataclass(tp):
        return "tables" if plural else "a table"
    return _NAMES.get(tp, (str(tp), str(tp)))[plural]


def _bad(path: Path, keys: tuple[str, ...], tp: Any, value: Any) -> UnsupportedError:
    return UnsupportedError(f"{path}: '{_key(keys)}' must be {_describe(tp)}, got {value!r} "
                            f"({type(value).__name__})")


def _convert(tp: Any, value: Any, path: Path, keys: tuple[str, ...], partial: bool) -> Any:
    """`value` as type `tp`, or a one-line error naming the file and the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, keys, partial)
            except UnsupportedError:
                if len([a for a in args if a is not type(None)]) == 1:
                    raise
        raise _bad(path, keys, tp, value)
    if origin is tuple:
        if not isinstance(value, list):
            raise _bad(path, keys, tp, value)
        return tuple(_convert(args[0], v, path, (*keys[:-1], f"{keys[-1]}[{n}]"), partial)
                     for n, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(path, keys, tp, value)
        return {k: _convert(args[1], v, path, (*keys, k), partial) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path, keys, partial)
    # TOML integers are numbers too; booleans are not integers (as Python's isinstance says).
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise _bad(path, keys, tp, value)
    return value


def parse(cls: type, table: Any, path: Path, keys: tuple[str, ...] = (), partial: bool = False,
          also_known: tuple[str, ...] = ()) -> Any:
    """The dataclass `cls` from a TOML table. Unknown keys, missing required keys and values of
    the wrong type are refused naming `path` and the dotted key. `partial` checks the keys and
    values a file states without requiring the rest (a file with a `base` states only what differs);
    it returns the table unchanged."""
    where = f"[{_key(keys)}]" if keys else "the top level"
    if not isinstance(table, dict):
        raise _bad(path, keys, cls, table)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = sorted([*fields, *also_known])
    for name in table:
        if name not in fields and name not in also_known:
            raise UnsupportedError(f"{path}: unknown key '{_key((*keys, name))}' "
                                   f"(known in {where}: {', '.join(known)})")
    if not partial:
        for name, f in fields.items():
            if (name not in table and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING):
                raise UnsupportedError(f"{path}: missing key '{_key((*keys, name))}' in {where}")
    values = {name: _convert(hints[name], v, path, (*keys, name), partial)
              for name, v in table.items() if name in fields}
    return table if partial else cls(**values)
