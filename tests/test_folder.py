"""Streamed class-folder trees (ImageNet layout, `ekg.data.stream`): a small tree of real CIFAR-10 JPEGs
(40 train and 10 val images per class) streamed through torchvision's transforms scaled down to
32-pixel crops, checked against the in-memory reader of the same tree and run through every phase.

Needs torchvision (the ``vision`` extra); skipped without it. CI runs this file in a second venv.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ekg.data.stream as folder
from ekg.bank import MemoryBank, build_bank, data_fingerprint
from ekg.checkpoint import load_checkpoint
from ekg.cli import main
from ekg.data import AugmentConfig, get_normalization, iterate_batches, load_data
from ekg.search import carve_search_sets
from ekg.distributed import Dist
from ekg.errors import DataError, EkgError
from ekg.evaluate import evaluate, predict_logits
from ekg.data import FolderSet, StreamConfig
from ekg.masks import MaskedNetwork
from ekg.models import create_model
from ekg.search import SearchConfig
from ekg.train import TrainConfig, _two_view_batches

from conftest import fake_history

pytest.importorskip("torchvision.transforms.v2", reason="torchvision is not installed (pip install -e '.[vision]')")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SMALL = StreamConfig(image_size=32, resize=36, workers=0)  # ImageNet's 224 from 256, scaled down
IDENTITY = StreamConfig(image_size=32, resize=32, workers=0)  # resize and crop are no-ops at 32x32


@pytest.fixture(scope="module")
def tree(jpeg_dir, tmp_path_factory) -> Path:
    """ROOT/train/<class>/ (first 40 JPEGs of each class) and ROOT/val/<class>/ (first 10 test JPEGs)."""
    root = tmp_path_factory.mktemp("imagenet-style") / "tree"
    for split, out, per_class in (("train", "train", 40), ("test", "val", 10)):
        with zipfile.ZipFile(jpeg_dir / f"cifar10_jpeg_{split}.zip") as z:
            names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
            for cls in CLASSES:
                for name in [n for n in names if n.split("/")[-2] == cls][:per_class]:
                    path = root / out / cls / name.split("/")[-1]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(z.read(name))
    return root


@pytest.fixture(scope="module")
def memory(tree, tmp_path_factory):
    """The same tree decoded into memory (val/ is its test split)."""
    return load_data(tree, mode="memory", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def stream(tree: Path, config: StreamConfig = SMALL):
    return load_data(tree, mode="stream", stream=config)


def test_labels_classes_and_files(tree, memory):
    data = stream(tree)
    assert data.streamed and not memory.streamed and data.name == memory.name == "imagefolder"
    assert isinstance(data.train, FolderSet) and len(data.train) == 400 and len(data.test) == 100
    assert data.train.classes == data.test.classes == CLASSES == memory.train.classes
    assert data.train.labels.tolist() == [c for c in range(10) for _ in range(40)] == memory.train.labels.tolist()
    assert torch.equal(data.test.labels, memory.test.labels)
    paths = data.train.paths
    assert paths[0] == str(tree / "train" / "airplane" / "0000.jpg") and paths[41].endswith("automobile/0001.jpg")
    assert data.train.image_size == (3, 32, 32) and data.train.device == torch.device("cpu")
    assert data.train.to("cpu").paths == paths  # cheap: same files, no copy
    # the memory bank's fingerprint of the training set: the in-memory reader's, plus the crop and
    # resize the teachers see
    streamed = data_fingerprint(data.train)
    assert streamed.pop("stream") == {"image_size": 32, "resize": data.train.config.eval_resize}
    assert streamed == data_fingerprint(memory.train)
    assert "streamed" in data.source and "RandomResizedCrop 32" in data.source
    # a same-size small tree stays in memory by default
    assert not load_data(tree, cache_dir=tree.parent / "cache", progress=False).streamed


def test_search_sets_carved_per_class_like_in_memory(tree, memory):
    data = stream(tree, IDENTITY)
    for s_set, m_set in zip(carve_search_sets(data.train, val_per_class=4, sub_per_class=8),
                            carve_search_sets(memory.train, val_per_class=4, sub_per_class=8)):
        assert isinstance(s_set, FolderSet) and torch.equal(s_set.labels, m_set.labels)
        x = torch.cat([x for x, _ in iterate_batches(s_set, 16)])
        assert torch.equal(x, m_set.images.float())  # the same images in the same order
    d_val, d_sub = carve_search_sets(data.train, val_per_class=4, sub_per_class=8)
    names = [Path(p).name for p in d_val.paths]
    assert sorted(names) == sorted(f"{i:04d}.jpg" for i in range(36, 40) for _ in range(10))  # last 4 per class
    assert set(Path(p).name for p in d_sub.paths) == {f"{i:04d}.jpg" for i in range(8)}  # first 8 per class
    with pytest.raises(DataError, match="fewer than"):
        carve_search_sets(data.train, val_per_class=32, sub_per_class=256)


def test_identity_evaluation_equals_in_memory(tree, memory, shared_data):
    """Resize 32 + centre crop 32 of a 32x32 image is the image: streamed pixels, logits and accuracy
    equal the in-memory path's, with in-process decoding and with DataLoader workers."""
    ckpt = load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    norm = get_normalization(ckpt.normalization)
    want = predict_logits(ckpt.model, memory.test, norm, batch_size=32)
    for workers in (0, 2):
        data = stream(tree, StreamConfig(image_size=32, resize=32, workers=workers))
        x = torch.cat([x for x, _ in iterate_batches(data.test, 32)])
        assert torch.equal(x, memory.test.images.float())
        assert torch.equal(predict_logits(ckpt.model, data.test, norm, batch_size=32), want)
    got = evaluate(ckpt.model, data.test, norm, batch_size=32)
    assert got == evaluate(ckpt.model, memory.test, norm, batch_size=32)
    assert got["top1"] > 60  # JPEG quality 75 costs about 10 points
    # the ImageNet-style evaluation transform (resize 36, centre crop 32) changes the pixels
    other = torch.cat([x for x, _ in iterate_batches(stream(tree).test, 32)])
    assert other.shape == x.shape and not torch.equal(other, x)


