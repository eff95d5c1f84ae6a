"""``ekg.rundir``: the one owner of the run directory — its artifact names, what each phase records
about its settings, the one rule "these settings match this folder", and starting over.

Layout (every phase leaves its artifacts, so each can be inspected or resumed alone)::

    RUN/config.json        `ekg prune`'s record: the SearchConfig, model and data (source and fingerprint)
    RUN/adapted.pt         the model after the adaptation epoch (the search's frozen weights)
    RUN/search_state.pt    the search state after the last finished step (the resume point)
    RUN/search.jsonl       one line per search step
    RUN/history.pt         (masks, val loss) of every interim sub-network, for the memory bank
    RUN/latency.json       a latency budget's cost model (the table it predicts with, its target) and the
                           slim network's latency measured on the target against the original's
    RUN/widths.json        final width of every channel group
    RUN/pruned.pt          the slim model
    RUN/trajectory.png     FLOPs ratio vs val loss/J and accuracy
    RUN/widths.png         per-group widths before/after
    RUN/bank/              the memory bank (bank.json, logits.npy or topk_*.npy; progress.json while building)
    RUN/finetune/          a training run (:class:`TrainDir`: config.json, last.pt, model.pt, log.jsonl, tb/)
    RUN/run.json           `ekg run`'s own settings (keep, preset, kd and the flags that override the preset)
    RUN/original.pt        the original model in ekg's format
    RUN/final.pt           the fine-tuned slim model
    RUN/summary.json       original vs pruned
    RUN/summary.md         the same as a Markdown table
    RUN/.ekg.lock          while a process works in it (:mod:`ekg.lock`)

**Settings.** Each phase records what it decides with: `ekg prune` its SearchConfig with a
fingerprint of the model (architecture, SHA-1 of the weights) and of the training set (count,
classes, SHA-1 of the labels; for a streamed tree its crop and resize) in ``config.json``;
`ekg run` its own settings in ``run.json``; a training run its TrainConfig in ``last.pt``.
:func:`decision_settings` reads a record as the settings that decide the result, leaving out the
fields in :data:`HOW_IT_RUNS` (device, speed options, cache sizes: how it runs, not what it
computes). :func:`check_settings` is the one rule: a folder is continued only if every setting
both records hold is equal, else one :class:`EkgError` line names each differing setting with its
saved and requested value and how to go on. A setting only the request has (a record written by
an earlier ekg) is not compared.

**Starting over** (``--restart``, :meth:`RunDir.clear`) removes the artifacts above, and only
those. A folder that also holds anything ekg does not write there (your notes, an ``ekg export``
or ``ekg landscape`` output, another tool's ``config.json``) is refused before anything is
removed, naming those entries: they may be derived from the run being thrown away, and a restarted
run directory holds only the new run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import EkgError
from .io import load_torch, read_json
from .lock import LOCK_NAME

# ----------------------------------------------------------------------------- artifact names

CONFIG = "config.json"
ADAPTED = "adapted.pt"
SEARCH_STATE = "search_state.pt"
SEARCH_LOG = "search.jsonl"
HISTORY = "history.pt"
WIDTHS = "widths.json"
LATENCY = "latency.json"
PRUNED = "pruned.pt"
TRAJECTORY_PLOT = "trajectory.png"
WIDTHS_PLOT = "widths.png"
BANK = "bank"
FINETUNE = "finetune"
RUN_RECORD = "run.json"
ORIGINAL = "original.pt"
FINAL = "final.pt"
SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"

PRUNE_FILES = (CONFIG, ADAPTED, SEARCH_STATE, SEARCH_LOG, HISTORY, WIDTHS, LATENCY, PRUNED, TRAJECTORY_PLOT, WIDTHS_PLOT)
RUN_FILES = (RUN_RECORD, ORIGINAL, FINAL, SUMMARY, SUMMARY_MD)

# a training run (ekg train, ekg finetune, RUN/finetune)
TRAIN_CONFIG = "config.json"
TRAIN_STATE = "last.pt"
TRAIN_MODEL = "model.pt"
TRAIN_LOG = "log.jsonl"
TRAIN_TB = "tb"
TRAIN_FILES = (TRAIN_CONFIG, TRAIN_STATE, TRAIN_MODEL, TRAIN_LOG)

# a memory bank (RUN/bank; the layouts are ekg.bank's)
BANK_INFO = "bank.json"
BANK_PROGRESS = "progress.json"
BANK_DENSE_FILES = {"logits": "logits.npy"}
BANK_TOPK_FILES = {"values": "topk_values.npy", "classes": "topk_classes.npy", "rest": "topk_rest.npy"}


# what to do about a damaged artifact: run the phase that wrote it again
REMEDY = {
    ADAPTED: f"delete it and {SEARCH_STATE} and run the same command again (with `resume=True`) to redo the "
             "adaptation and the search, or add `restart=True` to start over",
    SEARCH_STATE: "delete it and run the same command again (with `resume=True`): the search starts again from "
                  "step 0 on the saved adapted model",
    HISTORY: f"delete it and {PRUNED} and run the same command again (`ekg prune` with `resume=True`) to write "
             f"them again from {SEARCH_STATE}",
    LATENCY: "delete it and run the same command again (with `resume=True`): the latency model is built again "
             "(from the cache where it has the layers)",
    TRAIN_STATE: "delete it to train again from epoch 0, or choose another `out`",
}


def load_artifact(path: str | Path, *, map_location: Any = "cpu") -> Any:
    """A torch artifact of a run directory (``adapted.pt``, ``search_state.pt``, ``history.pt``,
    ``last.pt``), ``weights_only``; a damaged one is one error naming it with :data:`REMEDY`'s fix."""
    path = Path(path)
    return load_torch(path, REMEDY.get(path.name, "delete it and run the same command again"),
                      map_location=map_location)


