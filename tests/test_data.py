"""Tests of ekg.data: readers, download, normalisation, batched augmentation, batches, search sets."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import pickle
import random
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ekg.data as D
import ekg.data.cifar
import ekg.data.trees
import ekg.download
from ekg import safe_pickle
from ekg.data import (NORMALIZATIONS, AugmentConfig, ImageSet, Normalization, augment,
                      get_normalization, iterate_batches, load_data)
from ekg.errors import DataError, EkgError
from ekg.download import download
from ekg.search import carve_search_sets
from ekg.io import md5sum

EXACT_TEST_COUNTS = [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


def raises_data_error(*fragments: str):
    """Context manager: a one-line DataError whose message contains every fragment."""

    class _Check:
        def __enter__(self):
            self._cm = pytest.raises(DataError)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._cm.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return suppressed

    return _Check()


def assert_same_splits(a, b) -> None:
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) and x.classes == y.classes


@pytest.fixture(scope="module")
def exact_tarball(cifar10_exact, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tarball") / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(cifar10_exact / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ============================================================================ CIFAR python layouts


def test_exact_subset_loads(exact, cifar10_exact):
    assert exact.name == "cifar10" and exact.num_classes == 10
    assert len(exact.train) == 5085 and len(exact.test) == 1017
    assert torch.bincount(exact.test.labels).tolist() == EXACT_TEST_COUNTS
    for split in (exact.train, exact.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (3, 32, 32)
    assert exact.train.classes[:3] == ["airplane", "automobile", "bird"]
    folder = cifar10_exact / "cifar-10-batches-py"
    first = safe_pickle.load(folder / "data_batch_1", encoding="bytes")
    assert exact.train.images[0].numpy().tobytes() == first[b"data"][0].tobytes()  # CHW rows, unchanged
    assert exact.train.labels[:1017].tolist() == first[b"labels"]
    last = safe_pickle.load(folder / "test_batch", encoding="bytes")
    assert exact.test.images[-1].numpy().tobytes() == last[b"data"][-1].tobytes()
    assert str(folder) in exact.source


def test_the_batches_folder_itself_loads_the_same(exact, cifar10_exact):
    assert_same_splits(load_data(str(cifar10_exact / "cifar-10-batches-py"), progress=False), exact)


def test_tarball_equals_folder(exact, exact_tarball):
    from_tar = load_data(exact_tarball, progress=False)
    assert from_tar.name == "cifar10" and "tarball" in from_tar.source
    assert_same_splits(from_tar, exact)


def test_cifar100_synthetic_folder_and_tarball(make_cifar, tmp_path):
    syn = make_cifar("cifar100", per_batch=30)
    data = load_data(syn.folder.parent, progress=False)
    assert data.name == "cifar100" and data.num_classes == 100 and data.train.classes == syn.classes
    assert np.array_equal(data.train.images.numpy(), syn.train_images)
    assert np.array_equal(data.train.labels.numpy(), syn.train_labels)
    assert np.array_equal(data.test.images.numpy(), syn.test_images)
    tar = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(syn.folder, arcname="cifar-100-python")
    assert_same_splits(load_data(tar, progress=False), data)


def test_synthetic_cifar10_with_any_batch_size(make_cifar):
    syn = make_cifar("cifar10", per_batch=7)
    data = load_data(syn.folder, progress=False)
    assert len(data.train) == 35 and len(data.test) == 7
    assert np.array_equal(data.train.images.numpy(), syn.train_images)
    assert np.array_equal(data.test.labels.numpy(), syn.test_labels)


# ============================================================================ names and download


def test_name_resolves_through_ekg_data(monkeypatch, shared_data, exact, cache):
    monkeypatch.setenv("EKG_DATA", str(shared_data))
    assert_same_splits(load_data("cifar10", cache_dir=cache, progress=False), exact)
    assert not cache.exists()  # nothing written for CIFAR


def test_name_resolves_in_the_cache_folder(monkeypatch, make_cifar, cache):
    monkeypatch.delenv("EKG_DATA", raising=False)
    syn = make_cifar("cifar100", root=cache)
    assert load_data("cifar100", cache_dir=cache, progress=False).train.classes == syn.classes


def test_name_not_found_says_how_to_fix(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("EKG_DATA", str(tmp_path / "empty"))
    with raises_data_error("no CIFAR-10 data found", "`data`", "EKG_DATA", "`download=True`", "cifar-10-batches-py"):
        load_data("cifar10", cache_dir=cache, progress=False)


def test_download_verifies_and_caches(exact_tarball, tmp_path, monkeypatch):
    md5 = md5sum(exact_tarball)
    dest = tmp_path / "dl" / "c10.tar.gz"
    assert download(exact_tarball.as_uri(), dest, md5, progress=False) == dest
    assert md5sum(dest) == md5

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(ekg.download.urllib.request, "urlopen", no_network)
    assert download(exact_tarball.as_uri(), dest, md5, progress=False) == dest


def test_download_with_wrong_md5_leaves_nothing(exact_tarball, tmp_path):
    dest = tmp_path / "dl" / "c10.tar.gz"
    with raises_data_error("0" * 32, md5sum(exact_tarball)):
        download(exact_tarball.as_uri(), dest, "0" * 32, progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("url", ["file:///nonexistent/cifar-10-python.tar.gz", "http://127.0.0.1:9/cifar.tar.gz"])
def test_download_unreachable(url, tmp_path):
    with raises_data_error(url, "could not be reached", "by hand"):
        download(url, tmp_path / "x.tar.gz", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_named_downloads_into_cache(exact_tarball, exact, monkeypatch, cache):
    monkeypatch.delenv("EKG_DATA", raising=False)
    fake = dataclasses.replace(ekg.data.cifar.CIFAR_FORMATS["cifar10"], url=exact_tarball.as_uri(), md5=md5sum(exact_tarball))
    monkeypatch.setitem(ekg.data.cifar.CIFAR_FORMATS, "cifar10", fake)
    assert_same_splits(load_data("cifar10", cache_dir=cache, download=True, progress=False), exact)
    assert (cache / "cifar-10-python.tar.gz").is_file()
    monkeypatch.setattr(ekg.download.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    assert len(load_data("cifar10", cache_dir=cache, progress=False).train) == 5085


# ============================================================================ image trees and zips


@pytest.fixture(scope="module")
def small_jpeg(jpeg_dir, tmp_path_factory):
    """A zip of 20 train and 10 test JPEGs per class taken from the real zips, stored in shuffled order,
    plus the bytes of every member."""
    members: dict[str, bytes] = {}
    for split, per_class in (("train", 20), ("test", 10)):
        with zipfile.ZipFile(jpeg_dir / f"cifar10_jpeg_{split}.zip") as z:
            names = [n for n in z.namelist() if n.endswith(".jpg")]
            for cls in sorted({n.split("/")[1] for n in names}):
                for name in sorted(n for n in names if n.split("/")[1] == cls)[:per_class]:
                    members[name] = z.read(name)
    order = list(members)
    random.Random(0).shuffle(order)
    path = tmp_path_factory.mktemp("jpeg") / "small.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in order:
            z.writestr(name, members[name])
    return path, members


def pil_decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def test_zip_tree_labels_order_and_pixels(small_jpeg, cache):
    path, members = small_jpeg
    data = load_data(path, cache_dir=cache, progress=False)
    classes = sorted({n.split("/")[1] for n in members})
    assert data.name == "imagefolder" and data.train.classes == classes == data.test.classes
    assert len(data.train) == 200 and len(data.test) == 100
    assert data.train.labels.tolist() == [c for c in range(10) for _ in range(20)]
    for split, ims in (("train", data.train), ("test", data.test)):
        names = sorted((n for n in members if n.startswith(split + "/")), key=lambda n: (n.split("/")[1], n))
        for i, name in enumerate(names):  # per-class file order preserved; pixels are PIL's decode
            assert np.array_equal(ims.images[i].numpy(), pil_decode(members[name])), name


def test_zip_cache_is_hit_and_invalidated(small_jpeg, cache, tmp_path, monkeypatch):
    path = tmp_path / "copy.zip"
    shutil.copy(small_jpeg[0], path)
    first = load_data(path, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1 and str(cache) in first.source

    calls = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    assert_same_splits(load_data(path, cache_dir=cache, progress=False), first)
    assert calls == []  # served from the cache, no decoding

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert_same_splits(load_data(path, cache_dir=cache, progress=False), first)
    assert len(calls) >= 300  # the zip changed: decoded again


def test_folder_tree_and_zip_pair_equal_the_zip(small_jpeg, cache, tmp_path):
    path, members = small_jpeg
    from_zip = load_data(path, cache_dir=cache, progress=False)
    tree = tmp_path / "tree"
    with zipfile.ZipFile(path) as z:
        z.extractall(tree)
    assert_same_splits(load_data(tree, cache_dir=cache, progress=False), from_zip)
    pair = tmp_path / "pair"
    pair.mkdir()
    for split in ("train", "test"):
        with zipfile.ZipFile(pair / f"set_{split}.zip", "w") as z:
            for name, blob in members.items():
                if name.startswith(split):
                    z.writestr(name, blob)
    assert_same_splits(load_data(pair, cache_dir=cache, progress=False), from_zip)
    assert len(list(cache.glob("*.npz"))) == 3


def test_parallel_decode_equals_serial(small_jpeg):
    files = [f for f in ekg.data.trees._list_zips([small_jpeg[0]]) if f.split == "train"]
    serial = ekg.data.trees._decode_images(files, progress=False, desc="", workers=1)
    assert np.array_equal(ekg.data.trees._decode_images(files, progress=False, desc="", workers=2), serial)


def _png(path: Path, array: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_png_tree_sorted_classes_names_and_rgb_conversion(tmp_path, cache):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for value, (cls, name) in enumerate([("zebra", "1.png"), ("apple", "2.png"), ("apple", "10.png"),
                                             ("mango", "a.PNG")]):
            _png(root / split / cls / name, np.full((8, 6, 3), 10 * value, np.uint8))
    _png(root / "train" / "mango" / "b.png", np.full((8, 6), 77, np.uint8), mode="L")  # grayscale → RGB
    (root / "train" / "mango" / "notes.txt").write_text("ignored")
    data = load_data(root, cache_dir=cache, progress=False)
    assert data.train.classes == ["apple", "mango", "zebra"]
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2]
    assert data.train.images.shape == (5, 3, 8, 6)
    assert data.train.images[:, 0, 0, 0].tolist() == [20, 10, 30, 77, 0]  # "10.png" sorts before "2.png"
    assert len(data.test) == 4


def test_tree_with_mixed_sizes_names_the_file(tmp_path, cache):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        _png(root / split / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    _png(root / "train" / "b" / "1.png", np.zeros((8, 9, 3), np.uint8))
    _png(root / "test" / "b" / "1.png", np.zeros((8, 8, 3), np.uint8))
    with raises_data_error(str(root / "train" / "b" / "1.png"), str(root / "train" / "a" / "0.png"), "same size",
                           "`mode` stream"):
        load_data(root, cache_dir=cache, progress=False, mode="memory")
    # by default such a tree is streamed (tests/test_folder.py), which needs torchvision
    if importlib.util.find_spec("torchvision") is None:
        with raises_data_error(str(root / "train" / "b" / "1.png"), str(root / "train" / "a" / "0.png"),
                               "not all the same size", 'pip install "ekg[vision]"'):
            load_data(root, cache_dir=cache, progress=False)
    else:
        assert load_data(root, cache_dir=cache, progress=False).streamed


def test_tree_of_large_images_of_one_size_is_streamed(tmp_path, cache):
    root = tmp_path / "tree"
    for split in ("train", "val"):
        _png(root / split / "a" / "0.png", np.zeros((130, 140, 3), np.uint8))
    if importlib.util.find_spec("torchvision") is None:
        with raises_data_error(str(root), "140x130 pixels, larger than the 128x128", 'pip install "ekg[vision]"'):
            load_data(root, cache_dir=cache, progress=False)
    else:
        assert load_data(root, cache_dir=cache, progress=False).streamed
    assert load_data(root, cache_dir=cache, progress=False, mode="memory").train.images.shape == (1, 3, 130, 140)


def test_tree_with_corrupt_image_names_the_file(tmp_path, cache):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        _png(root / split / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    (root / "test" / "a" / "1.jpg").write_bytes(b"not a jpeg")
    with raises_data_error(str(root / "test" / "a" / "1.jpg"), "not a readable image"):
        load_data(root, cache_dir=cache, progress=False)


def test_streaming_without_torchvision_names_the_extra(tmp_path, monkeypatch):
    """Streaming needs torchvision's transforms (the ``vision`` extra): one line saying what to install."""
    import sys

    root = tmp_path / "tree"
    for split in ("train", "val"):
        _png(root / split / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with raises_data_error("streaming a class-folder tree", 'pip install "ekg[vision]"'):
        load_data(root, mode="stream", progress=False)
    data = load_data(root, mode="auto", cache_dir=tmp_path / "cache", progress=False)  # one small size: in memory
    assert not data.streamed and data.test.images.shape == (1, 3, 8, 8)  # val/ is the held-out split


# ============================================================================ malformed data


def test_missing_path(tmp_path):
    with raises_data_error(str(tmp_path / "nowhere"), "does not exist"):
        load_data(tmp_path / "nowhere", progress=False)


def test_empty_folder(tmp_path):
    with raises_data_error(f"no CIFAR data in {tmp_path}", "cifar-10-batches-py", "train/ and test/"):
        load_data(tmp_path, progress=False)


def test_truncated_batch_names_the_file(cifar10_exact, tmp_path):
    broken = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_exact / "cifar-10-batches-py", broken)
    batch = broken / "data_batch_3"
    batch.chmod(0o644)
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    with raises_data_error(str(batch), "truncated"):
        load_data(tmp_path, progress=False)


