"""The memory bank: teacher selection from a search history, and the fp16 memory-mapped stores (dense, top-k)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ekg.bank import (NEG_FILL_GAP, bank_for_run, build_bank, densify, index_dtype, open_bank, select_teachers,
                      topk_compress)
from ekg.cli import main
from ekg.data import ImageSet, get_normalization, iterate_batches
from ekg.errors import EkgError
from ekg.evaluate import batch_statistics_bn
from ekg.masks import MaskedNetwork
from ekg.models import create_model

from conftest import fake_history


def test_select_teachers_spread_evenly_in_loss() -> None:
    # targets 0.10, 0.26, 0.42, 0.58, 0.74 -> nearest untaken: 0.10, 0.30, 0.45, 0.50, 0.70
    assert select_teachers([0.10, 0.50, 0.30, 0.12, 0.90, 0.45, 0.70], 5) == [0, 2, 5, 1, 6]


def test_select_teachers_skips_taken_entries() -> None:
    # targets 0, .2, .4, .6, .8: .6's nearest (.5) is taken by .4 -> .9; .8's nearest (.9) taken -> 1.0
    assert select_teachers([0.0, 0.01, 0.02, 1.0, 0.9, 0.5], 5) == [0, 2, 5, 4, 3]


def test_select_teachers_small_histories_and_ties() -> None:
    assert select_teachers([0.3, 0.1, 0.2], 5) == [1, 2, 0]  # all, by loss
    assert select_teachers([0.5, 0.5, 0.1, 0.9, 0.7, 0.2], 2) == [2, 0]  # target .5: tie -> earlier entry
    with pytest.raises(EkgError, match="history"):
        select_teachers([], 5)


def _setup(n: int = 40):
    torch.manual_seed(0)
    model = create_model("resnet20", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])
    net = MaskedNetwork(model)
    return net, data, fake_history(net, [0.2, 0.9, 0.5, 0.35, 1.3])  # the last one is the final sub-network


def test_bank_round_trip_memory_mapped(tmp_path) -> None:
    net, data, history = _setup()
    norm = get_normalization("cifar10")
    bank = build_bank(net, history, data, norm, tmp_path / "bank", teachers=3, batch_size=16, progress=False)
    assert isinstance(bank.logits, np.memmap) and bank.logits.dtype == np.float16
    assert bank.logits.shape == (40, 10, 3)
    info = json.loads((tmp_path / "bank" / "bank.json").read_text())
    # losses of the non-final entries 0.2, 0.9, 0.5, 0.35: targets 0.2, 0.433, 0.667 -> 0.2, 0.5 (.067) , 0.9 (.233)
    assert [t["history_index"] for t in info["teachers"]] == [0, 2, 1]
    assert not (tmp_path / "bank" / "logits.partial.npy").exists()
    # the stored logits are the teachers' own, image by image (BN on batch statistics, batches of 16)
    for t, h in enumerate([0, 2, 1]):
        for gm, m in zip(net.masks, history[h]["masks"]):
            gm.set(m)
        with batch_statistics_bn(net.model), torch.no_grad():
            want = torch.cat([net(x) for x, _ in iterate_batches(data, 16, normalization=norm)])
        got = torch.from_numpy(np.asarray(bank.logits[:, :, t], dtype=np.float32))
        assert torch.allclose(got, want.half().float(), atol=0, rtol=0)
    # reading a batch: rows by index, as (B, T, classes) float32
    idx = torch.tensor([7, 3, 39])
    rows = bank.batch(idx)
    assert rows.shape == (3, 3, 10) and rows.dtype == torch.float32
    assert torch.equal(rows[1, 2], torch.from_numpy(bank.logits[3, :, 2].astype(np.float32)))
    # reopening reads the same bank; another dataset is refused
    again = open_bank(tmp_path)  # a run directory holding bank/
    assert np.array_equal(np.asarray(again.logits), np.asarray(bank.logits))
    other = ImageSet(data.images[:30], data.labels[:30], data.classes)
    with pytest.raises(EkgError, match="another training set"):
        again.check_data(other)


@pytest.mark.parametrize("topk", [None, 4])
def test_bank_build_resumes_after_an_interrupt(tmp_path, monkeypatch, topk) -> None:
    """Killed during the second teacher: nothing final is written; the resumed build runs only the
    missing teachers and ends with the arrays of an uninterrupted build (dense and top-k)."""
    net, data, history = _setup(24)
    norm = get_normalization("cifar10")
    full = build_bank(net, history, data, norm, tmp_path / "a", teachers=3, batch_size=8, progress=False, topk=topk)
    calls = {"n": 0}
    real = net.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:  # during the second teacher
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(net, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_bank(net, history, data, norm, tmp_path / "b", teachers=3, batch_size=8, progress=False, topk=topk)
    final = ["logits.npy"] if topk is None else ["topk_values.npy", "topk_classes.npy", "topk_rest.npy"]
    assert not any((tmp_path / "b" / name).exists() for name in [*final, "bank.json"])
    assert sorted(p.name for p in (tmp_path / "b").glob("*.partial.npy")) == sorted(
        name.replace(".npy", ".partial.npy") for name in final)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["done"] == [0]
    counted = {"n": 0}

    def counting(x):
        counted["n"] += 1
        return real(x)

    monkeypatch.setattr(net, "forward", counting)
    resumed = build_bank(net, history, data, norm, tmp_path / "b", teachers=3, batch_size=8, progress=False, topk=topk)
    assert counted["n"] == 2 * 3  # teachers 1 and 2 only, 3 batches each
    for name in ("logits",) if topk is None else ("values", "classes", "rest"):
        assert np.array_equal(np.asarray(getattr(resumed, name)), np.asarray(getattr(full, name))), name
    assert not list((tmp_path / "b").glob("*.partial.npy")) and not (tmp_path / "b" / "progress.json").exists()


def test_open_bank_errors(tmp_path) -> None:
    with pytest.raises(EkgError, match="no memory bank"):
        open_bank(tmp_path)


# ---------------------------------------------------------------------------------------------
# top-k storage
# ---------------------------------------------------------------------------------------------


def test_topk_compress_keeps_the_largest_logits_and_the_mean_of_the_rest() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 10, generator=g) * 3  # (rows, teachers, classes)
    values, classes, rest = topk_compress(z, 3)
    assert values.shape == classes.shape == (6, 4, 3) and rest.shape == (6, 4)
    assert values.dtype == np.float16 and classes.dtype == np.int16 and rest.dtype == np.float16
    want_v, want_i = z.sort(-1, descending=True)
    assert np.array_equal(values, want_v[..., :3].numpy().astype(np.float16))  # largest first
    assert np.array_equal(classes, want_i[..., :3].numpy())
    want_rest = want_v[..., 3:].mean(-1)
    assert np.array_equal(rest, want_rest.numpy().astype(np.float16))  # rounded to fp16 once
    # densified: the top 3 at their classes, the rest value everywhere else
    dense = densify(torch.from_numpy(values), torch.from_numpy(classes), torch.from_numpy(rest), 10)
    assert dense.shape == (6, 4, 10) and dense.dtype == torch.float32
    top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, want_i[..., :3], True)
    assert torch.equal(dense[top], z.half().float()[top])
    assert torch.equal(dense[~top], torch.from_numpy(rest).float()[..., None].expand_as(z)[~top])
    # the -inf rule: softmax renormalised over the top 3, exactly zero elsewhere
    neg = densify(torch.from_numpy(values), torch.from_numpy(classes), torch.from_numpy(rest), 10, fill="-inf")
    assert torch.equal(neg[top], dense[top])
    floor = torch.from_numpy(values).float().min(-1, keepdim=True).values - NEG_FILL_GAP
    assert torch.equal(neg[~top], floor.expand_as(z)[~top])
    p = torch.softmax(neg / 4, -1)
    assert torch.all(p[~top] == 0)
    idx = torch.from_numpy(classes.astype(np.int64))
    assert torch.allclose(p.gather(-1, idx), torch.softmax(torch.from_numpy(values).float() / 4, -1), atol=1e-6)
    with pytest.raises(EkgError, match="fill rule"):
        densify(torch.from_numpy(values), torch.from_numpy(classes), torch.from_numpy(rest), 10, fill="zero")


def test_topk_of_all_classes_is_the_dense_fp16_logits() -> None:
    z = torch.randn(5, 2, 7, generator=torch.Generator().manual_seed(1)) * 5
    values, classes, rest = topk_compress(z, 7)
    assert np.all(rest == 0)  # nothing left to summarise
    dense = densify(torch.from_numpy(values), torch.from_numpy(classes), torch.from_numpy(rest), 7)
    assert torch.equal(dense, z.half().float())


def test_index_dtype_widens_only_past_int16() -> None:
    assert index_dtype(10) == np.int16 and index_dtype(1000) == np.int16
    assert index_dtype(32768) == np.int16  # indices 0..32767 fit
    assert index_dtype(32769) == np.int32
    z = torch.zeros(2, 40000)
    z[0, 39999], z[1, 32768] = 5.0, 7.0
    values, classes, _ = topk_compress(z, 1)
    assert classes.dtype == np.int32 and classes[:, 0].tolist() == [39999, 32768]
    assert values[:, 0].tolist() == [5.0, 7.0]


def test_topk_bank_with_k_equal_classes_reads_exactly_like_the_dense_bank(tmp_path) -> None:
    net, data, history = _setup()
    norm = get_normalization("cifar10")
    dense = build_bank(net, history, data, norm, tmp_path / "dense", teachers=3, batch_size=16, progress=False)
    top = build_bank(net, history, data, norm, tmp_path / "top", teachers=3, batch_size=16, progress=False, topk=10)
    assert top.logits is None and top.topk == 10 and dense.topk is None
    assert sorted(p.name for p in (tmp_path / "top").iterdir()) == [
        "bank.json", "topk_classes.npy", "topk_rest.npy", "topk_values.npy"]
    idx = torch.arange(40).flip(0)
    assert torch.equal(top.batch(idx), dense.batch(idx))
    info = json.loads((tmp_path / "top" / "bank.json").read_text())
    assert info["topk"] == 10 and info["fill"] == "mean" and info["classes_dtype"] == "int16"
    assert info["shape"] == [40, 10, 3]
    assert json.loads((tmp_path / "dense" / "bank.json").read_text())["topk"] is None
    assert {k: v for k, v in info.items() if k not in ("topk", "fill", "classes_dtype", "rest")} == \
        {k: v for k, v in dense.info.items() if k != "topk"}  # the same teachers, data, BN


def test_topk_bank_stores_each_rows_largest_logits(tmp_path) -> None:
    net, data, history = _setup()
    norm = get_normalization("cifar10")
    bank = build_bank(net, history, data, norm, tmp_path / "bank", teachers=3, batch_size=16, progress=False, topk=3)
    assert isinstance(bank.values, np.memmap) and bank.values.shape == (40, 3, 3) and bank.values.dtype == np.float16
    assert isinstance(bank.classes, np.memmap) and bank.classes.dtype == np.int16
    assert isinstance(bank.rest, np.memmap) and bank.rest.shape == (40, 3) and bank.rest.dtype == np.float16
    # each teacher's own float32 logits, image by image (BN on batch statistics, batches of 16)
    for t, h in enumerate([0, 2, 1]):
        for gm, m in zip(net.masks, history[h]["masks"]):
            gm.set(m)
        with batch_statistics_bn(net.model), torch.no_grad():
            z = torch.cat([net(x) for x, _ in iterate_batches(data, 16, normalization=norm)])
        v, i = z.sort(-1, descending=True)
        assert np.array_equal(bank.values[:, t], v[:, :3].half().numpy())
        assert np.array_equal(bank.classes[:, t], i[:, :3].numpy())
        rest = v[:, 3:].mean(-1)
        assert np.allclose(bank.rest[:, t].astype(np.float32), rest.numpy(), rtol=1e-3, atol=1e-3)
        rows = bank.batch(torch.arange(40))[:, t]  # (40, classes)
        assert torch.equal(rows.gather(1, i[:, :3]), v[:, :3].half().float())
        other = torch.ones_like(z, dtype=torch.bool).scatter_(1, i[:, :3], False)
        assert torch.equal(rows[other].view(40, 7), torch.from_numpy(np.array(bank.rest[:, t])).float()[:, None].expand(40, 7))
    # a -inf reading of the same files
    neg = open_bank(tmp_path / "bank", fill="-inf")
    assert neg.fill == "-inf" and torch.all(torch.softmax(neg.batch(torch.arange(5)), -1).gt(0).sum(-1) == 3)


def test_a_bank_stored_otherwise_than_asked_is_refused(tmp_path) -> None:
    net, data, history = _setup(24)
    norm = get_normalization("cifar10")
    build_bank(net, history, data, norm, tmp_path / "d", teachers=2, batch_size=8, progress=False)
    with pytest.raises(EkgError, match="every logit .a dense bank.*top-3 bank was asked for.*leave out `topk`"):
        build_bank(net, history, data, norm, tmp_path / "d", teachers=2, batch_size=8, progress=False, topk=3)
    build_bank(net, history, data, norm, tmp_path / "k", teachers=2, batch_size=8, progress=False, topk=3)
    with pytest.raises(EkgError, match="top-3 logits.*dense bank .no `topk`. was asked for.*`topk` 3"):
        build_bank(net, history, data, norm, tmp_path / "k", teachers=2, batch_size=8, progress=False)
    with pytest.raises(EkgError, match="top-3 logits.*top-5 bank was asked for.*`topk` 3"):
        bank_for_run(tmp_path / "k", data, topk=5, progress=False)
    assert bank_for_run(tmp_path / "k", data, topk=3, progress=False).topk == 3  # a bank folder as --bank
    with pytest.raises(EkgError, match="exceeds the model's 10 classes"):
        build_bank(net, history, data, norm, tmp_path / "x", teachers=2, batch_size=8, progress=False, topk=11)
    for bad in (0, -2, 2.5):
        with pytest.raises(EkgError, match="`topk` must be a whole number"):
            build_bank(net, history, data, norm, tmp_path / "x", teachers=2, batch_size=8, progress=False, topk=bad)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_a_bank_built_for_another_number_of_teachers_is_refused(tmp_path) -> None:
    """bank.json records the teachers asked for; asking for another number names both. Not asking
    (None, the CLI's default) accepts the bank as built; banks written before the record, too."""
    net, data, history = _setup(24)
    norm = get_normalization("cifar10")
    bank = build_bank(net, history, data, norm, tmp_path / "b", teachers=2, batch_size=8, progress=False)
    assert bank.info["teachers_requested"] == 2
    with pytest.raises(EkgError, match="built with `teachers` 2, but `teachers` 3 was asked for.*`teachers` 2"):
        bank_for_run(tmp_path / "b", data, teachers=3, progress=False)
    assert bank_for_run(tmp_path / "b", data, progress=False).logits.shape[2] == 2
    assert bank_for_run(tmp_path / "b", data, teachers=2, progress=False).logits.shape[2] == 2
    info = json.loads((tmp_path / "b" / "bank.json").read_text())
    del info["teachers_requested"]  # as written before the record existed
    (tmp_path / "b" / "bank.json").write_text(json.dumps(info))
    assert bank_for_run(tmp_path / "b", data, teachers=3, progress=False).logits.shape[2] == 2


def test_open_bank_validates_the_topk_arrays(tmp_path) -> None:
    net, data, history = _setup(24)
    norm = get_normalization("cifar10")
    build_bank(net, history, data, norm, tmp_path / "good", teachers=2, batch_size=8, progress=False, topk=3)

    def broken(name: str):
        folder = tmp_path / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp_path / "good", folder)
        return folder

    f = broken("classes32")
    np.save(f / "topk_classes.npy", np.load(f / "topk_classes.npy").astype(np.int32))
    with pytest.raises(EkgError, match=r"topk_classes.npy of shape \(24, 2, 3\) int32.*int16"):
        open_bank(f)
    f = broken("values")
    np.save(f / "topk_values.npy", np.zeros((24, 2, 4), dtype=np.float16))
    with pytest.raises(EkgError, match="topk_values.npy of shape"):
        open_bank(f)
    f = broken("rest")
    np.save(f / "topk_rest.npy", np.zeros((24, 2), dtype=np.float32))
    with pytest.raises(EkgError, match="topk_rest.npy"):
        open_bank(f)
    f = broken("missing")
    (f / "topk_rest.npy").unlink()
    with pytest.raises(EkgError, match="no memory bank.*topk_rest.npy"):
        open_bank(f)
    f = broken("k")
    info = json.loads((f / "bank.json").read_text())
    (f / "bank.json").write_text(json.dumps({**info, "topk": 11}))
    with pytest.raises(EkgError, match="invalid bank.json"):
        open_bank(f)
    f = broken("fill")
    (f / "bank.json").write_text(json.dumps({**info, "fill": "zero"}))
    with pytest.raises(EkgError, match="fill rule 'zero'"):
        open_bank(f)
    f = broken("json")
    (f / "bank.json").write_text("{")
    with pytest.raises(EkgError, match="unreadable"):
        open_bank(f)