def partial_name(name: str) -> str:
    """The name a bank array has while it is being built."""
    return name.replace(".npy", ".partial.npy")


class _Folder:
    """A folder whose files are named by properties of the subclass."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class TrainDir(_Folder):
    """The files of a training run directory."""

    config = property(lambda self: self.path / TRAIN_CONFIG)
    state = property(lambda self: self.path / TRAIN_STATE)   # the resume point
    model = property(lambda self: self.path / TRAIN_MODEL)
    log = property(lambda self: self.path / TRAIN_LOG)
    tb = property(lambda self: self.path / TRAIN_TB)


class RunDir(_Folder):
    """The artifacts of a run directory (``ekg prune``, ``ekg run``) by name; see the module doc."""

    config = property(lambda self: self.path / CONFIG)
    adapted = property(lambda self: self.path / ADAPTED)
    search_state = property(lambda self: self.path / SEARCH_STATE)
    search_log = property(lambda self: self.path / SEARCH_LOG)
    history = property(lambda self: self.path / HISTORY)
    widths = property(lambda self: self.path / WIDTHS)
    latency = property(lambda self: self.path / LATENCY)
    pruned = property(lambda self: self.path / PRUNED)
    trajectory_plot = property(lambda self: self.path / TRAJECTORY_PLOT)
    widths_plot = property(lambda self: self.path / WIDTHS_PLOT)
    bank = property(lambda self: self.path / BANK)
    finetune = property(lambda self: self.path / FINETUNE)
    run_record = property(lambda self: self.path / RUN_RECORD)
    original = property(lambda self: self.path / ORIGINAL)
    final = property(lambda self: self.path / FINAL)
    summary = property(lambda self: self.path / SUMMARY)
    summary_md = property(lambda self: self.path / SUMMARY_MD)

    # ------------------------------------------------------------------ saved records

    def prune_record(self) -> dict[str, Any] | None:
        """``config.json`` (None if there is none); an error if it is not an `ekg prune` record."""
        if not self.config.exists():
            if any(p.exists() for p in (self.adapted, self.search_state, self.pruned)):
                raise EkgError(f"{self.path} holds pruning artifacts but no {CONFIG} recording their settings; "
                               "choose another `out` or add `restart=True` to start over")
            return None
        record = _read_json(self.config)
        if not _is_prune_record(record):
            raise EkgError(f"{self.config} is not the record of an `ekg prune` run (another command's run "
                           "directory?); choose another `out`")
        return record

    def saved_settings(self) -> dict[str, Any]:
        """The decision settings the folder records, `ekg prune`'s (config.json) and `ekg run`'s
        (run.json), as one dict ({} for an empty or missing folder)."""
        out: dict[str, Any] = {}
        record = self.prune_record()
        if record is not None:
            out.update(prune_settings(record))
        if self.run_record.exists():
            out.update(run_settings(_read_json(self.run_record)))
        return out

    # ------------------------------------------------------------------ starting over

    def unknown_entries(self) -> list[str]:
        """Entries of the folder (paths relative to it) that ekg does not write into a run directory."""
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            return ["."]
        unknown = []
        for p in sorted(self.path.iterdir()):
            name = p.name
            if p.is_dir() and name == BANK:
                unknown += [f"{BANK}/{n}" for n in _unknown_in(p, _BANK_KNOWN)]
            elif p.is_dir() and name == FINETUNE:
                unknown += [f"{FINETUNE}/{n}" for n in _unknown_in(p, {*TRAIN_FILES, LOCK_NAME}, tb=True)]
            elif not (p.is_file() and _known_file(name, _RUN_KNOWN)):
                unknown.append(name)
            elif name == CONFIG and not _is_prune_record(_read_json(p, strict=False)):
                unknown.append(name)  # somebody else's config.json
        return unknown

    def check_restart(self) -> None:
        """Refuse to start over in a folder that holds anything ekg did not write (see the module doc)."""
        unknown = self.unknown_entries()
        if unknown:
            shown = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
            raise EkgError(f"`restart=True` removes only ekg's own artifacts, but {self.path} also holds {shown}; "
                           "move those out of it (they may be derived from the run being thrown away) "
                           "or choose another `out`")

    def clear(self) -> list[Path]:
        """Remove every ekg artifact of the folder (refused as :meth:`check_restart` says, before
        anything is removed); returns what was removed. The folder itself stays."""
        self.check_restart()
        removed: list[Path] = []
        if not self.path.is_dir():
            return removed
        for sub in (self.bank, self.finetune):
            if sub.is_dir():
                removed.append(sub)
                shutil.rmtree(sub)
        for p in sorted(self.path.iterdir()):  # only known files are left
            if p.name == LOCK_NAME:
                continue  # the lock of the process that clears it
            removed.append(p)
            p.unlink()
        return removed


_RUN_KNOWN = {*PRUNE_FILES, *RUN_FILES, LOCK_NAME}
_BANK_KNOWN = {BANK_INFO, BANK_PROGRESS, LOCK_NAME, *(f for files in (BANK_DENSE_FILES, BANK_TOPK_FILES)
                                           for name in files.values() for f in (name, partial_name(name)))}
_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")  # ekg.io.atomic_path's leftovers after a kill


def _known_file(name: str, known: set[str]) -> bool:
    m = _TMP.match(name)
    return name in known or (m is not None and m["name"] in known)


def _unknown_in(folder: Path, known: set[str], *, tb: bool = False) -> list[str]:
    out = []
    for p in sorted(folder.iterdir()):
        if tb and p.name == TRAIN_TB and p.is_dir():
            out += [f"{TRAIN_TB}/{q.name}" for q in sorted(p.iterdir())
                    if not (q.is_file() and q.name.startswith("events.out.tfevents."))]
        elif not (p.is_file() and _known_file(p.name, known)):
            out.append(p.name)
    return out


def _read_json(path: Path, *, strict: bool = True) -> Any:
    if not strict:
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError):
            return None
    return read_json(path, "it records the settings of the run, which cannot be checked without it: add "
                           "`restart=True` to start over, or choose another `out`")


def _is_prune_record(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("search"), dict)


# ----------------------------------------------------------------------------- what each phase records

# The fields of each record that say how a phase runs, not what it decides (changing them on a
# resume changes speed or rounding, not the result): the one place they are listed.
HOW_IT_RUNS: dict[str, frozenset[str]] = {
    # SearchConfig: fast makes the same decisions, sliced computes the same function, cache_gb is a memory limit
    "search": frozenset({"device", "fast", "cache_gb", "sliced"}),
    # TrainConfig: epochs may grow on a resume (the schedule is a function of progress)
    "train": frozenset({"device", "amp", "eval_batch_size", "limit_test", "accum", "compile", "channels_last",
                        "epochs"}),
    # `ekg run`: run.json holds deciding settings only; its speed options (TrainConfig's amp, compile,
    # channels_last, accum), latency batches and progress bars are never recorded
    "run": frozenset(),
    # StudyConfig (flattened): the landscape's device and memory format
    "study": frozenset({"landscape.device", "landscape.channels_last"}),
}

# run.json: the keys `ekg run` records (the overrides only when given: absent means the preset's)
RUN_KEYS = ("keep", "preset", "kd", "epochs", "limit_train", "teachers", "bank_topk")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``{"augment": {"pad": 4}}`` → ``{"augment.pad": 4}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def decision_settings(kind: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a ``kind`` record (a key of :data:`HOW_IT_RUNS`) that decide the result: the
    record flattened, without the fields that only say how it runs."""
    ignore = HOW_IT_RUNS[kind]
    return {k: v for k, v in flatten(record).items() if k not in ignore}


