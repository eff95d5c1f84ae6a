"""The zoo table (issue 14): every torchvision classification model and 20 timm models, pruned to
keep 0.5 (FLOPs) by ekg and by Torch-Pruning, or refused.

The models are ``tests/zoo_models.py``'s list (random weights, 10 classes, 32×32 or the smallest
size a model accepts). For each model, each in a subprocess of its own with a time limit:

* **ekg**: the real ``ekg.prune(model, data, keep=0.5, out=...)`` on a tiny real CIFAR-10 subset
  (the exact subset's first ``--per-class`` training images of each class: D_val and D_sub carve
  2 + 2 per class; images resized when the model needs more than 32×32), the search at
  ``--step``. Recorded: refused (the reason, and that nothing was written in ``out``) or pruned
  (the landed FLOPs ratio, steps, seconds, the slim == masked max abs difference prune checked,
  whether ekg's FLOPs of the slim model are ``torch.utils.flop_counter``'s and the search's,
  whether ``pruned.pt`` reloads to the same outputs), a failure (any other exception, or an
  EkgError after something was written), or "timed out" with the search's last step.
* **Torch-Pruning** (``import torch_pruning as tp``): ``tp.pruner.MagnitudePruner`` with
  ``tp.importance.MagnitudeImportance(p=2)``, local (uniform) pruning, the layers writing the
  class scores ignored, its ``pruning_ratio`` searched in a shrinking bracket of [0, 1] (at most
  ``--tp-iters`` tries) for the smallest one whose ``tp.utils.count_ops_and_params`` FLOPs ratio
  is at most 0.5: until a ratio lands in (0.495, 0.5] or the bracket is under 0.001. Recorded:
  pruned (the ratio reached, the pruning ratio, ekg's conv+linear count of the same model, that
  the pruned model runs and gives (2, 10) outputs), the error (type and first line, and the
  pruning ratio it happened at), "cannot reach 0.5", or "timed out" with the best ratio so far.

Results: one JSON per model in ``bench/results/zoo/`` (written after each tool; a model's tool
already there is skipped unless ``--redo``). ``--table`` prints the markdown table of what is
there and the counts.

    nice -n 10 python bench/zoo.py                          # the whole list (hours on 2 cores)
    python bench/zoo.py --only resnet18 timm:dla34 --redo   # a few models again
    python bench/zoo.py --tool ekg --redo                   # ekg again, Torch-Pruning's kept
    python bench/zoo.py --table                             # the table of the results there
    python bench/zoo.py --only regnet_y_128gf --redo --runs /tmp/zoo-runs --ekg-limit 3600
                                # a long search in parts: run it again to resume where it stopped

Each worker runs with ``--threads`` torch threads (default 1) and an address-space limit (``--mem-gb``: a model that
needs more is "out of memory" instead of waking the machine's OOM killer); run the sweep under
``nice`` on a shared machine. The time limits are wall-clock: on a loaded machine a model's limit
buys less work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from zoo_models import ZOO, build, classifier_layers, input_size  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "zoo"
KEEP = 0.5
TOOLS = ("ekg", "tp")


def result_path(results: Path, name: str) -> Path:
    return results / (name.replace(":", "_") + ".json")


def run_folder(name: str, scratch: Path, args: argparse.Namespace) -> Path:
    """Where the ekg worker prunes ``name``: the scratch folder's ``run`` (deleted with it), or with
    ``--runs DIR`` a folder of DIR kept while the search has not finished, so that the next sweep
    resumes it (``ekg.prune(..., resume=True)``) instead of starting over."""
    return Path(args.runs) / name.replace(":", "_") if args.runs else scratch / "run"


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def commit() -> str:
    """The ekg commit measured (``$EKG_ZOO_COMMIT`` when the sweep runs from an exported copy)."""
    if os.environ.get("EKG_ZOO_COMMIT"):
        return os.environ["EKG_ZOO_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty src" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- data

def cifar_subset(size: tuple[int, int, int], per_class: int, test_per_class: int = 2):
    """The exact CIFAR-10 subset's first ``per_class`` training images of each class (and
    ``test_per_class`` test images), bilinearly resized to ``size`` if it is not 32×32."""
    import torch
    import torch.nn.functional as F

    from _common import shared_data_root
    from ekg.data import DataSplits, ImageSet, load_data

    full = load_data(shared_data_root() / "cifar10" / "exact-subset", progress=False)

    def take(split, k):
        labels = split.labels
        idx = torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in range(len(split.classes))])
        images = split.images[idx]
        if tuple(images.shape[1:]) != tuple(size):
            images = F.interpolate(images.float(), size=size[1:], mode="bilinear", align_corners=False)
            images = images.round().clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels[idx].clone(), list(split.classes))

    return DataSplits("cifar10", take(full.train, per_class), take(full.test, test_per_class),
                      f"exact CIFAR-10 subset, {per_class} training images per class, {size[1]}x{size[2]}")


# ----------------------------------------------------------------------------- ekg

def flop_counter(model, size) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *size))
    return int(counter.get_total_flops())


def ekg_worker(name: str, scratch: Path, args: argparse.Namespace) -> dict:
    import torch

    from ekg import flops
    from ekg.checkpoint import load_checkpoint
    from ekg.errors import EkgError
    from ekg.graph import build_graph
    from ekg.pruning import prune
    from ekg.search import SearchConfig

    size = input_size(name)
    model = build(name)
    data = cifar_subset(size, args.per_class)
    rec: dict = {"commit": commit(), "settings": {"step": args.step, "val_per_class": 2, "sub_per_class": 2,
                                                  "batch_size": 20, "train_images_per_class": args.per_class}}
    try:
        graph = build_graph(model, size)
        rec["groups"], rec["prunable_groups"] = len(graph.groups), len(graph.prunable)
    except EkgError as e:
        rec["groups"] = rec["prunable_groups"] = None
        rec["graph_error"] = str(e)
    out = run_folder(name, scratch, args)
    cfg = SearchConfig(keep=KEEP, val_per_class=2, sub_per_class=2, batch_size=20, step=args.step)
    resume = (out / "config.json").exists()  # a search an earlier sweep began (--runs)
    if resume:
        rec["resumed_at_step"] = ekg_progress(out).get("step")
    t0 = time.perf_counter()
    try:
        res = prune(model, data, KEEP, out=out, config=cfg, progress=False, resume=resume)
    except EkgError as e:
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
        rec.update(status="refused" if not written else "failed", reason=str(e), written=written,
                   seconds=round(time.perf_counter() - t0, 1))
        if written:
            rec["error"] = first_line(e)
        return rec
    except Exception as e:  # noqa: BLE001 - the point is to record what happens
        rec.update(status="failed", error=first_line(e), traceback=traceback.format_exc()[-3000:],
                   seconds=round(time.perf_counter() - t0, 1))
        return rec
    seconds = time.perf_counter() - t0
    if resume:  # the search's own time over every part (search.jsonl), beside this part's
        rec["search_s"] = round(sum(row.get("seconds", 0.0) for row in search_log(out)), 1)
    slim = res.model.eval()
    full = flops.count(model, size).flops
    counted = flops.count(slim, size).flops
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(3))
    back = load_checkpoint(out / "pruned.pt").model.eval()
    if args.runs:
        shutil.rmtree(out)  # finished: nothing to resume
    # the scale of the outputs prune's slim == masked check compared (its first D_val batch, as it carved it):
    # that check allows 1e-4 of it
    from ekg.data import get_normalization, iterate_batches
    from ekg.search import carve_search_sets

    d_val, _ = carve_search_sets(data.train, val_per_class=2, sub_per_class=2, seed=cfg.split_seed)
    xv = next(iter(iterate_batches(d_val, cfg.batch_size, normalization=get_normalization(
        res.checkpoint.normalization))))[0][:64]
    with torch.no_grad():
        reload_equal = bool(torch.equal(back(x), slim(x)))
        scale = float(slim(xv).abs().max())
    rec.update(status="pruned", flops_ratio=res.flops_ratio, flops=res.flops, full_flops=full, steps=res.steps,
               seconds=round(seconds, 1), in_budget=KEEP - 0.01 < res.flops_ratio <= KEEP,
               slim_max_diff=res.slim_max_diff, output_scale=scale, slim_rel_diff=res.slim_max_diff / max(scale, 1.0),
               flops_equal_count=counted == res.flops,
               flops_equal_flop_counter=2 * counted == flop_counter(slim, size), reload_equal=reload_equal,
               params=res.params)
    return rec


def search_log(run: Path) -> list[dict]:
    """The steps of the search in ``run`` (search.jsonl), [] before the first."""
    try:
        return [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def ekg_progress(run: Path) -> dict:
    """The last step of an interrupted search, if it got that far."""
    rows = search_log(run)
    if not rows:
        return {"reached": "adaptation or the first step" if run.exists() else "before the search"}
    last = rows[-1]
    return {"step": last.get("step"), "flops_ratio": last.get("flops_ratio")}


# ----------------------------------------------------------------------------- Torch-Pruning

def tp_worker(name: str, scratch: Path, args: argparse.Namespace) -> dict:
    import copy
    import importlib.metadata

    import torch
    import torch_pruning as tp

    from ekg import flops

    size = input_size(name)
    model = build(name)
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(3))
    rec: dict = {"version": importlib.metadata.version("torch-pruning"), "importance": "MagnitudeImportance(p=2)",
                 "pruner": "MagnitudePruner", "global_pruning": False}
    progress = scratch / "tp_progress.json"
    t0 = time.perf_counter()
    try:
        base_macs, base_params = tp.utils.count_ops_and_params(model, example)
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=first_line(e), stage="count_ops_and_params of the original")
        return rec
    full_ekg = flops.count(model, size).flops

    def prune_at(r: float):
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=r, ignored_layers=classifier_layers(m))
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(m, example)
        return m, macs / base_macs, params

    # the smallest pruning_ratio whose FLOPs ratio is at most KEEP: a bracket [lo, hi] (ratio(lo) > KEEP >=
    # ratio(hi)) narrowed from a first guess (FLOPs ~ (1 - r)^2) by that model's guesses clipped into the
    # bracket, halving it where a guess falls outside; done when a ratio lands in (KEEP - 0.005, KEEP] or
    # the bracket is narrower than 1e-3
    lo, hi, best, tried = 0.0, 1.0, None, []
    r = 1 - math.sqrt(KEEP)
    for _ in range(args.tp_iters):
        try:
            m, ratio, params = prune_at(r)
        except Exception as e:  # noqa: BLE001
            rec.update(status="error", error=first_line(e), at_pruning_ratio=r, tried=tried,
                       traceback=traceback.format_exc()[-3000:], seconds=round(time.perf_counter() - t0, 1))
            return rec
        tried.append([round(r, 6), ratio])
        if ratio <= KEEP:
            best, hi = (r, ratio, params, m), r
        else:
            lo = r
            del m
        progress.write_text(json.dumps({"tried": tried, "best": None if best is None else best[:2]}))
        if (best is not None and best[1] > KEEP - 0.005) or hi - lo < 1e-3:
            break
        guess = 1 - (1 - r) * math.sqrt(KEEP / ratio) if ratio > 0 else -1.0
        margin = min(0.02 * (hi - lo), 1e-3)
        r = guess if lo + margin < guess < hi - margin else (lo + hi) / 2
    rec["tried"] = tried
    if best is None:
        rec.update(status="cannot reach 0.5", lowest_ratio=min(t[1] for t in tried),
                   seconds=round(time.perf_counter() - t0, 1))
        return rec
    r, ratio, params, m = best
    m.eval()
    try:
        with torch.no_grad():
            y = m(torch.randn(2, *size, generator=torch.Generator().manual_seed(4)))
        shape = list(y.shape)
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=first_line(e), stage="forward of the pruned model", pruning_ratio=r,
                   flops_ratio=ratio, seconds=round(time.perf_counter() - t0, 1))
        return rec
    rec.update(status="pruned" if shape == [2, 10] else "wrong output", output_shape=shape, pruning_ratio=r,
               flops_ratio=ratio, params_ratio=params / base_params, macs=int(base_macs * ratio),
               ekg_count_ratio=flops.count(m, size).flops / full_ekg, seconds=round(time.perf_counter() - t0, 1))
    return rec


def tp_progress(scratch: Path) -> dict:
    try:
        return json.loads((scratch / "tp_progress.json").read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- the sweep

def run_one(name: str, tool: str, args: argparse.Namespace) -> dict:
    limit = args.ekg_limit if tool == "ekg" else args.tp_limit
    with tempfile.TemporaryDirectory(prefix=f"zoo-{tool}-") as tmp:
        scratch = Path(tmp)
        result = scratch / "result.json"
        cmd = [sys.executable, __file__, "--worker", tool, name, "--scratch", str(scratch),
               "--step", str(args.step), "--per-class", str(args.per_class), "--tp-iters", str(args.tp_iters),
               "--mem-gb", str(args.mem_gb), "--threads", str(args.threads)] + (["--runs", args.runs] if args.runs else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            rec = {"status": "timed out", "limit_s": limit}
            rec.update(ekg_progress(run_folder(name, scratch, args)) if tool == "ekg" else tp_progress(scratch))
            if tool == "ekg" and args.runs:
                rec["kept"] = "the search is kept in --runs: the next sweep resumes it"
            rec["commit"] = commit()
            return rec
        wall = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            why = f"worker killed by signal {-proc.returncode}" if proc.returncode < 0 else \
                f"worker exited with {proc.returncode}"
            return {"status": "failed", "error": why, "stderr_tail": tail, "wall_s": wall, "commit": commit()}
        rec = json.loads(result.read_text())
        rec["wall_s"] = wall
        return rec


def out_of_memory(rec: dict) -> dict:
    """A worker's failure to allocate (the ``--mem-gb`` address-space limit) is recorded as such."""
    text = rec.get("error", "") + rec.get("traceback", "")
    if rec.get("status") in ("failed", "error") and ("can't allocate memory" in text or "MemoryError" in text):
        rec["status"] = "out of memory"
    return rec


