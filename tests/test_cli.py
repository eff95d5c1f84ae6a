"""End-to-end CLI: the interface other tools call, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ekg.checkpoint import Checkpoint, save_checkpoint
from ekg.cli import main
from ekg.data import get_normalization
from ekg.models import create_model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ekg: error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.fixture(scope="module")
def res56(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("conv") / "res56.pt"
    assert main(["convert", str(shared_data / "pretrained/ekg_tf/res56_cifar10.pkl"), "--out", str(out)]) == 0
    return out


def test_console_script_convert_test_info(tmp_path, shared_data, cifar10_exact):
    """The interface outside checks call, through the installed `ekg` executable."""
    exe = shutil.which("ekg") or str(Path(sys.executable).parent / "ekg")
    dst = tmp_path / "DST.pt"
    subprocess.run([exe, "convert", str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th"), "--out", str(dst)],
                   check=True, capture_output=True)
    r = subprocess.run([exe, "test", "--model", str(dst), "--data", str(cifar10_exact), "--json"],
                       check=True, capture_output=True, text=True)
    res = json.loads(r.stdout)
    assert {"top1", "top5", "loss", "flops", "params", "n_images"} <= set(res)
    assert res["n_images"] == 1017 and abs(res["top1"] - 91.6) <= 0.2
    assert res["flops"] == 40_551_040
    r = subprocess.run([exe, "info", "--model", str(dst), "--json"], check=True, capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert info["flops"] == res["flops"] and info["params"] == res["params"]
    assert info["spec"]["stage_widths"] == [16, 32, 64]
    convs = [layer for layer in info["layers"] if layer["type"] == "conv"]
    assert len(convs) == 19 and convs[0]["out_channels"] == 16


def test_test_json_on_converted_ekg_model(capsys, res56, cifar10_exact):
    code, out, _ = run_cli(capsys, "test", "--model", res56, "--data", cifar10_exact, "--json")
    assert code == 0
    res = json.loads(out)
    assert res["top1"] >= 93.3 and res["n_images"] == 1017
    assert res["flops"] == 125_747_840 and res["bn_mode"] == "running"
    assert 99.0 <= res["top5"] <= 100.0 and 0.1 < res["loss"] < 0.5


def test_test_accepts_the_data_root_folder_itself(capsys, res56, cifar10_exact):
    code, out, _ = run_cli(capsys, "test", "--model", res56, "--data", cifar10_exact / "cifar-10-batches-py", "--json")
    assert code == 0 and json.loads(out)["n_images"] == 1017


def test_batch_statistics_mode_and_latency(capsys, res56, cifar10_exact):
    code, out, _ = run_cli(capsys, "test", "--model", res56, "--data", cifar10_exact, "--json", "--bn", "batch",
                           "--latency", "--latency-batch", "1", "8")
    assert code == 0
    res = json.loads(out)
    assert res["bn_mode"] == "batch" and res["top1"] > 90
    assert [lat["batch_size"] for lat in res["latency_cpu"]] == [1, 8]
    assert all(lat["median_ms"] > 0 for lat in res["latency_cpu"])


def test_latency_against_a_baseline_is_timed_interleaved(capsys, tmp_path, shared_data, cifar10_exact,
                                                         slim_checkpoint):
    """`ekg test --latency-baseline`: a pruned-shaped ResNet-20 against the real ResNet-20, both
    timed in the same rounds; structure only, no timing is asserted."""
    model = save_checkpoint(slim_checkpoint, tmp_path / "slim.pt")
    base = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    code, out, _ = run_cli(capsys, "test", "--model", model, "--data", cifar10_exact, "--latency-baseline", base,
                           "--latency-rounds", "2", "--latency-batch", "1", "2", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["latency_baseline"] == str(base) and [lat["batch_size"] for lat in res["latency_cpu"]] == [1, 2]
    for lat, cmp in zip(res["latency_cpu"], res["latency_cpu_comparison"]):
        assert cmp["rounds"] == 2 and cmp["baseline"] == "baseline" and list(cmp["models"]) == ["model", "baseline"]
        assert lat["median_ms"] == cmp["models"]["model"]["median_ms"]
        sp = cmp["speedup"]["model"]
        rounds = zip(cmp["models"]["baseline"]["round_ms"], cmp["models"]["model"]["round_ms"])
        assert sp["per_round"] == pytest.approx([b / m for b, m in rounds])
        assert sp["rounds"] == 2 and sp["min"] <= sp["median"] <= sp["max"]
    from ekg.cli.test import print_test as _print_test  # the human-readable form of the same result

    _print_test(res)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("latency batch")]
    assert len(lines) == 2 and all("speed-up" in line and "over 2 rounds)" in line for line in lines)
    assert "interleaved" in out


def test_latency_options_are_checked_before_any_work(capsys, tmp_path, cifar10_exact, slim_checkpoint):
    model = save_checkpoint(slim_checkpoint, tmp_path / "slim.pt")
    code, _, err = run_cli(capsys, "test", "--model", model, "--data", tmp_path / "nowhere", "--latency",
                           "--latency-rounds", "3")
    assert_one_line_error(code, err, "--latency-rounds", "--latency-baseline")
    code, _, err = run_cli(capsys, "test", "--model", model, "--data", tmp_path / "nowhere",
                           "--latency-baseline", model, "--latency-rounds", "0")
    assert_one_line_error(code, err, "--latency-rounds must be at least 1")
    code, _, err = run_cli(capsys, "test", "--model", model, "--data", tmp_path / "nowhere",
                           "--latency-baseline", tmp_path / "missing.pt")
    assert_one_line_error(code, err, "missing.pt", "does not exist")
    wide = Checkpoint(model=create_model("resnet20", 10), input_size=(3, 64, 64),
                      normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()},
                      dataset={"name": "cifar10", "num_classes": 10})
    code, _, err = run_cli(capsys, "test", "--model", model, "--data", tmp_path / "nowhere",
                           "--latency-baseline", save_checkpoint(wide, tmp_path / "wide.pt"))
    assert_one_line_error(code, err, "--latency-baseline expects (3, 64, 64)")


def test_pretrained_name_and_default_data_resolve_through_ekg_data(capsys, monkeypatch, shared_data):
    monkeypatch.setenv("EKG_DATA", str(shared_data))
    code, out, _ = run_cli(capsys, "test", "--json")  # built-in defaults: EKG ResNet-56 on cifar10
    assert code == 0
    res = json.loads(out)
    assert res["model"] == "ekg_resnet56_cifar10" and res["top1"] >= 93.3


def test_human_readable_output(capsys, res56):
    code, out, _ = run_cli(capsys, "info", "--model", res56)
    assert code == 0 and "125.75 M FLOPs" in out and "layer3.8.conv2" in out
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "resnet110_a" in out and "ekg_resnet56_cifar10" in out


# ----------------------------------------------------------------------------- bad input

def test_missing_data_folder(capsys, res56, tmp_path):
    code, _, err = run_cli(capsys, "test", "--model", res56, "--data", tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere")


def test_truncated_batch_file(capsys, res56, tmp_path, cifar10_exact):
    broken = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_exact / "cifar-10-batches-py", broken)
    for p in broken.iterdir():
        p.chmod(0o644)
    data = (broken / "data_batch_3").read_bytes()
    (broken / "data_batch_3").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "test", "--model", res56, "--data", tmp_path)
    assert_one_line_error(code, err, "data_batch_3")


def test_checkpoint_of_another_architecture(capsys, shared_data, tmp_path):
    out = tmp_path / "x.pt"
    code, _, err = run_cli(capsys, "convert", shared_data / "pretrained/akamaster/resnet32-d509ac18.th",
                           "--arch", "resnet56_a", "--out", out)
    assert_one_line_error(code, err, "do not fit architecture resnet56_a")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_cifar100_checkpoint_on_cifar10(capsys, tmp_path, cifar10_exact):
    model = create_model("resnet20", 100)
    ckpt = Checkpoint(model=model, normalization={"name": "cifar100", **get_normalization("cifar100").to_dict()},
                      dataset={"name": "cifar100", "num_classes": 100})
    path = save_checkpoint(ckpt, tmp_path / "c100.pt")
    code, _, err = run_cli(capsys, "test", "--model", path, "--data", cifar10_exact)
    assert_one_line_error(code, err, "100 classes", "10")


def test_non_checkpoint_file(capsys, tmp_path, cifar10_exact):
    junk = tmp_path / "model.pt"
    junk.write_bytes(os.urandom(4096))
    code, _, err = run_cli(capsys, "test", "--model", junk, "--data", cifar10_exact)
    assert_one_line_error(code, err, "not a model checkpoint")
    code, _, err = run_cli(capsys, "info", "--model", cifar10_exact / "cifar-10-batches-py" / "batches.meta")
    assert_one_line_error(code, err, "not a model checkpoint")


def test_missing_model_file_and_bad_names(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("EKG_DATA", raising=False)
    monkeypatch.setenv("EKG_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "info", "--model", tmp_path / "nope.pt")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "info", "--model", "ekg_resnet56_cifar10")
    assert_one_line_error(code, err, "EKG_DATA", "--download")
    code, _, err = run_cli(capsys, "train", "--arch", "resnet57", "--out", tmp_path / "r", "--data", tmp_path)
    assert_one_line_error(code, err, "unknown model 'resnet57'")
    code, _, err = run_cli(capsys, "train", "--arch", "resnet20", "--epochs", "0", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "--epochs")


def test_checksum_mismatch_of_a_pretrained_file(capsys, tmp_path, monkeypatch, shared_data):
    fake_root = tmp_path / "data"
    (fake_root / "pretrained/ekg_tf").mkdir(parents=True)
    blob = (shared_data / "pretrained/ekg_tf/res56_cifar10.pkl").read_bytes()
    (fake_root / "pretrained/ekg_tf/res56_cifar10.pkl").write_bytes(blob[:-10] + b"0" * 10)
    monkeypatch.setenv("EKG_DATA", str(fake_root))
    code, _, err = run_cli(capsys, "info", "--model", "ekg_resnet56_cifar10")
    assert_one_line_error(code, err, "md5", "6645ed77fd4f94601279e592e9928961")


def test_convert_refuses_to_overwrite_its_source(capsys, tmp_path, shared_data):
    src = tmp_path / "r20.th"
    shutil.copy(shared_data / "pretrained/akamaster/resnet20-12fca82f.th", src)
    code, _, err = run_cli(capsys, "convert", src, "--out", src)
    assert_one_line_error(code, err, "--out")
    assert torch.load(src, map_location="cpu", weights_only=True)["best_prec1"] > 90


# ----------------------------------------------------------------------------- library messages in flags

def test_backticked_library_arguments_print_as_flags():
    """`name` → the flag whose dest is name (the current command's first), `name=True` → the switch,
    `x=False` → --no-x, library names that differ from dests through the alias table, and a name
    with no flag bare."""
    from ekg.cli import build_parser
    from ekg.cli.errors import flag_text

    parser = build_parser()

    def text(msg: str, command: str | None = None) -> str:
        return flag_text(msg, parser, command)

    assert text("`epochs` must be at least 1, got 0", "train") == "--epochs must be at least 1, got 0"
    assert text("`batch_size` 100 is not divisible by `accum` 3", "train") == \
        "--batch-size 100 is not divisible by --accum 3"
    assert text("add `resume=True` to continue it, `restart=True` to start over, or choose another `out`",
                "prune") == "add --resume to continue it, --restart to start over, or choose another --out"
    assert text("`restart=True` removes", "run") == "--restart removes"
    assert text("`resume=True`", "run") == "--resume"  # `ekg run` has none: another command's flag
    assert text("`weight_decay` and `warmup_epochs`", "finetune") == "--wd and --warmup"
    assert text("`fast=False`, `adapt=False`, `cache_gb`", "prune") == "--straightforward, --no-adapt, --search-cache-gb"
    assert text("`flip=False`", "train") == "--no-flip"
    assert text("`jitter=False` or `jitter=True`", "finetune") == "--no-jitter or --jitter"
    assert text("`seed`", "prune") == "--search-seed" and text("`seed`", "train") == "--seed"
    assert text("`bn_mode` must be one of", "test") == "--bn must be one of"
    assert text("`bn` batch", "landscape") == "--bn batch"
    assert text("`topk` 3", "finetune") == "--bank-topk 3"
    assert text("`surface_2d` must be", "landscape") == "--surface-2d must be"
    assert text("`download=True`", "test") == "--download"
    assert text("`top_k` must be at least 1", "landscape") == "top_k must be at least 1"  # no flag: bare
    # commands and other backticked text are left as they are
    assert text("run `ekg prune --out RUN` first", "study") == "run `ekg prune --out RUN` first"
    assert text("no backticks --here") == "no backticks --here"


def test_a_library_error_names_the_argument_and_ekg_the_flag(capsys, tmp_path, cifar10_exact):
    from ekg.errors import EkgError
    from ekg.train import TrainConfig

    with pytest.raises(EkgError, match="^`epochs` must be at least 1, got 0$"):
        TrainConfig(epochs=0).validate()
    code, _, err = run_cli(capsys, "train", "--epochs", "0", "--data", cifar10_exact, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "ekg: error: --epochs must be at least 1, got 0")
    assert "`" not in err


def test_cli_choices_and_defaults_come_from_the_library():
    """No choice list or default retyped in the CLI: each one is the library's."""
    import inspect

    from ekg.bank import DEFAULT_TEACHERS
    from ekg.bn import BN_STATS
    from ekg.checkpoint import TORCHVISION_INPUT_SIZE, TORCHVISION_NORMALIZATION
    from ekg.cli import build_parser
    from ekg.data import DATA_MODES, PAD_MODES, AugmentConfig
    from ekg.distill import KD_MODES
    from ekg.evaluate import LATENCY_BATCHES, SPLITS, evaluate
    from ekg.export import FORMATS
    from ekg.pipeline import PRESETS, run
    from ekg.runtime import AMP_MODES
    from ekg.study import StudyConfig
    from ekg.train import SCHEDULES, TrainConfig, finetune_config

    def parse(*argv: str) -> dict:
        return vars(build_parser().parse_args(list(argv)))

    def choices(command: str, flag: str) -> tuple:
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
        return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)

    ev = inspect.signature(evaluate).parameters
    t = parse("test")
    assert (t["bn"], t["batch_size"], t["split"], t["latency_batch"]) == \
        (ev["bn_mode"].default, ev["batch_size"].default, SPLITS[0], list(LATENCY_BATCHES)) == \
        ("running", 256, "test", [1, 64])
    assert choices("test", "--bn") == choices("landscape", "--bn") == BN_STATS == ("batch", "running")
    assert choices("test", "--split") == SPLITS and choices("export", "--format") == FORMATS
    assert choices("train", "--data-mode") == DATA_MODES and choices("train", "--pad-mode") == PAD_MODES
    assert choices("train", "--schedule") == SCHEDULES and choices("run", "--amp") == AMP_MODES
    assert choices("finetune", "--kd") == choices("run", "--kd") == KD_MODES
    assert choices("run", "--preset") == tuple(PRESETS)
    d, f = TrainConfig(), finetune_config()
    tr, ft = parse("train", "--out", "o"), parse("finetune")
    for args, cfg in ((tr, d), (ft, f)):
        assert (args["epochs"], args["batch_size"], args["lr"], args["schedule"], args["wd"], args["warmup"],
                args["seed"], args["amp"], args["accum"]) == (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule,
                                                              cfg.weight_decay, cfg.warmup_epochs, cfg.seed,
                                                              cfg.amp, cfg.accum)
        assert (args["pad"], args["pad_mode"]) == (AugmentConfig().pad, AugmentConfig().pad_mode)
    assert ft["kd"] == f.kd and (tr["arch"], tr["normalization"]) == (d.arch, d.normalization)
    r = parse("run", "--out", "o")
    sig = inspect.signature(run).parameters
    assert (r["preset"], r["kd"]) == (sig["preset"].default, sig["kd"].default)
    c = parse("convert", "x", "--out", "y")  # None: not given (refused without --torchvision), then the library's
    assert (c["input_size"], c["normalization"]) == (None, None)
    convert_help = next(a for a in build_parser()._actions if a.dest == "command").choices["convert"].format_help()
    assert " ".join(map(str, TORCHVISION_INPUT_SIZE)) in convert_help and TORCHVISION_NORMALIZATION in convert_help
    s, sc = parse("study", "--runs", "r", "--out", "o"), StudyConfig()
    assert (s["perturb"], tuple(s["swap"]), s["finetune_epochs"], s["finetune_lr"], s["bootstrap"]) == \
        (sc.perturb, sc.swap, sc.finetune_epochs, sc.finetune_lr, sc.bootstrap)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    assert f"(default {DEFAULT_TEACHERS})" in next(a for a in sub._actions if a.dest == "teachers").help
