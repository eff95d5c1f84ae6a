"""Shared pytest fixtures: the real data folder, and synthetic data in the official formats.

The real data (``../shared/data`` beside the repository, or ``$EKG_SHARED_DATA``) is read-only
and never copied into the repository. Tests that need it are skipped when it is absent, except
under CI (``$CI`` set), where its absence is a failure.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _require(path: Path, what: str) -> Path:
    """``path`` if it exists; else skip the test (fail it under CI)."""
    if not path.exists():
        message = f"{what} not found at {path} (set EKG_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data root: ``$EKG_SHARED_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("EKG_SHARED_DATA")
    return _require(Path(env) if env else REPO_ROOT.parent / "shared" / "data", "the shared data folder")


@pytest.fixture(scope="session")
def cifar10_exact(shared_data: Path) -> Path:
    """The folder holding ``cifar-10-batches-py/`` with the exact 1017-per-batch CIFAR-10 subset."""
    return _require(shared_data / "cifar10" / "exact-subset", "the exact CIFAR-10 subset")


@pytest.fixture(scope="session")
def exact(cifar10_exact: Path):
    """The exact CIFAR-10 subset, loaded once (5,085 training and 1,017 test images)."""
    from ekg.data import load_data

    return load_data(cifar10_exact, progress=False)


@pytest.fixture(scope="session")
def jpeg_dir(shared_data: Path) -> Path:
    """The folder holding ``cifar10_jpeg_train.zip`` and ``cifar10_jpeg_test.zip`` (JPEG quality 75)."""
    return _require(shared_data / "cifar10" / "jpeg75", "the CIFAR-10 JPEG zips")


# ---------------------------------------------------------------------------------------------
# Synthetic CIFAR folders in the official python format
# ---------------------------------------------------------------------------------------------


@dataclass
class SyntheticCifar:
    """A synthetic official-format folder and the arrays written into it."""

    folder: Path  # the cifar-10-batches-py/ or cifar-100-python/ folder
    train_images: np.ndarray  # uint8 (N, 3, 32, 32)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _random_split(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(n) % num_classes  # every class present once n >= num_classes
    rng.shuffle(labels)
    return images, labels.astype(np.int64)


def write_synthetic_cifar(root: Path, kind: str = "cifar10", *, per_batch: int = 20, seed: int = 0) -> SyntheticCifar:
    """Write random images as an official CIFAR-10 (``cifar-10-batches-py/``: five data batches and a
    test batch of ``per_batch`` images each) or CIFAR-100 (``cifar-100-python/``: train of
    ``5 * per_batch`` and test of ``per_batch`` images) folder under ``root``, with bytes keys and
    pickle protocol 4 like the originals."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        folder, label_key = root / "cifar-10-batches-py", b"labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                           b"label_names": [c.encode() for c in classes]}
        sizes = [per_batch] * 6
    elif kind == "cifar100":
        classes = [f"class_{i:03d}" for i in range(100)]
        folder, label_key = root / "cifar-100-python", b"fine_labels"
        files = ["train", "test"]
        meta_name, meta = "meta", {b"fine_label_names": [c.encode() for c in classes],
                                   b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
        sizes = [5 * per_batch, per_batch]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    folder.mkdir(parents=True)
    parts = [_random_split(rng, n, len(classes)) for n in sizes]
    for name, (images, labels) in zip(files, parts):
        batch = {b"batch_label": name.encode(), label_key: labels.tolist(), b"data": images.reshape(len(images), 3072),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}
        if kind == "cifar100":
            batch[b"coarse_labels"] = (labels // 5).tolist()
        _write_pickle(folder / name, batch)
    _write_pickle(folder / meta_name, meta)
    train, test = parts[:-1], parts[-1]
    return SyntheticCifar(folder, np.concatenate([p[0] for p in train]), np.concatenate([p[1] for p in train]),
                          test[0], test[1], classes)


@pytest.fixture
def make_cifar(tmp_path: Path) -> Callable[..., SyntheticCifar]:
    """A factory: ``make_cifar(kind="cifar10" | "cifar100", per_batch=20, seed=0, root=None)``.

    Each call writes a fresh folder under ``root`` (default: a new folder in ``tmp_path``)."""
    counter = iter(range(1_000_000))

    def make(kind: str = "cifar10", *, per_batch: int = 20, seed: int = 0, root: Path | None = None) -> SyntheticCifar:
        folder = root or tmp_path / f"synthetic{next(counter)}"
        return write_synthetic_cifar(folder, kind, per_batch=per_batch, seed=seed)

    return make


@pytest.fixture
def slim_checkpoint():
    """A pruned-shaped (uneven widths) projection ResNet-20 checkpoint: random weights and random
    BN running statistics, so that a wrong channel would show in the output."""
    import torch

    from ekg.checkpoint import Checkpoint
    from ekg.data import get_normalization
    from ekg.models import ResNetSpec, build_model

    spec = ResNetSpec(depth=20, shortcut="B", stage_widths=[5, 17, 9], block_widths=[[3, 16, 1], [7, 2, 32], [64, 4, 5]])
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return Checkpoint(model=model.eval(), normalization={"name": "cifar10", **get_normalization("cifar10").to_dict()},
                      dataset={"name": "cifar10", "num_classes": 10})


def random_splits(name: str = "imagefolder", size: int = 16, per_class: int = 2):
    """Tiny random 10-class splits (train == test) for tests of models other than CIFAR ResNets."""
    import torch

    from ekg.data import DataSplits, ImageSet

    gen = torch.Generator().manual_seed(3)
    n = 10 * per_class
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    classes = [f"c{i}" for i in range(10)]
    return DataSplits(name, ImageSet(images, labels, classes), ImageSet(images, labels, classes), "random")


def make_pruned_run(run: Path, shared: Path) -> Path:
    """The real ResNet-20 pruned to keep 0.85 on the exact subset (no adaptation epoch) into ``run``."""
    from ekg.checkpoint import load_checkpoint
    from ekg.data import load_data
    from ekg.pruning import prune
    from ekg.search import SearchConfig

    src = shared / "pretrained/akamaster/resnet20-12fca82f.th"
    prune(load_checkpoint(src), load_data(shared / "cifar10/exact-subset", progress=False), 0.85, out=run,
          config=SearchConfig(adapt=False), progress=False)
    return run


def make_finetuned(out: Path, pruned: Path, shared: Path) -> Path:
    """A 1-epoch plain fine-tuning of ``pruned``'s model into ``out`` (its last.pt is what --resume reads)."""
    from ekg.cli import main

    assert main(["finetune", "--model", str(pruned / "pruned.pt"), "--data", str(shared / "cifar10/exact-subset"),
                 "--kd", "none", "--out", str(out), "--epochs", "1", "--limit-train", "128", "--batch-size", "64",
                 "--limit-test", "64", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def pruned_run(tmp_path_factory, shared_data):
    """An `ekg prune` run directory (:func:`make_pruned_run`). Tests that build a bank or fine-tune in
    it share it; copy it to write elsewhere."""
    return make_pruned_run(tmp_path_factory.mktemp("prune") / "RUN", shared_data)


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory, pruned_run, shared_data):
    """A training run directory (:func:`make_finetuned`); copy it to write elsewhere."""
    return make_finetuned(tmp_path_factory.mktemp("ft") / "ft", pruned_run, shared_data)


def fake_history(net, losses, per: int = 8, **extra):
    """A search history for bank tests: entry k masks the first k/``per`` of every group's channels
    and has val loss ``losses[k]`` (``extra``: further keys of every entry)."""
    history = []
    for k, loss in enumerate(losses):
        masks = []
        for gate in net.gates:
            m = torch.ones(gate.channels, dtype=torch.bool)
            m[: k * gate.channels // per] = False
            masks.append(m)
        history.append({"step": k, "masks": masks, **extra, "loss": loss, "accuracy": 50.0})
    return history


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster, and it avoids OpenMP spin-waiting when other
    processes share the 2 cores (which made the rule tests 20x slower). Use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_bn(model, seed: int, running: tuple[float, float, float] | None = None):
    """``model`` with random BN affine parameters (positive biases, so a missing mask would show)
    and, with ``running = (mean_std, var_low, var_high)``, random running statistics; parameters
    frozen (the search never trains them). Draws from one generator seeded ``seed + 100``."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(0.05, 0.5, generator=g)
                if running is not None:
                    mean_std, var_lo, var_hi = running
                    m.running_mean.normal_(0.0, mean_std, generator=g)
                    m.running_var.uniform_(var_lo, var_hi, generator=g)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_batches(classes: int = 10) -> list:
    """Two fixed random batches of 8 and 6 CIFAR-sized images (seed 5)."""
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, classes, (8,), generator=g)),
            (torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, classes, (6,), generator=g))]


def independent_step0(run_dir, train, stats: str = "batch") -> dict:
    """The search's step-0 numbers of an `ekg prune` run directory, computed without the search code:
    its own D_val carve (the last 32 images of each class in training-set order, reversed, concatenated
    over classes and shuffled with ``np.random.RandomState(1)``), its own normalisation, batches of
    256 then the rest, and a plain forward of ``RUN/adapted.pt`` with every BN on the batch's
    statistics (``stats="batch"``, as the method's search) or on running statistics ("running").
    Returns mean CE, accuracy (%) and mean J = CE + entropy (K is the network itself at step 0)."""
    import copy

    import torch.nn.functional as F

    from ekg.checkpoint import load_checkpoint

    labels = train.labels.cpu().numpy()
    idx = np.hstack([np.where(labels == c)[0][::-1][:32] for c in range(int(labels.max()) + 1)])
    np.random.RandomState(1).shuffle(idx)
    ckpt = load_checkpoint(Path(run_dir) / "adapted.pt")
    model = copy.deepcopy(ckpt.model).float()
    model.train(stats == "batch")  # ResNets: BN is the only module with a mode
    norm = ckpt.normalization
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1)
    images = train.images[torch.as_tensor(idx)]
    x_all = (images.float() - mean) / std  # the constants are on the 0..255 scale
    y_all = train.labels[torch.as_tensor(idx)].long()
    ce = acc = j = 0.0
    with torch.no_grad():
        for a in range(0, len(idx), 256):
            x, y = x_all[a:a + 256], y_all[a:a + 256]
            z = model(x).double()
            logp = F.log_softmax(z, 1)
            ce += float(F.nll_loss(logp, y, reduction="sum"))
            j += float(F.nll_loss(logp, y, reduction="sum") - (logp.exp() * logp).sum())
            acc += float((z.argmax(1) == y).sum())
    n = len(idx)
    return {"val_loss": ce / n, "val_accuracy": 100.0 * acc / n, "j": j / n, "n": n}


def search_log(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "search.jsonl").read_text().splitlines()]
