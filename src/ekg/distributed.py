"""Running on N processes (``torchrun``), one or many machines: a small layer over ``torch.distributed``.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and starts the process group: NCCL when the run uses CUDA GPUs
(one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPUs. Launched without torchrun it returns a
single-process :class:`Dist` and every helper is a no-op, so the same code runs both ways.

The :class:`Dist` value is passed explicitly to what needs it (no module-level state of ours;
``torch.distributed`` keeps its own default group while the group exists).

How the phases use it (see docs/design.md, "Distributed"):

* decisions (search steps, teacher choice) come from all-reduced per-batch sums laid out by global
  batch index, so every rank holds the same numbers, in the same summation order, as one process;
* only rank 0 writes files; the others wait at barriers where they read what rank 0 wrote.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from .errors import EkgError
from .runtime import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; ``Dist()`` is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def note(self, text: str | None) -> None:
        """A one-line ``note: ...`` on stderr, once (from rank 0), above any progress bar; nothing for None."""
        if text and self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"note: {text}", file=sys.stderr)

    def device(self, name: str = "auto") -> torch.device:
        """The device of this process: ``resolve_device(name)``, on CUDA this rank's GPU."""
        dev = resolve_device(name)
        if self.enabled and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        return dev

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (returns ``t``)."""
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values."""
        if self.enabled:
            for t in tensors:
                tdist.broadcast(t.data, src=0)

    def shard(self, n: int) -> list[int]:
        """This rank's items of ``0..n-1``: every world_size-th, starting at the rank."""
        return list(range(self.rank, n, self.world_size))

    def part(self, n: int) -> slice:
        """This rank's consecutive rows of a batch of ``n`` (the first ``n % world_size`` ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (one flat all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_sum(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs); ``Dist()`` without torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Dist()
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise EkgError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers: launch with torchrun") from None
    cuda = resolve_device(device).type == "cuda"
    if cuda and local >= torch.cuda.device_count():
        raise EkgError(f"process {rank} has LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} "
                       "GPUs: use --nproc_per_node at most the GPU count, or `device` cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local, backend=backend)


def shutdown(d: Dist) -> None:
    if d.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------- BN over all ranks

class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        tdist.all_reduce(g, op=tdist.ReduceOp.SUM)
        return g


def _sync_bn_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BN with the statistics of the whole global batch (all ranks' rows): two
    differentiable all-reduces (sum, then squared deviations), running statistics updated like
    ``nn.BatchNorm``'s. Works with gloo on CPUs, where ``nn.SyncBatchNorm`` does not."""
    all_reduce = _AllReduceSum.apply
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    s = all_reduce(torch.cat([x.sum(dims), count]))
    n = s[-1]
    mean = s[:-1] / n
    var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
        bn.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, d: Dist) -> Iterator[nn.Module]:
    """While inside, every BatchNorm of ``model`` in training mode normalises with the statistics
    of the global batch (all ranks), so a batch split over ranks trains as one batch would.
    A no-op on one process."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if d.enabled else []
    try:
        for bn in bns:
            bn.forward = (lambda x, bn=bn: _sync_bn_forward(bn, x) if bn.training else
                          type(bn).forward(bn, x))
        yield model
    finally:
        for bn in bns:
            del bn.forward
