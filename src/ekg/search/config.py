"""The search's settings: :class:`SearchConfig` (defaults: the paper's CIFAR run), its checks,
and the allowed choices of its string fields (importance criteria, rewards, methods, compat modes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..bn import BN_STATS
from ..errors import EkgError, check_finite, check_seed

IMPORTANCES = ("ekg", "taylor", "l1", "fpgm", "random")
REWARDS = ("ensemble", "val-loss")
METHODS = ("greedy", "uniform")
COMPATS = ("method", "release")
BUDGETS = ("flops", "latency")

DEFAULT_KEEP = 0.45  # the paper's CIFAR budget


@dataclass
class SearchConfig:
    """Settings of the search. Defaults: the paper's CIFAR run."""

    keep: float = DEFAULT_KEEP         # target FLOPs ratio (budget "latency": fraction of the measured latency)
    budget: str = "flops"              # flops | latency (a measured-latency cost model on the latency_* target)
    latency_device: str = "cpu"        # the latency target: cpu | cuda
    latency_runtime: str = "torch"     # torch (eager) | onnxruntime (CPU)
    latency_threads: int | None = None  # CPU threads; None: torch's current number
    latency_batch: int = 1
    latency_dtype: str = "float32"     # the deployed model's dtype: float32 | bfloat16 | float16 (cuda); torch runtime
    latency_channels_last: bool = False  # the deployed model's memory format; torch runtime
    importance: str = "ekg"            # ekg | taylor | l1 | fpgm | random
    reward: str = "ensemble"           # ensemble (J) | val-loss (CE)
    method: str = "greedy"             # greedy | uniform
    step: float = 0.2                  # the 0.2 of max(1/C, 0.2/n)
    round_to: int = 1                  # every kept width a multiple of it (or the group's full width)
    otsu_trim: float = 0.2
    otsu: bool = True                  # the candidate filter
    batch_size: int = 256
    val_per_class: int = 32
    sub_per_class: int = 256
    split_seed: int = 1
    seed: int = 0                      # only the random importance uses it
    adapt: bool = True
    adapt_lr: float = 1e-3
    adapt_momentum: float = 0.9
    adapt_weight_decay: float = 5e-4
    bn_ops: bool = False               # count 2 ops per BN output element in the FLOPs ratio
    search_bn: str = "batch"           # BN statistics of every search pass: batch (the method) | running (ablation)
    compat: str = "method"             # method (the method doc's rules) | release (the TF release's effective ones)
    fast: bool = True                  # re-use unchanged activations per candidate (same decisions)
    cache_gb: float | None = None      # fast mode's activation cache limit; None: half the free memory
    sliced: bool = True                # channels-last, kept-channels-only layers (same function, less work)
    device: str = "auto"

    def validate(self) -> None:
        if not 0 < self.keep < 1:
            what = "fraction of the measured latency" if self.budget == "latency" else "FLOPs ratio"
            raise EkgError(f"`keep` must lie in (0, 1) (the {what} to reach), got {self.keep}")
        for name, value, allowed in (("importance", self.importance, IMPORTANCES),
                                     ("reward", self.reward, REWARDS), ("method", self.method, METHODS),
                                     ("search_bn", self.search_bn, BN_STATS), ("compat", self.compat, COMPATS)):
            if value not in allowed:
                raise EkgError(f"`{name}` must be one of {', '.join(allowed)}, got {value!r}")
        if self.budget not in BUDGETS:
            raise EkgError(f"`budget` must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.budget == "latency":
            if self.compat == "release":
                raise EkgError("a latency budget is not part of the original release's search: use `compat` method")
            self.latency_target().validate()
        else:
            given = [name for name in LATENCY_TARGET_FIELDS
                     if getattr(self, name) != SearchConfig.__dataclass_fields__[name].default]
            if given:
                raise EkgError(f"{', '.join(f'`{g}`' for g in given)} set{'s' if len(given) == 1 else ''} the latency "
                               "target of a latency budget: add `budget` latency, or drop it")
        if not 0 < self.step <= 1:
            raise EkgError(f"`step` must lie in (0, 1], got {self.step}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise EkgError(f"`round_to` must be an integer >= 1 (kept widths a multiple of it), got {self.round_to!r}")
        if self.round_to > 1 and self.compat == "release":
            raise EkgError("`round_to` is not part of the original release's search: use `compat` method with it")
        if self.batch_size < 2:
            raise EkgError("`batch_size` must be at least 2 (BN uses batch statistics in the search)")
        for name in ("step", "otsu_trim", "cache_gb", "adapt_lr", "adapt_momentum", "adapt_weight_decay"):
            check_finite(name, getattr(self, name))
        check_seed("seed", self.seed)
        check_seed("split_seed", self.split_seed)
        if self.cache_gb is not None and self.cache_gb < 0:
            raise EkgError(f"`cache_gb` must be at least 0, got {self.cache_gb}")
        if self.val_per_class < 1 or self.sub_per_class < 0:
            raise EkgError(f"`val_per_class` must be at least 1 and `sub_per_class` at least 0, got "
                           f"{self.val_per_class} and {self.sub_per_class}")

    def latency_target(self) -> Any:
        """The :class:`ekg.latency.LatencyTarget` the latency_* settings name."""
        from ..latency import LatencyTarget

        return LatencyTarget(*(getattr(self, name) for name in LATENCY_TARGET_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# the fields that name the latency target, in LatencyTarget's order
LATENCY_TARGET_FIELDS = ("latency_device", "latency_runtime", "latency_threads", "latency_batch", "latency_dtype",
                         "latency_channels_last")


def with_keep(config: SearchConfig | None, keep: float | None) -> SearchConfig:
    """The SearchConfig of a call that states its budget once: ``keep``, or ``config.keep``. A
    ``config`` that leaves keep at its default takes ``keep``; one that sets another budget than
    ``keep`` is an error (neither may silently override the other)."""
    if config is None:
        return SearchConfig() if keep is None else SearchConfig(keep=keep)
    if keep is None or keep == config.keep:
        return config
    if config.keep == DEFAULT_KEEP:
        return replace(config, keep=keep)
    raise EkgError(f"`keep` is {keep} but the `config` says keep {config.keep}: state the budget once, as `keep` or "
                   "as SearchConfig(keep=...)")
