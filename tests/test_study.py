"""The potential study: rank statistics against hand values, perturbations that keep the budget,
and the study end to end on real pruning runs (resumable)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from ekg.errors import EkgError
from ekg.study import bootstrap_interval, correlations, kendall, perturb, rankdata, spearman


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_and_kendall_hand_values():
    x = [1, 2, 3, 4, 5]
    assert spearman(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert kendall(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair of 5: rho = 1 - 6*2/(5*24) = 0.9, tau = (9 - 1)/10 = 0.8
    y = [1, 2, 3, 5, 4]
    assert spearman(x, y) == pytest.approx(0.9)
    assert kendall(x, y) == pytest.approx(0.8)
    # tau-b with ties: x = [1,1,2,3], y = [1,2,2,3]: concordant 4, discordant 0, ties 1 in each -> 4/5
    assert kendall([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(4 / 5)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_interval_and_correlation_table():
    rng = np.random.RandomState(0)
    x = rng.randn(40)
    y = x + 0.3 * rng.randn(40)
    lo, hi = bootstrap_interval(x, y, spearman, samples=500)
    rho = spearman(x, y)
    assert lo < rho < hi and hi <= 1 and lo > 0.5
    rows = [{"a": float(a), "b": float(-a), "t": float(b)} for a, b in zip(x, y)]
    table = correlations(rows, ("a", "b"), "t", samples=200)
    assert table["a"]["spearman"]["value"] == pytest.approx(-table["b"]["spearman"]["value"])
    assert table["a"]["n"] == 40 and table["a"]["kendall"]["low"] < table["a"]["kendall"]["value"]


def test_perturb_keeps_widths_and_swaps_the_asked_fraction():
    kept = {0: torch.arange(10), 1: torch.tensor([0, 2, 4, 6]), 2: torch.arange(8)}
    channels = {0: 20, 1: 8, 2: 8}
    new = perturb(kept, channels, 0.5, np.random.RandomState(0))
    for gi in kept:
        assert len(new[gi]) == len(kept[gi]) and len(set(new[gi].tolist())) == len(new[gi])
        assert int(new[gi].max()) < channels[gi]
    assert len(set(new[0].tolist()) - set(kept[0].tolist())) == 5
    assert len(set(new[1].tolist()) - set(kept[1].tolist())) == 2
    assert torch.equal(new[2], kept[2])  # nothing pruned there: nothing to swap
    with pytest.raises(EkgError):
        perturb(kept, channels, 1.5, np.random.RandomState(0))


def test_perturb_swaps_within_each_block_of_a_grouped_group():
    """A group cut in equal blocks (a grouped conv's) stays cut evenly: each block swaps its own kept
    channels for its own pruned ones, so slimming keeps ``groups`` (swapping across blocks made the
    study's sub-networks of a ResNeXt uneven, which slimming refuses)."""
    kept = {0: torch.tensor([0, 1, 2, 8, 9, 10])}      # 3 of 8 in each of 2 blocks
    for seed in range(20):
        new = perturb(kept, {0: 16}, 0.7, np.random.RandomState(seed), blocks={0: 2})[0]
        assert int((new < 8).sum()) == 3 and int((new >= 8).sum()) == 3
        assert len(set(new.tolist()) - set(kept[0].tolist())) == 4   # round(0.7 · 3) = 2 per block


@pytest.mark.slow
def test_study_end_to_end_on_real_runs(tmp_path, shared_data, exact, capsys):
    from ekg.checkpoint import load_checkpoint
    from ekg.cli import main
    from ekg.pruning import prune
    from ekg.search import SearchConfig

    model = load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    runs = []
    for name, cfg in (("l1", SearchConfig(importance="l1", method="uniform", adapt=False)),
                      ("uniform", SearchConfig(method="uniform", adapt=False))):
        t0 = time.perf_counter()
        prune(model, exact, 0.85, out=tmp_path / name, config=cfg, progress=False)
        print("prune", name, time.perf_counter() - t0)
        runs.append(str(tmp_path / name))
    args = ["study", "--runs", *runs, "--data", str(shared_data / "cifar10/exact-subset"), "--out",
            str(tmp_path / "study"), "--perturb", "1", "--images", "40", "--batch-size", "20", "--power-iters", "3",
            "--lanczos-steps", "3", "--hutchinson-samples", "2", "--limit-train", "256", "--bootstrap", "100",
            "--device", "cpu", "--quiet"]
    t0 = time.perf_counter()
    assert main(args) == 0
    print("study", time.perf_counter() - t0)
    rec = json.loads((tmp_path / "study" / "study.json").read_text())
    rows = rec["subnetworks"]
    assert [r["name"] for r in rows] == ["l1", "l1~1", "uniform", "uniform~1"]
    assert {r["source"] for r in rows} == {"uniform-l1", "uniform-l1 perturbed", "uniform-ekg", "uniform-ekg perturbed"}
    # a perturbation keeps the run's widths, so its FLOPs
    assert rows[0]["flops"] == rows[1]["flops"] and rows[2]["flops"] == rows[3]["flops"]
    for r in rows:
        assert r["lambda_max"] > 0 and math.isfinite(r["trace"]) and r["test_loss_after"] > 0
    for m in ("val_loss", "lambda_max", "neg_ratio", "trace"):
        assert rec["correlations"][m]["n"] == 4 and -1 <= rec["correlations"][m]["spearman"]["value"] <= 1
    assert (tmp_path / "study" / "study.png").stat().st_size > 0
    assert "Spearman" in capsys.readouterr().out
    # re-running continues: finished sub-networks are read back, not measured again
    stamp = (tmp_path / "study/subnets/l1/result.json").stat().st_mtime_ns
    (tmp_path / "study/subnets/uniform~1/result.json").unlink()
    assert main(args) == 0
    assert (tmp_path / "study/subnets/l1/result.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "study/study.json").read_text())["subnetworks"][3]["name"] == "uniform~1"
    # other settings in the same folder are refused
    other = list(args)
    other[other.index("--perturb") + 1] = "2"
    assert main(other) == 1
    assert "other settings" in capsys.readouterr().err
