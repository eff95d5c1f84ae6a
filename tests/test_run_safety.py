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
from test_bad_input import _snapshot
from ekg.errors import EkgError
from ekg.lock import LOCK_NAME, hold, holder
from ekg.rundir import RunDir

def _one_line(capsys) -> str:
    """The one ``ekg: error:`` line a refused command printed (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("ekg: error: "), err
    return err


HOLD = ("import sys, time\nfrom ekg.lock import hold\nwith hold(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def _holder_process(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


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


# ----------------------------------------------------------------------------- a read-only disk

def test_prune_on_a_read_only_file_system_is_refused_naming_the_folder(tmp_path, shared_data, cifar10_exact, capsys):
    """(A table row of tests/test_bad_input.py but for the mount, which needs root.)"""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    try:
        assert main(["prune", "--model", str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th"), "--data",
                     str(cifar10_exact), "--out", str(mnt / "run"), "--quiet"]) != 0
        assert f"{mnt / 'run'} is on a read-only file system; choose an --out on a writable disk" in _one_line(capsys)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
