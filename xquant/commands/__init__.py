"""The command registry: every command of xquant is one `Command` object, registered once.

A command names its inputs (paths), its typed options (options.py), a planner that turns
inputs + options into a plan (a pure value `--dry-run` prints), how the plan is carried out (by
default the one executor, pipeline.execute) and how the result is shown. The Typer CLI (cli.py) and
the recipe runner (recipe.py) are both built from these objects, so they cannot drift apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UnsupportedError
from ..io.output import jsonable
from .options import Options

# The modules that register commands, in the order `xquant --help` lists them.
_MODULES = ("convert", "delta", "bnb", "gptq", "gguf", "report")

# What a plan is made for: running it, printing it (--dry-run), or sizing a recipe step whose input
# is a stand-in with the real shapes but no values (checks that read tensor values are skipped).
RUN, DRY_RUN, STAND_IN = "run", "dry-run", "stand-in"


@dataclass(frozen=True)
class Input:
    """A path the command reads (or, for `out`, writes): a positional argument or a named option."""

    name: str
    help: str
    flag: str | None = None  # "--base": a named option; None: positional
    many: bool = False  # several paths (report's artifacts)


def _execute(plan: Any, force: bool, resume: bool) -> Any:
    from ..pipeline import execute

    return execute(plan, force=force, resume=resume)


def _show_written(result: Any) -> None:
    from ..console import console

    console.print(f"[green]wrote[/] {result}")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: type[Options]
    inputs: tuple[Input, ...]
    # plan(inputs by name, options, mode): the command's plan; mode is RUN, DRY_RUN or STAND_IN.
    plan: Callable[[dict[str, Any], Any, str], Any]
    run: Callable[[Any, bool, bool], Any] = _execute  # (plan, force, resume) -> result
    show: Callable[[Any], None] = _show_written
    artifact_name: Callable[[Any], str] | None = None  # a recipe's default output name; None: not an artifact kind
    source: str = "model"  # the input a recipe's previous step feeds
    writes: bool = True  # has --force and --dry-run
    resumable: bool = False  # has --resume

    def make_plan(self, inputs: dict[str, Any], options: Options, mode: str = RUN) -> Any:
        """The plan, with every option recorded in its provenance.

        The manifest's `options` are exactly the command's options as given (the CLI's flags, a
        recipe's keys), so they can be typed again to make the same artifact. What the planner
        worked out from the inputs (a default dtype read from the config, the source format, a
        size in bytes) and differs from them goes under `resolved`."""
        plan = self.plan(inputs, options, mode)
        prov = getattr(plan, "provenance", None)
        if prov is not None:
            asked = options.record()
            resolved = {k: v for k, v in prov.options.items()
                        if k not in asked or jsonable(v) != jsonable(asked[k])}
            prov.options = asked
            if resolved:
                prov.extra["resolved"] = {**prov.extra.get("resolved", {}), **resolved}
        return plan


_REGISTRY: dict[str, Command] = {}


def command(cmd: Command) -> Command:
    """Register a command (one call per command, in its module)."""
    if cmd.name in _REGISTRY:
        raise RuntimeError(f"command '{cmd.name}' registered twice")
    if cmd.options.command != cmd.name:
        raise RuntimeError(f"{cmd.options.__name__}.command is '{cmd.options.command}', not '{cmd.name}'")
    _REGISTRY[cmd.name] = cmd
    return cmd


def _load() -> dict[str, Command]:
    if not _REGISTRY:
        for name in _MODULES:
            importlib.import_module(f"{__name__}.{name}")
    return _REGISTRY


def all_commands() -> list[Command]:
    return list(_load().values())


def get(name: str) -> Command:
    try:
        return _load()[name]
    except KeyError:
        raise UnsupportedError(f"unknown command '{name}' (known: {', '.join(_load())})") from None


def artifact_kinds() -> dict[str, Command]:
    """The commands a recipe's `[[artifact]]` can name (`kind = "..."`)."""
    return {n: c for n, c in _load().items() if c.artifact_name is not None}
