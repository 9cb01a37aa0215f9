"""Atomic outputs and provenance manifests.

Every artifact is built in a temporary sibling (`.NAME.xquant-tmp`) and renamed into place only
when complete, so an interrupted run never leaves something that looks whole. The manifest
(`xquant-manifest.json`, or `NAME.xquant-manifest.json` beside a single-file artifact) records
what made it: xquant version, command, options, and sha256 of every input and output file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..errors import DiskFullError, OutputError
from .hashing import sha256_cached_many, sha256_file

MANIFEST_NAME = "xquant-manifest.json"


def check_output_path(target: Path, inputs: list[Path], force: bool, command: str | None = None) -> Path:
    """Refuse outputs that would overwrite or nest with an input, or replace what is already there.

    With `force`, an existing target is replaced only when it is an xquant artifact made by the
    same command (its manifest says so): xquant never deletes or replaces a file or folder it did
    not write. `command=None` checks only the nesting (planners call it before execution)."""
    target = target.expanduser().resolve()
    for inp in inputs:
        inp = inp.expanduser().resolve()
        if target == inp:
            raise OutputError(f"{target}: the output is the input; choose another output path")
        if inp.is_dir() and inp in target.parents:
            raise OutputError(f"{target}: the output would be written inside the input directory {inp}")
        if inp in target.parents or (target in inp.parents):
            raise OutputError(f"{target}: the output would contain the input {inp}")
    if command is not None and (target.exists() or target.is_symlink()):
        if not force:
            raise OutputError(f"{target}: already exists (use --force to replace it)")
        made_by = artifact_command(target)
        if made_by is None:
            raise OutputError(f"{target}: exists and was not written by xquant (no manifest); "
                              f"it is never replaced, --force included: choose another output path")
        if made_by != command:
            raise OutputError(f"{target}: exists and is a '{made_by}' artifact, not '{command}'; "
                              f"--force replaces only an artifact of the same kind")
        if foreign := foreign_files(target):
            raise OutputError(f"{target}: holds {len(foreign)} file(s) xquant did not write (first: "
                              f"{foreign[0]}); it is never replaced, --force included: move them first")
    if not target.parent.exists():
        raise OutputError(f"{target.parent}: the output's parent directory does not exist")
    return target


def foreign_files(artifact: Path) -> list[str]:
    """Files inside an xquant artifact directory that its manifest does not list (a user's notes)."""
    if not artifact.is_dir():
        return []
    listed = {o.get("path") for o in (read_manifest(artifact) or {}).get("outputs", []) if isinstance(o, dict)}
    listed.add(MANIFEST_NAME)
    return sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(artifact).as_posix() not in listed)


def artifact_command(path: Path) -> str | None:
    """The command that made an xquant artifact at `path` (its manifest), or None for anything else.

    A directory is xquant's when it holds a manifest; a file when its sidecar manifest names it as
    the output. A symlink is never treated as an artifact (replacing it would act on its target's
    name, which xquant did not choose)."""
    if path.is_symlink():
        return None
    m = read_manifest(path)
    if not m or not isinstance(m.get("command"), str):
        return None
    if path.is_file():
        outs = m.get("outputs") or []
        if not any(isinstance(o, dict) and o.get("path") == path.name for o in outs):
            return None
    elif not path.is_dir():
        return None
    return m["command"]


def temp_path_for(target: Path) -> Path:
    return target.parent / f".{target.name}.xquant-tmp"


@dataclass
class Provenance:
    """What goes into a manifest besides the output hashes."""

    command: str
    options: dict[str, Any] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def input_records(self) -> list[dict[str, Any]]:
        files: list[Path] = []
        for root in self.inputs:
            found = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            files += [p for p in found if not (p.name.startswith(".") or MANIFEST_NAME in p.name)]
        digests = sha256_cached_many(files)
        return [{"path": str(p.resolve()), "size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)]


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_manifest(prov: Provenance, files: list[Path], root: Path,
                   known_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    known_hashes = known_hashes or {}
    outputs = []
    for p in files:
        rel = p.relative_to(root).as_posix() if p != root else p.name
        digest = known_hashes.get(rel) or sha256_file(p)
        outputs.append({"path": rel, "size": p.stat().st_size, "sha256": digest})
    return {
        "xquant_version": __version__,
        "command": prov.command,
        "options": jsonable(prov.options),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": prov.input_records(),
        "outputs": outputs,
        **jsonable(prov.extra),
    }


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.xquant-old"
        _remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class ArtifactDir:
    """Handle given to the body of `atomic_dir` / `atomic_file`: the temporary path to write, and
    the sha256 of files already hashed while written (by file name), so they are not read again."""

    def __init__(self, path: Path):
        self.path = path
        self.hashes: dict[str, str] = {}


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Any failure removes the temporary output; a full disk becomes a DiskFullError naming it."""
    try:
        yield
    except OSError as e:
        _remove(tmp)
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise DiskFullError(f"{target}: disk full while writing ({e.strerror})") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, prov: Provenance, force: bool = False) -> Iterator[ArtifactDir]:
    """Build a directory artifact in a temp sibling; manifest + rename on success, cleanup on error."""
    target = check_output_path(target, prov.inputs, force, prov.command)
    tmp = temp_path_for(target)
    _remove(tmp)  # a leftover from a crashed run: ours by name
    tmp.mkdir()
    art = ArtifactDir(tmp)
    with _removed_on_failure(tmp, target):
        yield art
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = build_manifest(prov, files, tmp, art.hashes)
        _write_json(tmp / MANIFEST_NAME, manifest)
        _replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: Path, prov: Provenance, force: bool = False) -> Iterator[ArtifactDir]:
    """Like atomic_dir for a single-file artifact (GGUF); the manifest is a sidecar file.

    A writer that hashed the file while writing it puts the sha256 in the handle's `hashes` under
    the temporary file's name; otherwise the finished file is read once to hash it."""
    target = check_output_path(target, prov.inputs, force, prov.command)
    tmp = temp_path_for(target)
    sidecar = target.parent / f"{target.name}.{MANIFEST_NAME}"
    _remove(tmp)
    art = ArtifactDir(tmp)
    with _removed_on_failure(tmp, target):
        yield art
        manifest = build_manifest(prov, [tmp], tmp.parent, art.hashes)
        manifest["outputs"][0]["path"] = target.name
        side_tmp = temp_path_for(sidecar)
        _write_json(side_tmp, manifest)
        _replace(tmp, target)
        os.replace(side_tmp, sidecar)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_manifest(artifact: Path) -> dict[str, Any] | None:
    """The manifest of a directory or single-file artifact, or None."""
    p = artifact / MANIFEST_NAME if artifact.is_dir() else artifact.parent / f"{artifact.name}.{MANIFEST_NAME}"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