def model_fingerprint(ckpt: Any) -> dict[str, Any]:
    """What identifies a checkpoint's model: its architecture and the SHA-1 of its state dict
    (names, dtypes, shapes, values)."""
    import torch

    h = hashlib.sha1()
    for name, t in ckpt.model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return {"arch": str(ckpt.arch), "sha1": h.hexdigest()}


def prune_record(cfg: Any, ckpt: Any, splits: Any, *, source: str | None = None,
                 search_sets: Any = None) -> dict[str, Any]:
    """What `ekg prune` writes into ``config.json``: the SearchConfig, the model's and the data's
    source (for people) and fingerprint (compared; with the fingerprints of explicit
    ``search_sets``), and the model's normalisation."""
    from .bank import data_fingerprint

    data = data_fingerprint(splits.train)
    if search_sets is not None:
        data["search_sets"] = [data_fingerprint(s) for s in search_sets]
    return {"search": cfg.to_dict(), "model": source if source is not None else str(ckpt.meta.get("source", "")),
            "data": splits.source, "normalization": ckpt.normalization,
            "model_fingerprint": model_fingerprint(ckpt), "data_fingerprint": data}


def prune_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """The decision settings of a ``config.json`` record: the search's (keep, importance, reward,
    method, compat, search_bn, seeds, set sizes, step, otsu, adaptation, ...), ``model`` and ``data``."""
    out = decision_settings("search", record["search"])
    for key in ("model", "data"):
        if record.get(f"{key}_fingerprint") is not None:  # absent in records of an earlier ekg
            out[key] = record[f"{key}_fingerprint"]
    return out