def test_a_dense_bank_json_without_topk_still_opens(tmp_path) -> None:
    """Banks written before top-k storage existed have no "topk" in bank.json: dense."""
    net, data, history = _setup(16)
    build_bank(net, history, data, get_normalization("cifar10"), tmp_path, teachers=2, batch_size=8, progress=False)
    info = json.loads((tmp_path / "bank.json").read_text())
    del info["topk"]
    (tmp_path / "bank.json").write_text(json.dumps(info))
    bank = bank_for_run(tmp_path, data, progress=False)
    assert bank.topk is None and bank.batch(torch.tensor([1])).shape == (1, 2, 10)


def test_a_partial_bank_of_the_other_layout_is_started_again(tmp_path, monkeypatch) -> None:
    net, data, history = _setup(24)
    norm = get_normalization("cifar10")
    real = net.forward
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(net, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_bank(net, history, data, norm, tmp_path, teachers=3, batch_size=8, progress=False)  # dense
    assert (tmp_path / "logits.partial.npy").exists()
    monkeypatch.setattr(net, "forward", real)
    top = build_bank(net, history, data, norm, tmp_path, teachers=3, batch_size=8, progress=False, topk=2)
    assert top.topk == 2 and not (tmp_path / "logits.partial.npy").exists()  # the stale dense rows are gone
    want = build_bank(net, history, data, norm, tmp_path / "fresh", teachers=3, batch_size=8, progress=False, topk=2)
    assert np.array_equal(np.asarray(top.values), np.asarray(want.values))


def _two_process_build(rank: int, folder: str, port: int) -> None:
    import os

    import torch.distributed as tdist

    from ekg.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net, data, history = _setup(40)
        build_bank(net, history, data, get_normalization("cifar10"), folder, teachers=3, batch_size=8,
                   progress=False, dist=Dist(rank=rank, world_size=2, backend="gloo"), topk=3)
    finally:
        tdist.destroy_process_group()


def test_topk_bank_built_by_two_processes_equals_one(tmp_path) -> None:
    """Under torchrun each rank computes every other batch and writes its rows into the shared
    memory-mapped top-k arrays; the result is the one-process bank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_build, args=(str(tmp_path / "two"), port), nprocs=2, join=True)
    net, data, history = _setup(40)
    one = build_bank(net, history, data, get_normalization("cifar10"), tmp_path / "one", teachers=3, batch_size=8,
                     progress=False, topk=3)
    two = open_bank(tmp_path / "two")
    assert two.info == one.info
    for name in ("values", "classes", "rest"):
        assert np.array_equal(np.asarray(getattr(two, name)), np.asarray(getattr(one, name))), name
    assert not list((tmp_path / "two").glob("*.partial.npy")) and not (tmp_path / "two" / "progress.json").exists()


@pytest.mark.slow
def test_bank_topk_flag_end_to_end(pruned_run, shared_data, cifar10_exact, exact, tmp_path, capsys) -> None:
    """`ekg finetune --bank-topk` builds a top-k bank and fine-tunes from it; `ekg run --bank-topk`
    re-uses it; other settings are refused in one line."""
    run = tmp_path / "RUN"
    shutil.copytree(pruned_run, run, ignore=shutil.ignore_patterns("bank", "ft", "finetune", "run.json"))
    common = ["--data", str(cifar10_exact), "--epochs", "1", "--limit-train", "256", "--teachers", "2", "--quiet"]
    ft = ["finetune", "--model", str(run / "pruned.pt"), "--bank", str(run), "--limit-test", "128", *common]
    assert main(ft + ["--out", str(tmp_path / "ft"), "--bank-topk", "2"]) == 0
    capsys.readouterr()
    info = json.loads((run / "bank" / "bank.json").read_text())
    assert info["topk"] == 2 and info["fill"] == "mean" and info["shape"] == [5085, 10, 2]
    assert not (run / "bank" / "logits.npy").exists()
    assert np.load(run / "bank" / "topk_values.npy", mmap_mode="r").shape == (5085, 2, 2)
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and 1 <= log[0]["teachers_selected"] <= 2 and log[0]["kd_loss"] >= 0
    # the same bank without --bank-topk (dense asked for), or with another K: one-line errors
    for extra, words in (([], "pass --bank-topk 2"), (["--bank-topk", "3"], "top-3 bank was asked for"),
                         (["--bank-topk", "0"], "--bank-topk must be a whole number")):
        assert main(ft + ["--out", str(tmp_path / "ft2"), *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("ekg: error:") == 1 and words in err and "Traceback" not in err, err
    # `ekg run` in the same directory, with the model and search settings of its `ekg prune` run (no
    # adaptation: the API's search=): the search and the top-2 bank are re-used
    from ekg.checkpoint import load_checkpoint
    from ekg.pipeline import run as run_pipeline
    from ekg.search import SearchConfig

    stamp = (run / "bank" / "topk_values.npy").stat().st_mtime_ns
    model = load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    same = dict(out=run, preset="quick", epochs=1, limit_train=256, teachers=2, search=SearchConfig(adapt=False),
                progress=False)
    run_pipeline(model, exact, 0.85, bank_topk=2, **same)
    assert (run / "bank" / "topk_values.npy").stat().st_mtime_ns == stamp
    assert json.loads((run / "run.json").read_text())["bank_topk"] == 2
    assert json.loads((run / "summary.json").read_text())["settings"]["bank_topk"] == 2
    with pytest.raises(EkgError, match=r"other settings \(bank_topk: 2 saved, none requested\)"):
        run_pipeline(model, exact, 0.85, **same)  # other settings (no bank_topk) in the same run directory
    # a K above the model's classes fails before anything is written
    fresh = tmp_path / "fresh"
    args = ["run", "--model", str(run / "pruned.pt"), "--keep", "0.85", "--out", str(fresh), "--preset", "quick",
            *common]
    assert main(args + ["--bank-topk", "11"]) == 1
    assert "exceeds the model's 10 classes" in capsys.readouterr().err and not fresh.exists()