def test_augmented_batches_are_deterministic_and_independent_of_the_workers(tree):
    aug = AugmentConfig(jitter=True)

    def epoch(config: StreamConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return list(iterate_batches(stream(tree, config).train, 64, shuffle=True, generator=g, augment=aug,
                                    drop_last=True))

    first = epoch(SMALL, 0)
    assert len(first) == 6 and first[0][0].shape == (64, 3, 32, 32) and first[0][0].dtype == torch.float32
    for again in (epoch(SMALL, 0), epoch(StreamConfig(image_size=32, resize=36, workers=2), 0)):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = epoch(SMALL, 1)
    assert not torch.equal(first[0][1], other[0][1])
    # the crops are random: an augmented image differs from the evaluation view of the same image
    assert 0 <= float(first[0][0].min()) and float(first[0][0].max()) <= 255


def test_two_ranks_load_disjoint_halves_that_make_the_one_process_batch(tree, monkeypatch):
    data = stream(tree)
    loaded: list[str] = []
    real_open = folder.open_rgb
    monkeypatch.setattr(folder, "open_rgb", lambda path: loaded.append(path) or real_open(path))
    aug, batch = AugmentConfig(jitter=True), 64

    def batches(part: slice | None):
        loaded.clear()
        g = torch.Generator().manual_seed(5)
        out = list(iterate_batches(data.train, batch, shuffle=True, generator=g, augment=aug, drop_last=True,
                                   part=part))
        return out, list(loaded)

    whole, whole_files = batches(None)
    ranks = [batches(Dist(rank=r, world_size=2).part(batch)) for r in range(2)]
    assert all(len(files) == len(whole_files) // 2 for _, files in ranks)  # each rank decodes only its half
    assert set(ranks[0][1]).isdisjoint(ranks[1][1]) and sorted(ranks[0][1] + ranks[1][1]) == sorted(whole_files)
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][0][b][0], ranks[1][0][b][0]]), x)
        assert torch.equal(torch.cat([ranks[0][0][b][1], ranks[1][0][b][1]]), y)

    # fine-tuning's two views and the memory bank's rows, the same way
    n = len(data.train)
    bank = MemoryBank(logits=np.broadcast_to(np.arange(n, dtype=np.float16)[:, None, None], (n, 10, 2)), info={})
    cfg = TrainConfig(batch_size=batch, augment=aug)
    norm = get_normalization("imagenet")

    def two_views(part: slice):
        loaded.clear()
        g = torch.Generator().manual_seed(7)
        return list(_two_view_batches(data.train, cfg, g, norm, bank, part)), len(loaded)

    (whole, count) = two_views(slice(None))
    halves = [two_views(Dist(rank=r, world_size=2).part(batch)) for r in range(2)]
    assert count == 6 * batch and all(c == 3 * batch for _, c in halves)  # one decode per image for both views
    for b, (views, y, teachers) in enumerate(whole):
        assert len(views) == 2 and not torch.equal(views[0], views[1])
        rows = teachers[:, 0, 0].long()  # the bank row of each image: its index in the training set
        assert torch.equal(data.train.labels[rows], y) and len(set(rows.tolist())) == batch
        for k in range(2):
            assert torch.equal(torch.cat([h[0][b][0][k] for h in halves]), views[k])
        assert torch.equal(torch.cat([h[0][b][2] for h in halves]), teachers)