def worker_main(args: argparse.Namespace) -> int:
    import resource

    limit = int(args.mem_gb * 2**30)  # address space: a model too big fails here, not the machine's OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    tool, name = args.worker
    scratch = Path(args.scratch)
    try:
        rec = ekg_worker(name, scratch, args) if tool == "ekg" else tp_worker(name, scratch, args)
    except MemoryError as e:  # building the model, say
        rec = {"status": "failed", "error": first_line(e) or "MemoryError"}
    rec["mem_gb"] = args.mem_gb
    (scratch / "result.json").write_text(json.dumps(out_of_memory(rec)))
    return 0


def select(only: list[str] | None) -> list[str]:
    if not only:
        return list(ZOO)
    names = []
    for want in only:
        hits = [n for n in ZOO if n == want or n.partition(":")[2] == want]
        if not hits:
            raise SystemExit(f"zoo.py: {want!r} is not in tests/zoo_models.py's list")
        names += [h for h in hits if h not in names]
    return names


def sweep(args: argparse.Namespace) -> int:
    """Each model's tools in turn, ``--jobs`` models at a time (one JSON per model: no two jobs
    write the same file)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    tools = args.tool or list(TOOLS)
    lock = threading.Lock()

    def model(name: str) -> None:
        path = result_path(results, name)
        rec = json.loads(path.read_text()) if path.exists() else {"name": name, "input_size": list(input_size(name))}
        for tool in tools:
            if tool in rec and not args.redo:
                continue
            r = run_one(name, tool, args)
            r["date"] = time.strftime("%Y-%m-%d %H:%M")
            rec[tool] = r
            rec["versions"] = versions()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=1))
            tmp.replace(path)
            with lock:
                print(f"{name:34s} {tool:3s} {r['status']:16s} {summary(tool, r)}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for f in [pool.submit(model, name) for name in select(args.only)]:
            f.result()
    return 0


_VERSIONS: dict | None = None


def versions() -> dict:
    global _VERSIONS
    if _VERSIONS is None:
        import importlib.metadata

        _VERSIONS = {}
        for dist in ("torch", "torchvision", "timm", "torch-pruning"):
            try:
                _VERSIONS[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                _VERSIONS[dist] = None
    return _VERSIONS


# ----------------------------------------------------------------------------- the table

def short(text: str, n: int = 150) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def refusal(reason: str) -> str:
    """An ekg refusal in short: the first group's reason of "no prunable channel group", the
    largest share of the floor's (the JSON has the whole line)."""
    import re

    m = re.match(r"this model \(.*?\) has no prunable channel group: [^:]*: (.*?)(;|$)", reason)
    if m:
        return f"no prunable group ({m.group(1)}; …)"
    m = re.match(r"cannot reach `keep` [\d.]+: .*? FLOPs ratio of ([\d.]+) \((.*?%.*?)(;|\); give)", reason)
    if m:
        return f"floor {m.group(1)} > 0.5 ({m.group(2)}; …)"
    return reason