def test_missing_batch_file(make_cifar):
    syn = make_cifar()
    (syn.folder / "data_batch_4").unlink()
    with raises_data_error(str(syn.folder / "data_batch_4"), "missing", "data_batch_1"):
        load_data(syn.folder.parent, progress=False)


def _rewrite_batch(folder: Path, name: str, **changes) -> None:
    batch = safe_pickle.load(folder / name, encoding="bytes")
    batch.update({k.encode(): v for k, v in changes.items()})
    with open(folder / name, "wb") as f:
        pickle.dump(batch, f, protocol=4)


@pytest.mark.parametrize("changes, message", [
    ({"data": np.zeros((20, 3000), np.uint8)}, "(N, 3072)"),
    ({"data": np.zeros((20, 3072), np.float32)}, "uint8"),
    ({"labels": list(range(19))}, "20 integer labels"),
    ({"labels": [10] * 20}, "0..9"),
])
def test_wrong_shapes_and_ranges(make_cifar, changes, message):
    syn = make_cifar()
    _rewrite_batch(syn.folder, "data_batch_2", **changes)
    with raises_data_error(str(syn.folder / "data_batch_2"), message):
        load_data(syn.folder, progress=False)


def test_unsafe_pickle_is_refused(make_cifar, tmp_path):
    syn = make_cifar()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(syn.folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=4)
    with raises_data_error(str(syn.folder / "test_batch")):
        load_data(syn.folder, progress=False)
    assert not marker.exists()


