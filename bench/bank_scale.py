"""Memory-bank cost at ImageNet scale, measured on a synthetic bank.

Writes a bank in ekg's format (``logits.npy``: float16, shape ``(N, classes, T)``, memory-mapped;
``bank.json``) with N = 1,281,167 rows (ImageNet-1k's training set), 1000 classes and 5 teachers,
then opens it with :func:`ekg.bank.open_bank` and reads random batches with ``MemoryBank.batch``
as fine-tuning does, measuring:

* the file size on disk and the write time;
* the process's memory while reading: anonymous RSS (what the bank really costs in RAM) and
  file-backed RSS (page cache mapped into the process, which the kernel can drop at any time);
* the read rate in rows per second, first from a cold page cache (when it can be dropped: needs
  root) and then warm.

It then builds a **top-k** bank (``--topk``, default 10) of the same size through the code path of
``ekg.bank.build_bank`` — the same store class, teacher by teacher in batches of 256 rows, each
batch's float32 logits compressed by ``topk_compress`` (fp16 values, int16 classes, the fp16 mean of
the other logits) into memory-mapped ``.partial.npy`` arrays, renamed at the end — with synthetic
logits in place of a network's, and reads it back with ``MemoryBank.batch`` (which densifies each
batch to float32 ``(B, T, classes)``), measuring the build rate, the files' size, memory and read
rates the same way. (Its accuracy cost needs real 1000-class teacher logits; ``bench/bank_topk.py``
measures it on CIFAR-10's real ones.)

    python bench/bank_scale.py                       # ~13 GB written to --dir (deleted at the end)
    python bench/bank_scale.py --rows 100000         # a smaller trial
    python bench/bank_scale.py --no-dense            # the top-k bank only (0.25 GB)

"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import machine  # noqa: E402

from ekg.bank import _Store, index_dtype, open_bank  # noqa: E402


def rss() -> dict[str, int]:
    """Anonymous and file-backed resident memory of this process, in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_rate(bank, rows: int, batch: int, batches: int, seed: int) -> tuple[float, dict[str, int]]:
    gen = torch.Generator().manual_seed(seed)
    peak = {"RssAnon": 0, "RssFile": 0}
    t0 = time.perf_counter()
    for _ in range(batches):
        idx = torch.randint(0, rows, (batch,), generator=gen)
        bank.batch(idx)
        now = rss()
        for k in peak:
            peak[k] = max(peak[k], now[k])
    return batch * batches / (time.perf_counter() - t0), peak


def reads(label: str, bank, args: argparse.Namespace) -> list[str]:
    """Table rows: random batches read with MemoryBank.batch, cold (if the cache can be dropped), then warm."""
    mib = 1024 ** 2
    cold = drop_caches()
    rows = []
    for name in ("cold page cache" if cold else "page cache not dropped (no permission)", "warm page cache"):
        rate, peak = read_rate(bank, args.rows, args.batch, args.batches, seed=1)
        rows.append(f"| {label}: random batches of {args.batch}, {name} | {rate:,.0f} rows/s; peak anonymous RSS "
                    f"{peak['RssAnon'] / mib:.0f} MiB, peak file-backed RSS {peak['RssFile'] / mib:.0f} MiB |")
    return rows


def build_topk(folder: Path, rows: int, classes: int, teachers: int, k: int, batch: int) -> dict:
    """A top-k bank written the way build_bank writes one, from one random block of float32
    logits repeated (the compression and the writes are what is timed, not a random generator)."""
    shape = (rows, classes, teachers)
    store = _Store(folder, shape, k)
    block = (np.random.RandomState(0).randn(batch, classes) * 4).astype(np.float32)
    peak = 0
    t0 = time.perf_counter()
    store.create()
    store.open()
    for t in range(teachers):
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            store.write(slice(start, start + n), t, block[:n])
            if start % (512 * batch) == 0:
                peak = max(peak, rss()["RssAnon"])
        store.flush()
    store.close()
    info = {"shape": list(shape), "dtype": "float16", "topk": k, "classes_dtype": index_dtype(classes).name,
            "fill": "mean", "data": {"n_images": rows, "num_classes": classes, "labels_sha1": "synthetic"}}
    (folder / "bank.json").write_text(json.dumps(info))
    store.finish()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows_per_s": rows * teachers / seconds, "peak_anon": peak,
            "bytes": sum(f.stat().st_size for f in folder.glob("topk_*.npy"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_281_167)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--teachers", type=int, default=5)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--dir", default=str(ROOT / "bench" / "runs" / "bank_scale"))
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense bank (12 GiB at full size)")
    args = ap.parse_args()
    print(f"# memory-bank scale — {machine('cpu')}")
    print(f"# command: python bench/bank_scale.py {' '.join(sys.argv[1:])}")
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shape = (args.rows, args.classes, args.teachers)
    base = rss()

    gib, mib = 1024 ** 3, 1024 ** 2
    out = ["| what | measured |", "|---|---|"]
    out.append(f"| anonymous RSS before any bank | {base['RssAnon'] / mib:.0f} MiB |")
    size = 0
    if not args.no_dense:
        # write the full fp16 bank in chunks (one random chunk repeated, so that the write, not the
        # random generator, is what is timed)
        dense = folder / "dense"
        dense.mkdir()
        t0 = time.perf_counter()
        arr = np.lib.format.open_memmap(dense / "logits.npy", mode="w+", dtype=np.float16, shape=shape)
        chunk = 8192
        block = np.random.RandomState(0).randn(chunk, args.classes, args.teachers).astype(np.float16) * 4
        for start in range(0, args.rows, chunk):
            n = min(chunk, args.rows - start)
            arr[start:start + n] = block[:n]
        arr.flush()
        del arr, block
        write_s = time.perf_counter() - t0
        (dense / "bank.json").write_text(json.dumps({"shape": list(shape), "data": {
            "n_images": args.rows, "num_classes": args.classes, "labels_sha1": "synthetic"}}))
        size = (dense / "logits.npy").stat().st_size
        bank = open_bank(dense)
        out.append(f"| dense: logits.npy on disk | {size / gib:.2f} GiB ({size:,} bytes) |")
        out.append(f"| dense: write time | {write_s:.1f} s ({size / mib / write_s:.0f} MiB/s) |")
        out += reads("dense", bank, args)
        del bank

    topk = folder / "topk"
    topk.mkdir()
    built = build_topk(topk, args.rows, args.classes, args.teachers, args.topk, batch=256)
    bank = open_bank(topk)
    assert bank.batch(torch.arange(3)).shape == (3, args.teachers, args.classes)
    smaller = f", {size / built['bytes']:.0f}× smaller than dense" if size else ""
    out.append(f"| top-{args.topk}: topk_values + topk_classes ({index_dtype(args.classes).name}) + topk_rest on "
               f"disk | {built['bytes'] / gib:.3f} GiB ({built['bytes']:,} bytes{smaller}) |")
    out.append(f"| top-{args.topk}: build (compress + write, batches of 256 rows, teacher by teacher) | "
               f"{built['seconds']:.1f} s ({built['rows_per_s']:,.0f} rows×teachers/s); peak anonymous RSS "
               f"{built['peak_anon'] / mib:.0f} MiB |")
    out += reads(f"top-{args.topk} (densified to float32)", bank, args)
    del bank
    print(f"\nbank: {args.rows:,} rows × {args.classes} classes × {args.teachers} teachers")
    print("\n".join(out))
    if not args.keep_files:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
