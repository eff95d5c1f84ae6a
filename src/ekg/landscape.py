"""Loss-landscape analysis: the Hessian spectrum of a model's loss and filter-normalised surfaces.

One module because it is one measurement, a loss's smoothness: the :class:`Objective`, the
instruments that read its Hessian-vector products and :func:`analyse`, which runs them and defines
the numbers reported (:data:`DEFINITIONS`); split, those definitions would sit apart from their code.

The paper's first claim is that a sub-network's *smoothness* predicts how well it fine-tunes (its
"potential"). This module gives the instruments to measure it on any model, by Hessian-vector
products (never forming the Hessian):

* :func:`power_iteration` — the eigenvalue of largest magnitude (for trained networks the top,
  positive one; its sign is reported as found);
* :func:`lanczos` — k Lanczos steps with full re-orthogonalisation: the Ritz values approximate both
  ends of the spectrum (``lambda_min`` is the smallest Ritz value) and, with their weights (squared
  first components of the Ritz vectors), the spectral density (stochastic Lanczos quadrature);
* :func:`hutchinson_trace` — tr(H) ≈ mean of vᵀHv over Rademacher vectors v, with its standard error;
* :func:`random_directions` / :func:`surface` — 1-D and 2-D loss surfaces along random directions
  normalised filter by filter (Li et al., 2018, "Visualizing the loss landscape of neural nets").

The loss is an :class:`Objective`: the parameters and a function yielding loss terms whose sum is
the loss (one term per batch, so any amount of data fits in memory). :func:`model_objective`
builds it for a classifier: mean cross-entropy over fixed batches, with BN on each batch's
statistics (as in the search) or on its running statistics. Every random vector is drawn on the CPU
from a seeded generator, so results are deterministic under a seed and the same on CPU and GPU (up
to floating-point rounding).

Smoothness numbers written by :func:`analyse` (see :data:`DEFINITIONS`): ``lambda_max``,
``lambda_min``, ``neg_ratio`` = |λmin| / λmax and ``trace``.

A *masked* sub-network is measured through its slim twin (:func:`ekg.slim.slim_model` computes the
same function): the masked-out parameters would only add directions of zero curvature, pulling
λmin and the density towards 0.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .bn import BN_STATS, bn_mode
from .errors import EkgError

BN_MODES = BN_STATS

DEFINITIONS = {
    "loss": "mean cross-entropy over the fixed images (the same batches for every number)",
    "hessian": "second derivative of that loss with respect to every trainable parameter (conv/linear weights "
               "and biases, BN scales and shifts), by Hessian-vector products (double backward)",
    "lambda_max": "eigenvalue of largest magnitude, by power iteration (for a trained network the top, positive one)",
    "lambda_min": "smallest eigenvalue: the smallest Ritz value of k Lanczos steps with full re-orthogonalisation",
    "neg_ratio": "|lambda_min| / lambda_max: how strong the negative curvature is against the positive one "
                 "(0 for a convex neighbourhood); with lambda_max, a smaller value means a smoother landscape",
    "trace": "tr(H) by Hutchinson's estimator: the mean of v^T H v over Rademacher vectors v (stderr given)",
    "top_eigenvalues": "the largest Ritz values of the Lanczos run, in descending order",
    "ritz": "Ritz values and weights (squared first components of the Ritz vectors): a spectral density estimate",
    "surface": "loss at theta + a*d1 (+ b*d2) for random Gaussian directions d normalised filter by filter to the "
               "norms of the weights' filters (Li et al., 2018); BN and bias parameters are not moved",
}


# ----------------------------------------------------------------------------- the objective

@dataclass
class Objective:
    """A loss as a sum of terms over fixed data, and the parameters it is a function of.

    ``terms()`` yields scalar tensors (attached to the autograd graph of ``params``) whose sum is
    the loss; ``context()`` is entered around every evaluation (BN mode, for instance)."""

    params: list[torch.Tensor]
    terms: Callable[[], Iterable[torch.Tensor]]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def loss(self) -> float:
        with self.context(), torch.no_grad():
            return float(sum(float(t) for t in self.terms()))

    def gradient(self) -> torch.Tensor:
        out = torch.zeros(self.size, device=self.device, dtype=torch.float64)
        with self.context():
            for term in self.terms():
                out += _flat(torch.autograd.grad(term, self.params, allow_unused=True), self.params)
        return out

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H·v for a flat vector ``v`` (float64 result; the products themselves run in the model's dtype)."""
        vs = _unflat(v.to(self.device, self.params[0].dtype), self.params)
        out = torch.zeros(self.size, device=self.device, dtype=torch.float64)
        with self.context():
            for term in self.terms():
                grads = torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
                dot = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None)
                if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                    continue  # this term does not depend on the parameters twice: no curvature
                out += _flat(torch.autograd.grad(dot, self.params, allow_unused=True), self.params)
        return out


