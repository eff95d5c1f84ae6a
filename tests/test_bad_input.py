"""Bad input through the command line, table-driven (issue 16): each case exits non-zero with one
line on stderr (``ekg: error: ...``, no traceback) that names the culprit, and leaves no new or
changed file under the folder it names (by default the whole temporary folder of the test).

:data:`CASES` is the table: ``Case(name, argv, text, folder)``. ``argv`` is one string split on
spaces; its ``{placeholders}`` name the inputs of :class:`Inputs` (a real model, the data, a
truncated copy of a checkpoint, a class-folder tree of the wrong kind, ...), each made on first
use under the test's temporary folder. ``text`` (formatted the same way) must appear in the
error line. ``bench/error_catalogue.py`` prints every case's message into docs/errors.md.
Plus: files get the permissions the umask allows."""

from __future__ import annotations

import os
import pickle
import shutil
import string
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple

import numpy as np
import pytest
from PIL import Image

from ekg.cli import main
from ekg.io import write_json

REPO_ROOT = Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    name: str
    argv: str          # split on spaces, then each word formatted with the Inputs
    text: str          # formatted with the Inputs; must be in the error line
    folder: str = "{tmp}"  # must hold the same files, of the same sizes and times, afterwards


def _png(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tree(root: Path, classes: tuple[str, ...] = ("a", "b"), *, splits: tuple[str, ...] = ("train", "test"),
          empty: dict[str, list[str]] | None = None, size: tuple[int, int] = (8, 8), per_class: int = 3) -> Path:
    """A class-folder tree of tiny PNGs; ``empty``: the class folders (per split) left without images."""
    empty = empty or {}
    for split in splits:
        for k, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            if cls not in empty.get(split, []):
                for i in range(per_class):
                    _png(d / f"{i}.png", size, seed=100 * k + i)
    return root


def _truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _ekg_checkpoint(path: Path, *, num_classes: int = 10, input_size: tuple[int, int, int] = (3, 32, 32),
                    version: int | None = None) -> Path:
    import torch

    from ekg.checkpoint import Checkpoint, save_checkpoint
    from ekg.data import get_normalization
    from ekg.models import ResNetSpec, build_model

    torch.manual_seed(0)
    ckpt = Checkpoint(model=build_model(ResNetSpec(depth=20, num_classes=num_classes)),
                      normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()},
                      dataset={"name": "custom", "num_classes": num_classes}, input_size=input_size)
    save_checkpoint(ckpt, path)
    if version is not None:
        payload = torch.load(path, weights_only=True)
        payload["version"] = version
        torch.save(payload, path)
    return path


def _cifar_copy(root: Path, shared: Path, *, drop: str | None = None, truncate: str | None = None) -> Path:
    """A cifar-10-batches-py/ of links to the shared subset, without ``drop`` or with ``truncate`` cut short."""
    src = shared / "cifar10/exact-subset/cifar-10-batches-py"
    dst = root / "cifar-10-batches-py"
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name == drop:
            continue
        if f.name == truncate:
            _truncated(f, dst / f.name, 0.3)
        else:
            (dst / f.name).symlink_to(f)
    return root


def _torch_save(path: Path, obj: object) -> Path:
    import torch

    torch.save(obj, path)
    return path


def _pickle(path: Path, obj: object) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


