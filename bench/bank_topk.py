"""What does a top-k memory bank cost in accuracy? (``--bank-topk K``, see ekg.bank)

Two measurements on what is real here (CIFAR-10: 10 classes, 5 teachers):

``distortion`` — on the real teacher logits of a finished dense bank (default ``runs/quick/bank``,
the original release's ResNet-56 searched at keep 0.45 on the exact subset), each (image, teacher)
row is compressed to its top k (the library's ``topk_compress``: fp16 values, class indices, the
mean of the other logits) and densified again with each fill rule (``densify``: ``mean`` fills the
other classes with the stored mean; ``-inf`` renormalises over the top k). Reported, at the KD
temperature T = 4, with ``p = softmax(z/T)`` the full and ``p̂`` the reconstructed teacher:

* ``KL(p‖p̂)`` (nats; mean, 99th percentile and max over the rows);
* ``TV = ½‖p − p̂‖₁``: the KD loss's gradient with respect to the student's logits is
  ``(q − p)`` per image (up to T), so the gradient error from a top-k teacher is ``p̂ − p``;
* the mass of ``p`` outside the top k (what the fill has to stand for);
* for reference, the same for a temperature-matched fill (``T·log mean exp(z/T)`` of the other
  logits: it keeps their softmax mass at T exact), which the library does not offer;
* the per-batch teacher selection (``distill.select_batch_teachers``): over fine-tuning batches
  (batch 128, the training order of ``--selection-epochs`` epochs, two augmented views with the
  colour jitter, student in training mode), how often the selected set differs from the dense
  bank's, for a student at the start of fine-tuning (``RUN/pruned.pt``) and after it
  (``RUN/final.pt``, if present).

``finetune`` — the same pruned model (default the ResNet-56 ``ekg`` found at keep 0.45 in
``bench/runs/criteria/keep0.45/ekg``) fine-tuned with ``--kd ensemble`` from a dense bank and from
top-k banks built through the real code path (``bank_for_run(..., topk=K)``, each in its own copy
of the run), plus ``--kd none`` as the floor, with the same seed, data order and schedule (the
paper's recipe scaled to ``--epochs``; ``--single`` adds ``--kd single`` from the dense bank, which
is what the ``-inf`` fill reduces the teacher selection to); every model is tested on the whole test set, paired
against the dense bank (bootstrap 95% interval; images only one of the two gets right).

    python bench/bank_topk.py distortion
    python bench/bank_topk.py finetune --epochs 3 --ks 1 2 5 --ks-neg-inf 2      # seed 0
    python bench/bank_topk.py finetune --epochs 3 --ks 1 2 5 --seed 1            # more seeds
    python bench/bank_topk.py summary                 # every finished run: per seed, mean, vs dense

``summary`` evaluates again what ``finetune`` left in ``--out`` (runs of every seed), so the
seeds can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ekg.bank import FILL_RULES, bank_for_run, densify, open_bank, topk_compress
from ekg.checkpoint import load_checkpoint
from ekg.data import get_normalization, load_data
from ekg.distill import select_batch_teachers
from ekg.evaluate import metrics_from_logits, predict_logits
from ekg.train import _two_view_batches, epoch_generator, finetune_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import finetune_and_test, machine, paired, shared_data_root  # noqa: E402

TEMPERATURE = 4.0


def reconstruct(z: torch.Tensor, k: int, fill: str) -> torch.Tensor:
    """``z`` (..., classes) float32 -> the logits a top-k bank gives back for it."""
    values, classes, rest = topk_compress(z, k)
    return densify(torch.from_numpy(values), torch.from_numpy(classes), torch.from_numpy(rest), z.shape[-1], fill)


def distortion(args: argparse.Namespace) -> dict:
    bank = open_bank(args.bank)
    if bank.topk is not None:
        raise SystemExit(f"{args.bank} is a top-{bank.topk} bank; distortion needs a dense one")
    z = torch.from_numpy(np.asarray(bank.logits, dtype=np.float32)).transpose(1, 2).contiguous()  # (N, T, C)
    n, t, c = z.shape
    log_p = F.log_softmax(z / TEMPERATURE, -1)
    p = log_p.exp()
    rows: dict[str, dict] = {}
    for k in args.ks:
        top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(k, -1).indices, True)
        tail = (p * ~top).sum(-1)
        for fill in FILL_RULES:
            zh = reconstruct(z, k, fill)
            log_q = F.log_softmax(zh / TEMPERATURE, -1)
            kl = (p * (log_p - log_q)).sum(-1).flatten()
            tv = 0.5 * (p - log_q.exp()).abs().sum(-1).flatten()
            rows[f"k={k} {fill}"] = {
                "k": k, "fill": fill, "tail_mass_mean": round(float(tail.mean()), 5),
                "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
                "tv_mean": float(tv.mean()), "tv_p99": float(tv.quantile(0.99)), "tv_max": float(tv.max())}
        # reference only (not a library rule): the temperature-matched fill T·log(mean exp(z/T)) of
        # the other logits, which keeps their softmax mass at this T exact (the KL-optimal constant)
        lme = TEMPERATURE * (torch.logsumexp((z / TEMPERATURE).masked_fill(top, float("-inf")), -1)
                             - float(np.log(c - k))) if k < c else torch.zeros(n, t)
        zh = lme.half().float()[..., None].expand_as(z).clone()
        zh[top] = z.half().float()[top]
        log_q = F.log_softmax(zh / TEMPERATURE, -1)
        kl = (p * (log_p - log_q)).sum(-1).flatten()
        tv = 0.5 * (p - log_q.exp()).abs().sum(-1).flatten()
        rows[f"k={k} T-matched (reference)"] = {
            "k": k, "fill": "T-matched", "tail_mass_mean": round(float(tail.mean()), 5),
            "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
            "tv_mean": float(tv.mean()), "tv_p99": float(tv.quantile(0.99)), "tv_max": float(tv.max())}

    # the per-batch teacher selection with a real student
    data = load_data(args.data, progress=False)
    bank.check_data(data.train)
    students = {"start (pruned.pt)": Path(args.student_run) / "pruned.pt",
                "end (final.pt)": Path(args.student_run) / "final.pt"}
    cfg = finetune_config("ensemble", batch_size=128)
    selection: dict[str, dict] = {}
    for label, path in students.items():
        if not path.exists():
            continue
        ckpt = load_checkpoint(path)
        model, norm = ckpt.model.train(), get_normalization(ckpt.normalization)
        counts = {name: {"changed": 0, "selected": 0} for name in ["dense", *rows]}
        batches = 0
        with torch.no_grad():
            for epoch in range(args.selection_epochs):
                gen = epoch_generator(0, epoch, torch.device("cpu"))
                for views, _, teachers in _two_view_batches(data.train, cfg, gen, norm, bank):
                    s_mean = torch.stack(list(model(torch.cat(views)).float().chunk(2))).mean(0)
                    want = select_batch_teachers(teachers, s_mean, TEMPERATURE)
                    counts["dense"]["selected"] += int(want.sum())
                    for name, r in rows.items():
                        if r["fill"] not in FILL_RULES:
                            continue
                        got = select_batch_teachers(reconstruct(teachers, r["k"], r["fill"]), s_mean, TEMPERATURE)
                        counts[name]["changed"] += int(not torch.equal(got, want))
                        counts[name]["selected"] += int(got.sum())
                    batches += 1
        selection[label] = {"batches": batches, **{name: {
            "changed_fraction": round(v["changed"] / batches, 4),
            "mean_selected": round(v["selected"] / batches, 3)} for name, v in counts.items()
            if name == "dense" or rows[name]["fill"] in FILL_RULES}}
        print(f"selection, student {label}: {batches} batches", file=sys.stderr, flush=True)
    return {"bank": str(args.bank), "rows_x_teachers_x_classes": [n, t, c], "temperature": TEMPERATURE,
            "distortion": rows, "selection": selection}


def _bank_run(src: Path, folder: Path) -> Path:
    """A copy of the prune run's bank inputs, so that each bank layout has its own RUN/bank."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("adapted.pt", "history.pt", "config.json"):
        if not (folder / name).exists():
            shutil.copy2(src / name, folder / name)
    return folder


