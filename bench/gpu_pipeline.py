"""GPU evidence (issue 5) in one time-budgeted call: ResNet-56 on the complete CIFAR-10 JPEG copy.

Every phase is an `ekg` command (printed, logged, timed); the epochs of the baseline and of the
fine-tuning are sized from throughput measured earlier in the same call so the whole run ends
inside ``--budget`` seconds:

1. probe: one epoch of the baseline recipe on 25,600 images -> baseline images/s;
2. baseline: `ekg train --arch resnet56` on all 50,000 JPEG training images (cosine, batch 256,
   lr 0.2, one warm-up epoch, bf16 + channels-last), so that the original and the pruned network
   have seen the same training data;
3. `ekg prune --keep 0.45`: adaptation epoch, EKG search, slimming;
4. bench/speed_options.py on the pruned network: fine-tuning images/s with and without
   AMP / channels-last / compile, plain and with EKG's ensemble distillation (this builds the
   memory bank, which step 5 reuses);
5. `ekg run --preset paper --epochs E` (the search and the bank are reused): the paper's
   fine-tuning recipe (batch 128, lr 0.01, x0.2 at 30/60/80 %) shortened to the E epochs that fit,
   with the fastest measured ensemble configuration, and the original-vs-pruned summary;
6. GPU inference throughput of the original and the pruned network.

    python bench/gpu_pipeline.py --data runs/jpeg75 --work /tmp/gpu --report $OUT --budget 470

``--data`` holds cifar10_jpeg_train.zip and cifar10_jpeg_test.zip. The report (report.md,
results.json and the logs that matter) goes to ``--report``; the run directories stay in ``--work``.
``--smoke`` runs every phase at toy sizes (for a dry run on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from _common import machine  # noqa: E402

import torch  # noqa: E402

T0 = time.perf_counter()
HARD_STOP = [float("inf")]  # seconds into the call at which a phase is killed (set from --budget)


def elapsed() -> float:
    return time.perf_counter() - T0


def ekg(*args: str) -> list[str]:
    return [sys.executable, "-m", "ekg.cli", *args]


def run(cmd: list[str], log: Path, results: dict, name: str) -> bool:
    """Run ``cmd`` (output to the console and ``log``); record its wall time and status. A phase
    still running at the hard stop (``--budget`` + 30 s) is killed, so the report is still written."""
    timeout = HARD_STOP[0] - elapsed()
    shown = " ".join(c if c != sys.executable else "python" for c in cmd)
    print(f"\n$ {shown}", flush=True)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "EKG_DEBUG": "1"}  # a failure shows its traceback in the log
    with open(log, "a") as f:
        f.write(f"\n$ {shown}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               timeout=max(1.0, timeout))
            out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        f.write(out)
    tail = "\n".join(out.splitlines()[-25:])
    print(tail, flush=True)
    seconds = time.perf_counter() - t
    results["phases"][name] = {"command": shown, "seconds": round(seconds, 1), "rc": rc}
    print(f"[{name}: rc {rc}, {seconds:.1f} s; {elapsed():.0f} s into the call]", flush=True)
    return rc == 0


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gpu_throughput(ckpt_path: Path, device: str, batches: tuple[int, ...] = (1, 256)) -> dict:
    """Inference images/s (batch 256) and latency (batch 1) with CUDA events, fp32 and bf16+NHWC."""
    from ekg.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    out = {}
    for mode in ("fp32", "bf16+channels-last"):
        model = ckpt.model.to(device).eval()
        if mode != "fp32":
            model = model.to(memory_format=torch.channels_last)
        for b in batches:
            x = torch.randn(b, *ckpt.input_size, device=device)
            if mode != "fp32":
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast("cuda", torch.bfloat16) if mode != "fp32" and device.startswith("cuda") else \
                torch.autocast("cpu", enabled=False)
            with torch.inference_mode(), ctx:
                for _ in range(10):
                    model(x)
                times = []
                for _ in range(30):
                    if device.startswith("cuda"):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        model(x)
                        e.record()
                        torch.cuda.synchronize()
                        times.append(s.elapsed_time(e))
                    else:
                        t = time.perf_counter()
                        model(x)
                        times.append(1000 * (time.perf_counter() - t))
            ms = sorted(times)[len(times) // 2]
            out[f"{mode} b{b}"] = {"median_ms": round(ms, 3), "images_per_s": round(b / ms * 1000)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with cifar10_jpeg_train.zip and cifar10_jpeg_test.zip")
    ap.add_argument("--work", default="/tmp/ekg-gpu", help="run directories")
    ap.add_argument("--report", required=True, help="folder for report.md, results.json and the logs")
    ap.add_argument("--budget", type=float, default=470, help="seconds for the whole call")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--keep", type=float, default=0.45)
    ap.add_argument("--smoke", action="store_true", help="toy sizes, for a dry run on a CPU")
    args = ap.parse_args()
    work, report = Path(args.work), Path(args.report)
    HARD_STOP[0] = args.budget + 30
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    report.mkdir(parents=True, exist_ok=True)
    log = report / "commands.log"
    arch = "resnet20" if args.smoke else "resnet56"
    keep = 0.8 if args.smoke else args.keep
    n_train = 50_000
    results: dict = {"machine": machine(args.device), "budget_s": args.budget, "phases": {}, "smoke": args.smoke,
                     "date": time.strftime("%Y-%m-%d")}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    print(f"# {results['machine']}", flush=True)
    dev = ["--device", args.device]
    speed_flags = ["--amp", "bf16", "--channels-last"] if args.device.startswith("cuda") else []
    limit = ["--limit-train", "1024", "--limit-test", "512"] if args.smoke else []

    def save() -> None:  # after every phase: a call cut short still leaves its report
        results["total_s"] = round(elapsed(), 1)
        (report / "results.json").write_text(json.dumps(results, indent=1))
        (report / "report.md").write_text(markdown(results))

    def finish() -> int:  # returns 1: called early only when a phase failed
        save()
        print("\n" + markdown(results), flush=True)
        return 1

    # 0. data: decode the JPEG zips once into ekg's cache
    from ekg.data import load_data

    t = time.perf_counter()
    data = load_data(args.data, progress=False)
    n_train = len(data.train)
    results["data"] = {"source": str(data.source), "train": n_train, "test": len(data.test),
                       "decode_s": round(time.perf_counter() - t, 1)}
    del data

    # 1. probe: baseline recipe, one epoch on 25,600 images
    base_args = ["--arch", arch, "--data", args.data, "--batch-size", "256", "--lr", "0.2", "--schedule", "cosine",
                 "--quiet", *dev, *speed_flags]
    probe_n = 1024 if args.smoke else 25_600
    if not run(ekg("train", *base_args, "--epochs", "1", "--limit-train", str(probe_n), "--limit-test", "512",
                   "--out", str(work / "probe")), log, results, "probe"):
        return finish()
    probe = log_lines(work / "probe" / "log.jsonl")[-1]
    epoch_s = n_train / probe["train_images_per_s"] + 2.0  # + the test pass and the checkpoint
    if args.smoke:
        epoch_s = 1024 / probe["train_images_per_s"] + 2.0
    # what the rest is expected to cost: search, speed table, final comparison (refined as measured)
    reserve = {"prune": 25.0 if args.smoke else 90.0, "speed": 40.0 if args.smoke else 150.0, "summary": 40.0}
    left = args.budget - elapsed() - sum(reserve.values())
    base_epochs = max(1, min(2 if args.smoke else 200, math.floor(0.45 * left / epoch_s)))
    save()
    results["baseline_plan"] = {"probe_images_per_s": round(probe["train_images_per_s"]),
                                "epoch_s_estimate": round(epoch_s, 2), "epochs": base_epochs}

    # 2. baseline on the whole JPEG training set
    ok = run(ekg("train", *base_args, "--epochs", str(base_epochs), "--warmup", "1", *limit,
                 "--out", str(work / "baseline")), log, results, "baseline")
    blog = log_lines(work / "baseline" / "log.jsonl")
    if blog:
        results["baseline"] = {"epochs": len(blog), "test_top1": blog[-1]["test_top1"],
                               "images_per_s": round(blog[-1]["train_images_per_s"])}
    save()
    if not ok:
        return finish()

    # 3. EKG search and slimming
    ek = work / "ekg"
    if not run(ekg("prune", "--model", str(work / "baseline" / "model.pt"), "--data", args.data, "--keep", str(keep),
                   "--out", str(ek), "--quiet", *dev), log, results, "prune"):
        return finish()
    steps = log_lines(ek / "search.jsonl")
    results["search"] = {"steps": len(steps), "seconds": results["phases"]["prune"]["seconds"],
                         "final_flops_ratio": steps[-1].get("flops_ratio") if steps else None}
    if (ek / "widths.json").exists():
        results["search"]["widths"] = json.loads((ek / "widths.json").read_text())

    save()

    # 4. fine-tuning throughput per speed option (builds the memory bank)
    configs = ["plain", "bf16", "channels-last", "bf16+channels-last", "ensemble", "ensemble+bf16+channels-last",
               "bf16+channels-last+compile", "ensemble+bf16+channels-last+compile"]
    if args.smoke:  # every code path once, nothing that takes long
        configs = ["plain", "ensemble"] + (["ensemble+bf16+channels-last"] if args.device.startswith("cuda") else [])
    elif not args.device.startswith("cuda"):
        configs = ["plain", "channels-last", "ensemble"]
    speed_json = work / "speed.json"
    run([sys.executable, str(ROOT / "bench" / "speed_options.py"), "--run", str(ek), "--data", args.data,
         "--device", args.device, "--limit-train", "1024" if args.smoke else "10240", "--epochs", "2",
         "--configs", *configs, "--json", str(speed_json)], log, results, "speed")
    speed = json.loads(speed_json.read_text()) if speed_json.exists() else {"rows": []}
    results["speed"] = speed
    save()

    # 5. fine-tuning with the memory bank, sized to what is left
    left = args.budget - elapsed() - reserve["summary"]
    choices = []
    for r in speed["rows"]:
        if r["kd"] != "ensemble":
            continue
        ft_epoch = (1024 if args.smoke else n_train) / r["images_per_s"] + 2.0
        overhead = max(0.0, r["first_epoch_s"] - r["last_epoch_s"])  # compilation
        choices.append((math.floor((left - overhead) / ft_epoch), "compile" not in r["config"], r["config"], ft_epoch))
    if not choices:  # the speed table failed: fall back on the baseline's pace at half the batch, two views
        choices = [(math.floor(left / (4 * epoch_s)), True, "ensemble+bf16+channels-last", 4 * epoch_s)]
    epochs, _, config, ft_epoch = max(choices)
    epochs = max(1, min(2 if args.smoke else 100, epochs))
    flags = (["--amp", "bf16"] if "bf16" in config else ["--amp", "off"]) + \
        (["--channels-last"] if "channels-last" in config else []) + (["--compile"] if "compile" in config else [])
    results["finetune_plan"] = {"config": config, "epochs": epochs, "epoch_s_estimate": round(ft_epoch, 2)}
    save()
    run(ekg("run", "--model", str(work / "baseline" / "model.pt"), "--data", args.data, "--keep", str(keep),
            "--out", str(ek), "--preset", "paper", "--epochs", str(epochs), "--quiet", *dev, *flags,
            *(["--limit-train", "1024"] if args.smoke else [])), log, results, "finetune")
    flog = log_lines(ek / "finetune" / "log.jsonl")
    if flog:
        results["finetune"] = {"epochs": len(flog), "test_top1": flog[-1]["test_top1"],
                               "images_per_s": round(flog[-1]["train_images_per_s"]),
                               "curve": [round(r["test_top1"], 2) for r in flog]}
    if (ek / "summary.json").exists():
        results["summary"] = json.loads((ek / "summary.json").read_text())
        shutil.copy(ek / "summary.md", report / "summary.md")

    # 6. GPU inference throughput, original vs pruned (+ fine-tuned where it finished)
    final = ek / "final.pt" if (ek / "final.pt").exists() else ek / "pruned.pt"
    try:
        results["inference"] = {"original": gpu_throughput(work / "baseline" / "model.pt", args.device),
                                "pruned": gpu_throughput(final, args.device)}
    except Exception as e:  # the numbers above are what matters; report and go on
        results["inference"] = {"error": f"{type(e).__name__}: {e}"}
    for name, src in (("baseline_log.jsonl", work / "baseline" / "log.jsonl"),
                      ("search.jsonl", ek / "search.jsonl"), ("finetune_log.jsonl", ek / "finetune" / "log.jsonl")):
        if src.exists():
            shutil.copy(src, report / name)
    finish()
    failed = [name for name, p in results["phases"].items() if p["rc"] != 0]
    return 1 if failed else 0


def markdown(r: dict) -> str:
    lines = [f"# GPU pipeline — {r.get('gpu', r['machine'])}", "", f"{r['date']}; {r['machine']}; "
             f"budget {r['budget_s']:.0f} s, used {r.get('total_s', 0):.0f} s" + (" (SMOKE: toy sizes)" if r["smoke"] else ""),
             "", "| phase | seconds | rc | command |", "|---|---|---|---|"]
    for name, p in r["phases"].items():
        lines.append(f"| {name} | {p['seconds']} | {p['rc']} | `{p['command']}` |")
    if "data" in r:
        lines += ["", f"data: {r['data']['train']} training / {r['data']['test']} test images, decoded in "
                      f"{r['data']['decode_s']} s"]
    if "baseline" in r:
        b = r["baseline"]
        lines += [f"baseline: {b['epochs']} epochs, test top-1 {b['test_top1']:.2f}%, {b['images_per_s']} images/s"]
    if "search" in r:
        s = r["search"]
        lines += [f"search: {s['steps']} steps in {s['seconds']} s, FLOPs ratio {s['final_flops_ratio']}"]
    rows = r.get("speed", {}).get("rows", [])
    if rows:
        base = rows[0]["images_per_s"]
        lines += ["", f"fine-tuning throughput ({r['speed']['limit_train']} images × {r['speed']['epochs']} epochs, "
                      "last epoch):", "", "| configuration | images/s | vs plain | first epoch s |", "|---|---|---|---|"]
        lines += [f"| {x['config']} | {x['images_per_s']:.0f} | {x['images_per_s'] / base:.2f}× | "
                  f"{x['first_epoch_s']:.1f} |" for x in rows]
    if "finetune" in r:
        f = r["finetune"]
        lines += ["", f"fine-tuning ({r['finetune_plan']['config']}): {f['epochs']} epochs, test top-1 "
                      f"{f['test_top1']:.2f}%, {f['images_per_s']} images/s; curve {f['curve']}"]
    if "summary" in r:
        s = r["summary"]
        lines += ["", f"original {s['original']['top1']:.2f}% -> pruned {s['pruned']['top1']:.2f}%, "
                      f"FLOPs -{100 * s['flops_reduction']:.1f}%, params -{100 * s['params_reduction']:.1f}%"]
    inf = r.get("inference", {})
    if "original" in inf:
        lines += ["", "| inference | original ms | pruned ms | original images/s | pruned images/s |", "|---|---|---|---|---|"]
        for k in inf["original"]:
            o, q = inf["original"][k], inf["pruned"][k]
            lines.append(f"| {k} | {o['median_ms']} | {q['median_ms']} | {o['images_per_s']} | {q['images_per_s']} |")
    elif inf:
        lines += ["", f"inference: {inf.get('error')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