class Inputs(dict):
    """The placeholders of the table, each made on first use: ``inputs["truncated_th"]`` is the
    path of a half-length copy of the real ResNet-20 .th under ``tmp``."""

    def __init__(self, tmp: Path, shared: Path, runs: Callable[[str], Path] | None = None):
        super().__init__()
        self.tmp, self.shared = tmp, shared
        aka = shared / "pretrained/akamaster"

        def run(name: str, damage: str | None = None, how: Callable[[Path], object] = _cut) -> Path:
            """A copy of a finished run (``pruned_run``: a prune; ``finetuned``: a 1-epoch fine-tuning),
            its file ``damage`` damaged by ``how``."""
            if runs is None:
                raise RuntimeError("this case needs finished runs: pass `runs` to prepare()")
            dst = tmp / f"{name}{'-' + damage.replace('.', '-') if damage else ''}"
            shutil.copytree(runs(name), dst, ignore=shutil.ignore_patterns("bank", "ft", "finetune", "run.json"))
            if damage:
                how(dst / damage)
            return dst

        self.makers = {
            "tmp": lambda: tmp,
            "model": lambda: aka / "resnet20-12fca82f.th",
            "model32": lambda: aka / "resnet32-d509ac18.th",
            "tf56": lambda: shared / "pretrained/ekg_tf/res56_cifar10.pkl",
            "data": lambda: shared / "cifar10/exact-subset",
            "batches": lambda: shared / "cifar10/exact-subset/cifar-10-batches-py",
            # model files that are not (whole) checkpoints
            "truncated_th": lambda: _truncated(aka / "resnet20-12fca82f.th", tmp / "resnet20-cut.th"),
            "truncated_pkl": lambda: _truncated(shared / "pretrained/ekg_tf/res56_cifar10.pkl", tmp / "res56-cut.pkl"),
            "truncated_pt": lambda: _truncated(_ekg_checkpoint(tmp / "whole.pt"), tmp / "cut.pt", 0.6),
            "random_pt": lambda: _write(tmp / "random.pt", np.random.default_rng(0).bytes(4096)),
            "empty_pt": lambda: _write(tmp / "empty.pt", b""),
            "json_pt": lambda: _write(tmp / "model.json", '{"arch": "resnet20", "weights": []}'),
            "text_pt": lambda: _write(tmp / "model.pt", "this is not a model\n"),
            "list_pkl": lambda: _pickle(tmp / "list.pkl", [1, 2, 3]),
            "dict_pkl": lambda: _pickle(tmp / "weights.pkl", {"weights": np.zeros(3, np.float32)}),
            "tensor_pt": lambda: _torch_save(tmp / "tensor.pt", __import__("torch").zeros(3)),
            "epoch_pt": lambda: _torch_save(tmp / "epoch.pt", {"epoch": 3, "optimizer": {}}),
            "foreign_pt": lambda: _torch_save(tmp / "foreign.pt", {"state_dict": {"fc.weight": __import__("torch").zeros(2, 2)}}),
            "c100_pt": lambda: _ekg_checkpoint(tmp / "c100.pt", num_classes=100),
            "big_pt": lambda: _ekg_checkpoint(tmp / "big.pt", input_size=(3, 64, 64)),
            "ekg_pt": lambda: _ekg_checkpoint(tmp / "ekg.pt"),
            "future_pt": lambda: _ekg_checkpoint(tmp / "future.pt", version=99),
            "module_pt": lambda: _torch_save(tmp / "module.pt", __import__("torch").nn.Linear(2, 2)),
            "object_pkl": lambda: _pickle(tmp / "object.pkl", PurePosixPath("a/b")),
            "incomplete_pt": lambda: _torch_save(tmp / "incomplete.pt", {"format": "ekg-checkpoint", "version": 1}),
            # data that is not a dataset ekg can read
            "emptydir": lambda: _mkdir(tmp / "emptydir"),
            "textfile": lambda: _write(tmp / "notes.txt", "hello\n"),
            "bad_zip": lambda: _write(tmp / "images.zip", np.random.default_rng(1).bytes(2048)),
            "bad_tgz": lambda: _write(tmp / "cifar-10-python.tar.gz", np.random.default_rng(2).bytes(2048)),
            "no_test_batch": lambda: _cifar_copy(tmp / "no-test-batch", shared, drop="test_batch"),
            "cut_test_batch": lambda: _cifar_copy(tmp / "cut-test-batch", shared, truncate="test_batch"),
            "tree_empty_both": lambda: _tree(tmp / "empty-both", empty={"train": ["b"], "test": ["b"]}),
            "tree_empty_train": lambda: _tree(tmp / "empty-train", empty={"train": ["b"]}),
            "tree_2": lambda: _tree(tmp / "two-classes", size=(32, 32)),
            "tree_16": lambda: _tree(tmp / "small-images", tuple("abcdefghij"), size=(16, 16), per_class=1),
            "tree_train_only": lambda: _tree(tmp / "train-only", splits=("train",)),
            "tree_bad_image": lambda: _bad_image_tree(tmp / "bad-image"),
            "tree_sizes": lambda: _mixed_size_tree(tmp / "mixed-sizes"),
            "tree_loose": lambda: _loose_tree(tmp / "loose"),
            "tree_extra_test_class": lambda: _extra_test_class_tree(tmp / "extra-test-class"),
            # run directories and banks that are not
            "run_file": lambda: _write(tmp / "run.txt", "not a run\n"),
            # finished runs, whole or with one of their own files damaged
            "run": lambda: run("pruned_run"),
            "run_cut_state": lambda: run("pruned_run", "search_state.pt"),
            "run_cut_adapted": lambda: run("pruned_run", "adapted.pt"),
            "run_cut_history": lambda: run("pruned_run", "history.pt"),
            "run_bad_config": lambda: run("pruned_run", "config.json", _not_json),
            "run_bad_bank": lambda: run("pruned_run", "bank.json", _not_json),
            "ft": lambda: run("finetuned"),
            "ft_cut_last": lambda: run("finetuned", "last.pt"),
            "ft_empty_last": lambda: run("finetuned", "last.pt", lambda p: p.write_bytes(b"")),
            "ft_foreign_last": lambda: run("finetuned", "last.pt", lambda p: _torch_save(p, {"epoch": 1})),
        }

    def __missing__(self, key: str) -> str:
        value = str(self.makers[key]())
        self[key] = value
        return value

    def format(self, template: str) -> str:
        return string.Formatter().vformat(template, (), self)


def _cut(path: Path) -> Path:
    return _truncated(path, path)


def _not_json(path: Path) -> Path:
    return _write(path, '{"search": {"keep": 0.85,')


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _bad_image_tree(root: Path) -> Path:
    _tree(root, size=(32, 32))
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


def _mixed_size_tree(root: Path) -> Path:
    _tree(root, size=(32, 32))
    _png(root / "train" / "a" / "9.png", (24, 40), seed=7)
    return root


def _loose_tree(root: Path) -> Path:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for i in range(2):
            _png(root / split / f"{i}.png", (8, 8), seed=i)
    return root


def _extra_test_class_tree(root: Path) -> Path:
    _tree(root, size=(32, 32))
    (root / "test" / "c").mkdir()
    _png(root / "test" / "c" / "0.png", (32, 32), seed=9)
    return root


M, D = "--model {model}", "--data {data}"
MD = f"{M} {D}"
OUT = "--out {tmp}/out"
Q = "--quiet"

CASES: list[Case] = [
    # ------------------------------------------------------------------ kept from the first part
    Case("an empty class folder in train/ and test/",
         f"train --data {{tree_empty_both}} --arch resnet20 {OUT} --epochs 1", "{tree_empty_both}/train/b holds no images"),
    Case("an empty class folder only in train/ (not 'no train/ folder')",
         f"train --data {{tree_empty_train}} --arch resnet20 {OUT} --epochs 1", "{tree_empty_train}/train/b holds no images"),
    Case("ekg run --teachers 0", f"run {MD} {Q} {OUT} --teachers 0", "--teachers must be a whole number of at least 1"),
    Case("ekg finetune --teachers 0", f"finetune {MD} {Q} --bank {{tmp}}/o4 --teachers 0",
         "--teachers must be a whole number of at least 1"),
    Case("ekg run --limit-train 0, refused before the search", f"run {MD} {Q} {OUT} --limit-train 0",
         "--limit-train must be at least 1"),
    Case("ekg finetune --limit-test 0", f"finetune {MD} {Q} --kd none {OUT} --limit-test 0", "--limit-test must be at least 1"),
    Case("ekg study --runs notarun writes no study_config.json", f"study --runs {{tmp}}/notarun {D} {OUT} {Q}",
         "is not a finished pruning run"),
    Case("ekg test --latency-batch 0", f"test {MD} --latency --latency-batch 0", "--latency-batch sizes must be at least 1"),
]