def _bank_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.npy"))


def finetune(args: argparse.Namespace) -> dict:
    run, out = Path(args.run), Path(args.out)
    data = load_data(args.data, progress=False)
    pruned = load_checkpoint(run / "pruned.pt")
    configs = [("none", None, None), ("dense", None, None)]
    configs += [(f"top{k}", k, "mean") for k in args.ks]
    configs += [(f"top{k} -inf", k, "-inf") for k in args.ks_neg_inf]
    if args.single:
        configs.append(("dense single", None, None))
    rows, right = {}, {}
    for name, k, fill in configs:
        bank = None
        build_s = None
        if name != "none":
            bank_dir = _bank_run(run, out / "banks" / ("dense" if k is None else f"top{k}"))
            fresh = not (bank_dir / "bank" / "bank.json").exists()
            t0 = time.perf_counter()
            bank = bank_for_run(bank_dir, data.train, teachers=5, progress=False, topk=k)
            build_s = round(time.perf_counter() - t0, 1) if fresh else None
            if fill is not None:
                bank = open_bank(bank_dir, fill=fill)
        kd = "none" if name == "none" else "single" if name.endswith("single") else "ensemble"
        cfg = finetune_config(kd, epochs=args.epochs, limit_train=args.limit_train, seed=args.seed)
        folder = out / f"ft-e{args.epochs}-s{args.seed}" / name.replace(" ", "_")
        rows[name], right[name] = finetune_and_test(cfg, data, folder, pruned, bank)
        if bank is not None:
            rows[name]["bank_bytes"] = _bank_bytes(bank_dir / "bank")
            rows[name]["bank_build_s"] = build_s
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    for name in rows:
        if name != "dense":
            rows[name]["vs_dense"] = paired(right["dense"], right[name])
        if name != "none":
            rows[name]["vs_none"] = paired(right["none"], right[name])
    return {"model": f"{pruned.arch} from {run / 'pruned.pt'}", "epochs": args.epochs, "seed": args.seed,
            "schedule": "paper recipe scaled to the epochs: batch 128, lr 0.01 x0.2 at 30/60/80%",
            "data": f"{args.data}: {min(len(data.train), args.limit_train or len(data.train))} training / "
                    f"{len(data.test)} test images", "rows": rows}


