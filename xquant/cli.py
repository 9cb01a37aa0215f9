"""The `xquant` command line: each command parses options, makes one library call, renders the result.

Errors from the library are typed (errors.py) and rendered here, once: one line on stderr and a
non-zero exit code. XQUANT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import json
import os
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
    err_console.print(f"[bold red]error:[/] {msg.splitlines()[0] if msg else type(e).__name__}", soft_wrap=True)
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
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and memory estimate; write nothing.")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard (e.g. 5GB, 500MB).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float16, bfloat16 or float32.")]


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


def _run_plan(plan, dry_run: bool, as_json: bool, force: bool) -> None:
    """Shared tail of plan-based commands: print the plan (dry run) or execute it."""
    from .pipeline import execute
    from .render import render_plan

    if dry_run:
        if as_json:
            console.print_json(json.dumps(plan.to_json()))
        else:
            render_plan(plan)
        return
    out = execute(plan, force=force)
    console.print(f"[green]wrote[/] {out}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Meta original directory (params.json + consolidated.*.pth) or HF directory.")],
    out: Annotated[Path, typer.Argument(help="Output Hugging Face directory.")],
    dtype: DtypeOpt = None,
    max_shard_size: ShardOpt = "5GB",
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Convert to a Hugging Face safetensors directory, one tensor at a time (Meta -> HF, .bin -> safetensors, re-shard, cast)."""
    from .convert import plan_convert

    _run_plan(plan_convert(src, out, dtype, max_shard_size), dry_run, as_json, force)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo's artifacts go.")] = Path("demo-out"),
) -> None:
    """Run the whole chain on the embedded tiny model (built offline, cached)."""
    from .demo import run_demo

    artifacts = run_demo(workdir)
    console.print(f"[green]demo finished:[/] {len(artifacts)} artifacts in {workdir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
