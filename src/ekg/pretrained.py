"""Known pretrained checkpoints, found locally or downloaded with checksum verification.

``--model`` accepts a file path or one of these names. A name is looked up, in order, under the
data root (``$EKG_DATA``, laid out like this project's shared data folder), in the cache folder
(``$EKG_CACHE`` or ``~/.cache/ekg``), and finally downloaded into the cache when ``download`` is
allowed and a network exists. Every file found or fetched is MD5-checked.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from . import download as _download
from .download import data_root, default_cache_dir
from .errors import CheckpointError
from .io import md5sum


@dataclass(frozen=True)
class Pretrained:
    name: str
    relpath: str  # where it lies under a data root laid out like ../shared/data
    url: str
    md5: str
    description: str
    expected_top1: float  # on the exact CIFAR-10 test subset, BN in inference mode

    @property
    def filename(self) -> str:
        return Path(self.relpath).name


_AKA = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
PRETRAINED: dict[str, Pretrained] = {
    p.name: p
    for p in (
        Pretrained(
            "ekg_resnet56_cifar10", "pretrained/ekg_tf/res56_cifar10.pkl",
            "https://github.com/sseung0703/EKG/raw/1fe87fe962ddbd69ef2a280f72b44979f4fb74ab/pretrained/res56_cifar10.pkl",
            "6645ed77fd4f94601279e592e9928961",
            "the original EKG release's ResNet-56 (projection shortcuts, TF padding)", 93.5),
        Pretrained("akamaster_resnet20", "pretrained/akamaster/resnet20-12fca82f.th", _AKA + "resnet20-12fca82f.th",
                   "1f38c81cdebd6bcce9b03d082161a36c", "akamaster ResNet-20 (zero-padding shortcuts)", 91.6),
        Pretrained("akamaster_resnet32", "pretrained/akamaster/resnet32-d509ac18.th", _AKA + "resnet32-d509ac18.th",
                   "1b290d0b1aad139b0f2be36cf1fa4846", "akamaster ResNet-32 (zero-padding shortcuts)", 92.8),
        Pretrained("akamaster_resnet56", "pretrained/akamaster/resnet56-4bfd9763.th", _AKA + "resnet56-4bfd9763.th",
                   "48a2383e717f38f02934658ab8d4d9a2", "akamaster ResNet-56 (zero-padding shortcuts)", 92.7),
    )
}
DEFAULT_MODEL = "ekg_resnet56_cifar10"
DEFAULT_DATA = "cifar10"  # the dataset of DEFAULT_MODEL (a name load_data looks up under $EKG_DATA)


def resolve_model(spec: str | os.PathLike, *, cache_dir: Path | None = None, download: bool = False) -> Path:
    """A model argument (path or pretrained name) → an existing local file."""
    path = Path(spec)
    if str(spec) not in PRETRAINED:
        if not path.exists():
            names = ", ".join(PRETRAINED)
            if len(path.parts) == 1 and not path.suffix:  # meant as a name
                close = difflib.get_close_matches(str(spec), PRETRAINED, n=1)
                raise CheckpointError(
                    f"{spec} is neither a model file nor a pretrained name"
                    + (f" (did you mean {close[0]}?)" if close else "")
                    + f": give a checkpoint's path or one of {names} (see `ekg models`)"
                )
            raise CheckpointError(f"model file {path} does not exist (nor is it a pretrained name: {names})")
        return path
    entry = PRETRAINED[str(spec)]
    cache_dir = cache_dir or default_cache_dir()
    candidates = [root / entry.relpath for root in (data_root(),) if root is not None]
    candidates.append(cache_dir / entry.filename)
    for cand in candidates:
        if cand.is_file():
            actual = md5sum(cand)
            if actual != entry.md5:
                raise CheckpointError(
                    f"{cand} has md5 {actual}, expected {entry.md5} for {entry.name}: the file is corrupt "
                    "or a different version; delete it and fetch it again"
                )
            return cand
    if not download:
        where = " or ".join(str(c) for c in candidates)
        raise CheckpointError(
            f"pretrained model {entry.name} not found at {where}; set EKG_DATA to a folder holding "
            f"{entry.relpath}, pass the file's path, or add `download=True` to fetch {entry.url}"
        )
    return _download.download(entry.url, cache_dir / entry.filename, entry.md5)