def summary(args: argparse.Namespace) -> dict:
    """Every finished fine-tuning run under ``--out`` (all seeds), tested again on the whole test
    set: top-1 per seed, the mean, and the difference from the dense bank's run of the same seed
    (per seed, its mean, and a paired bootstrap over the pooled (seed, image) pairs)."""
    out = Path(args.out)
    data = load_data(args.data, progress=False)
    labels = data.test.labels
    right: dict[str, dict[int, np.ndarray]] = {}
    losses: dict[str, dict[int, float]] = {}
    for folder in sorted(out.glob(f"ft-e{args.epochs}-s*/*")):
        if not (folder / "model.pt").exists():
            continue
        seed = int(folder.parent.name.rsplit("-s", 1)[1])
        ckpt = load_checkpoint(folder / "model.pt")
        if ckpt.meta.get("epoch") != args.epochs:
            continue
        logits = predict_logits(ckpt.model, data.test, get_normalization(ckpt.normalization))
        right.setdefault(folder.name.replace("_", " "), {})[seed] = (logits.argmax(1) == labels).numpy()
        losses.setdefault(folder.name.replace("_", " "), {})[seed] = metrics_from_logits(logits, labels)["loss"]
    rows = {}
    for name, by_seed in right.items():
        seeds = sorted(by_seed)
        row = {"seeds": seeds, "top1": [round(100 * float(by_seed[s].mean()), 2) for s in seeds]}
        row["top1_mean"] = round(float(np.mean(row["top1"])), 2)
        row["loss_mean"] = round(float(np.mean([losses[name][s] for s in seeds])), 4)
        common = [s for s in seeds if s in right.get("dense", {})]
        if name != "dense" and common:
            diffs = [100 * float(by_seed[s].mean() - right["dense"][s].mean()) for s in common]
            row["vs_dense_per_seed"] = [round(d, 2) for d in diffs]
            row["vs_dense_mean"] = round(float(np.mean(diffs)), 2)
            row["vs_dense_pooled"] = paired(np.concatenate([right["dense"][s] for s in common]),
                                            np.concatenate([by_seed[s] for s in common]))
        base = name.removesuffix(" -inf")
        if base != name and base in right:  # the same K with the mean fill
            both = [s for s in seeds if s in right[base]]
            row["vs_mean_fill_per_seed"] = [round(100 * float(by_seed[s].mean() - right[base][s].mean()), 2)
                                            for s in both]
            row["vs_mean_fill_pooled"] = paired(np.concatenate([right[base][s] for s in both]),
                                                np.concatenate([by_seed[s] for s in both]))
        rows[name] = row
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    return {"runs": str(out), "epochs": args.epochs, "test_images": len(labels), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("distortion", help="KL/TV of top-k teachers and teacher-selection changes")
    d.add_argument("--bank", default=str(ROOT / "runs/quick/bank"), help="a finished dense bank")
    d.add_argument("--student-run", default=str(ROOT / "runs/quick"), help="holds pruned.pt (and final.pt)")
    d.add_argument("--data", default=str(shared_data_root() / "cifar10/exact-subset"))
    d.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5])
    d.add_argument("--selection-epochs", type=int, default=3, help="epochs of batches for the selection count")
    f = sub.add_parser("finetune", help="fine-tuned accuracy: dense vs top-k banks vs no KD")
    f.add_argument("--run", default=str(ROOT / "bench/runs/criteria/keep0.45/ekg"), help="an `ekg prune` run dir")
    f.add_argument("--data", default=str(shared_data_root() / "cifar10/exact-subset"))
    f.add_argument("--ks", type=int, nargs="*", default=[1, 2, 5], help="top-k banks (fill: mean)")
    f.add_argument("--ks-neg-inf", type=int, nargs="*", default=[], help="top-k banks read with the -inf fill")
    f.add_argument("--single", action="store_true", help="also --kd single from the dense bank (teacher 0 only)")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--limit-train", type=int, default=None)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default=str(ROOT / "bench/runs/bank_topk"))
    m = sub.add_parser("summary", help="all finished fine-tuning runs under --out, over seeds")
    m.add_argument("--data", default=str(shared_data_root() / "cifar10/exact-subset"))
    m.add_argument("--epochs", type=int, default=3)
    m.add_argument("--out", default=str(ROOT / "bench/runs/bank_topk"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    report = {"command": "python " + " ".join(sys.argv), "machine": machine("cpu")}
    print(f"# {report['command']}\n# {report['machine']}", file=sys.stderr, flush=True)
    report.update({"distortion": distortion, "finetune": finetune, "summary": summary}[args.what](args))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
