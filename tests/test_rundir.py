"""The run directory (ekg.rundir): one rule for "these settings match this folder", the refusal of
`ekg run` in an `ekg prune` folder of another budget, adoption of a matching one, and --restart."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import pytest

from ekg import rundir
from ekg.checkpoint import load_checkpoint
from ekg.cli import main
from ekg.data import DataSplits
from ekg.errors import EkgError
from ekg.rundir import (HOW_IT_RUNS, RunDir, TrainDir, check_settings, decision_settings, prune_settings,
                        run_settings)
from ekg.search import SearchConfig

SRC = "pretrained/akamaster/resnet20-12fca82f.th"


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_prune_run(pruned_run, dest):
    """Only the `ekg prune` artifacts of the shared fixture (other tests add a bank and fine-tuning runs)."""
    dest.mkdir(parents=True)
    for name in rundir.PRUNE_FILES:
        if name != rundir.LATENCY:  # a latency budget's only
            shutil.copy2(pruned_run / name, dest / name)
    return dest


# ----------------------------------------------------------------------------- the rule (no data)

def test_the_rule_names_each_differing_setting_with_both_values_in_one_line():
    saved = prune_settings({"search": SearchConfig(keep=0.85, importance="l1").to_dict(),
                            "model_fingerprint": {"arch": "resnet20_a", "sha1": "0123456789abcdef" * 3}})
    requested = prune_settings({"search": SearchConfig(keep=0.6, importance="l1", device="cpu", fast=False,
                                                       cache_gb=0.5, sliced=False).to_dict(),
                                "model_fingerprint": {"arch": "resnet20_a", "sha1": "0123456789abcdef" * 3},
                                "data_fingerprint": {"n_images": 10}})  # the saved record predates data
    with pytest.raises(EkgError) as e:
        check_settings("R", saved, requested)
    assert str(e.value) == ("R holds a run with other settings (keep: 0.85 saved, 0.6 requested); use the saved "
                            "settings to continue it, or choose another `out` or add `restart=True` to start over")
    # the decision settings of the search (the new search_bn and compat too) are compared; how it runs is not
    for change in ({"search_bn": "running"}, {"compat": "release"}, {"seed": 3}, {"val_per_class": 8},
                   {"adapt": False}, {"otsu": False}, {"step": 0.1}, {"method": "uniform"}, {"reward": "val-loss"}):
        other = prune_settings({"search": SearchConfig(keep=0.85, importance="l1", **change).to_dict()})
        with pytest.raises(EkgError, match=f"{next(iter(change))}: "):
            check_settings("R", saved, other)
    many = prune_settings({"search": SearchConfig(keep=0.6, importance="ekg", adapt=False).to_dict(),
                           "model_fingerprint": {"arch": "resnet20_a", "sha1": "f" * 40}})
    with pytest.raises(EkgError) as e:
        check_settings("R", saved, many, what="a pruning run")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("R holds a pruning run with other settings (keep: 0.85 saved, 0.6 "
                                              "requested; importance: l1 saved, ekg requested; adapt: true saved, "
                                              "false requested; model: {arch resnet20_a, sha1 0123456789...} saved,")
    # run.json: an override absent from the record is the preset's (None), so giving it is a difference
    with pytest.raises(EkgError, match=r"\(bank_topk: none saved, 2 requested\)"):
        check_settings("R", run_settings({"keep": 0.5, "preset": "quick", "kd": "ensemble"}),
                       run_settings({"keep": 0.5, "preset": "quick", "kd": "ensemble", "bank_topk": 2}))
    # tuples and lists are the same value (JSON round trips)
    check_settings("R", {"milestones": [0.3, 0.6]}, {"milestones": (0.3, 0.6)})


def test_how_it_runs_names_real_fields_and_nothing_that_decides():
    from ekg.study import StudyConfig
    from ekg.train import TrainConfig

    assert HOW_IT_RUNS["search"] <= {f.name for f in fields(SearchConfig)}
    assert HOW_IT_RUNS["train"] <= {f.name for f in fields(TrainConfig)}
    assert HOW_IT_RUNS["study"] <= set(rundir.flatten(StudyConfig().to_dict()))
    decides = set(decision_settings("search", SearchConfig().to_dict()))
    assert {"keep", "importance", "reward", "method", "compat", "search_bn", "seed", "split_seed", "val_per_class",
            "sub_per_class", "step", "otsu", "otsu_trim", "adapt", "bn_ops", "batch_size"} <= decides
    train = decision_settings("train", TrainConfig().to_dict())
    assert "augment.jitter" in train and "lr" in train and "amp" not in train and "epochs" not in train


def test_restart_removes_only_known_artifacts_and_refuses_a_folder_with_others(tmp_path):
    run = RunDir(tmp_path / "RUN")
    assert run.unknown_entries() == [] and run.clear() == []  # nothing there: nothing to do
    run.path.mkdir()
    run.config.write_text(json.dumps({"search": SearchConfig().to_dict()}))
    for p in (run.pruned, run.search_log, run.summary, run.run_record, run.path / ".pruned.pt.ab12_x.tmp",
              run.bank / "bank.json", run.bank / "logits.partial.npy",
              TrainDir(run.finetune).state, TrainDir(run.finetune).tb / "events.out.tfevents.1.host"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (run.path / "notes.txt").write_text("mine")
    (run.bank / "mine.npy").write_text("mine")
    before = snapshot(run.path)
    with pytest.raises(EkgError) as e:
        run.clear()
    assert str(e.value).startswith(f"`restart=True` removes only ekg's own artifacts, but {run.path} also holds "
                                   "bank/mine.npy, notes.txt; move those out of it")
    assert snapshot(run.path) == before  # refused before anything was removed
    (run.path / "notes.txt").unlink()
    (run.bank / "mine.npy").unlink()
    run.clear()
    assert run.path.is_dir() and list(run.path.iterdir()) == []
    # somebody else's config.json is not ekg's
    run.config.write_text('{"lr": 0.1}')
    with pytest.raises(EkgError, match="also holds config.json"):
        run.check_restart()


def test_run_dir_names():
    r = RunDir("R")
    assert (r.adapted.name, r.search_state.name, r.history.name, r.widths.name, r.pruned.name, r.bank.name,
            r.finetune.name, r.final.name, r.summary.name) == ("adapted.pt", "search_state.pt", "history.pt",
                                                                "widths.json", "pruned.pt", "bank", "finetune",
                                                                "final.pt", "summary.json")
    assert TrainDir(r.finetune).state == r.path / "finetune" / "last.pt"


# ----------------------------------------------------------------------------- on real data

@pytest.mark.slow
def test_run_refuses_a_prune_folder_of_another_budget(pruned_run, shared_data, exact, tmp_path):
    """`ekg prune --keep 0.85 --out R` then `ekg run --keep 0.6 --out R`: one line, nothing written
    (it used to fine-tune the 0.85 network and write a summary saying keep 0.6)."""
    from ekg.pipeline import run
    from ekg.pruning import prune

    r = copy_prune_run(pruned_run, tmp_path / "R")
    before = snapshot(r)
    model = load_checkpoint(shared_data / SRC)
    with pytest.raises(EkgError) as e:
        run(model, exact, 0.6, out=r, preset="quick", search=SearchConfig(adapt=False), progress=False)
    assert str(e.value) == (f"{r} holds a run with other settings (keep: 0.85 saved, 0.6 requested); use the "
                            "saved settings to continue it, or choose another `out` or add `restart=True` to start over")
    with pytest.raises(EkgError, match=r"holds a pruning run with other settings \(keep: 0.85 saved, 0.6 requested\)"):
        prune(model, exact, 0.6, out=r, config=SearchConfig(adapt=False), resume=True, progress=False)
    # another model, other training data: named too
    other_data = DataSplits(exact.name, exact.train.subset(range(4000)), exact.test, exact.source)
    with pytest.raises(EkgError, match=r"\(data: \{n_images 5085, .* saved, \{n_images 4000, "):
        run(model, other_data, 0.85, out=r, preset="quick", search=SearchConfig(adapt=False), progress=False)
    with pytest.raises(EkgError, match=r"\(model: \{arch resnet20_a, sha1 .* saved, \{arch resnet20_a \(pruned\), "):
        run(load_checkpoint(r / "pruned.pt"), exact, 0.85, out=r, preset="quick", search=SearchConfig(adapt=False),
            progress=False)
    assert snapshot(r) == before


@pytest.mark.slow
def test_run_cli_refuses_in_one_line_and_writes_nothing(pruned_run, shared_data, cifar10_exact, tmp_path, capsys):
    r = copy_prune_run(pruned_run, tmp_path / "R")
    before = snapshot(r)
    code = main(["run", "--model", str(shared_data / SRC), "--data", str(cifar10_exact), "--keep", "0.6",
                 "--out", str(r), "--preset", "quick", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"ekg: error: {r} holds a run with other settings (")
    assert "keep: 0.85 saved, 0.6 requested" in err and "add --restart to start over" in err
    assert "adapt: false saved, true requested" in err  # that folder was pruned with --no-adapt
    assert snapshot(r) == before


@pytest.mark.slow
def test_run_adopts_a_matching_prune_folder(pruned_run, shared_data, exact, tmp_path, monkeypatch):
    """The same decision settings (device, fast and the cache size do not count): the search is
    not repeated, its pruned.pt is fine-tuned."""
    from ekg import pipeline

    r = copy_prune_run(pruned_run, tmp_path / "R")
    stamp = (r / "pruned.pt").stat().st_mtime_ns

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran again")

    monkeypatch.setattr(pipeline, "prune", no_search)
    summary = pipeline.run(load_checkpoint(shared_data / SRC), exact, 0.85, out=r, preset="quick", kd="none",
                           epochs=1, limit_train=256, latency_batches=(1,), progress=False,
                           search=SearchConfig(adapt=False, device="cpu", fast=False, cache_gb=0.25))
    assert (r / "pruned.pt").stat().st_mtime_ns == stamp
    assert summary["settings"]["keep"] == 0.85 and (r / "final.pt").exists()
    assert summary["pruned"]["flops"] == json.loads((r / "search.jsonl").read_text().splitlines()[-1])["flops"]
    assert json.loads((r / "run.json").read_text()) == {"keep": 0.85, "preset": "quick", "kd": "none", "epochs": 1,
                                                        "limit_train": 256}


@pytest.mark.slow
def test_restart_starts_over_after_checking_everything(pruned_run, shared_data, cifar10_exact, exact, tmp_path,
                                                       capsys):
    from ekg.pipeline import run

    r = copy_prune_run(pruned_run, tmp_path / "R")
    for p in (r / "run.json", r / "summary.json", r / "bank" / "bank.json", r / "finetune" / "last.pt"):
        p.parent.mkdir(exist_ok=True)
        p.write_text("{}")
    (r / "notes.txt").write_text("mine")
    before = snapshot(r)
    args = ["prune", "--model", str(shared_data / SRC), "--data", str(cifar10_exact), "--keep", "0.95", "--no-adapt",
            "--out", str(r), "--quiet"]
    # refused, nothing removed: a file ekg did not write; --restart with --resume; a bad setting (checked first)
    assert main(args + ["--restart"]) == 1
    err = capsys.readouterr().err
    assert err.count("ekg: error:") == 1 and "also holds notes.txt" in err
    assert main(args + ["--restart", "--resume"]) == 1
    assert "give only one" in capsys.readouterr().err
    (r / "notes.txt").unlink()
    before.pop("notes.txt")
    with pytest.raises(EkgError, match="exceeds the model's 10 classes"):
        run(load_checkpoint(shared_data / SRC), exact, 0.9, out=r, preset="quick", bank_topk=11, restart=True,
            progress=False)
    assert snapshot(r) == before
    # without --restart the folder is refused; with it, every old artifact goes and the new run is written
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already holds a pruning run; add --resume to continue it, --restart to start over" in err
    assert main(args + ["--restart"]) == 0
    capsys.readouterr()
    assert not any((r / name).exists() for name in ("run.json", "summary.json", "bank", "finetune"))
    assert json.loads((r / "config.json").read_text())["search"]["keep"] == 0.95
    assert 0.93 < json.loads((r / "search.jsonl").read_text().splitlines()[-1])["flops_ratio"] <= 0.95
    assert (r / "pruned.pt").stat().st_mtime_ns != before["pruned.pt"][1]