def _flat(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).double()
                      for t, p in zip(tensors, like)])


def _unflat(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in like]), like)]


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def model_objective(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                    bn: str = "batch") -> Objective:
    """Mean cross-entropy of ``model`` over ``batches`` (fixed), as an :class:`Objective` of every
    parameter that requires grad. ``bn``: ``batch`` (each batch's statistics, as the search) or
    ``running``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EkgError("the model has no trainable parameter (requires_grad is off everywhere)")
    if bn not in BN_MODES:
        raise EkgError(f"`bn` must be one of {', '.join(BN_MODES)}, got {bn!r}")
    n = sum(len(y) for _, y in batches)
    if n == 0:
        raise EkgError("no images to measure the loss on")

    def terms() -> Iterator[torch.Tensor]:
        for x, y in batches:
            yield F.cross_entropy(_full_precision(model(x)), y, reduction="sum") / n

    return Objective(params=params, terms=terms, context=lambda: bn_mode(model, bn))


# ----------------------------------------------------------------------------- spectrum

def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()  # CPU: the same draws on every device
    g.manual_seed(seed)
    return g


def _unit(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    return v / v.norm()


@dataclass
class PowerResult:
    eigenvalue: float
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)


def power_iteration(hvp: Callable[[torch.Tensor], torch.Tensor], n: int, *, iters: int = 50, tol: float = 1e-3,
                    seed: int = 0, device: torch.device | str = "cpu",
                    progress: Callable[[int, float], None] | None = None) -> PowerResult:
    """The eigenvalue of largest magnitude of the symmetric operator ``hvp`` (n × n), by power
    iteration from a seeded random start; stops when the Rayleigh quotient changes by less than
    ``tol`` relative."""
    v = _unit(n, _generator(seed), torch.device(device))
    lam: float | None = None
    history: list[float] = []
    for i in range(1, iters + 1):
        w = hvp(v)
        new = float(torch.dot(v, w))
        history.append(new)
        if progress:
            progress(i, new)
        norm = float(w.norm())
        if norm == 0.0:
            return PowerResult(0.0, i, True, history)
        if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
            return PowerResult(new, i, True, history)
        lam, v = new, w / norm
    return PowerResult(float(lam if lam is not None else 0.0), iters, False, history)


@dataclass
class LanczosResult:
    ritz_values: list[float]     # ascending
    ritz_weights: list[float]    # squared first components of the Ritz vectors (sum to 1)
    steps: int

    @property
    def lambda_min(self) -> float:
        return self.ritz_values[0]

    @property
    def lambda_max(self) -> float:
        return self.ritz_values[-1]


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], n: int, *, steps: int = 30, seed: int = 0,
            device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> LanczosResult:
    """``steps`` Lanczos iterations (at most n) with full re-orthogonalisation, from a seeded random
    start. With steps = n the Ritz values are the exact eigenvalues; with fewer, the extreme ones
    converge first. Keeps ``steps`` vectors of length n (float64) on ``device``."""
    device = torch.device(device)
    k = min(steps, n)
    basis = torch.zeros(k, n, dtype=torch.float64, device=device)
    v = _unit(n, _generator(seed), device)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(k):
        basis[j] = v
        w = hvp(v)
        alpha = float(torch.dot(w, v))
        alphas.append(alpha)
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        if progress:
            progress(j + 1)
        if j == k - 1 or beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas)):
            break  # done, or an invariant subspace: its Ritz values are exact
        betas.append(beta)
        v = w / beta
    m = len(alphas)
    t = np.diag(np.array(alphas)) + np.diag(np.array(betas[: m - 1]), 1) + np.diag(np.array(betas[: m - 1]), -1)
    values, vectors = np.linalg.eigh(t)
    return LanczosResult([float(x) for x in values], [float(x) for x in vectors[0] ** 2], m)


@dataclass
class TraceResult:
    trace: float
    stderr: float
    samples: int


def hutchinson_trace(hvp: Callable[[torch.Tensor], torch.Tensor], n: int, *, samples: int = 30, seed: int = 0,
                     device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> TraceResult:
    """tr(H) ≈ mean of vᵀHv over ``samples`` Rademacher vectors (exact for a diagonal H)."""
    if samples < 1:
        raise EkgError(f"`hutchinson_samples` must be at least 1, got {samples}")
    gen = _generator(seed + 1)
    values = []
    for i in range(samples):
        v = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1).to(device)
        values.append(float(torch.dot(v, hvp(v))))
        if progress:
            progress(i + 1)
    arr = np.array(values)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return TraceResult(float(arr.mean()), stderr, len(arr))


# ----------------------------------------------------------------------------- surfaces

def random_directions(params: Sequence[torch.Tensor], count: int, *, seed: int = 0,
                      normalize: str = "filter") -> list[list[torch.Tensor]]:
    """``count`` random Gaussian directions in parameter space. ``filter`` normalisation (Li et al.):
    for every weight with 2+ dims, each filter (slice along dim 0) of the direction is scaled to the
    norm of the same filter of the weight; 1-D parameters (BN scales/shifts, biases) get 0. ``none``
    leaves the Gaussian draws as they are."""
    if normalize not in ("filter", "none"):
        raise EkgError(f"direction normalisation must be 'filter' or 'none', got {normalize!r}")
    gen = _generator(seed + 2)
    out = []
    for _ in range(count):
        direction = []
        for p in params:
            d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
            if normalize == "filter":
                if p.dim() <= 1:
                    d = torch.zeros_like(p)
                else:
                    pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
                    dn = d.reshape(d.shape[0], -1).norm(dim=1)
                    d = d * (pn / (dn + 1e-10)).view(-1, *([1] * (p.dim() - 1)))
            direction.append(d)
        out.append(direction)
    return out


def surface(objective: Objective, directions: Sequence[Sequence[torch.Tensor]], coords: Sequence[np.ndarray], *,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Loss at θ + Σ_i c_i·d_i over the grid spanned by ``coords`` (one 1-D array per direction):
    shape ``tuple(len(c) for c in coords)``. The parameters are restored afterwards (also on error)."""
    if len(directions) != len(coords) or not 1 <= len(coords) <= 2:
        raise EkgError("a surface needs one or two directions, each with its own coordinates")
    params = objective.params
    origin = [p.detach().clone() for p in params]
    grid = np.meshgrid(*coords, indexing="ij")
    out = np.zeros(grid[0].shape)
    try:
        for count, idx in enumerate(np.ndindex(out.shape), 1):
            with torch.no_grad():
                for j, p in enumerate(params):
                    p.copy_(origin[j])
                    for d, g in zip(directions, grid):
                        p.add_(d[j], alpha=float(g[idx]))
            out[idx] = objective.loss()
            if progress:
                progress(count)
    finally:
        with torch.no_grad():
            for p, o in zip(params, origin):
                p.copy_(o)
    return out


