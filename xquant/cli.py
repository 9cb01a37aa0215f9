"""The `xquant` command line: each command parses options, makes one library call, renders the result.

Errors from the library are typed (errors.py) and rendered here, once: one line on stderr and a
non-zero exit code. XQUANT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import inspect as pyinspect
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .console import console, err_console
from .errors import XQuantError


class _App(typer.Typer):
    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - this is the one place errors are rendered
            sys.exit(render_error(e))


def render_error(e: BaseException) -> int:
    """Print one line for an exception and return the exit code."""
    if os.environ.get("XQUANT_DEBUG") == "1":
        import traceback

        traceback.print_exception(e)
    if isinstance(e, XQuantError):
        msg, code = str(e), e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        msg, code = "interrupted (partial outputs were removed)", 130
    elif isinstance(e, MemoryError):
        msg, code = "out of memory (try --dry-run to see the estimate)", 6
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg, code = f"{e.filename or 'output'}: disk full ({e.strerror})", 4
    elif isinstance(e, OSError):
        msg, code = f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 2
    else:
        msg, code = f"internal error: {type(e).__name__}: {e} (XQUANT_DEBUG=1 shows the traceback)", 70
    from rich.markup import escape  # messages hold brackets (pip install 'xquant[llamacpp]')

    err_console.print(f"[bold red]error:[/] {escape(msg.splitlines()[0]) if msg else type(e).__name__}", soft_wrap=True)
    return code


app = _App(
    name="xquant",
    help="Convert and quantize LLaMA-family checkpoints: HF, delta, LLM.int8, NF4, GPTQ, GGUF, reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Reusable option types keep command signatures short.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and memory estimate; write nothing.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"xquant {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """xquant: every deployable artifact from one LLaMA-family checkpoint, streamed."""


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="HF directory, Meta directory or GGUF file.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what a checkpoint is: architecture, sizes, dtypes, quantization, tensors."""
    from .inspect import inspect_path
    from .render import render_inspect

    info = inspect_path(path, tensors=tensors)
    if as_json:
        console.print_json(json.dumps(info))
    else:
        render_inspect(info)


def _option_param(spec) -> pyinspect.Parameter:
    """A Typer parameter from an option's field (commands/options.py)."""
    flags = spec.flag.split("/") if "/" in spec.flag and spec.type is bool else [spec.flag]
    decl = ["/".join(flags)] if len(flags) > 1 else flags
    base = spec.type
    if spec.many:
        annotation = Optional[list[base]]
        default = None  # the field's default applies when the flag is not given
    else:
        annotation = Optional[base] if spec.optional else base
        default = spec.default
    return pyinspect.Parameter(spec.name, pyinspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(*decl, help=spec.help)])


def _input_param(inp) -> pyinspect.Parameter:
    annotation = list[Path] if inp.many else Path
    marker = typer.Option(inp.flag, help=inp.help) if inp.flag else typer.Argument(help=inp.help)
    return pyinspect.Parameter(inp.name, pyinspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, marker])


_FLAGS = {
    "dry_run": (bool, typer.Option("--dry-run", help="Print the plan and memory estimate; write nothing.")),
    "as_json": (bool, typer.Option("--json", help="Print machine-readable JSON.")),
    "force": (bool, typer.Option("--force", help="Replace an existing output made by the same xquant command "
                                                 "(never anything else).")),
    "resume": (bool, typer.Option("--resume", help="Continue an interrupted run from its saved state.")),
}