def summary(tool: str, r: dict) -> str:
    s = r.get("status")
    if tool == "ekg":
        if s == "pruned":
            checks = []
            rel = r.get("slim_rel_diff")
            checks.append(f"slim−masked {r['slim_max_diff']:.1g}" + (f" ({rel:.1g} of the scale)" if rel else ""))
            checks.append("FLOPs = flop_counter" if r["flops_equal_flop_counter"] and r["flops_equal_count"]
                          else "FLOPs ≠ flop_counter")
            checks.append("reload equal" if r["reload_equal"] else "reload DIFFERS")
            took = f"{r['seconds']:.0f} s" if "resumed_at_step" not in r else \
                f"search {r['search_s']:.0f} s, resumed at step {r['resumed_at_step']}"
            return f"pruned: {r['steps']} steps, {took}; {', '.join(checks)}"
        if s == "refused":
            return "refused: " + short(refusal(r["reason"]), 230) + ("" if not r["written"] else " (after writing!)")
        if s == "timed out":
            where = (f"at step {r['step']}, ratio {r['flops_ratio']:.3f}" if r.get("step") is not None
                     else r.get("reached", ""))
            return f"timed out after {r['limit_s']} s ({where})"
        if s == "out of memory":
            return f"out of memory ({r.get('mem_gb')} GiB limit): " + short(r.get("error", ""), 80)
        return "failed: " + short(r.get("error", ""))
    if s == "pruned":
        return f"pruned (pruning_ratio {r['pruning_ratio']:.4f}; runs, output (2, 10))"
    if s == "error":
        where = f" at pruning_ratio {r['at_pruning_ratio']:.4f}" if "at_pruning_ratio" in r else ""
        return f"error{where}: " + short(r.get("error", ""), 120)
    if s == "out of memory":
        return f"out of memory ({r.get('mem_gb')} GiB limit)"
    if s == "cannot reach 0.5":
        return f"cannot reach 0.5 (lowest {r['lowest_ratio']:.3f})"
    if s == "timed out":
        best = r.get("best")
        return f"timed out after {r['limit_s']} s" + (f" (best {best[1]:.3f})" if best else "")
    return f"{s}: " + short(r.get("error", ""), 120)