def test_corrupt_and_foreign_tarballs(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(os.urandom(1000))
    with raises_data_error(str(bad), "tar.gz"):
        load_data(bad, progress=False)
    foreign = tmp_path / "other.tar.gz"
    with tarfile.open(foreign, "w:gz") as tar:
        tar.add(__file__, arcname="stuff/test.py")
    with raises_data_error(str(foreign), "neither cifar-10-batches-py"):
        load_data(foreign, progress=False)


# ============================================================================ normalisation


def test_normalization_presets_are_exact():
    assert NORMALIZATIONS["ekg_tf_cifar10"] == Normalization((113.9, 123.0, 125.3), (66.7, 62.1, 63.0))
    assert NORMALIZATIONS["ekg_tf_cifar100"] == Normalization((112, 124, 129), (70, 65, 68))
    assert NORMALIZATIONS["imagenet"].mean == pytest.approx((123.675, 116.28, 103.53))
    assert NORMALIZATIONS["imagenet"].std == pytest.approx((58.395, 57.12, 57.375))
    assert NORMALIZATIONS["cifar10"].mean == pytest.approx(tuple(255 * v for v in (0.4914, 0.4822, 0.4465)))
    assert NORMALIZATIONS["cifar100"].std == pytest.approx(tuple(255 * v for v in (0.2673, 0.2564, 0.2762)))


def test_normalization_apply_and_round_trip():
    norm = get_normalization("ekg_tf_cifar10")
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    y = norm.apply(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    expected = (x.double().numpy() - np.array(norm.mean)[:, None, None]) / np.array(norm.std)[:, None, None]
    assert np.allclose(y.numpy(), expected, atol=1e-5)
    assert get_normalization(norm.to_dict()) == norm
    assert get_normalization({"name": "x", **norm.to_dict()}) == norm
    assert get_normalization(norm) is norm


def test_unknown_normalization_lists_presets():
    with pytest.raises(EkgError, match="ekg_tf_cifar10.*imagenet"):
        get_normalization("nope")
    with pytest.raises(EkgError):
        Normalization((1, 2, 3), (1, 0, 1))


# ============================================================================ augmentation


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen(seed))


def candidate_matches(x: torch.Tensor, out: torch.Tensor, pad: int, mode: str, flips: bool) -> torch.Tensor:
    """(candidates, N) bool: which (flip, dy, dx) translates of each input equal the output."""
    sources = [x.float()] + ([x.float().flip(3)] if flips else [])
    h, w = x.shape[2:]
    rows = []
    for src in sources:
        padded = F.pad(src, (pad,) * 4, mode="reflect" if mode == "reflect" else "constant")
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                rows.append((padded[:, :, dy:dy + h, dx:dx + w] == out).flatten(1).all(1))
    return torch.stack(rows)


def test_augment_output_shape_dtype_range_and_input_untouched(exact):
    x = exact.train.images[:64].clone()
    out = augment(x, AugmentConfig(jitter=True), gen())
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    assert out.min() >= 0 and out.max() <= 255
    assert torch.equal(x, exact.train.images[:64])
    xf = x.float()
    augment(xf, AugmentConfig(jitter=True), gen())
    assert torch.equal(xf, x.float())


def test_pad_crop_is_a_translate_by_at_most_pad():
    x = random_images(256)
    out = augment(x, AugmentConfig(pad=4, pad_mode="zeros", flip=False), gen())
    matches = candidate_matches(x, out, 4, "zeros", flips=False)
    assert matches.shape == (81, 256) and matches.any(0).all()
    offsets = matches.float().argmax(0)
    assert len(offsets.unique()) > 60  # different images get different offsets
    assert (offsets == 40).float().mean() < 0.1  # not stuck at the centre


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_flip_pad_crop_is_a_translate_of_the_image_or_its_mirror(mode):
    x = random_images(256, 16, 16, seed=1)
    out = augment(x, AugmentConfig(pad=3, pad_mode=mode, flip=True), gen(1))
    matches = candidate_matches(x, out, 3, mode, flips=True)
    assert matches.any(0).all()
    flipped = matches[49:].any(0)
    assert 0.3 < flipped.float().mean() < 0.7


def test_flip_probability_is_one_half():
    x = random_images(4000, 4, 4)
    out = augment(x, AugmentConfig(pad=0, flip=True), gen())
    same = (out == x.float()).flatten(1).all(1)
    mirrored = (out == x.float().flip(3)).flatten(1).all(1)
    assert (same ^ mirrored).all()
    assert 0.45 < mirrored.float().mean() < 0.55


def test_reflect_mode_introduces_no_zeros():
    x = torch.full((64, 3, 32, 32), 7, dtype=torch.uint8)
    assert (augment(x, AugmentConfig(pad_mode="reflect"), gen()) == 7).all()
    assert (augment(x, AugmentConfig(pad_mode="zeros"), gen()) == 0).any()


def test_augment_is_deterministic_given_the_generator():
    x = random_images(32)
    cfg = AugmentConfig(jitter=True)
    assert torch.equal(augment(x, cfg, gen(5)), augment(x, cfg, gen(5)))
    assert not torch.equal(augment(x, cfg, gen(5)), augment(x, cfg, gen(6)))


def test_jitter_with_zero_ranges_is_identity():
    x = random_images(16)
    cfg = AugmentConfig(pad=0, flip=False, jitter=True, brightness=0, contrast=0, saturation=0)
    assert torch.equal(augment(x, cfg, gen()), x.float())


def test_jitter_components():
    x = torch.randint(100, 156, (512, 3, 8, 8), generator=gen()).to(torch.uint8)  # far from the clamp
    xf, base = x.float(), dict(pad=0, flip=False, jitter=True, brightness=0.0, contrast=0.0, saturation=0.0)

    delta = augment(x, AugmentConfig(**{**base, "brightness": 0.2}), gen()) - xf
    per_image = delta.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-4)  # one shift per image
    assert per_image.abs().max() <= 51.0 + 1e-4 and per_image[:, 0].std() > 20

    out = augment(x, AugmentConfig(**{**base, "contrast": 0.2}), gen())
    mean = xf.mean((2, 3), keepdim=True)
    assert torch.allclose(out.mean((2, 3), keepdim=True), mean, atol=1e-3)
    factor = ((out - mean) * (xf - mean)).sum((1, 2, 3)) / ((xf - mean) ** 2).sum((1, 2, 3))
    assert torch.allclose(out, mean + factor.view(-1, 1, 1, 1) * (xf - mean), atol=1e-3)
    assert factor.min() >= 0.8 - 1e-5 and factor.max() <= 1.2 + 1e-5 and factor.std() > 0.05

    out = augment(x, AugmentConfig(**{**base, "saturation": 0.2}), gen())
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((out * weights).sum(1), (xf * weights).sum(1), atol=1e-3)  # luma is preserved


