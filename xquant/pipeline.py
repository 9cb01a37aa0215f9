"""The shared shape of every command: build a plan (pure data), then execute it into artifacts.

A plan lists the output tensors with their shapes and dtypes, a producer for each (a closure that
reads and transforms just what that tensor needs), the side files to write, and a memory estimate.
`--dry-run` prints the plan. `execute` is the one executor of every writing command (HF
directories, GGUF files single and split, GPTQ's resumable layer walk): it owns the output rules
(nesting with inputs, --force replacing only an xquant artifact of the same kind), the long work
before any output is opened (`prepare`: the GPTQ layer walk, an importance matrix), the temporary
siblings renamed into place when complete, disk-full handling, hashing, the manifest, and the
clean-up of a failed run.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .console import progress
from .io.dtypes import dtype_name, human_bytes
from .io.output import ArtifactDir, Provenance, atomic_dir, atomic_file, check_output_path
from .io.pool import BufferPool
from .io.readers import TensorReader
from .io.writer import ShardedWriter, TensorSpec

# Interpreter, torch and library code resident before any tensor is read (measured ~0.4 GiB).
BASE_MEMORY = 512 * 2**20
# Finished outputs held besides the one being made: one queued, one being written.
IN_FLIGHT = 2


@dataclass(frozen=True)
class Output:
    """One path a plan writes: a directory (safetensors checkpoint, report) or a single file (GGUF)."""

    path: Path
    directory: bool = True


class Executable:
    """What `execute` asks of a plan. `provenance` (command, options, inputs) is set by each plan."""

    provenance: Provenance

    def outputs(self) -> list[Output]:
        raise NotImplementedError

    def running(self) -> contextlib.AbstractContextManager:
        """A context held for the whole execution (e.g. a thread setting)."""
        return contextlib.nullcontext()

    def prepare(self, force: bool, resume: bool) -> None:
        """Long work needed before any output is opened (the output paths are checked by then)."""
        if resume:
            from .errors import UnsupportedError

            raise UnsupportedError("--resume: only GPTQ runs keep a state to resume from")

    def write(self, handles: list[ArtifactDir]) -> None:
        """Write every output into its temporary path (`handles`, in `outputs()` order)."""
        raise NotImplementedError

    def abandon(self, interrupted: bool) -> None:
        """Called after a failure, once the temporary outputs are gone: remove what `prepare` left,
        unless an interruption left state that a re-run can continue."""

    def finished(self) -> None:
        """Called once every output is in place (messages about the result)."""

    def result(self) -> Any:
        return self.outputs()[0].path.resolve()


@dataclass
class TensorJob:
    spec: TensorSpec
    produce: Callable[[], torch.Tensor]
    group: int | None = None  # decoder layer; readers are released when the group changes
    source: str = ""  # what it is made from, for the plan table
    # Set when the output bytes equal a range of an input file: copied in-kernel, never decoded.
    passthrough: tuple[Path, int] | None = None
    # For a pass-through: a check of the source bytes (the NaN/inf scan over their mapping), run
    # on the producer thread before the kernel copies them.
    check: Callable[[], None] | None = None


@dataclass
class Plan(Executable):
    title: str
    out: Path
    jobs: list[TensorJob]
    max_shard_size: int
    provenance: Provenance
    json_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    copy_files: list[Path] = field(default_factory=list)
    readers: list[TensorReader] = field(default_factory=list)
    working_factor: float = 3.0  # input copy + float32 working copy + output, per tensor
    # Output buffers reused from tensor to tensor (see io/pool.py); producers that use it
    # must not keep their output after returning it.
    pool: BufferPool | None = None
    notes: list[str] = field(default_factory=list)
    allow_nonfinite: bool = False  # NaN/inf weights pass instead of being refused (io/finite.py)

    @property
    def output_bytes(self) -> int:
        return sum(j.spec.nbytes for j in self.jobs)

    def estimated_output_bytes(self) -> int:
        """The artifact's size on disk: tensor data and side files (shard headers aside)."""
        return (self.output_bytes + sum(len(_json_text(o).encode()) for o in self.json_files.values())
                + sum(p.stat().st_size for p in self.copy_files if p.exists()))

    def temporary_bytes(self) -> int:
        """Disk written and removed again during execution (none: outputs are written once)."""
        return 0

    def peak_memory_estimate(self) -> int:
        """The largest tensor being made times the working factor, two more outputs in flight
        (one queued, one being written: see `_produced`), plus the resident base."""
        largest = max((j.spec.nbytes for j in self.jobs), default=0)
        largest_f32 = max((j.spec.nbytes * 4 // max(1, j.spec.dtype.itemsize) for j in self.jobs), default=0)
        return int(BASE_MEMORY + (1 + IN_FLIGHT) * largest + (self.working_factor - 1) * largest_f32 / 2)

    def rows(self) -> list[dict[str, Any]]:
        return [{"tensor": j.spec.name, "shape": "x".join(map(str, j.spec.shape)),
                 "dtype": dtype_name(j.spec.dtype), "bytes": f"{j.spec.nbytes:,}", "from": j.source}
                for j in self.jobs]

    def summary(self) -> dict[str, Any]:
        out = {
            "output": str(self.out),
            "tensors": len(self.jobs),
            "output size": human_bytes(self.output_bytes),
            "estimated peak memory": human_bytes(self.peak_memory_estimate()),
            "side files": ", ".join([*self.json_files, *(p.name for p in self.copy_files)]) or "-",
        }
        for i, note in enumerate(self.notes):
            out[f"note {i + 1}"] = note
        return out

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "summary": self.summary(), "tensors": self.rows()}

    def outputs(self) -> list[Output]:
        return [Output(self.out, directory=True)]

    def write(self, handles: list[ArtifactDir]) -> None:
        art = handles[0]
        write_jobs(art.path, self, art.hashes)
        self.check_written(art.path, art.hashes)

    def check_written(self, directory: Path, hashes: dict[str, str]) -> None:
        """Called inside the temporary output before it is renamed into place: raising here
        leaves nothing behind."""


def execute(plan: Executable, force: bool = False, resume: bool = False) -> Any:
    """Carry out any plan: check every output path, prepare, write each output into a temporary
    sibling, add its manifest and rename it into place; on failure nothing is left (see
    `Executable.abandon` for resumable state). Returns `plan.result()`."""
    outputs = plan.outputs()
    for o in outputs:  # refuse before any long computation
        check_output_path(o.path, plan.provenance.inputs, force, plan.provenance.command)
    try:
        with plan.running():
            plan.prepare(force=force, resume=resume)
            with contextlib.ExitStack() as stack:
                handles = [stack.enter_context((atomic_dir if o.directory else atomic_file)(
                    o.path, plan.provenance, force)) for o in outputs]
                plan.write(handles)
    except KeyboardInterrupt:
        plan.abandon(interrupted=True)
        raise
    except BaseException:
        plan.abandon(interrupted=False)
        raise
    plan.finished()
    return plan.result()


_DONE = object()


def _produced(plan: Plan, stop: threading.Event) -> Iterator[tuple[TensorJob, torch.Tensor | None]]:
    """The jobs with their tensors, made one tensor ahead on a worker thread.

    While the writer copies tensor N into the page cache (pwrite releases the GIL), the worker
    already reads and transforms tensor N+1, so on two cores the transform and the write overlap.
    Only the worker touches the readers, in job order, releasing them between layers; at most one
    finished tensor waits in the queue, which keeps the memory bound at a few tensors.
    """
    q: queue.Queue = queue.Queue(maxsize=1)

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            current_group = None
            for job in plan.jobs:
                if job.group != current_group:
                    for r in plan.readers:
                        r.release()
                    current_group = job.group
                if job.passthrough is not None:
                    tensor = None
                    if job.check is not None:
                        job.check()
                else:
                    tensor = job.produce()
                if not put((job, tensor)):
                    return
                del tensor
            for r in plan.readers:
                r.release()
            put(_DONE)
        except BaseException as e:  # re-raised on the writer's thread, with its own type and message
            put(e)

    worker = threading.Thread(target=work, name="xquant-produce", daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def write_jobs(directory: Path, plan: Plan, hashes: dict[str, str]) -> None:
    writer = ShardedWriter(directory, [j.spec for j in plan.jobs], plan.max_shard_size)
    stop = threading.Event()
    try:
        with progress(plan.title, total=len(plan.jobs)) as advance:
            for job, tensor in _produced(plan, stop):
                if job.passthrough is not None:
                    writer.add_range(job.spec.name, job.spec, *job.passthrough)
                else:
                    writer.add(job.spec.name, tensor)
                    if plan.pool is not None:
                        plan.pool.recycle(tensor)  # written to the file: its buffer is free again
                del tensor
                advance()
        hashes.update(writer.close())
    except BaseException:
        stop.set()
        writer.abort()
        raise
    write_side_files(plan, directory)


def _json_text(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_side_files(plan: Plan, directory: Path, place: Callable[[Path, Path], Any] = shutil.copy2) -> None:
    """The plan's JSON files, and its copied files put in place by `place(src, dst)`."""
    for name, obj in plan.json_files.items():
        (directory / name).write_text(_json_text(obj))
    for src in plan.copy_files:
        place(src, directory / src.name)