CASES += [
    # test: the model file
    Case("test: --model file missing", f"test --model {{tmp}}/nope.th {D}", "{tmp}/nope.th does not exist"),
    Case("test: --model is a folder", f"test --model {{tmp}} {D}", "is a folder"),
    Case("test: --model truncated akamaster .th", f"test --model {{truncated_th}} {D}", "{truncated_th}"),
    Case("test: --model truncated EKG TF pickle", f"test --model {{truncated_pkl}} {D}", "{truncated_pkl}"),
    Case("test: --model truncated ekg .pt", f"test --model {{truncated_pt}} {D}", "{truncated_pt}"),
    Case("test: --model random bytes", f"test --model {{random_pt}} {D}", "{random_pt}"),
    Case("test: --model empty file", f"test --model {{empty_pt}} {D}", "{empty_pt}"),
    Case("test: --model a JSON file", f"test --model {{json_pt}} {D}", "{json_pt}"),
    Case("test: --model a text file", f"test --model {{text_pt}} {D}", "{text_pt}"),
    Case("test: --model a pickle of a list", f"test --model {{list_pkl}} {D}", "{list_pkl}"),
    Case("test: --model a pickle of a dict of arrays", f"test --model {{dict_pkl}} {D}", "{dict_pkl}"),
    Case("test: --model a saved tensor", f"test --model {{tensor_pt}} {D}", "{tensor_pt}"),
    Case("test: --model a training-state dict", f"test --model {{epoch_pt}} {D}", "{epoch_pt}"),
    Case("test: --model a state dict of another network", f"test --model {{foreign_pt}} {D}", "{foreign_pt}"),
    Case("test: --model from a newer ekg", f"test --model {{future_pt}} {D}", "newer ekg"),
    Case("test: --model an incomplete ekg checkpoint", f"test --model {{incomplete_pt}} {D}", "incomplete"),
    Case("test: --model an architecture name, not a pretrained one", f"test --model resnet20 {D}",
         "resnet20 is neither a model file nor a pretrained name"),
    Case("test: --model a pickled nn.Module", f"test --model {{module_pt}} {D}", "{module_pt} holds pickled Python objects"),
    Case("test: --model a pickle of a Python object", f"test --model {{object_pkl}} {D}", "{object_pkl}"),
    Case("test: a 100-class model on CIFAR-10", f"test --model {{c100_pt}} {D}", "100 classes"),
    Case("test: a 64x64 model on 32x32 images", f"test --model {{big_pt}} {D}", "(3, 64, 64)"),
    # test: the data
    Case("test: --data missing", f"test {M} --data {{tmp}}/nodata", "{tmp}/nodata does not exist"),
    Case("test: --data an unknown dataset name", f"test {M} --data cifar11", "cifar11"),
    Case("test: --data an empty folder", f"test {M} --data {{emptydir}}", "{emptydir}"),
    Case("test: --data a text file", f"test {M} --data {{textfile}}", "{textfile}"),
    Case("test: --data a corrupt zip", f"test {M} --data {{bad_zip}}", "{bad_zip}"),
    Case("test: --data a corrupt tar.gz", f"test {M} --data {{bad_tgz}}", "{bad_tgz}"),
    Case("test: --data without test_batch", f"test {M} --data {{no_test_batch}}", "test_batch"),
    Case("test: --data with a truncated test_batch", f"test {M} --data {{cut_test_batch}}", "test_batch"),
    Case("test: --data the model file", f"test {M} --data {{model}}", "resnet20-12fca82f.th"),
    Case("test: --data a 2-class tree for a 10-class model", f"test {M} --data {{tree_2}}", "2"),
    Case("test: --data 16x16 images for a 32x32 model", f"test {M} --data {{tree_16}}", "(3, 16, 16)"),
    Case("test: --data a tree with a broken image", f"test {M} --data {{tree_bad_image}}", "1.png"),
    Case("test: --data a tree of mixed sizes in memory", f"test {M} --data {{tree_sizes}} --data-mode memory", "9.png"),
    Case("test: --data a tree with train/ only", f"test {M} --data {{tree_train_only}}", "{tree_train_only}"),
    Case("test: --data a tree without class folders", f"test {M} --data {{tree_loose}}", "{tree_loose}"),
    Case("test: --data test classes without train/ folders", f"test {M} --data {{tree_extra_test_class}}", "c"),
    Case("test: --data-mode stream on CIFAR batches", f"test {MD} --data-mode stream", "stream"),
    Case("test: --image-size 0 on a streamed tree", f"test {M} --data {{tree_2}} --data-mode stream --image-size 0", "image-size"),
    Case("test: --resize -1 on a streamed tree", f"test {M} --data {{tree_2}} --data-mode stream --resize -1", "resize"),
    Case("test: --workers -1 on a streamed tree", f"test {M} --data {{tree_2}} --data-mode stream --workers -1", "workers"),
    Case("test: --resize smaller than --image-size", f"test {M} --data {{tree_2}} --data-mode stream --image-size 32 --resize 16", "resize"),
    # test: the numbers and choices
    Case("test: --batch-size 0", f"test {MD} --batch-size 0", "--batch-size"),
    Case("test: --batch-size -4", f"test {MD} --batch-size -4", "--batch-size"),
    Case("test: --batch-size not a number", f"test {MD} --batch-size ten", "--batch-size"),
    Case("test: --latency-batch -1", f"test {MD} --latency --latency-batch 1 -1", "--latency-batch"),
    Case("test: --latency-rounds without --latency-baseline", f"test {MD} --latency-rounds 3", "--latency-baseline"),
    Case("test: --latency-rounds 0", f"test {MD} --latency-baseline {{model}} --latency-rounds 0", "--latency-rounds"),
    Case("test: --latency-baseline missing", f"test {MD} --latency-baseline {{tmp}}/base.th", "{tmp}/base.th"),
    Case("test: --latency-baseline truncated", f"test {MD} --latency-baseline {{truncated_th}}", "{truncated_th}"),
    Case("test: --latency-baseline of another input size", f"test {MD} --latency-baseline {{big_pt}}", "--latency-baseline"),
    Case("test: --split unknown", f"test {MD} --split val", "--split"),
    Case("test: --bn unknown", f"test {MD} --bn eval", "--bn"),
    Case("test: --data-mode unknown", f"test {MD} --data-mode disk", "--data-mode"),
    Case("test: --device unknown", f"test {MD} --device tpu", "tpu"),
    Case("test: an unknown flag", f"test {MD} --top5", "--top5"),
    # info
    Case("info: --model missing", "info --model {tmp}/nope.pt", "{tmp}/nope.pt does not exist"),
    Case("info: --model a folder", "info --model {tmp}", "is a folder"),
    Case("info: --model truncated .th", "info --model {truncated_th}", "{truncated_th}"),
    Case("info: --model truncated TF pickle", "info --model {truncated_pkl}", "{truncated_pkl}"),
    Case("info: --model truncated ekg .pt", "info --model {truncated_pt}", "{truncated_pt}"),
    Case("info: --model random bytes", "info --model {random_pt}", "{random_pt}"),
    Case("info: --model empty file", "info --model {empty_pt}", "{empty_pt}"),
    Case("info: --model JSON", "info --model {json_pt}", "{json_pt}"),
    Case("info: --model pickle of a list", "info --model {list_pkl}", "{list_pkl}"),
    Case("info: --model newer ekg", "info --model {future_pt}", "newer ekg"),
    Case("info: --model a misspelt pretrained name", "info --model akamaster_resnet23", "(did you mean akamaster_resnet32?)"),
    Case("info: an argument too many", "info {model}", "{model}"),
    # convert
    Case("convert: source missing", "convert {tmp}/nope.pkl --out {tmp}/out.pt", "{tmp}/nope.pkl does not exist"),
    Case("convert: source a folder", "convert {emptydir} --out {tmp}/out.pt", "{emptydir}"),
    Case("convert: source truncated TF pickle", "convert {truncated_pkl} --out {tmp}/out.pt", "{truncated_pkl}"),
    Case("convert: source truncated .th", "convert {truncated_th} --out {tmp}/out.pt", "{truncated_th}"),
    Case("convert: source random bytes", "convert {random_pt} --out {tmp}/out.pt", "{random_pt}"),
    Case("convert: source empty", "convert {empty_pt} --out {tmp}/out.pt", "{empty_pt}"),
    Case("convert: source a non-model pickle", "convert {dict_pkl} --out {tmp}/out.pt", "{dict_pkl}"),
    Case("convert: --out the source", "convert {tmp}/same.th --out {tmp}/same.th", "--out"),
    Case("convert: --arch unknown", "convert {model} --out {tmp}/out.pt --arch resnet21", "resnet21"),
    Case("convert: --arch of another depth", "convert {model} --out {tmp}/out.pt --arch resnet56", "resnet56"),
    Case("convert: --arch on an ekg checkpoint", "convert {ekg_pt} --out {tmp}/out.pt --arch resnet20", "--arch"),
    Case("convert: --arch with --torchvision", "convert {model} --out {tmp}/out.pt --torchvision resnet18 --arch resnet20", "--arch"),
    Case("convert: --torchvision of a JSON file", "convert {json_pt} --out {tmp}/out.pt --torchvision resnet18", "{json_pt}"),
    Case("convert: --num-classes without --torchvision", "convert {model} --out {tmp}/out.pt --num-classes 10", "--num-classes"),
    Case("convert: --normalization without --torchvision", "convert {model} --out {tmp}/out.pt --normalization cifar10", "--normalization"),
    Case("convert: --input-size without --torchvision", "convert {model} --out {tmp}/out.pt --input-size 3 32 32", "--input-size"),
    Case("convert: --num-classes 0", "convert {foreign_pt} --out {tmp}/out.pt --torchvision resnet18 --num-classes 0", "--num-classes"),
    Case("convert: --input-size with a zero", "convert {foreign_pt} --out {tmp}/out.pt --torchvision resnet18 --input-size 3 0 224", "--input-size"),
    Case("convert: --normalization unknown", "convert {foreign_pt} --out {tmp}/out.pt --torchvision resnet18 --normalization imagenette", "imagenette"),
    Case("convert: --timm with --torchvision", "convert {foreign_pt} --out {tmp}/out.pt --timm resnet18 --torchvision resnet18",
         "--torchvision and --timm"),
    Case("convert: --arch with --timm", "convert {model} --out {tmp}/out.pt --timm resnet18 --arch resnet20", "--timm"),
    Case("convert: no --out", "convert {model}", "--out"),
    # train
    Case("train: --arch unknown", f"train --arch resnet21 {D} {OUT}", "resnet21"),
    Case("train: --epochs 0", f"train {D} {OUT} --epochs 0", "--epochs"),
    Case("train: --epochs -3", f"train {D} {OUT} --epochs -3", "--epochs"),
    Case("train: --epochs not a whole number", f"train {D} {OUT} --epochs 1.5", "--epochs"),
    Case("train: --batch-size 0", f"train {D} {OUT} --batch-size 0", "--batch-size"),
    Case("train: --lr 0", f"train {D} {OUT} --lr 0", "--lr"),
    Case("train: --lr -0.1", f"train {D} {OUT} --lr -0.1", "--lr"),
    Case("train: --lr nan", f"train {D} {OUT} --lr nan", "--lr"),
    Case("train: --lr inf", f"train {D} {OUT} --lr inf", "--lr"),
    Case("train: --wd -1e-4 (taken for a flag)", f"train {D} {OUT} --wd -1e-4", "--wd=VALUE"),
    Case("train: --wd=-1e-4", f"train {D} {OUT} --wd=-1e-4", "--wd"),
    Case("train: --wd nan", f"train {D} {OUT} --wd nan", "--wd"),
    Case("train: --warmup -1", f"train {D} {OUT} --warmup -1", "--warmup"),
    Case("train: --warmup beyond --epochs", f"train {D} {OUT} --epochs 2 --warmup 5", "--warmup"),
    Case("train: --pad -2", f"train {D} {OUT} --pad -2", "--pad"),
    Case("train: --accum 0", f"train {D} {OUT} --accum 0", "--accum"),
    Case("train: --accum not dividing --batch-size", f"train {D} {OUT} --batch-size 100 --accum 3", "--accum"),
    Case("train: --limit-train -5", f"train {D} {OUT} --limit-train -5", "--limit-train"),
    Case("train: --limit-test 0", f"train {D} {OUT} --limit-test 0", "--limit-test"),
    Case("train: --seed -1", f"train {D} {OUT} --seed -1", "--seed"),
    Case("train: --normalization unknown", f"train {D} {OUT} --normalization imagenette", "imagenette"),
    Case("train: --schedule unknown", f"train {D} {OUT} --schedule linear", "--schedule"),
    Case("train: --pad-mode unknown", f"train {D} {OUT} --pad-mode mirror", "--pad-mode"),
    Case("train: --amp unknown", f"train {D} {OUT} --amp fp8", "--amp"),
    Case("train: --amp fp16 on the CPU", f"train {D} {OUT} --amp fp16 --device cpu", "fp16"),
    Case("train: --device unknown", f"train {D} {OUT} --device gpu0", "gpu0"),
    Case("train: --data missing", f"train --data {{tmp}}/nodata {OUT}", "{tmp}/nodata"),
    Case("train: --data a corrupt zip", f"train --data {{bad_zip}} {OUT}", "{bad_zip}"),
    Case("train: --data a tree with a broken image", f"train --data {{tree_bad_image}} {OUT}", "1.png"),
    Case("train: --resume with nothing to resume", f"train {D} {OUT} --resume", "{tmp}/out"),
    Case("train: no --out", f"train {D}", "--out"),
    # finetune
    Case("finetune: --kd ensemble without --bank", f"finetune {MD} {OUT}", "--bank"),
    Case("finetune: --kd none without --out or --bank", f"finetune {MD} --kd none", "--out"),
    Case("finetune: --bank missing", f"finetune {MD} --bank {{tmp}}/norun", "{tmp}/norun"),
    Case("finetune: --bank a file", f"finetune {MD} --bank {{run_file}}", "{run_file}"),
    Case("finetune: --bank an empty folder", f"finetune {MD} --bank {{emptydir}}", "{emptydir}"),
    Case("finetune: --model missing", f"finetune --model {{tmp}}/nope.pt {D} --kd none {OUT}", "{tmp}/nope.pt"),
    Case("finetune: --model truncated", f"finetune --model {{truncated_th}} {D} --kd none {OUT}", "{truncated_th}"),
    Case("finetune: --model a JSON file", f"finetune --model {{json_pt}} {D} --kd none {OUT}", "{json_pt}"),
    Case("finetune: a 100-class model on CIFAR-10", f"finetune --model {{c100_pt}} {D} --kd none {OUT}", "100 classes"),
    Case("finetune: --data missing", f"finetune {M} --data {{tmp}}/nodata --kd none {OUT}", "{tmp}/nodata"),
    Case("finetune: --teachers -2", f"finetune {MD} --bank {{tmp}}/run --teachers -2", "--teachers"),
    Case("finetune: --bank-topk 0", f"finetune {MD} --bank {{tmp}}/run --bank-topk 0", "--bank-topk"),
    Case("finetune: --bank-topk beyond the classes", f"finetune {MD} --bank {{tmp}}/run --bank-topk 11", "--bank-topk"),
    Case("finetune: --teachers with --kd none", f"finetune {MD} --kd none {OUT} --teachers 3", "--teachers"),
    Case("finetune: --bank-topk with --kd none", f"finetune {MD} --kd none {OUT} --bank-topk 3", "--bank-topk"),
    Case("finetune: --temperature 0", f"finetune {MD} --kd none {OUT} --temperature 0", "--temperature"),
    Case("finetune: --temperature nan", f"finetune {MD} --kd none {OUT} --temperature nan", "--temperature"),
    Case("finetune: --epochs 0", f"finetune {MD} --kd none {OUT} --epochs 0", "--epochs"),
    Case("finetune: --lr -1", f"finetune {MD} --kd none {OUT} --lr -1", "--lr"),
    Case("finetune: --batch-size -1", f"finetune {MD} --kd none {OUT} --batch-size -1", "--batch-size"),
    Case("finetune: --kd unknown", f"finetune {MD} --kd soft {OUT}", "--kd"),
    Case("finetune: --warmup nan", f"finetune {MD} --kd none {OUT} --warmup nan", "--warmup"),
    Case("finetune: --seed beyond 2**32", f"finetune {MD} --kd none {OUT} --seed 5000000000", "--seed"),
    # prune
    Case("prune: --keep 0", f"prune {MD} {OUT} --keep 0", "--keep"),
    Case("prune: --keep 1.5", f"prune {MD} {OUT} --keep 1.5", "--keep"),
    Case("prune: --keep -0.3", f"prune {MD} {OUT} --keep -0.3", "--keep"),
    Case("prune: --keep nan", f"prune {MD} {OUT} --keep nan", "--keep"),
    Case("prune: --keep as a percentage", f"prune {MD} {OUT} --keep 50", "--keep"),
    Case("prune: --keep not a number", f"prune {MD} {OUT} --keep half", "--keep"),
    Case("prune: --resume and --restart", f"prune {MD} {OUT} --resume --restart", "--restart"),
    Case("prune: a latency target without --budget latency", f"prune {MD} {OUT} --latency-runtime onnxruntime",
         "--latency-runtime sets the latency target of a latency budget: add --budget latency, or drop it"),
    Case("prune: --budget latency --latency-batch 0", f"prune {MD} {OUT} --budget latency --latency-batch 0",
         "latency batch must be an integer >= 1"),
    Case("prune: --budget latency --latency-threads 0", f"prune {MD} {OUT} --budget latency --latency-threads 0",
         "latency threads must be an integer >= 1"),
    Case("prune: --budget latency with --compat release", f"prune {MD} {OUT} --budget latency --compat release",
         "not part of the original release"),
    Case("run: --budget latency --keep 1.2", f"run {MD} {Q} {OUT} --budget latency --keep 1.2",
         "fraction of the measured latency"),
    Case("test: --latency-runtime onnxruntime --latency-threads 0", f"test {MD} --latency --latency-threads 0",
         "latency threads must be an integer >= 1"),
    Case("prune: --latency-dtype without --budget latency", f"prune {MD} {OUT} --latency-dtype bfloat16",
         "--latency-dtype sets the latency target of a latency budget: add --budget latency, or drop it"),
    Case("prune: --latency-dtype float16 on the CPU", f"prune {MD} {OUT} --budget latency --latency-dtype float16",
         "float16 is a GPU format"),
    Case("test: --latency-runtime onnxruntime --latency-channels-last",
         f"test {MD} --latency --latency-runtime onnxruntime --latency-channels-last", "float32 ONNX graphs"),
    Case("prune: --val-per-class 0", f"prune {MD} {OUT} --val-per-class 0", "--val-per-class"),
    Case("prune: --sub-per-class -1", f"prune {MD} {OUT} --sub-per-class -1", "--sub-per-class"),
    Case("prune: --search-seed -1", f"prune {MD} {OUT} --search-seed -1", "--search-seed"),
    Case("prune: --search-cache-gb -1", f"prune {MD} {OUT} --search-cache-gb -1", "--search-cache-gb"),
    Case("prune: --search-cache-gb nan", f"prune {MD} {OUT} --search-cache-gb nan", "--search-cache-gb"),
    Case("prune: --importance unknown", f"prune {MD} {OUT} --importance l2", "--importance"),
    Case("prune: --method unknown", f"prune {MD} {OUT} --method random", "--method"),
    Case("prune: --compat unknown", f"prune {MD} {OUT} --compat tf", "--compat"),
    Case("prune: --model missing", f"prune --model {{tmp}}/nope.th {D} {OUT}", "{tmp}/nope.th"),
    Case("prune: --model truncated", f"prune --model {{truncated_pkl}} {D} {OUT}", "{truncated_pkl}"),
    Case("prune: --model an empty file", f"prune --model {{empty_pt}} {D} {OUT}", "{empty_pt}"),
    Case("prune: --data missing", f"prune {M} --data {{tmp}}/nodata {OUT}", "{tmp}/nodata"),
    Case("prune: a 100-class model on CIFAR-10", f"prune --model {{c100_pt}} {D} {OUT}", "100 classes"),
    Case("prune: 16x16 images for a 32x32 model", f"prune {M} --data {{tree_16}} {OUT}", "16"),
    Case("prune: --device unknown", f"prune {MD} {OUT} --device gpu", "gpu"),
    Case("prune: no --out", f"prune {MD}", "--out"),
    # run
    Case("run: --keep 0", f"run {MD} {Q} {OUT} --keep 0", "--keep"),
    Case("run: --keep 1", f"run {MD} {Q} {OUT} --keep 1", "--keep"),
    Case("run: --epochs 0", f"run {MD} {Q} {OUT} --epochs 0", "--epochs"),
    Case("run: --epochs -3", f"run {MD} {Q} {OUT} --epochs -3", "--epochs"),
    Case("run: --limit-train -1", f"run {MD} {Q} {OUT} --limit-train -1", "--limit-train"),
    Case("run: --teachers -2", f"run {MD} {Q} {OUT} --teachers -2", "--teachers"),
    Case("run: --bank-topk 0", f"run {MD} {Q} {OUT} --bank-topk 0", "--bank-topk"),
    Case("run: --bank-topk beyond the classes", f"run {MD} {Q} {OUT} --bank-topk 11", "--bank-topk"),
    Case("run: --teachers with --kd none", f"run {MD} {Q} {OUT} --kd none --teachers 3", "--teachers"),
    Case("run: --accum 0", f"run {MD} {Q} {OUT} --accum 0", "--accum"),
    Case("run: --amp fp16 on the CPU", f"run {MD} {Q} {OUT} --amp fp16 --device cpu", "fp16"),
    Case("run: --preset unknown", f"run {MD} {Q} {OUT} --preset fast", "--preset"),
    Case("run: --kd unknown", f"run {MD} {Q} {OUT} --kd soft", "--kd"),
    Case("run: --model random bytes", f"run --model {{random_pt}} {D} {Q} {OUT}", "{random_pt}"),
    Case("run: --model truncated ekg .pt", f"run --model {{truncated_pt}} {D} {Q} {OUT}", "{truncated_pt}"),
    Case("run: --data a text file", f"run {M} --data {{textfile}} {Q} {OUT}", "{textfile}"),
    Case("run: --data a 2-class tree for a 10-class model", f"run {M} --data {{tree_2}} {Q} {OUT}", "2"),
    Case("run: --sub-per-class -5", f"run {MD} {Q} {OUT} --sub-per-class -5", "--sub-per-class"),
    # export
    Case("export: --model missing", "export --model {tmp}/nope.pt --out {tmp}/m.onnx", "{tmp}/nope.pt"),
    Case("export: --model truncated", "export --model {truncated_th} --out {tmp}/m.ts", "{truncated_th}"),
    Case("export: --model a JSON file", "export --model {json_pt} --out {tmp}/m.ts", "{json_pt}"),
    Case("export: --model a pickle of a list", "export --model {list_pkl} --out {tmp}/m.ts", "{list_pkl}"),
    Case("export: --format unknown", "export --model {model} --out {tmp}/m.ts --format tflite", "--format"),
    Case("export: --out of an unknown kind", "export --model {model} --out {tmp}/m.tflite", "--format"),
    Case("export: --format contradicting --out", "export --model {model} --out {tmp}/m.onnx --format torchscript", "--format"),
    Case("export: no --out", "export --model {model}", "--out"),
    # landscape
    Case("landscape: --images 0", f"landscape {MD} {OUT} --images 0", "--images"),
    Case("landscape: --batch-size 1 with --bn batch", f"landscape {MD} {OUT} --batch-size 1", "--batch-size"),
    Case("landscape: --batch-size 0", f"landscape {MD} {OUT} --batch-size 0 --bn running", "--batch-size"),
    Case("landscape: --power-iters 0", f"landscape {MD} {OUT} --power-iters 0", "--power-iters"),
    Case("landscape: --lanczos-steps -1", f"landscape {MD} {OUT} --lanczos-steps -1", "--lanczos-steps"),
    Case("landscape: --hutchinson-samples 0", f"landscape {MD} {OUT} --hutchinson-samples 0", "--hutchinson-samples"),
    Case("landscape: --surface-1d 1", f"landscape {MD} {OUT} --surface-1d 1", "--surface-1d"),
    Case("landscape: --surface-2d -3", f"landscape {MD} {OUT} --surface-2d -3", "--surface-2d"),
    Case("landscape: --surface-range 0", f"landscape {MD} {OUT} --surface-range 0", "--surface-range"),
    Case("landscape: --surface-range nan", f"landscape {MD} {OUT} --surface-range nan", "--surface-range"),
    Case("landscape: --surface-range inf", f"landscape {MD} {OUT} --surface-range inf", "--surface-range"),
    Case("landscape: --images beyond the data", f"landscape {MD} {OUT} --images 100000", "--images"),
    Case("landscape: --bn unknown", f"landscape {MD} {OUT} --bn eval", "--bn"),
    Case("landscape: --model missing", f"landscape --model {{tmp}}/nope.th {D} {OUT}", "{tmp}/nope.th"),
    Case("landscape: --model truncated", f"landscape --model {{truncated_th}} {D} {OUT}", "{truncated_th}"),
    Case("landscape: --data missing", f"landscape {M} --data {{tmp}}/nodata {OUT}", "{tmp}/nodata"),
    Case("landscape: a 100-class model on CIFAR-10", f"landscape --model {{c100_pt}} {D} {OUT}", "100 classes"),
    Case("landscape: --seed -1", f"landscape {MD} {OUT} --seed -1", "--seed"),
    # study
    Case("study: --runs a file", f"study --runs {{run_file}} {D} {OUT} {Q}", "{run_file}"),
    Case("study: --runs an empty folder", f"study --runs {{emptydir}} {D} {OUT} {Q}", "{emptydir}"),
    Case("study: --runs none given", f"study --runs {D} {OUT}", "--runs"),
    Case("study: --perturb -1", f"study --runs {{emptydir}} {D} {OUT} --perturb -1", "--perturb"),
    Case("study: --swap reversed", f"study --runs {{emptydir}} {D} {OUT} --swap 0.5 0.2", "--swap"),
    Case("study: --swap above 1", f"study --runs {{emptydir}} {D} {OUT} --swap 0 2", "--swap"),
    Case("study: --swap nan", f"study --runs {{emptydir}} {D} {OUT} --swap nan 0.5", "--swap"),
    Case("study: --finetune-epochs 0", f"study --runs {{emptydir}} {D} {OUT} --finetune-epochs 0", "--finetune-epochs"),
    Case("study: --finetune-lr 0", f"study --runs {{emptydir}} {D} {OUT} --finetune-lr 0", "--finetune-lr"),
    Case("study: --finetune-lr nan", f"study --runs {{emptydir}} {D} {OUT} --finetune-lr nan", "--finetune-lr"),
    Case("study: --limit-train 0", f"study --runs {{emptydir}} {D} {OUT} --limit-train 0", "--limit-train"),
    Case("study: --bootstrap -1", f"study --runs {{emptydir}} {D} {OUT} --bootstrap -1", "--bootstrap"),
    Case("study: --images 0", f"study --runs {{emptydir}} {D} {OUT} --images 0", "--images"),
    Case("study: --power-iters 0", f"study --runs {{emptydir}} {D} {OUT} --power-iters 0", "--power-iters"),
    Case("study: --data missing", f"study --runs {{emptydir}} --data {{tmp}}/nodata {OUT}", "{tmp}/nodata"),
    Case("study: --runs the same run twice", f"study --runs {{tmp}}/r {{tmp}}/r {D} {OUT}", "{tmp}/r"),
    # models and the command itself
    Case("models: an argument", "models resnet20", "resnet20"),
    Case("models: an unknown flag", "models --json", "--json"),
    Case("ekg: no command", "", "COMMAND"),
    Case("ekg: an unknown command", "tset", "tset"),
]

