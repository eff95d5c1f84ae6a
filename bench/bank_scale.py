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

It also writes the same teachers' **top-k** (values fp16 + class indices int16, ``(N, T, k)``) and
reports its size, for comparison (its accuracy cost needs real 1000-class teacher logits and is not
measured here).

    python bench/bank_scale.py                       # ~13 GB written to --dir (deleted at the end)
    python bench/bank_scale.py --rows 100000         # a smaller trial

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

from ekg.bank import open_bank  # noqa: E402


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
    args = ap.parse_args()
    print(f"# memory-bank scale — {machine('cpu')}")
    print(f"# command: python bench/bank_scale.py {' '.join(sys.argv[1:])}")
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shape = (args.rows, args.classes, args.teachers)
    base = rss()

    # write the full fp16 bank in chunks (one random chunk repeated, so that the write, not the
    # random generator, is what is timed)
    t0 = time.perf_counter()
    arr = np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float16, shape=shape)
    chunk = 8192
    block = np.random.RandomState(0).randn(chunk, args.classes, args.teachers).astype(np.float16) * 4
    for start in range(0, args.rows, chunk):
        n = min(chunk, args.rows - start)
        arr[start:start + n] = block[:n]
    arr.flush()
    del arr
    write_s = time.perf_counter() - t0
    (folder / "bank.json").write_text(json.dumps({"shape": list(shape), "data": {"n_images": args.rows,
                                                  "num_classes": args.classes, "labels_sha1": "synthetic"}}))
    size = (folder / "logits.npy").stat().st_size

    bank = open_bank(folder)
    cold = drop_caches()
    rate_cold, peak_cold = read_rate(bank, args.rows, args.batch, args.batches, seed=1)
    rate_warm, peak_warm = read_rate(bank, args.rows, args.batch, args.batches, seed=1)

    # the top-k alternative: values fp16 + class indices int16, shape (N, T, k); written from the
    # first chunk's top-k repeated (its size, not the selection, is what is measured)
    first = np.asarray(block, dtype=np.float32).transpose(0, 2, 1)
    top = np.argpartition(-first, args.topk - 1, axis=2)[:, :, :args.topk]
    top_vals = np.take_along_axis(first, top, axis=2).astype(np.float16)
    top = top.astype(np.int16)
    t0 = time.perf_counter()
    vals = np.lib.format.open_memmap(folder / "topk_values.npy", mode="w+", dtype=np.float16,
                                     shape=(args.rows, args.teachers, args.topk))
    idxs = np.lib.format.open_memmap(folder / "topk_classes.npy", mode="w+", dtype=np.int16,
                                     shape=(args.rows, args.teachers, args.topk))
    for start in range(0, args.rows, chunk):
        n = min(chunk, args.rows - start)
        vals[start:start + n] = top_vals[:n]
        idxs[start:start + n] = top[:n]
    vals.flush()
    idxs.flush()
    topk_s = time.perf_counter() - t0
    topk_size = (folder / "topk_values.npy").stat().st_size + (folder / "topk_classes.npy").stat().st_size
    del vals, idxs

    gib = 1024 ** 3
    mib = 1024 ** 2
    print(f"\nbank: {args.rows:,} rows × {args.classes} classes × {args.teachers} teachers, float16")
    print("| what | measured |\n|---|---|")
    print(f"| logits.npy on disk | {size / gib:.2f} GiB ({size:,} bytes) |")
    print(f"| write time | {write_s:.1f} s ({size / mib / write_s:.0f} MiB/s) |")
    print(f"| anonymous RSS before opening | {base['RssAnon'] / mib:.0f} MiB |")
    for label, rate, peak, ok in (("cold page cache" if cold else "page cache not dropped (no permission)",
                                   rate_cold, peak_cold, True), ("warm page cache", rate_warm, peak_warm, True)):
        print(f"| random batches of {args.batch}, {label} | {rate:,.0f} rows/s; peak anonymous RSS "
              f"{peak['RssAnon'] / mib:.0f} MiB, peak file-backed RSS {peak['RssFile'] / mib:.0f} MiB |")
    print(f"| top-{args.topk} store (values fp16 + classes int16) | {topk_size / gib:.3f} GiB, written in {topk_s:.1f} s "
          f"({size / topk_size:.0f}× smaller) |")
    if not args.keep_files:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