def test_jitter_equals_the_sequential_definition():
    x = random_images(64, 8, 8)
    cfg = AugmentConfig(pad=0, flip=False, jitter=True, brightness=0.3, contrast=0.4, saturation=0.5)
    out = augment(x, cfg, gen(7))
    g, n = gen(7), len(x)  # draws in documented order: brightness, contrast, saturation
    b, c, s = ((torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * r for r in (0.3 * 255, 0.4, 0.5))
    ref = x.float() + b
    mean = ref.mean((2, 3), keepdim=True)
    ref = (ref - mean) * (1 + c) + mean
    gray = (ref * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    ref = (gray + (1 + s) * (ref - gray)).clamp(0, 255)
    assert torch.allclose(out, ref, atol=1e-3) and (ref == 0).any() and (ref == 255).any()


def test_augment_config_validation():
    with pytest.raises(EkgError, match="pad_mode"):
        AugmentConfig(pad_mode="circular")
    with pytest.raises(EkgError, match="reflect padding"):
        augment(random_images(2, 4, 4), AugmentConfig(pad=4), gen())


# ============================================================================ batches


def indexed_set(n: int) -> ImageSet:
    """Images whose first pixel and label are the image's position, for checking coverage."""
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n), ["x"])


def test_batches_cover_every_image_once_per_epoch():
    data = indexed_set(103)
    batches = list(iterate_batches(data, 10, shuffle=True, generator=gen()))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103)) and seen.tolist() != list(range(103))
    assert all(torch.equal(x[:, 0, 0, 0], y.float()) and x.dtype == torch.float32 for x, y in batches)
    dropped = list(iterate_batches(data, 10, shuffle=True, generator=gen(), drop_last=True))
    assert [len(y) for _, y in dropped] == [10] * 10 and len(set(torch.cat([y for _, y in dropped]).tolist())) == 100


