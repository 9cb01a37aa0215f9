"""Model cards (`xquant report --model-card`): a README.md in each artifact, in the Hugging Face
model-card convention, so a published quantization says what it is, how to load it, how it was
made and how it scored.

The card goes into the artifact directory (beside a GGUF file: NAME.README.md) and is added to the
artifact's manifest outputs with its sha256, so `--force` can still replace the artifact (it
refuses directories holding files the manifest does not list). A README.md that xquant did not
write (no MARK line) is never replaced: the report notes it and moves on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .io.hashing import sha256_file
from .io.output import MANIFEST_NAME, read_manifest

MARK = "<!-- xquant:model-card (written by `xquant report --model-card`; replaced only while this line is here) -->"

_LIBRARY = {"gguf": "gguf"}
_TAGS = {"hf": [], "int8": ["bitsandbytes", "8-bit"], "nf4": ["bitsandbytes", "4-bit", "nf4"],
         "gptq": ["gptq", "4-bit"], "gguf": ["gguf"]}
_INSTALL = {"hf": "transformers accelerate", "int8": "transformers accelerate bitsandbytes",
            "nf4": "transformers accelerate bitsandbytes", "gptq": "transformers accelerate optimum gptqmodel",
            "gguf": "llama-cpp-python"}


def card_path(artifact: Path) -> Path:
    return artifact / "README.md" if artifact.is_dir() else artifact.parent / f"{artifact.stem}.README.md"


def _manifest_path(artifact: Path) -> Path:
    return artifact / MANIFEST_NAME if artifact.is_dir() else artifact.parent / f"{artifact.name}.{MANIFEST_NAME}"


def _load_snippet(kind: str, artifact: Path) -> str:
    if kind == "gguf":
        return (f'from llama_cpp import Llama\n'
                f'llm = Llama(model_path="{artifact.name}")')
    return (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
            f'model = AutoModelForCausalLM.from_pretrained("{artifact.name}", device_map="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{artifact.name}")')


Table = Callable[[dict[str, Any]], list[str]]  # report -> markdown table lines (report.publisher_table)


def render_card(report: dict[str, Any], row: dict[str, Any], publisher_table: Table) -> str:
    """The card of one artifact row of a report; the table shows the reference's row and this one."""
    import yaml

    artifact, kind = Path(row["path"]), row["kind"]
    ref = next(r for r in report["artifacts"] if r["role"] == "reference")
    tags = ["xquant", "quantized", *_TAGS.get(kind, [])]
    if kind == "gguf" and (row.get("made_by") or {}).get("options", {}).get("outtype"):
        tags.append(row["made_by"]["options"]["outtype"])
    front = {"base_model": ref["name"], "base_model_relation": "quantized",
             "library_name": _LIBRARY.get(kind, "transformers"), "tags": tags, "quantized_by": "xquant"}
    m = read_manifest(artifact) or {}
    made = [f"- command: `xquant {m['command']}` (xquant {m.get('xquant_version', '?')}, {m.get('created', '')})"
            if m.get("command") else "- no xquant manifest beside this artifact"]
    if m.get("options"):
        made += ["- options:", "", "```json", json.dumps(m["options"], indent=2, ensure_ascii=False), "```", ""]
    calib = m.get("calibration")
    made.append(f"- calibration fingerprint: `{json.dumps(calib, ensure_ascii=False)}`" if calib
                else "- calibration: none (no calibration data was used)")
    if m.get("inputs"):
        made.append(f"- made from {len(m['inputs'])} input files, sha256 of each in `{_manifest_path(artifact).name}`")
    table = publisher_table({**report, "artifacts": [ref, row] if row is not ref else [ref]})
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", MARK, "",
        f"# {row['name']}", "",
        f"{row.get('format', kind)} quantization of `{ref['name']}`, made and evaluated by xquant.", "",
        "## How to load", "", f"`pip install {_INSTALL.get(kind, 'transformers')}`, then:", "",
        "```python", _load_snippet(kind, artifact), "```", "",
        "## How it was made", "", *made, "",
        "## Evaluation", "", f"Against the reference `{ref['name']}`, evaluated in the consumer's runtime "
        f"({row.get('engine', '?')}); accuracy by the first predicted token over A/B/C/D.", "", *table, "",
    ]
    return "\n".join(lines)


def _list_in_manifest(artifact: Path, card: Path) -> bool:
    """Add (or refresh) the card in the artifact's manifest outputs; False when it has no manifest."""
    mpath = _manifest_path(artifact)
    m = read_manifest(artifact)
    if m is None:
        return False
    rel = card.relative_to(artifact).as_posix() if artifact.is_dir() else card.name
    outs = [o for o in m.get("outputs") or [] if not (isinstance(o, dict) and o.get("path") == rel)]
    outs.append({"path": rel, "size": card.stat().st_size, "sha256": sha256_file(card)})
    m["outputs"] = outs
    tmp = mpath.parent / f".{mpath.name}.xquant-tmp"
    tmp.write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, mpath)
    return True


def write_model_cards(report: dict[str, Any], publisher_table: Table) -> list[dict[str, Any]]:
    """Write a card for every evaluated artifact; returns what was done with each."""
    done = []
    for row in report["artifacts"]:
        if row["role"] != "artifact" or "error" in row:
            continue
        artifact = Path(row["path"])
        path = card_path(artifact)
        entry = {"artifact": row["name"], "path": str(path), "written": False}
        if path.exists() and MARK not in path.read_text(encoding="utf-8", errors="replace"):
            done.append({**entry, "note": f"{path.name} was not written by xquant; left untouched"})
            continue
        path.write_text(render_card(report, row, publisher_table), encoding="utf-8")
        listed = _list_in_manifest(artifact, path)
        done.append({**entry, "written": True,
                     "note": "listed in the artifact's manifest" if listed else "the artifact has no manifest"})
    return done
