"""The search runs every BN on batch statistics (method doc, "What a mask does", rule 3), through
every entry point, with running statistics untouched; ``search_bn="running"`` is the explicit
ablation. The expected step-0 numbers are computed without the search code
(:func:`conftest.independent_step0`: its own D_val carve, normalisation and forward)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import independent_step0, search_log
from ekg.checkpoint import load_checkpoint
from ekg.cli import main
from ekg.masks import MaskedNetwork
from ekg.pruning import prune
from ekg.search import SearchConfig, Searcher


def _assert_step0(run, train, stats: str) -> None:
    got = search_log(run)[0]
    want = independent_step0(run, train, stats)
    other = independent_step0(run, train, "running" if stats == "batch" else "batch")
    # the two modes are far apart on a real model, so this decides which one the search used
    assert abs(want["val_loss"] - other["val_loss"]) > 10 * 1e-4 * want["val_loss"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    assert got["j"] == pytest.approx(want["j"], rel=1e-4)
    assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-6)


@pytest.fixture(scope="module")
def resnet20(shared_data):
    return shared_data / "pretrained/akamaster/resnet20-12fca82f.th"


def test_api_prune_runs_the_search_on_batch_statistics_and_leaves_running_statistics(tmp_path, resnet20, exact):
    run = tmp_path / "RUN"
    res = prune(load_checkpoint(resnet20), exact, 0.95, out=run, progress=False)
    _assert_step0(run, exact.train, "batch")
    # the running statistics the slim model carries are the adapted model's (a subset of its channels)
    adapted = dict(load_checkpoint(run / "adapted.pt").model.named_modules())
    for name, m in res.model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            src = adapted[name]
            for buf in ("running_mean", "running_var"):
                full, kept = getattr(src, buf), getattr(m, buf)
                hits = (kept[:, None] == full[None, :]).any(1)
                assert bool(hits.all()), f"{name}.{buf} changed during the search"
            assert int(m.num_batches_tracked) == int(src.num_batches_tracked)


def test_search_bn_running_is_the_inference_mode_ablation(tmp_path, resnet20, exact):
    run = tmp_path / "RUN"
    prune(load_checkpoint(resnet20), exact, 0.95, out=run, progress=False,
          config=SearchConfig(adapt=False, search_bn="running"))
    _assert_step0(run, exact.train, "running")


def test_cli_prune_and_the_shared_fixture_search_on_batch_statistics(tmp_path, resnet20, cifar10_exact, exact,
                                                                     pruned_run, capsys):
    _assert_step0(pruned_run, exact.train, "batch")  # the API run most tests share (no adaptation)
    run = tmp_path / "CLI"
    assert main(["prune", "--model", str(resnet20), "--data", str(cifar10_exact), "--keep", "0.95",
                 "--no-adapt", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    _assert_step0(run, exact.train, "batch")


@pytest.mark.parametrize("left_in", ["eval", "train"])
def test_the_searcher_sets_bn_whatever_mode_the_caller_left(exact, resnet20, left_in):
    """Any mode the caller leaves the model in (eval: the old bug; train) gives the same, batch
    statistics, search numbers, and the model's modes and BN buffers are as they were after."""
    from ekg.data import get_normalization, iterate_batches
    from ekg.search import carve_search_sets

    ckpt = load_checkpoint(resnet20)
    d_val, _ = carve_search_sets(exact.train)
    batches = list(iterate_batches(d_val, 256, normalization=get_normalization(ckpt.normalization)))
    model = copy.deepcopy(ckpt.model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(left_in == "train")
    net = MaskedNetwork(model)  # builds the graph: must not reset the modes it found
    assert all(m.training == (left_in == "train") for m in model.modules())
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    searcher = Searcher(net, batches, SearchConfig(keep=0.97, sliced=False))
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.training))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    state = searcher.initial_state()
    searcher.restore(state)
    state = searcher.step(state)
    for h in hooks:
        h.remove()
    assert seen and all(seen), "a search pass ran BN on running statistics"
    assert all(m.training == (left_in == "train") for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    # step 0 on batch statistics equals the same forward in training mode on a copy
    ref = copy.deepcopy(ckpt.model).train()
    with torch.no_grad():
        ce = sum(float(torch.nn.functional.cross_entropy(ref(x), y, reduction="sum")) for x, y in batches)
    assert state.log[0]["val_loss"] == pytest.approx(ce / len(d_val), rel=1e-4)


def test_bench_search_makes_the_decisions_of_ekg_prune(pruned_run, exact):
    """bench/search.py (its timing harness) and `ekg prune` take the same steps for the same settings."""
    import importlib.util

    from conftest import REPO_ROOT
    from ekg.data import get_normalization
    from ekg.search import carve_search_sets

    spec = importlib.util.spec_from_file_location("bench_search", REPO_ROOT / "bench" / "search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = load_checkpoint(pruned_run / "adapted.pt")
    d_val, _ = carve_search_sets(exact.train)
    log, _ = bench.run_search(ckpt.model, d_val, get_normalization(ckpt.normalization),
                              SearchConfig(keep=0.85, adapt=False), None)
    want = search_log(pruned_run)
    assert [r["group"] for r in log] == [r["group"] for r in want] and len(want) > 2
    assert [r.get("widths") for r in log] == [r.get("widths") for r in want]
    assert [r["j"] for r in log] == pytest.approx([r["j"] for r in want], rel=1e-6)