R20 = "--model {model} --data {data} --quiet"
FT = "--epochs 1 --limit-train 128 --batch-size 64 --limit-test 64"
CASES += [
    # ------------------------------------------------------------------ outputs that cannot be written
    Case("prune: --out under /proc", f"prune {R20} --out /proc/ekg-test/run", "/proc/ekg-test/run cannot be created"),
    Case("run: --out under /proc", f"run {R20} --out /proc/ekg-test/run", "/proc/ekg-test/run cannot be created"),
    Case("finetune: --out under /proc", f"finetune {R20} --kd none --out /proc/ekg-test/ft {FT}",
         "/proc/ekg-test/ft cannot be created"),
    Case("train: --out under /proc", "train --arch resnet20 --data {data} --out /proc/ekg-test/t",
         "/proc/ekg-test/t cannot be created"),
    Case("landscape: --out under /proc", f"landscape {R20} --out /proc/ekg-test/l", "/proc/ekg-test/l cannot be created"),
    Case("study: --out under /proc", f"study --runs {{run}} {D} {Q} --out /proc/ekg-test/s",
         "/proc/ekg-test/s cannot be created"),
    Case("export: --out under /proc", "export --model {model} --out /proc/ekg-test/m.onnx",
         "/proc/ekg-test/m.onnx cannot be created"),
    Case("convert: --out under /proc", "convert {model} --out /proc/ekg-test/m.pt", "/proc/ekg-test/m.pt cannot be created"),
    Case("prune: --out is an existing file", f"prune {R20} --out {{run_file}}", "{run_file} is a file, not a folder"),
    Case("run: --out is an existing file", f"run {R20} --out {{run_file}}", "{run_file} is a file, not a folder"),
    Case("finetune: --out is an existing file", f"finetune {R20} --kd none --out {{run_file}} {FT}",
         "{run_file} is a file, not a folder"),
    Case("train: --out is an existing file", "train --arch resnet20 --data {data} --out {run_file}",
         "{run_file} is a file, not a folder"),
    Case("landscape: --out is an existing file", f"landscape {R20} --out {{run_file}}", "{run_file} is a file, not a folder"),
    Case("study: --out is an existing file", f"study --runs {{run}} {D} {Q} --out {{run_file}}",
         "{run_file} is a file, not a folder"),
    Case("prune: --out below an existing file", f"prune {R20} --out {{run_file}}/run",
         "cannot be created: {run_file} is a file, not a folder"),
    Case("export: --out is an existing folder", "export --model {model} --out {emptydir}", "{emptydir} is a folder"),
    Case("convert: --out is an existing folder", "convert {model} --out {emptydir}", "{emptydir} is a folder"),
    # ------------------------------------------------------------------ a run directory's own files, damaged
    Case("prune --resume: search_state.pt truncated", f"prune {R20} --out {{run_cut_state}} --keep 0.85 --no-adapt --resume",
         "{run_cut_state}/search_state.pt is damaged (truncated", "{run_cut_state}"),
    Case("prune --resume: adapted.pt truncated", f"prune {R20} --out {{run_cut_adapted}} --keep 0.85 --no-adapt --resume",
         "{run_cut_adapted}/adapted.pt is damaged (truncated", "{run_cut_adapted}"),
    Case("prune --resume: config.json not JSON", f"prune {R20} --out {{run_bad_config}} --keep 0.85 --no-adapt --resume",
         "{run_bad_config}/config.json is damaged (not valid JSON", "{run_bad_config}"),
    Case("run: adopting a prune run whose config.json is not JSON", f"run {R20} --out {{run_bad_config}} --keep 0.85",
         "{run_bad_config}/config.json is damaged (not valid JSON", "{run_bad_config}"),
    Case("finetune --bank: history.pt truncated", f"finetune {R20} --bank {{run_cut_history}} {FT}",
         "{run_cut_history}/history.pt is damaged (truncated", "{run_cut_history}"),
    Case("finetune --bank: adapted.pt truncated", f"finetune {R20} --bank {{run_cut_adapted}} {FT}",
         "{run_cut_adapted}/adapted.pt is damaged (truncated", "{run_cut_adapted}"),
    Case("finetune --bank: a bank.json that is not JSON", f"finetune {R20} --bank {{run_bad_bank}} {FT}",
         "{run_bad_bank}/bank.json is damaged (not valid JSON", "{run_bad_bank}"),
    Case("finetune --resume: last.pt truncated", f"finetune {R20} --kd none --out {{ft_cut_last}} {FT} --resume",
         "{ft_cut_last}/last.pt is damaged (truncated", "{ft_cut_last}"),
    Case("finetune --resume: last.pt empty", f"finetune {R20} --kd none --out {{ft_empty_last}} {FT} --resume",
         "{ft_empty_last}/last.pt is damaged (it is empty)", "{ft_empty_last}"),
    Case("finetune --resume: last.pt is not a training state", f"finetune {R20} --kd none --out {{ft_foreign_last}} "
         f"{FT} --resume", "{ft_foreign_last}/last.pt is not the state of an ekg training run", "{ft_foreign_last}"),
    Case("study: a run whose search_state.pt is truncated", f"study --runs {{run_cut_state}} {D} {Q} {OUT}",
         "{run_cut_state}/search_state.pt is damaged (truncated"),
    # ------------------------------------------------------------------ the memory bank, the model, the budget
    Case("finetune: a ResNet-32 with a ResNet-20 run's bank", f"finetune --model {{model32}} {D} {Q} --bank {{run}} {FT}",
         "the memory bank of {run} was built from sub-networks of another network than {model32}", "{run}"),
    Case("finetune --resume with another model", f"finetune --model {{model32}} {D} {Q} --kd none --out {{ft}} {FT} "
         "--resume", "{ft}/last.pt was saved by a training run of another model", "{ft}"),
    Case("prune: --keep 0.01, below what one channel per group leaves", f"prune {R20} {OUT} --keep 0.01",
         "cannot reach --keep 0.01: with every prunable channel group at one channel"),
    Case("prune: --keep 0.04 --method uniform", f"prune {R20} {OUT} --keep 0.04 --method uniform",
         "cannot reach --keep 0.04: with every prunable channel group at one channel"),
    Case("run: --keep 0.01", f"run {R20} {OUT} --keep 0.01", "cannot reach --keep 0.01"),
    Case("run: on a prune run of another --keep", f"run {R20} --out {{run}} --keep 0.5 --no-adapt",
         "keep: 0.85 saved, 0.5 requested", "{run}"),
    Case("prune: --resume and --restart together", f"prune {R20} --out {{run}} --resume --restart",
         "--resume continues the run in --out and --restart starts it over", "{run}"),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def prepare(case: Case, tmp: Path, shared: Path, runs: Callable[[str], Path] | None = None
            ) -> tuple[list[str], Path, str]:
    """``case``'s argv, the folder that must not change and the text, its inputs made under ``tmp``;
    ``runs(name)``: the finished run ``pruned_run`` or ``finetuned`` (see conftest.py) a case copies."""
    inputs = Inputs(tmp, shared, runs)
    argv = [inputs.format(word) for word in case.argv.split()]
    return argv, Path(inputs.format(case.folder)), inputs.format(case.text)


CASE_NAMES = [c.name for c in CASES]


def test_the_table_is_unique_and_covers_every_command():
    from ekg.cli import COMMANDS

    assert len(set(CASE_NAMES)) == len(CASE_NAMES) >= 100
    commands = {c.argv.split()[0] for c in CASES if c.argv}
    assert {m.__name__.rsplit(".", 1)[-1] for m in COMMANDS} <= commands


def test_the_error_catalogue_names_every_case():
    """docs/errors.md is made from this table by bench/error_catalogue.py; re-run it when a case is added."""
    catalogue = (REPO_ROOT / "docs" / "errors.md").read_text()
    missing = [name for name in CASE_NAMES if f"| {md_cell(name)} |" not in catalogue]
    assert not missing, f"not in docs/errors.md (run bench/error_catalogue.py): {missing}"


def md_cell(text: str) -> str:
    """``text`` as a Markdown table cell (what bench/error_catalogue.py writes)."""
    return text.replace("|", "\\|")


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing(case, tmp_path, tmp_path_factory, shared_data,
                                                                     capsys, monkeypatch, request):
    monkeypatch.setenv("EKG_CACHE", str(tmp_path_factory.mktemp("cache")))  # decoded trees are cached, not in ~
    argv, folder, text = prepare(case, tmp_path, shared_data, runs=request.getfixturevalue)
    before = _snapshot(folder)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "weights_only" not in err, err
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
