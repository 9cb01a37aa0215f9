"""The one rich Console of xquant: tables, progress bars and error lines go through here."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def quiet() -> bool:
    """Progress bars are hidden when XQUANT_QUIET=1 (tests, scripted runs)."""
    return os.environ.get("XQUANT_QUIET", "") == "1"


@contextlib.contextmanager
def progress(description: str, total: float | None) -> Iterator["Advance"]:
    """A progress bar on stderr; yields a callable `advance(n=1, description=None)`."""
    if quiet():
        yield Advance(None, None)
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield Advance(bar, task)


class Advance:
    def __init__(self, bar: Progress | None, task):
        self._bar, self._task = bar, task

    def __call__(self, n: float = 1, description: str | None = None) -> None:
        if self._bar is not None:
            kwargs = {"description": description} if description else {}
            self._bar.update(self._task, advance=n, **kwargs)


def info(message: str) -> None:
    """A status line on stderr (so stdout stays clean for --json)."""
    if not quiet():
        err_console.print(message)
