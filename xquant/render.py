"""Rendering library results as rich tables (the CLI's output side)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .console import console
from .io.dtypes import human_bytes


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("size_on_disk",) or key.endswith("_bytes"):
        return f"{human_bytes(value)} ({value:,} B)"
    if key == "parameters":
        return f"{value:,} ({value / 1e6:.2f} M)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_inspect(info: dict[str, Any]) -> None:
    table = Table(title=info["path"], show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in info.items():
        if key in ("path", "tensors"):
            continue
        table.add_row(key.replace("_", " "), _fmt(key, value))
    console.print(table)
    if "tensors" in info:
        t = Table(title="tensors")
        for col in ("name", "shape", "dtype", "bytes"):
            t.add_column(col, justify="right" if col == "bytes" else "left")
        for row in info["tensors"]:
            t.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"], f"{row['bytes']:,}")
        console.print(t)


def render_plan(plan) -> None:
    """Any plan object with `rows()` (list of dicts), `title` and `summary()` (dict)."""
    table = Table(title=plan.title)
    rows = plan.rows()
    if rows:
        for col in rows[0]:
            table.add_column(col)
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
    for key, value in plan.summary().items():
        console.print(f"[bold]{key}:[/] {value}")


def render_gptq(result) -> None:
    """A GPTQResult: per-layer time and objective, then where the artifact went."""
    if result.layers:
        table = Table(title=f"gptq ({result.engine})")
        for col in ("layer", "seconds", "mean loss", "max damp"):
            table.add_column(col, justify="right")
        for row in result.layers:
            linears = row.get("linears", {}).values()
            losses = [v["loss"] for v in linears]
            table.add_row(str(row["layer"]), f"{row['seconds']:.1f}",
                          f"{sum(losses) / max(1, len(losses)):.4g}",
                          f"{max((v['damp'] for v in linears), default=0):g}")
        console.print(table)
    if getattr(result, "experts", None):
        x = result.experts
        console.print(f"experts by round-to-nearest: {x['rtn']} of {x['total']} "
                      f"(fewer than {x['min_tokens']} calibration tokens routed to them)")
    resumed = f", resumed at layer {result.resumed_at}" if result.resumed_at else ""
    console.print(f"[green]wrote[/] {result.out} ({result.engine}, {result.seconds:.1f} s{resumed})")
