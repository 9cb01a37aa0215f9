"""Typed command options: one frozen dataclass per command, the single definition of each option.

A field's type, default, help text, allowed values and check live on the field (`opt(...)`). The
CLI (cli_build.py) derives its Typer parameters from these fields; a recipe table becomes the same
dataclass through `Options.from_table`, so a recipe key and a command-line flag cannot differ in
name, type, default or validation. The record of an instance (`record()`) is what manifests,
step fingerprints and `--dry-run` show.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..errors import UnsupportedError

_META = "xquant"


def opt(default: Any, help: str, *, choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
        check: Callable[[Any], str | None] | None = None, flag: str | None = None,
        fingerprint: bool = True, cli: bool = True,
        relative: Callable[[str, Path], str] | None = None) -> Any:
    """A dataclass field carrying what the CLI and the recipe need to know about an option.

    `check(value)` returns an error text (without the option's name) or None; `choices` may be a
    callable so registries are read only when checking; `flag` overrides the derived CLI flag
    (e.g. "--sym/--asym"); `fingerprint=False` for options that do not change the output
    (threads); `cli=False` for options only a recipe or the library sets; `relative(value, base_dir)`
    resolves the path inside a text value (NAME=DIR) against a recipe's folder, as Path options are.
    """
    meta = {"help": help, "choices": choices, "check": check, "flag": flag, "fingerprint": fingerprint, "cli": cli,
            "relative": relative}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (options are frozen)")
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one option is, read off its field."""

    name: str
    type: Any  # the base type: int, float, bool, str, Path
    optional: bool
    many: bool  # tuple[X, ...]: repeatable flag, list in a recipe
    default: Any
    help: str
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None
    check: Callable[[Any], str | None] | None
    flag: str
    fingerprint: bool
    cli: bool
    relative: Callable[[str, Path], str] | None = None

    def allowed(self) -> list[Any] | None:
        c = self.choices
        return list(c() if callable(c) else c) if c is not None else None


def _unwrap(tp: Any) -> tuple[Any, bool, bool]:
    """(base type, optional, many) of an annotation such as `tuple[str, ...] | None`."""
    optional = many = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is tuple:
        many = True
        tp = typing.get_args(tp)[0]
    return tp, optional, many


_TYPE_WORD = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", Path: "a path"}


class Options:
    """Base of every command's frozen options dataclass (see the module doc)."""

    command: ClassVar[str] = ""

    # ------------------------------------------------------------ what the options are

    @classmethod
    def specs(cls) -> list[Spec]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(_META, {})
            base, optional, many = _unwrap(hints[f.name])
            out.append(Spec(f.name, base, optional, many, f.default, meta.get("help", ""), meta.get("choices"),
                            meta.get("check"), meta.get("flag") or "--" + f.name.replace("_", "-"),
                            meta.get("fingerprint", True), meta.get("cli", True), meta.get("relative")))
        return out

    @classmethod
    def keys(cls) -> list[str]:
        return [s.name for s in cls.specs()]

    # ------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        for s in self.specs():
            value = getattr(self, s.name)
            if isinstance(value, list):  # a list from the library or a recipe: options are frozen
                object.__setattr__(self, s.name, tuple(value))
                value = tuple(value)
            problem = _type_problem(s, value)
            if problem is None and value is not None:
                allowed = s.allowed()
                items = value if s.many else (value,)
                bad = [v for v in items if allowed is not None and v not in allowed]
                if bad:
                    problem = f"unknown value '{bad[0]}' (known: {', '.join(map(str, allowed))})"
                elif s.check is not None:
                    problem = s.check(value)
            if problem:
                shown = ",".join(map(str, value)) if s.many and value is not None else value
                raise UnsupportedError(f"{s.flag.split('/')[0]} {shown}: {problem}")
        self.check()

    def check(self) -> None:
        """Checks across options (after each one's own); raise UnsupportedError naming them."""

    # ------------------------------------------------------------ from a recipe

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str, base_dir: Path | None = None,
                   fixed: dict[str, Any] | None = None) -> "Options":
        """The options of a recipe table: unknown keys and wrong types are one line naming `where`,
        the key and the known keys. Relative paths are taken from `base_dir` (the recipe's folder)."""
        specs = {s.name: s for s in cls.specs()}
        values: dict[str, Any] = dict(fixed or {})
        for key, value in table.items():
            s = specs.get(key)
            if s is None:
                raise UnsupportedError(f"{where}: unknown key '{key}' (known: {', '.join(specs)})")
            if s.type is Path and value is not None:
                if s.many and isinstance(value, list):
                    value = [_resolve(v, base_dir) if isinstance(v, str) else v for v in value]
                elif isinstance(value, str):
                    value = _resolve(value, base_dir)
            if s.many and isinstance(value, (str, Path)):
                value = (value,)
            if s.relative is not None and base_dir is not None and value is not None:
                items = value if isinstance(value, (list, tuple)) else [value]
                if all(isinstance(v, str) for v in items):
                    items = [s.relative(v, base_dir) for v in items]
                    value = items if isinstance(value, (list, tuple)) else items[0]
            problem = _type_problem(s, tuple(value) if isinstance(value, list) else value)
            if problem:
                raise UnsupportedError(f"{where}: {key} = {value!r}: {problem}")
            values[key] = value
        try:
            return cls(**values)
        except UnsupportedError as e:
            raise UnsupportedError(f"{where}: {e}") from None

    # ------------------------------------------------------------ records

    def record(self, fingerprint_only: bool = False) -> dict[str, Any]:
        """The options as JSON values (paths as strings, tuples as lists)."""
        out = {}
        for s in self.specs():
            if fingerprint_only and not s.fingerprint:
                continue
            out[s.name] = _json(getattr(self, s.name))
        return out


