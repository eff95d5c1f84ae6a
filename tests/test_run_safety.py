"""Nothing lost, nothing half-done (issue 16): the run-directory lock (a second process is refused
naming the holder; a killed holder's lock is taken over; torchrun ranks share it), a full disk in
every writer (prune, the memory bank, fine-tuning: one line naming the file, no partial file at a
final path, and the same command finishes afterwards), and the early refusals of a run directory's
own damaged files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ekg.cli import main
from ekg.errors import EkgError
from ekg.lock import LOCK_NAME, hold, holder
from ekg.rundir import RunDir

HOLD = ("import sys, time\nfrom ekg.lock import hold\nwith hold(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def _holder_process(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("ekg: error: "), err
    return err


# ----------------------------------------------------------------------------- the lock

def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    proc = _holder_process(folder)
    try:
        assert holder(folder) == f"PID {proc.pid} on {os.uname().nodename}"
        with pytest.raises(EkgError, match=f"{folder} is in use by another ekg process \\(PID {proc.pid} "):
            with hold(folder):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed holder left its file, naming it; the kernel dropped its lock
    assert (folder / LOCK_NAME).read_text().startswith(f"PID {proc.pid} ")
    assert holder(folder) is None
    with hold(folder):
        assert (folder / LOCK_NAME).read_text().startswith(f"PID {os.getpid()} ")
    assert not (folder / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_one_process_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "new"
    with hold(folder):
        with hold(folder):  # ekg.run holds it while ekg.prune takes it again
            assert (folder / LOCK_NAME).exists()
        assert (folder / LOCK_NAME).exists(), "the inner release let the outer lock go"
        assert holder(folder) is None  # this process's own lock does not refuse it
    assert not folder.exists(), "a folder the lock created and nothing was written into stays behind"
    with hold(folder):
        (folder / "kept.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]


def test_the_lock_file_is_ekgs_own_and_clear_keeps_it_while_held(tmp_path):
    rd = RunDir(tmp_path / "run")
    with hold(rd.path):
        (rd.path / "config.json").write_text(json.dumps({"search": {}}))
        assert rd.unknown_entries() == []
        rd.clear()
        assert (rd.path / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pruned_run, cifar10_exact):
    """A 1-epoch plain fine-tuning of ``pruned_run``'s model (its last.pt is what --resume reads)."""
    out = tmp_path_factory.mktemp("ft") / "ft"
    assert main(["finetune", "--model", str(pruned_run / "pruned.pt"), "--data", str(cifar10_exact), "--kd", "none",
                 "--out", str(out), "--epochs", "1", "--limit-train", "128", "--batch-size", "64",
                 "--limit-test", "64", "--quiet"]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_commands_on_a_folder_another_process_holds_are_refused_at_once(tmp_path, pruned_run, finetuned,
                                                                       shared_data, cifar10_exact, capsys):
    model = str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    run = tmp_path / "run"
    shutil.copytree(pruned_run, run, ignore=shutil.ignore_patterns("bank", "ft", "finetune", "run.json"))
    ft = tmp_path / "ft"
    shutil.copytree(finetuned, ft)
    common = ["--data", str(cifar10_exact), "--quiet"]
    cases = [
        (run, ["prune", "--model", model, *common, "--out", str(run), "--keep", "0.85", "--no-adapt", "--resume"]),
        (run, ["run", "--model", model, *common, "--out", str(run), "--keep", "0.85", "--preset", "quick"]),
        # two fine-tunes sharing an unbuilt bank: the bank's run directory is held
        (run, ["finetune", "--model", str(run / "pruned.pt"), *common, "--bank", str(run), "--out", str(tmp_path / "x"),
               "--epochs", "1"]),
        (ft, ["finetune", "--model", str(run / "pruned.pt"), *common, "--kd", "none", "--out", str(ft), "--resume",
              "--epochs", "2", "--limit-train", "128", "--batch-size", "64", "--limit-test", "64"]),
        (ft, ["train", "--arch", "resnet20", *common, "--out", str(ft), "--epochs", "1"]),
    ]
    for folder, argv in cases:
        proc = _holder_process(folder)
        try:
            before = _snapshot(folder)
            t0 = time.perf_counter()
            assert main(argv) != 0, argv
            err = _one_line(capsys)
            assert f"is in use by another ekg process (PID {proc.pid} " in err, (argv, err)
            assert _snapshot(folder) == before, argv
            assert not (tmp_path / "x").exists()
            assert time.perf_counter() - t0 < 60  # refused at once, not after the search or the bank
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_two_prunes_on_one_folder_the_second_is_refused_and_the_first_finishes(tmp_path, shared_data,
                                                                              cifar10_exact, pruned_run, capsys):
    """Two real `ekg prune` processes, --keep 0.85 and --keep 0.5, on one --out: the second is refused
    naming the first, whose result on disk is its own."""
    model = str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "ekg.cli", "prune", "--model", model, "--data", str(cifar10_exact),
                              "--out", str(out), "--keep", "0.85", "--no-adapt", "--quiet"], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, "the first prune did not start"
            time.sleep(0.05)
        assert main(["prune", "--model", model, "--data", str(cifar10_exact), "--out", str(out), "--keep", "0.5",
                     "--no-adapt", "--quiet"]) != 0
        assert f"in use by another ekg process (PID {first.pid} " in _one_line(capsys)
        assert first.wait(timeout=900) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert json.loads((out / "config.json").read_text())["search"]["keep"] == 0.85
    assert json.loads((out / "widths.json").read_text())["groups"] == \
        json.loads((pruned_run / "widths.json").read_text())["groups"]
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_torchrun_ranks_share_the_lock_and_are_all_refused_when_another_job_holds_it(tmp_path, shared_data,
                                                                                     cifar10_exact):
    from test_distributed import BIN  # the ekg script beside this interpreter

    ekg = shutil.which("ekg", path=str(BIN)) or shutil.which("ekg")
    model = str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    out = tmp_path / "run"
    proc = _holder_process(out)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "--no-python", ekg, "prune", "--model", model, "--data", str(cifar10_exact), "--out",
                              str(out), "--keep", "0.85", "--no-adapt", "--device", "cpu", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.startswith("ekg: error: ")]
    assert len(lines) == 2 and all("in use by another ekg process" in x for x in lines), res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the killed holder's file, nothing else


