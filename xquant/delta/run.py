"""The delta plans and their execution, with `--expect-sha256` checked before the output appears.

`DeltaPlan` is a `pipeline.Plan` with two additions: the sha256 values the result must have
(checked through the plan's `check_written` hook, inside the atomic output directory, so a
mismatch leaves nothing behind) and an exact memory estimate (inputs + output of the largest
tensor + the float32 chunk). It runs through `pipeline.execute` like every other plan.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import info
from ..errors import InputError
from ..io.hashing import sha256_file
from ..io.output import MANIFEST_NAME
from ..io.writer import INDEX_NAME, assign_shards
from ..pipeline import BASE_MEMORY, IN_FLIGHT, Plan
from .arith import CHUNK_ELEMENTS, one_thread

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_GNU_LINE = re.compile(r"^\\?([0-9a-fA-F]{64})\s+[* ]?(.+)$")  # sha256sum: "HASH  name" / "HASH *name"
_BSD_LINE = re.compile(r"^SHA256\s*\((.+)\)\s*=\s*([0-9a-fA-F]{64})$")  # shasum --tag / BSD sha256


@dataclass
class DeltaPlan(Plan):
    expected: dict[str, str] | None = None  # output file name -> sha256
    expected_source: Path | None = None
    inflight_bytes: int = 0  # the largest tensor's inputs + output, held at once
    record: dict[str, Any] | None = None  # make-delta: the xquant-delta.json being filled in

    def peak_memory_estimate(self) -> int:
        largest_output = max((j.spec.nbytes for j in self.jobs), default=0)  # queued or being written
        return int(BASE_MEMORY + self.inflight_bytes + IN_FLIGHT * largest_output + 3 * 4 * CHUNK_ELEMENTS)

    def running(self):
        return one_thread()

    def check_written(self, directory: Path, hashes: dict[str, str]) -> None:
        if self.expected:
            verify_written(directory, hashes, self.expected, self.expected_source)

    def finished(self) -> None:
        if self.expected:
            info(f"sha256 of {len(self.expected)} file(s) match {self.expected_source}")
        if self.record is not None:
            trip = self.record["round_trip"]
            if trip["exact"]:
                zeros = trip.get("signed_zero_elements", 0)
                info(f"round trip: base + delta reproduces all {trip['elements']:,} target values"
                     + (f" ({zeros} negative zeros come back as +0.0)" if zeros else " bit for bit"))
            else:
                info(f"round trip: {trip['inexact_elements']:,} of {trip['elements']:,} target values are not "
                     f"reproduced bit for bit (largest error {trip['max_abs_error']:.3g}; see {self.out}/xquant-delta.json)")


def read_expected(path: Path) -> dict[str, str]:
    """sha256 values by file name from sha256sum-style lines, BSD-style lines, or JSON.

    JSON may be {"file": "hash"} or an xquant manifest (its "outputs"). Directory parts of the
    names are dropped: the result is one flat directory.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    pairs: list[tuple[str, str]] = []
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj.get("outputs"), list):
            pairs = [(str(r.get("path", "")), str(r.get("sha256", ""))) for r in obj["outputs"] if isinstance(r, dict)]
        else:
            pairs = [(str(k), str(v)) for k, v in obj.items()]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if m := _GNU_LINE.match(line):
                pairs.append((m.group(2).strip(), m.group(1)))
            elif m := _BSD_LINE.match(line):
                pairs.append((m.group(1).strip(), m.group(2)))
            else:
                raise InputError(f"{path}:{n}: not a sha256 line (expected 'HASH  filename')")
    expected: dict[str, str] = {}
    for name, digest in pairs:
        if not _HEX64.match(digest):
            raise InputError(f"{path}: '{digest}' for {name} is not a sha256 (64 hex digits)")
        base = Path(name.replace("\\", "/")).name
        if expected.get(base, digest.lower()) != digest.lower():
            raise InputError(f"{path}: lists two different hashes for {base}")
        expected[base] = digest.lower()
    expected.pop(MANIFEST_NAME, None)  # records the time of the run: never reproducible
    if not expected:
        raise InputError(f"{path}: holds no sha256 values")
    return expected


def planned_files(plan: Plan) -> list[str]:
    """The names of the files `write_jobs` will create for this plan."""
    n = len(assign_shards([j.spec for j in plan.jobs], plan.max_shard_size))
    shards = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [*shards, *([INDEX_NAME] if n > 1 else []), *plan.json_files, *(p.name for p in plan.copy_files)]


def check_expected_names(expected: dict[str, str], plan: Plan, source: Path) -> None:
    files = planned_files(plan)
    for name in expected:
        if name not in files:
            hint = " (xquant writes safetensors: hashes of .bin files cannot be checked)" if name.endswith(".bin") else ""
            raise InputError(f"{source}: lists '{name}', which the result will not contain{hint}; "
                             f"it will hold {', '.join(files)}")


def verify_written(directory: Path, known: dict[str, str], expected: dict[str, str], source: Path) -> None:
    for name, want in expected.items():
        got = known.get(name) or sha256_file(directory / name)
        if got != want:
            raise InputError(f"{name}: sha256 {got[:16]}… of the result differs from {want[:16]}… listed in "
                             f"{source}; nothing was written")