def test_a_bank_is_refused_for_images_read_at_another_size(tree, memory, tmp_path):
    """The teachers' logits depend on the crop and resize they saw: a bank built from the stream at
    one size is refused for another size, and for the in-memory images, with both named."""
    model = create_model("resnet20", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    net = MaskedNetwork(model)
    train = stream(tree, IDENTITY).train.subset(range(40))
    bank = build_bank(net, fake_history(net, [0.4, 0.9, 0.6]), train, get_normalization("imagenet"), tmp_path / "b",
                      teachers=2, batch_size=20, progress=False)
    bank.check_data(train)  # the same size: accepted
    with pytest.raises(EkgError, match="crop 32, resize 32, but they are now read crop 32, resize 36.*`resize`"):
        bank.check_data(stream(tree, SMALL).train.subset(range(40)))
    with pytest.raises(EkgError, match="now read in memory, at their own size"):
        bank.check_data(memory.train.subset(range(40)))


def test_memory_bank_rows_follow_dataset_order(tree, memory, tmp_path):
    """The bank of the streamed set (evaluation transform = identity here) is the in-memory set's."""
    torch.manual_seed(0)
    model = create_model("resnet20", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    net = MaskedNetwork(model)
    history = fake_history(net, [0.4, 0.9, 0.6])
    norm = get_normalization("imagenet")
    train = stream(tree, IDENTITY).train.subset(range(100))
    got = build_bank(net, history, train, norm, tmp_path / "s", teachers=2, batch_size=32, progress=False)
    want = build_bank(net, history, memory.train.subset(range(100)), norm, tmp_path / "m", teachers=2,
                      batch_size=32, progress=False)
    assert got.logits.shape == (100, 10, 2) and np.array_equal(np.asarray(got.logits), np.asarray(want.logits))
    assert {k: v for k, v in got.info["data"].items() if k != "stream"} == want.info["data"]


def test_images_of_any_size_are_streamed_to_the_crop(tmp_path):
    root = tmp_path / "varied"
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for c, cls in enumerate(["n01", "n02"]):
            for i in range(count):
                h, w = 20 + 7 * i + c, 30 - 3 * i
                path = root / split / cls / f"img_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    Image.fromarray(rng.integers(0, 256, (25, 25), dtype=np.uint8), "L").save(root / "train" / "n01" / "gray.png")
    data = load_data(root, stream=StreamConfig(image_size=16, workers=0))  # auto: several sizes → streamed
    assert data.streamed and data.train.classes == ["n01", "n02"] and len(data.train) == 7
    assert data.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1] and data.test.labels.tolist() == [0, 1]
    assert data.train.config.eval_resize == 18  # round(16 * 256 / 224)
    for augment in (None, AugmentConfig()):
        x, y = next(iterate_batches(data.train, 7, augment=augment, generator=torch.Generator().manual_seed(0)))
        assert x.shape == (7, 3, 16, 16) and y.tolist() == data.train.labels.tolist()


def _small_tree(root: Path, classes=("a", "b"), val_classes=("a", "b")) -> Path:
    for split, names in (("train", classes), ("val", val_classes)):
        for cls in names:
            for i, size in enumerate((8, 9)):
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(path)
    return root


def one_line_data_error(*fragments: str):
    class _Check:
        def __enter__(self):
            self._cm = pytest.raises(DataError)
            self.info = self._cm.__enter__()

        def __exit__(self, *exc):
            suppressed = self._cm.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message and all(f in message for f in fragments), message
            return suppressed

    return _Check()


def test_clear_errors(tmp_path, monkeypatch):
    config = StreamConfig(image_size=8, workers=0)
    # an empty class folder
    root = _small_tree(tmp_path / "empty")
    (root / "train" / "c").mkdir()
    with one_line_data_error(str(root / "train" / "c"), "holds no images"):
        load_data(root, stream=config)
    # val classes differ from train's
    root = _small_tree(tmp_path / "differ", classes=("a", "b", "c"), val_classes=("a", "d"))
    with one_line_data_error(str(root / "val"), "differ", "missing: b, c", "not in train/: d"):
        load_data(root, stream=config)
    # an unreadable image, found when its batch is read: in-process and in a DataLoader worker
    root = _small_tree(tmp_path / "corrupt")
    bad = root / "train" / "b" / "0.png"
    for workers in (0, 1):
        data = load_data(root, mode="stream", stream=StreamConfig(image_size=8, workers=workers))
        bad.write_bytes(b"not a png")
        with one_line_data_error(str(bad), "not a readable image"):
            list(iterate_batches(data.train, 4))
        _small_tree(tmp_path / "corrupt")
    # stream mode on data that is not a folder tree
    with one_line_data_error("`mode` stream", "class-folder tree"):
        load_data(tmp_path / "corrupt" / "train" / "a" / "0.png", mode="stream")
    with pytest.raises(DataError, match="`resize` 16 is smaller than the crop `image_size` 32"):
        StreamConfig(image_size=32, resize=16)


def test_prune_and_finetune_with_the_bank_on_a_streamed_tree(tree, shared_data, tmp_path, capsys):
    """`ekg prune` (adaptation, search, slimming) then `ekg finetune --kd ensemble` (the memory bank
    built from the streamed tree) and `ekg test`, end to end from the command line."""
    model = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    run = tmp_path / "run"
    data = ["--data", str(tree), "--data-mode", "stream", "--resize", "36"]  # crop: the model's 32
    assert main(["prune", "--model", str(model), *data, "--quiet", "--keep", "0.9", "--val-per-class", "4",
                 "--sub-per-class", "8", "--out", str(run), "--workers", "0"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert "streamed" in config["data"] and config["search"]["val_per_class"] == 4
    assert main(["finetune", "--model", str(run / "pruned.pt"), "--bank", str(run), *data, "--quiet", "--epochs", "1",
                 "--batch-size", "32", "--limit-train", "96", "--limit-test", "40", "--teachers", "2",
                 "--workers", "1"]) == 0
    assert np.load(run / "bank" / "logits.npy", mmap_mode="r").shape == (400, 10, 2)
    log = [json.loads(line) for line in (run / "finetune" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["kd_loss"] >= 0 and 1 <= log[0]["teachers_selected"] <= 2
    capsys.readouterr()
    assert main(["test", "--model", str(run / "finetune" / "model.pt"), *data, "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_images"] == 100 and res["top1"] > 20
    # a crop that does not fit the model is refused in one line
    assert main(["test", "--model", str(model), *data, "--image-size", "24"]) == 1
    err = capsys.readouterr().err
    assert "the model expects (3, 32, 32) inputs but the images of" in err
    assert "are (3, 24, 24): crop them to its size with --image-size" in err


def test_adaptation_and_search_read_the_streamed_search_sets(tree, shared_data, tmp_path):
    """The Python API with a search batch small enough for the adaptation epoch to take steps."""
    from ekg.pruning import prune

    ckpt = load_checkpoint(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    cfg = SearchConfig(val_per_class=4, sub_per_class=8, batch_size=40)
    res = prune(ckpt, stream(tree), 0.9, out=tmp_path / "run", config=cfg, progress=False)
    adapted = load_checkpoint(tmp_path / "run" / "adapted.pt")
    assert not all(torch.equal(a, b) for a, b in zip(adapted.model.state_dict().values(),
                                                     ckpt.model.state_dict().values()))
    assert res.flops_ratio <= 0.9 and res.slim_max_diff < 1e-3


def test_loader_workers_persist_across_passes_and_overlapping_passes_work(tree):
    """One DataLoader per split, shared by its subsets, kept between passes; a pass abandoned midway
    leaves nothing behind, and a pass started while another runs gets a loader of its own."""
    data = stream(tree, StreamConfig(image_size=32, resize=32, workers=1))
    want = [x for x, _ in iterate_batches(data.train, 50)]
    source = data.train._source
    loader = next(iter(source._loaders.values()))
    first = next(iterate_batches(data.train.subset(range(100, 400)), 50))[0]  # abandoned after one batch
    assert torch.equal(first, want[2])
    assert [len(source._loaders)] == [1] and next(iter(source._loaders.values())) is loader and not source._busy
    a, b = iterate_batches(data.train, 50), iterate_batches(data.train.subset(range(400)[::-1]), 50)
    for k, ((xa, _), (xb, _)) in enumerate(zip(a, b)):  # two passes at once over the same split
        assert torch.equal(xa, want[k]) and torch.equal(xb, want[7 - k].flip(0))


@pytest.mark.slow
def test_prune_and_finetune_on_two_processes_match_one_on_a_streamed_tree(tree, shared_data, tmp_path):
    """torchrun (gloo, CPU): the search on a streamed tree decides what one process decides, and
    fine-tuning with the bank runs with each process decoding its half of every batch."""
    from test_distributed import torchrun

    model = shared_data / "pretrained/akamaster/resnet20-12fca82f.th"
    data = ["--data", str(tree), "--data-mode", "stream", "--resize", "36", "--workers", "0"]
    widths = {}
    for nproc in (1, 2):
        run = tmp_path / f"np{nproc}"
        # D_sub of 260 images: one adaptation batch of 256, split over the ranks
        torchrun(nproc, "prune", "--model", str(model), *data, "--keep", "0.85", "--val-per-class", "4",
                 "--sub-per-class", "26", "--out", str(run), cwd=tmp_path)
        widths[nproc] = json.loads((run / "widths.json").read_text())["groups"]
    assert widths[1] == widths[2]
    run = tmp_path / "np2"
    torchrun(2, "finetune", "--model", str(run / "pruned.pt"), "--bank", str(run), *data, "--out", str(run / "ft"),
             "--epochs", "1", "--batch-size", "32", "--limit-train", "128", "--limit-test", "40", "--teachers", "2",
             cwd=tmp_path)
    log = json.loads((run / "ft" / "log.jsonl").read_text().splitlines()[0])
    assert log["epoch"] == 1 and log["kd_loss"] >= 0