def _resolve(value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or base_dir is None else (base_dir / p).resolve()


def _json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    return value


def _type_problem(s: Spec, value: Any) -> str | None:
    """Why `value` is not of the option's type, or None."""
    if value is None:
        return None if s.optional else f"needs {_TYPE_WORD.get(s.type, s.type.__name__)}"
    items = value if s.many else (value,)
    if s.many and not isinstance(value, tuple):
        return f"expected a list of {_TYPE_WORD.get(s.type, 'values')}s"
    for v in items:
        if s.type is bool:
            ok = isinstance(v, bool)
        elif s.type is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif s.type is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif s.type is Path:
            ok = isinstance(v, Path)
        else:
            ok = isinstance(v, s.type)
        if not ok:
            return f"expected {_TYPE_WORD.get(s.type, s.type.__name__)}, got {type(v).__name__}"
    return None


# ------------------------------------------------------------ reusable checks

def positive(value: int | float) -> str | None:
    return None if value > 0 else "must be positive"


def at_least(n: int) -> Callable[[int], str | None]:
    return lambda value: None if value >= n else f"must be at least {n}"


def size_text(value: str) -> str | None:
    """A size such as 5GB or 500MB (io.dtypes.parse_size)."""
    from ..io.dtypes import parse_size

    try:
        return None if parse_size(value) > 0 else "must be a positive size"
    except Exception as e:  # noqa: BLE001 - parse_size says what is wrong in its message
        return str(e).split(": ", 1)[-1] or "not a size (e.g. 5GB, 500MB)"


FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32")


def dtype_text(value: str) -> str | None:
    """A floating-point dtype name as config.json spells it (float16, bfloat16, float32; fp16 &c.)."""
    from ..io.dtypes import parse_dtype

    try:
        parse_dtype(value)
    except Exception:  # noqa: BLE001 - parse_dtype's own message lists the known names
        return f"unknown dtype (known: {', '.join(FLOAT_DTYPE_NAMES)})"
    return None