# ----------------------------------------------------------------------------- one model, all numbers

@dataclass
class LandscapeConfig:
    """Settings of :func:`analyse`. Defaults: enough for stable λmax on a CIFAR ResNet on a CPU."""

    images: int = 512                 # fixed images from the training split, the same per class
    batch_size: int = 128
    bn: str = "batch"                 # batch (as in the search) | running
    power_iters: int = 50
    power_tol: float = 1e-3
    lanczos_steps: int = 30
    top_k: int = 5
    hutchinson_samples: int = 30
    surface_1d: int = 41              # points along one direction (0: none)
    surface_2d: int = 15              # points per axis of the 2-D grid (0: none)
    surface_range: float = 1.0        # coordinates in [-range, range]
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True        # same numbers; double backward of convs is several times faster

    def validate(self) -> None:
        if self.images < 1:
            raise EkgError(f"`images` must be at least 1, got {self.images}")
        if self.batch_size < 1:
            raise EkgError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.batch_size < 2 and self.bn == "batch":
            raise EkgError("`batch_size` must be at least 2 with `bn` batch (BN needs batch statistics)")
        if self.bn not in BN_MODES:
            raise EkgError(f"`bn` must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        for name in ("power_iters", "lanczos_steps", "hutchinson_samples", "top_k"):
            if getattr(self, name) < 1:
                raise EkgError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("surface_1d", "surface_2d"):
            if getattr(self, name) < 0 or getattr(self, name) == 1:
                raise EkgError(f"`{name}` must be 0 (none) or at least 2, got {getattr(self, name)}")
        if not 0 < self.surface_range < math.inf:
            raise EkgError(f"`surface_range` must be a positive finite number, got {self.surface_range}")
        if not 0 <= self.seed <= 2**32 - 1:
            raise EkgError(f"`seed` must be a whole number from 0 to 2**32-1, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spectrum(objective: Objective, cfg: LandscapeConfig, *, progress: bool = True) -> dict[str, Any]:
    """λmax (power iteration), the Lanczos Ritz values (λmin, top-k, density) and the Hutchinson
    trace of ``objective``'s Hessian, with the derived smoothness numbers."""
    n, dev = objective.size, objective.device
    total = cfg.power_iters + min(cfg.lanczos_steps, n) + cfg.hutchinson_samples
    with tqdm(total=total, desc="hessian", unit="hvp", disable=not progress) as bar:
        power = power_iteration(objective.hvp, n, iters=cfg.power_iters, tol=cfg.power_tol, seed=cfg.seed, device=dev,
                                progress=lambda i, lam: (bar.update(1), bar.set_postfix_str(f"λmax≈{lam:.4g}")))
        bar.total = bar.n + min(cfg.lanczos_steps, n) + cfg.hutchinson_samples
        lz = lanczos(objective.hvp, n, steps=cfg.lanczos_steps, seed=cfg.seed, device=dev,
                     progress=lambda j: bar.update(1))
        bar.total = bar.n + cfg.hutchinson_samples
        tr = hutchinson_trace(objective.hvp, n, samples=cfg.hutchinson_samples, seed=cfg.seed, device=dev,
                              progress=lambda i: bar.update(1))
    lam_max, lam_min = power.eigenvalue, lz.lambda_min
    return {
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "neg_ratio": abs(lam_min) / lam_max if lam_max > 0 else float("nan"),
        "trace": tr.trace,
        "trace_stderr": tr.stderr,
        "lanczos_lambda_max": lz.lambda_max,
        "top_eigenvalues": sorted(lz.ritz_values, reverse=True)[: cfg.top_k],
        "bottom_eigenvalues": lz.ritz_values[: cfg.top_k],
        "ritz": {"values": lz.ritz_values, "weights": lz.ritz_weights},
        "power": {"iterations": power.iterations, "converged": power.converged, "history": power.history},
        "lanczos_steps": lz.steps,
        "hutchinson_samples": tr.samples,
        "params": n,
    }


def fixed_batches(data: Any, normalization: Any, cfg: LandscapeConfig,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed images every number is measured on: ``cfg.images`` from ``data`` (an ImageSet),
    the same count per class (the last ones of each class in data order, as the search's D_val),
    unaugmented, normalised, on ``device``."""
    from .data import iterate_batches

    labels = data.labels.cpu().numpy()
    classes = int(labels.max()) + 1 if len(labels) else 0
    if classes == 0:
        raise EkgError("the data set is empty")
    per = max(1, cfg.images // classes)
    parts = [np.where(labels == c)[0][::-1][:per] for c in range(classes)]
    idx = np.sort(np.hstack(parts)).astype(np.int64)
    np.random.RandomState(cfg.seed).shuffle(idx)  # mix classes within each batch (BN batch statistics)
    subset = data.subset(idx)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return [(x.contiguous(memory_format=fmt), y)
            for x, y in iterate_batches(subset, cfg.batch_size, normalization=normalization, device=device)]


def surfaces(objective: Objective, cfg: LandscapeConfig, *, progress: bool = True) -> dict[str, Any]:
    """The 1-D and 2-D filter-normalised surfaces of ``cfg`` (raw grids as lists)."""
    out: dict[str, Any] = {}
    dirs = random_directions(objective.params, 2, seed=cfg.seed)
    r = cfg.surface_range
    if cfg.surface_1d:
        a = np.linspace(-r, r, cfg.surface_1d)
        with tqdm(total=len(a), desc="surface 1-D", unit="pt", disable=not progress) as bar:
            loss = surface(objective, dirs[:1], [a], progress=lambda i: bar.update(1))
        out["surface_1d"] = {"alpha": a.tolist(), "loss": loss.tolist()}
    if cfg.surface_2d:
        a = np.linspace(-r, r, cfg.surface_2d)
        with tqdm(total=len(a) ** 2, desc="surface 2-D", unit="pt", disable=not progress) as bar:
            loss = surface(objective, dirs, [a, a], progress=lambda i: bar.update(1))
        out["surface_2d"] = {"alpha": a.tolist(), "beta": a.tolist(), "loss": loss.tolist()}
    return out


def analyse(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], cfg: LandscapeConfig, *,
            with_surfaces: bool = True, progress: bool = True) -> dict[str, Any]:
    """Every landscape number of ``model`` on ``batches``: loss and accuracy, the spectrum and
    (optionally) the surfaces. The model's parameters and BN statistics are left unchanged.

    A :class:`ekg.masks.MaskedNetwork` is measured through its slim twin (the same function, only
    the sub-network's own parameters; see the module doc)."""
    from .masks import MaskedNetwork

    cfg.validate()
    if isinstance(model, MaskedNetwork):
        from .slim import slim_model

        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = slim_model(model.model, model.graph, model.kept_indices()).to(memory_format=fmt)
    obj = model_objective(model, batches, bn=cfg.bn)
    t0 = time.perf_counter()
    with bn_mode(model, cfg.bn), torch.no_grad():
        logits = torch.cat([_full_precision(model(x)) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    result: dict[str, Any] = {"loss": float(F.cross_entropy(logits, labels)),
                              "accuracy": 100.0 * float((logits.argmax(1) == labels).float().mean()),
                              "images": int(len(labels))}
    result.update(spectrum(obj, cfg, progress=progress))
    if with_surfaces:
        result.update(surfaces(obj, cfg, progress=progress))
    result["seconds"] = time.perf_counter() - t0
    return result


def landscape(model: Any, data: Any, out: str | Path, *, config: LandscapeConfig | None = None,
              progress: bool = True, normalization: Any = "auto", classes: Any = None) -> dict[str, Any]:
    """``ekg landscape``: measure ``model`` (slim or not: a Checkpoint, a checkpoint path, the
    result of ``ekg.prune``/``ekg.finetune``, or an ``nn.Module`` with its ``normalization``) on
    fixed images of ``data``'s training split (``data`` as for :func:`ekg.prune`); write
    ``out/landscape.json``, the surface grids (``surface_1d.json``, ``surface_2d.json``) and their
    PNGs. Returns the JSON record."""
    import copy

    from .user_model import as_checkpoint
    from .data import as_splits, get_normalization
    from .io import check_output_folder, write_json
    from .plots import plot_surface_1d, plot_surface_2d
    from .runtime import resolve_device

    cfg = config or LandscapeConfig()
    cfg.validate()
    check_output_folder(out)
    splits = as_splits(data, progress=progress, classes=classes)
    ckpt = as_checkpoint(model, splits, normalization=normalization)
    if ckpt.num_classes != splits.num_classes:
        raise EkgError(f"the model predicts {ckpt.num_classes} classes but the data has {splits.num_classes}")
    if cfg.images > len(splits.train):
        raise EkgError(f"`images` {cfg.images} is more than the {len(splits.train)} training images of the data: "
                       f"measure on at most {len(splits.train)}")
    device = resolve_device(cfg.device)
    net = copy.deepcopy(ckpt.model).to(device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    batches = fixed_batches(splits.train, get_normalization(ckpt.normalization), cfg, device)
    res = analyse(net, batches, cfg, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in res.items() if not k.startswith("surface_")}
    source = str(model) if isinstance(model, (str, Path)) else str(ckpt.meta.get("source", "(in memory)"))
    record.update({"definitions": DEFINITIONS, "settings": cfg.to_dict(), "device": str(device), "model": source,
                   "data": splits.source, "data_split": "train"})
    for key, plot in (("surface_1d", plot_surface_1d), ("surface_2d", plot_surface_2d)):
        if key in res:
            write_json(out / f"{key}.json", res[key])
            record[f"{key}_files"] = [p.name for p in plot(res[key], out, title=Path(source).name)]
    write_json(out / "landscape.json", record)
    return record