def run_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """The decision settings of a ``run.json`` record (every key of :data:`RUN_KEYS`, None when not given)."""
    return decision_settings("run", {**{k: None for k in RUN_KEYS}, **record})


# ----------------------------------------------------------------------------- the rule

FIX_RESTART = "use the saved settings to continue it, or choose another `out` or add `restart=True` to start over"
FIX_RESUME = "use the saved settings to resume it, or choose another `out`"


def differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, saved, requested)`` for each setting both hold with different values."""
    return [(k, saved[k], v) for k, v in requested.items() if k in saved and _plain(saved[k]) != _plain(v)]


def check_settings(folder: str | Path, saved: Mapping[str, Any], requested: Mapping[str, Any], *,
                   what: str = "a run", fix: str = FIX_RESTART) -> None:
    """The one rule: the folder's ``saved`` decision settings match the ``requested`` ones, or one
    :class:`EkgError` line names each differing setting with both values, then ``fix``."""
    diff = differences(saved, requested)
    if diff:
        parts = "; ".join(f"{k}: {show(a)} saved, {show(b)} requested" for k, a, b in diff)
        raise EkgError(f"{folder} holds {what} with other settings ({parts}); {fix}")


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


_HEX = re.compile(r"^[0-9a-f]{32,}$")


def show(v: Any) -> str:
    """A setting's value as the error line shows it (hashes shortened)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} {show(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, str) and _HEX.match(v):
        return v[:10] + "..."
    return str(v)