# ----------------------------------------------------------------------------- a full disk

def _full_disk_at(monkeypatch, name: str, after: int = 0):
    """Make the ``after``-th and later writes of files whose final name is ``name`` fail with ENOSPC
    (at the fsync of :func:`ekg.io.write_bytes`, where a full disk shows)."""
    import ekg.io

    real = os.fsync
    seen = {"n": 0}

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if Path(path).name.startswith(f".{name}."):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(ekg.io.os, "fsync", fsync)
    return seen


def _no_temp_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob(".*.tmp")]
    assert not left, left


def test_prune_on_a_full_disk_says_which_file_and_resume_finishes_the_same_search(tmp_path, monkeypatch, shared_data,
                                                                                  cifar10_exact, pruned_run, capsys):
    model = str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th")
    out = tmp_path / "run"
    argv = ["prune", "--model", model, "--data", str(cifar10_exact), "--out", str(out), "--keep", "0.85",
            "--no-adapt", "--quiet"]
    seen = _full_disk_at(monkeypatch, "search_state.pt", after=2)  # step 0 and step 1 are saved, then the disk is full
    assert main(argv) != 0
    err = _one_line(capsys)
    assert f"{out / 'search_state.pt'} cannot be written: no space left on the device" in err, err
    assert "run the same command again" in err and seen["n"] == 3
    _no_temp_files(out)
    saved = RunDir(out).search_state
    assert saved.exists() and not (out / "pruned.pt").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "widths.json").read_text())["groups"] == \
        json.loads((pruned_run / "widths.json").read_text())["groups"]


