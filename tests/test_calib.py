"""Calibration sources: bundled sets, files, and `datasets` datasets; deterministic sampling."""

from __future__ import annotations

import json

import pytest

from xquant.calib import load_set, sample_windows
from xquant.errors import CorruptFileError, InputError


def test_bundled_sets_and_splits_are_disjoint():
    for name in ("zh", "en", "code"):
        calib, held_out = load_set(name, "calib"), load_set(name, "eval")
        assert calib.documents and held_out.documents
        assert not set(calib.documents) & set(held_out.documents)
    mixed = load_set("mixed", "calib")
    assert len(mixed.documents) == sum(len(load_set(n, "calib").documents) for n in ("zh", "en", "code"))
    assert sum(len(d.encode()) for n in ("zh", "en", "code") for s in ("calib", "eval")
               for d in load_set(n, s).documents) >= 150_000


def test_files_jsonl_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    assert load_set(str(tmp_path / "a.txt")).documents == ("first document",)
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_set(str(lines)).documents == ("one", "two")
    lines.write_text('{"body": "x"}\n')
    with pytest.raises(CorruptFileError, match=r"d.jsonl:1: expected a JSON object"):
        load_set(str(lines))
    with pytest.raises(InputError, match="neither a bundled set"):
        load_set(str(tmp_path / "missing.txt"))


def test_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": ["alpha beta", "  ", "gamma delta"], "id": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    got = load_set(f"hf:{tmp_path / 'ds'}#content")
    assert got.documents == ("alpha beta", "gamma delta")
    with pytest.raises(InputError, match="no column 'text'"):
        load_set(f"hf:{tmp_path / 'ds'}")


def test_sampling_is_deterministic_and_refuses_short_text():
    ids = list(range(10_000))
    a, b = sample_windows(ids, 8, 512, seed=3), sample_windows(ids, 8, 512, seed=3)
    assert a == b and all(len(w) == 512 for w in a) and a != sample_windows(ids, 8, 512, seed=4)
    starts = sorted(w[0] for w in a)
    assert all(y - x >= 512 for x, y in zip(starts, starts[1:]))  # enough text: no overlap
    with pytest.raises(InputError, match="fewer than one sequence of 512"):
        sample_windows(list(range(100)), 1, 512, seed=0)