def _register(cmd) -> None:
    """Add one registered command to the Typer app, its parameters derived from its inputs and options."""
    specs = [s for s in cmd.options.specs() if s.cli]
    flags = (["dry_run", "as_json", "force"] if cmd.writes else ["as_json"]) + (["resume"] if cmd.resumable else [])
    params = [_input_param(i) for i in cmd.inputs] + [_option_param(s) for s in specs]
    params += [pyinspect.Parameter(f, pyinspect.Parameter.KEYWORD_ONLY, default=False,
                                 annotation=Annotated[_FLAGS[f][0], _FLAGS[f][1]]) for f in flags]

    def handler(**values):
        invoke(cmd, values)

    handler.__signature__ = pyinspect.Signature(params)
    handler.__annotations__ = {p.name: p.annotation for p in params}
    handler.__doc__ = cmd.help
    handler.__name__ = cmd.name.replace("-", "_")
    app.command(cmd.name)(handler)


def invoke(cmd, values: dict) -> None:
    """Options from the parsed values (the same validation a recipe gets), then plan and run or print."""
    from .commands import DRY_RUN, RUN
    from .render import render_plan

    inputs = {i.name: values.pop(i.name) for i in cmd.inputs}
    flags = {f: values.pop(f, False) for f in _FLAGS}
    given = {k: v for k, v in values.items() if v is not None or not _is_many(cmd, k)}
    options = cmd.options(**given)
    dry_run = flags["dry_run"]
    plan = cmd.make_plan(inputs, options, DRY_RUN if dry_run else RUN)
    if dry_run:
        if flags["as_json"]:
            console.print_json(json.dumps({**plan.to_json(), "options": options.record()}))
        else:
            render_plan(plan)
            from rich.markup import escape

            console.print(f"[bold]options:[/] {escape(json.dumps(options.record()))}", soft_wrap=True)
        return
    result = cmd.run(plan, flags["force"], flags["resume"])
    if flags["as_json"] and not cmd.writes:
        console.print_json(json.dumps(result))
    else:
        cmd.show(result)


def _is_many(cmd, name: str) -> bool:
    return any(s.name == name and s.many for s in cmd.options.specs())


def _register_all() -> None:
    from .commands import all_commands

    for cmd in all_commands():
        _register(cmd)


_register_all()


@app.command("run")
def run_recipe_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe (TOML): source, optional delta, artifacts, report.")],
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the artifacts go.")] = Path("xquant-out"),
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a whole chain from one recipe; steps already done with the same inputs are skipped."""
    from .recipe import load_recipe, plan_recipe, run_recipe
    from .render import render_plan

    plan = plan_recipe(load_recipe(recipe), workdir, base_dir=recipe.resolve().parent)
    if dry_run:
        if as_json:
            console.print_json(json.dumps({"summary": plan.summary(), "steps": plan.rows()}))
        else:
            render_plan(plan)
        return
    outputs = run_recipe(plan)
    for name, path in outputs.items():
        console.print(f"[green]{name}[/] {path}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo's artifacts go.")] = Path("demo-out"),
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole chain on the embedded tiny model: Meta -> HF -> delta -> int8/NF4/GPTQ/GGUF -> report."""
    from .demo import plan_demo, run_demo

    if dry_run:
        plan = plan_demo(workdir)
        if as_json:
            console.print_json(json.dumps({"summary": plan.summary(), "steps": plan.rows()}))
        else:
            from .render import render_plan

            render_plan(plan)
        return
    outputs = run_demo(workdir)
    if "report" in outputs:
        console.print((outputs["report"] / "report.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"[green]demo finished:[/] {len(outputs)} outputs in {workdir} (recipe: {workdir / 'recipe.toml'})")


def _terminate(signum, frame) -> None:
    """SIGTERM (a scheduler ending the job) unwinds like Ctrl-C: temporary outputs are removed and
    a GPTQ run keeps its resume state."""
    raise KeyboardInterrupt


def main() -> None:
    """The console script: run the app, then leave without the interpreter's clean-up."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    exit_now(code)


def exit_now(code: int) -> None:
    """Flush logging and the standard streams, then end the process at once.

    Every output is closed and renamed into place by then; what the interpreter's finalization
    would still do is free torch's and transformers' module objects one by one, 0.5-0.8 s
    measured here on every command.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

if __name__ == "__main__":
    main()