def test_the_bank_on_a_full_disk_is_refused_before_any_teacher_runs_and_builds_afterwards(tmp_path, monkeypatch,
                                                                                         pruned_run, cifar10_exact,
                                                                                         capsys):
    import ekg.bank

    run = tmp_path / "run"
    shutil.copytree(pruned_run, run, ignore=shutil.ignore_patterns("bank", "ft", "finetune", "run.json"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ekg.bank.os, "posix_fallocate", full)
    argv = ["finetune", "--model", str(run / "pruned.pt"), "--bank", str(run), "--data", str(cifar10_exact),
            "--out", str(tmp_path / "ft"), "--epochs", "1", "--limit-train", "128", "--batch-size", "64",
            "--limit-test", "64", "--quiet"]
    assert main(argv) != 0
    err = _one_line(capsys)
    assert f"{run / 'bank' / 'logits.partial.npy'} cannot be written: no space left on the device" in err, err
    assert sorted(p.name for p in (run / "bank").iterdir()) == []  # no partial array, no progress record
    assert not (tmp_path / "ft").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    assert (run / "bank" / "logits.npy").exists() and (run / "bank" / "bank.json").exists()


def test_the_bank_on_a_real_full_tmpfs_is_an_error_not_a_bus_error(tmp_path, pruned_run, cifar10_exact):
    """The memory map on a disk too small for it (a real tmpfs; needs root to mount): one line, exit 1,
    where a sparse memory map died with SIGBUS (exit 135)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    files = ["config.json", "adapted.pt", "history.pt", "pruned.pt"]
    size = sum((pruned_run / f).stat().st_size for f in files) + 64 * 1024  # the bank needs 508 KB
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        run = mnt / "run"
        run.mkdir()
        for f in files:
            shutil.copy(pruned_run / f, run / f)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "ekg.cli", "finetune", "--model", str(run / "pruned.pt"), "--bank",
                              str(run), "--data", str(cifar10_exact), "--out", str(tmp_path / "ft"), "--epochs", "1",
                              "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
        assert res.stderr.strip().splitlines()[-1].startswith(f"ekg: error: {run / 'bank'}/"), res.stderr[-2000:]
        assert "no space left on the device" in res.stderr
        assert not [p for p in (run / "bank").iterdir() if p.suffix == ".npy"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_finetune_on_a_full_disk_says_which_file_and_resume_finishes(tmp_path, monkeypatch, pruned_run, cifar10_exact,
                                                                    capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(pruned_run / "pruned.pt"), "--data", str(cifar10_exact), "--kd", "none",
            "--out", str(out), "--epochs", "2", "--limit-train", "128", "--batch-size", "64", "--limit-test", "64",
            "--quiet"]
    _full_disk_at(monkeypatch, "last.pt", after=1)  # epoch 1 is saved, epoch 2's state does not fit
    assert main(argv) != 0
    err = _one_line(capsys)
    assert f"{out / 'last.pt'} cannot be written: no space left on the device" in err, err
    _no_temp_files(out)
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    epochs = [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_fresh_training_run_over_a_killed_first_epoch_starts_its_log_over(tmp_path, monkeypatch, pruned_run,
                                                                            cifar10_exact, capsys):
    """A first epoch whose state could not be saved leaves a log line; the same command (no epoch to
    resume) starts over and the log holds each epoch once."""
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(pruned_run / "pruned.pt"), "--data", str(cifar10_exact), "--kd", "none",
            "--out", str(out), "--epochs", "1", "--limit-train", "128", "--batch-size", "64", "--limit-test", "64",
            "--quiet"]
    _full_disk_at(monkeypatch, "last.pt")
    assert main(argv) != 0
    _one_line(capsys)
    monkeypatch.undo()
    assert main(argv) == 0
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1]


# ----------------------------------------------------------------------------- refused before any work

def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("bank", "ft", "finetune", "run.json"))
    return dst


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garble(path: Path) -> Path:
    path.write_text('{"search": {"keep": 0.85,')
    return path


class Env:
    """What the rows build on: the real ResNet-20 and ResNet-32, the exact subset, a finished prune
    run and a 1-epoch fine-tuning (each row gets its own copy to damage)."""

    def __init__(self, tmp: Path, shared: Path, pruned_run: Path, finetuned: Path) -> None:
        self.tmp, self.pruned_run, self.finetuned = tmp, pruned_run, finetuned
        self.r20 = str(shared / "pretrained/akamaster/resnet20-12fca82f.th")
        self.r32 = str(shared / "pretrained/akamaster/resnet32-d509ac18.th")
        self.data = ["--data", str(shared / "cifar10/exact-subset"), "--quiet"]
        self.file = tmp / "a-file"
        self.file.write_text("not a folder")

    def run(self, damage: str | None = None, how=_truncate) -> Path:
        run = _copy_run(self.pruned_run, self.tmp / "run")
        if damage:
            how(run / damage)
        return run

    def ft(self, damage: str | None = None, how=_truncate) -> Path:
        ft = self.tmp / "ft"
        shutil.copytree(self.finetuned, ft)
        if damage:
            how(ft / damage)
        return ft

    def prune(self, out: Path | str, *extra: str) -> list[str]:
        return ["prune", "--model", self.r20, *self.data, "--out", str(out), "--keep", "0.85", "--no-adapt", *extra]

    def finetune(self, *extra: str, model: str | None = None) -> list[str]:
        return ["finetune", "--model", model or str(self.pruned_run / "pruned.pt"), *self.data, "--epochs", "1",
                "--limit-train", "128", "--batch-size", "64", "--limit-test", "64", *extra]


def _ro_mount(e: Env) -> Path:
    mnt = e.tmp / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    return mnt


# name -> builder(env) -> (argv, folder that must not change, text the line must hold)
SAFETY_CASES = {
    # output targets
    "prune --out under /proc": lambda e: (e.prune("/proc/ekg-test/run"), e.tmp, "/proc/ekg-test/run cannot be created"),
    "run --out under /proc": lambda e: (["run", "--model", e.r20, *e.data, "--out", "/proc/ekg-test/run"], e.tmp,
                                        "/proc/ekg-test/run cannot be created"),
    "finetune --out under /proc": lambda e: (e.finetune("--kd", "none", "--out", "/proc/ekg-test/ft"), e.tmp,
                                             "/proc/ekg-test/ft cannot be created"),
    "train --out under /proc": lambda e: (["train", "--arch", "resnet20", *e.data, "--out", "/proc/ekg-test/t"], e.tmp,
                                          "/proc/ekg-test/t cannot be created"),
    "prune --out is an existing file": lambda e: (e.prune(e.file), e.tmp, f"{e.file} is a file, not a folder"),
    "run --out is an existing file": lambda e: (["run", "--model", e.r20, *e.data, "--out", str(e.file)], e.tmp,
                                                f"{e.file} is a file, not a folder"),
    "finetune --out is an existing file": lambda e: (e.finetune("--kd", "none", "--out", str(e.file)), e.tmp,
                                                     f"{e.file} is a file, not a folder"),
    "train --out is an existing file": lambda e: (["train", "--arch", "resnet20", *e.data, "--out", str(e.file)], e.tmp,
                                                  f"{e.file} is a file, not a folder"),
    "prune --out below an existing file": lambda e: (e.prune(e.file / "run"), e.tmp,
                                                     f"cannot be created: {e.file} is a file, not a folder"),
    "prune --out on a read-only file system": lambda e: (e.prune(_ro_mount(e) / "run"), e.tmp,
                                                         "run is on a read-only file system"),
    # a run directory's own files, damaged
    "prune --resume, search_state.pt truncated": lambda e: (e.prune(e.run("search_state.pt"), "--resume"), e.tmp / "run",
                                                            "search_state.pt is damaged (truncated"),
    "prune --resume, adapted.pt truncated": lambda e: (e.prune(e.run("adapted.pt"), "--resume"), e.tmp / "run",
                                                       "adapted.pt is damaged (truncated"),
    "prune --resume, config.json not JSON": lambda e: (e.prune(e.run("config.json", _garble), "--resume"),
                                                       e.tmp / "run", "config.json is damaged (not valid JSON"),
    "ekg run adopting a prune run whose config.json is not JSON": lambda e: (
        ["run", "--model", e.r20, *e.data, "--out", str(e.run("config.json", _garble)), "--keep", "0.85"],
        e.tmp / "run", "config.json is damaged (not valid JSON"),
    "finetune --bank, history.pt truncated": lambda e: (e.finetune("--bank", str(e.run("history.pt"))), e.tmp / "run",
                                                        "history.pt is damaged (truncated"),
    "finetune --bank, adapted.pt truncated": lambda e: (e.finetune("--bank", str(e.run("adapted.pt"))), e.tmp / "run",
                                                        "adapted.pt is damaged (truncated"),
    "finetune --resume, last.pt truncated": lambda e: (e.finetune("--kd", "none", "--out", str(e.ft("last.pt")),
                                                                  "--resume"), e.tmp / "ft", "last.pt is damaged (truncated"),
    "finetune --resume, last.pt empty": lambda e: (e.finetune("--kd", "none", "--out", str(e.ft(
        "last.pt", lambda p: p.write_bytes(b""))), "--resume"), e.tmp / "ft", "last.pt is damaged (it is empty)"),
    # the memory bank and the model
    "finetune a ResNet-32 with a ResNet-20 run's bank": lambda e: (e.finetune("--bank", str(e.run()), model=e.r32),
                                                                   e.tmp / "run", "was built from sub-networks of another network"),
    "finetune --resume with another model": lambda e: (e.finetune("--kd", "none", "--out", str(e.ft()), "--resume",
                                                                  model=e.r32), e.tmp / "ft",
                                                       "was saved by a training run of another model"),
    # budgets the graph says cannot be reached
    "prune --keep 0.01": lambda e: (["prune", "--model", e.r20, *e.data, "--out", str(e.tmp / "o"), "--keep", "0.01"],
                                    e.tmp, "cannot reach --keep 0.01: with every prunable channel group at one channel"),
    "prune --keep 0.04 --method uniform": lambda e: (["prune", "--model", e.r20, *e.data, "--out", str(e.tmp / "o"),
                                                      "--keep", "0.04", "--method", "uniform"], e.tmp,
                                                     "cannot reach --keep 0.04: with every prunable channel group"),
    "run --keep 0.01": lambda e: (["run", "--model", e.r20, *e.data, "--out", str(e.tmp / "o"), "--keep", "0.01"], e.tmp,
                                  "cannot reach --keep 0.01"),
    # settings
    "run on a prune run of another keep": lambda e: (["run", "--model", e.r20, *e.data, "--out", str(e.run()), "--keep",
                                                      "0.5", "--no-adapt"], e.tmp / "run", "keep: 0.85 saved, 0.5 requested"),
}


@pytest.mark.parametrize("case", list(SAFETY_CASES))
def test_refused_before_any_work_in_one_line_naming_the_culprit(case, tmp_path, shared_data, pruned_run, finetuned,
                                                                capsys):
    env = Env(tmp_path, shared_data, pruned_run, finetuned)
    try:
        argv, folder, text = SAFETY_CASES[case](env)
        before = _snapshot(folder)
        assert main(argv) != 0
        err = _one_line(capsys)
        assert text in err, err
        assert _snapshot(folder) == before
    finally:
        if (tmp_path / "ro").is_dir():
            subprocess.run(["umount", str(tmp_path / "ro")], check=False, capture_output=True)