def table(args: argparse.Namespace) -> int:
    results = Path(args.results)
    rows, counts = [], {t: {} for t in TOOLS}
    for name in select(args.only):
        path = result_path(results, name)
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        e, t = rec.get("ekg"), rec.get("tp")
        size = rec["input_size"][1]
        cells = [f"`{name}`", str(size)]
        if e:
            counts["ekg"][e["status"]] = counts["ekg"].get(e["status"], 0) + 1
            cells += [summary("ekg", e), f"{e['flops_ratio']:.4f}" if e.get("status") == "pruned" else "–",
                      f"{e.get('prunable_groups')}/{e.get('groups')}" if e.get("groups") is not None else "–"]
        else:
            cells += ["not run", "–", "–"]
        if t:
            counts["tp"][t["status"]] = counts["tp"].get(t["status"], 0) + 1
            cells += [summary("tp", t), f"{t['flops_ratio']:.4f}" if t.get("status") == "pruned" else "–"]
        else:
            cells += ["not run", "–"]
        rows.append(cells)
    print("| model | input | ekg result | ekg FLOPs ratio | prunable groups / groups | Torch-Pruning result "
          "| TP FLOPs ratio |")
    print("|---|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()
    for tool, label in (("ekg", "ekg"), ("tp", "Torch-Pruning")):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts[tool].items(), key=lambda kv: -kv[1]))
        print(f"- **{label}** ({sum(counts[tool].values())} models): {parts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="these models (torchvision:NAME, timm:NAME or NAME)")
    p.add_argument("--tool", nargs="+", choices=TOOLS, help="only these tools (default: both)")
    p.add_argument("--redo", action="store_true", help="run again what bench/results/zoo already has")
    p.add_argument("--table", action="store_true", help="print the markdown table of the results and exit")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--step", type=float, default=0.5, help="the search's step (default 0.5; ekg's default is 0.2)")
    p.add_argument("--per-class", type=int, default=4, help="training images per class (D_val 2 + D_sub 2)")
    p.add_argument("--ekg-limit", type=int, default=600, help="seconds per model for ekg.prune (default 600)")
    p.add_argument("--tp-limit", type=int, default=300, help="seconds per model for Torch-Pruning (default 300)")
    p.add_argument("--tp-iters", type=int, default=12, help="most tries of Torch-Pruning's pruning_ratio")
    p.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    p.add_argument("--mem-gb", type=float, default=12.0,
                   help="address-space limit of each worker in GiB (default 12): beyond it, 'out of memory'")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker (default 1)")
    p.add_argument("--runs", metavar="DIR",
                   help="keep each ekg search in DIR/NAME until it finishes: a timed-out search is resumed by the "
                        "next sweep (its row then says at which step, and the search's time over every part)")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "NAME"), help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.table:
        return table(args)
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
