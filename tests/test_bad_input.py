"""Bad input through the command line, table-driven (issue 16, first part): each case exits
non-zero with one line on stderr (no traceback) that names the culprit, and leaves no new or
changed file under the folder it names as output. Plus: files get the permissions the umask allows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ekg.cli import main
from ekg.io import write_json


def _tree(root: Path, empty: dict[str, list[str]]) -> Path:
    """A class-folder tree of tiny PNGs, classes a and b in train/ and test/; ``empty``: the
    class folders (per split) left without images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            if cls in empty.get(split, []):
                continue
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _cases(tmp: Path, shared: Path) -> list[tuple[str, list[str], Path, str]]:
    """``(case, argv, folder that must not change, text the line must hold)``."""
    model = str(shared / "pretrained/akamaster/resnet20-12fca82f.th")
    data = str(shared / "cifar10/exact-subset")
    both = _tree(tmp / "empty-both", {"train": ["b"], "test": ["b"]})
    train_only = _tree(tmp / "empty-train", {"train": ["b"]})
    common = ["--model", model, "--data", data, "--quiet"]
    return [
        ("an empty class folder in train/ and test/", ["train", "--data", str(both), "--arch", "resnet20",
         "--out", str(tmp / "o1"), "--epochs", "1"], tmp / "o1", f"{both / 'train' / 'b'} holds no images"),
        ("an empty class folder only in train/ (not 'no train/ folder')", ["train", "--data", str(train_only),
         "--arch", "resnet20", "--out", str(tmp / "o2"), "--epochs", "1"], tmp / "o2",
         f"{train_only / 'train' / 'b'} holds no images"),
        ("ekg run --teachers 0", ["run", *common, "--out", str(tmp / "o3"), "--teachers", "0"], tmp / "o3",
         "--teachers must be a whole number of at least 1"),
        ("ekg finetune --teachers 0", ["finetune", *common, "--bank", str(tmp / "o4"), "--teachers", "0"],
         tmp / "o4", "--teachers must be a whole number of at least 1"),
        ("ekg run --limit-train 0, refused before the search", ["run", *common, "--out", str(tmp / "o5"),
         "--limit-train", "0"], tmp / "o5", "--limit-train must be at least 1"),
        ("ekg finetune --limit-test 0", ["finetune", *common, "--kd", "none", "--out", str(tmp / "o6"),
         "--limit-test", "0"], tmp / "o6", "--limit-test must be at least 1"),
        ("ekg study --runs notarun writes no study_config.json", ["study", "--runs", str(tmp / "notarun"),
         "--data", data, "--out", str(tmp / "o7"), "--quiet"], tmp / "o7", "is not a finished pruning run"),
        ("ekg test --latency-batch 0", ["test", "--model", model, "--data", data, "--latency",
         "--latency-batch", "0"], tmp / "unused", "--latency-batch sizes must be at least 1"),
    ]


CASE_NAMES = ["an empty class folder in train/ and test/", "an empty class folder only in train/ (not 'no train/ folder')",
              "ekg run --teachers 0", "ekg finetune --teachers 0", "ekg run --limit-train 0, refused before the search",
              "ekg finetune --limit-test 0", "ekg study --runs notarun writes no study_config.json",
              "ekg test --latency-batch 0"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing(case, tmp_path, shared_data, capsys):
    cases = _cases(tmp_path, shared_data)
    assert [c[0] for c in cases] == CASE_NAMES
    _, argv, folder, text = next(c for c in cases if c[0] == case)
    before = _snapshot(folder)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("ekg: error: ") and text in err, err
    assert _snapshot(folder) == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