def test_batches_in_order_with_normalization(exact):
    data = exact.test.subset(range(70))
    norm = get_normalization("cifar10")
    batches = list(iterate_batches(data, 32, normalization=norm))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels)
    assert torch.allclose(torch.cat([x for x, _ in batches]), norm.apply(data.images))


def test_batches_are_deterministic_by_seed(exact):
    data, cfg = exact.train.subset(range(100)), AugmentConfig(jitter=True)

    def epoch(seed: int) -> list:
        return list(iterate_batches(data, 16, shuffle=True, generator=gen(seed), augment=cfg))

    a, b, c = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    g = gen(3)
    first, second = (torch.cat([y for _, y in iterate_batches(data, 16, shuffle=True, generator=g)]) for _ in range(2))
    assert not torch.equal(first, second)  # the generator advances: each epoch is a new permutation


def test_batches_reject_a_bad_batch_size():
    with pytest.raises(EkgError, match="batch_size"):
        iterate_batches(indexed_set(4), 0)


def test_subset_accepts_lists_ranges_arrays_and_refuses_masks():
    data = indexed_set(10)
    for index in ([3, 1], range(3, 0, -2), np.array([3, 1]), torch.tensor([3, 1])):
        assert data.subset(index).labels.tolist() == [3, 1]
    assert len(data.subset([])) == 0
    with pytest.raises(EkgError):
        data.subset(np.ones(10, dtype=bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_and_augmentation(exact):
    data = exact.train.subset(range(300))
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment(data.images.cuda(), AugmentConfig(jitter=True), g)
    assert out.is_cuda and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    with pytest.raises(EkgError, match="generator"):
        augment(data.images.cuda(), AugmentConfig(), gen())
    on_gpu = list(iterate_batches(data, 64, shuffle=True, generator=gen(1), augment=AugmentConfig(), device="cuda"))
    resident = list(iterate_batches(data.to("cuda"), 64, shuffle=True, generator=gen(1), augment=AugmentConfig()))
    assert all(x.is_cuda and y.is_cuda for x, y in on_gpu)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(on_gpu, resident))
    cuda_gen = torch.Generator(device="cuda").manual_seed(2)
    assert len(list(iterate_batches(data.to("cuda"), 64, shuffle=True, generator=cuda_gen))) == 5


# ============================================================================ EKG search sets


def release_sampler(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original EKG release's sampling, verbatim in spirit: global-seeded numpy shuffles."""
    val_idx, sub_idx = [], []
    for c in range(10):
        idx = np.where(labels == c)[0]
        val_idx.append(idx[:-33:-1])
        sub_idx.append(idx[:256])
    val_idx, sub_idx = np.hstack(val_idx), np.hstack(sub_idx)
    state = np.random.get_state()
    try:
        np.random.seed(1)
        np.random.shuffle(val_idx)
        np.random.seed(1)
        np.random.shuffle(sub_idx)
    finally:
        np.random.set_state(state)
    return val_idx, sub_idx


def test_carve_search_sets_matches_the_release(exact):
    d_val, d_sub = carve_search_sets(exact.train)
    assert len(d_val) == 320 and len(d_sub) == 2560
    assert torch.bincount(d_val.labels).tolist() == [32] * 10 and torch.bincount(d_sub.labels).tolist() == [256] * 10
    labels = exact.train.labels.numpy()
    val_idx, sub_idx = release_sampler(labels)
    assert torch.equal(d_val.images, exact.train.images[val_idx])
    assert torch.equal(d_val.labels, exact.train.labels[val_idx])
    assert torch.equal(d_sub.images, exact.train.images[sub_idx])
    last32 = {i for c in range(10) for i in np.where(labels == c)[0][-32:]}
    assert set(val_idx.tolist()) == last32


def test_carve_search_sets_needs_enough_images(exact):
    with raises_data_error("fewer than", "32 + 1000"):
        carve_search_sets(exact.train, sub_per_class=1000)


def test_batch_positions_never_yield_an_empty_batch():
    """Fewer images than one batch with drop_last gives no batch at all. Before, `split` of an empty
    order gave one empty batch; through a training-mode BN that made NaN statistics (an adaptation
    epoch on a D_sub smaller than a batch ended in NaN under torchrun)."""
    order = torch.arange(10)
    assert D.batch_positions(order, 4) and [len(b) for b in D.batch_positions(order, 4)] == [4, 4, 2]
    assert [len(b) for b in D.batch_positions(order, 4, drop_last=True)] == [4, 4]
    assert D.batch_positions(order, 16, drop_last=True) == []
    assert D.batch_positions(torch.arange(0), 4) == []
    data = ImageSet(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long), ["a"])
    assert list(D.iterate_batches(data, 16, drop_last=True)) == []
    assert list(D.iterate_batches(data, 16, drop_last=True, part=slice(8, 16))) == []
    assert [len(y) for _, y in D.iterate_batches(data, 16)] == [10]
