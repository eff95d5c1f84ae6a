"""`ekg prune` end to end on real data: budget landing, artifacts, resume, criteria, fast == straightforward."""

from __future__ import annotations

import json

import pytest
import torch

from ekg import search as search_mod
from ekg.checkpoint import Checkpoint, load_checkpoint
from ekg.cli import main
from ekg.data import get_normalization
from ekg.errors import EkgError
from ekg.models import create_model
from ekg.pruning import prune
from ekg.search import SearchConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def r20_a(shared_data):
    return load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")


@pytest.fixture(scope="module")
def r20_b(tmp_path_factory):
    """A projection-shortcut ResNet-20 (stream groups prunable), random weights."""
    model = create_model("resnet20", seed=0)
    norm = get_normalization("cifar10")
    return Checkpoint(model=model, normalization={"name": "cifar10", **norm.to_dict()},
                      dataset={"name": "cifar10", "num_classes": 10})


def read_log(run):
    return [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]


def test_prune_cli_writes_every_artifact(tmp_path, shared_data, cifar10_exact, capsys):
    run = tmp_path / "RUN"
    src = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    assert main(["prune", "--model", str(src), "--data", str(cifar10_exact), "--keep", "0.8", "--out", str(run),
                 "--quiet"]) == 0
    capsys.readouterr()
    for name in ("config.json", "adapted.pt", "search_state.pt", "search.jsonl", "history.pt", "widths.json",
                 "pruned.pt", "trajectory.png", "widths.png"):
        assert (run / name).exists(), name
    log = read_log(run)
    assert log[0]["step"] == 0 and log[0]["flops_ratio"] == 1.0
    assert 0.78 < log[-1]["flops_ratio"] <= 0.8
    assert all(a["flops_ratio"] > b["flops_ratio"] for a, b in zip(log, log[1:]))
    assert {"group_name", "widths", "val_accuracy", "val_loss", "j", "evaluated", "seconds"} <= set(log[-1])
    # the slim checkpoint reloads through the CLI with no extra flags, at the logged FLOPs
    assert main(["info", "--model", str(run / "pruned.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flops"] == log[-1]["flops"] and info["params"] == log[-1]["params"]
    assert main(["test", "--model", str(run / "pruned.pt"), "--data", str(cifar10_exact), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["flops"] == log[-1]["flops"] and res["n_images"] == 1017 and res["top1"] > 20
    history = torch.load(run / "history.pt", weights_only=True)["history"]
    assert len(history) == len(log) and history[0]["loss"] <= max(h["loss"] for h in history)


def test_stream_groups_are_pruned_with_projection_shortcuts(tmp_path, r20_b, exact):
    res = prune(r20_b, exact, 0.7, out=tmp_path / "run", progress=False)
    assert 0.68 < res.flops_ratio <= 0.7
    spec = res.checkpoint.spec
    assert res.checkpoint.arch == "resnet20 (pruned)"
    x = torch.randn(2, 3, 32, 32)
    assert res.checkpoint.model.eval()(x).shape == (2, 10)
    # reload from disk without the original
    back = load_checkpoint(tmp_path / "run" / "pruned.pt")
    assert back.spec == spec
    assert torch.allclose(back.model.eval()(x), res.checkpoint.model(x), atol=1e-5)


def test_resume_after_interrupt_gives_identical_masks(tmp_path, r20_a, exact, monkeypatch):
    cfg = SearchConfig(keep=0.75)
    full = prune(r20_a, exact, 0.75, out=tmp_path / "full", config=cfg, progress=False)

    real_step = search_mod.Searcher.step
    calls = {"n": 0}

    def interrupted(self, state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, state)

    monkeypatch.setattr(search_mod.Searcher, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(r20_a, exact, 0.75, out=tmp_path / "part", config=cfg, progress=False)
    monkeypatch.setattr(search_mod.Searcher, "step", real_step)
    assert len(read_log(tmp_path / "part")) == 3  # step 0 + two finished steps
    assert not (tmp_path / "part" / "pruned.pt").exists()
    with pytest.raises(EkgError, match="`resume=True`"):
        prune(r20_a, exact, 0.75, out=tmp_path / "part", config=cfg, progress=False)
    with pytest.raises(EkgError, match="importance"):
        prune(r20_a, exact, 0.75, out=tmp_path / "part", config=SearchConfig(keep=0.75, importance="l1"),
              resume=True, progress=False)
    resumed = prune(r20_a, exact, 0.75, out=tmp_path / "part", config=cfg, resume=True, progress=False)
    a = torch.load(tmp_path / "full" / "search_state.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "search_state.pt", weights_only=True)
    assert a["rates"] == b["rates"]
    assert all(torch.equal(x, y) for x, y in zip(a["ranks"], b["ranks"]))
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        assert all(torch.equal(x, y) for x, y in zip(ha["masks"], hb["masks"]))
    assert resumed.flops == full.flops
    sa, sb = full.checkpoint.model.state_dict(), resumed.checkpoint.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fast_and_straightforward_make_the_same_decisions(tmp_path, r20_b, exact):
    fast = prune(r20_b, exact, 0.8, out=tmp_path / "fast", config=SearchConfig(fast=True), progress=False)
    # the slow run is the fast one whose activation cache does not fit: the fallback decides the same
    slow = prune(r20_b, exact, 0.8, out=tmp_path / "slow", config=SearchConfig(fast=True, cache_gb=0), progress=False)
    lf, ls = read_log(tmp_path / "fast"), read_log(tmp_path / "slow")
    assert [r["group"] for r in lf] == [r["group"] for r in ls]
    assert [r["widths"] for r in lf[1:]] == [r["widths"] for r in ls[1:]]
    for a, b in zip(lf, ls):
        assert a["j"] == pytest.approx(b["j"], rel=1e-4)
    assert fast.flops == slow.flops


@pytest.mark.parametrize("importance,reward,method", [
    ("taylor", "ensemble", "greedy"), ("l1", "ensemble", "greedy"), ("fpgm", "val-loss", "greedy"),
    ("random", "ensemble", "greedy"), ("l1", "ensemble", "uniform"), ("ekg", "val-loss", "greedy"),
])
def test_every_criterion_lands_on_the_budget(tmp_path, r20_a, exact, importance, reward, method):
    cfg = SearchConfig(importance=importance, reward=reward, method=method, adapt=False)
    res = prune(r20_a, exact, 0.85, out=tmp_path / "run", config=cfg, progress=False)
    assert res.flops_ratio <= 0.85
    if method == "greedy":
        assert res.flops_ratio > 0.83
    log = read_log(tmp_path / "run")
    if method == "uniform":
        assert len(set(log[-1]["widths"])) <= 3  # one kept fraction: widths differ only by group size


def test_bad_budgets_and_unprunable_models(tmp_path, r20_a, exact, capsys, shared_data, cifar10_exact):
    with pytest.raises(EkgError, match="`keep`"):
        prune(r20_a, exact, 1.5, out=tmp_path / "x", progress=False)
    code = main(["prune", "--model", str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th"),
                 "--data", str(cifar10_exact), "--keep", "0", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("ekg: error:") and "--keep" in err and "Traceback" not in err
    with pytest.raises(EkgError, match="cannot reach `keep` 0.02: with every prunable channel group at one channel"):
        prune(r20_a, exact, 0.02, out=tmp_path / "z", config=SearchConfig(adapt=False, method="uniform"),
              progress=False)
    assert not (tmp_path / "z").exists()  # refused from the graph, before the adaptation writes anything
