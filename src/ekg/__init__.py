"""ekg: filter pruning of pretrained CNNs with EKG (Lee & Song, ECCV 2022).

    import ekg
    result = ekg.prune(model, (train_set, test_set), keep=0.45, out="runs/a", normalization=None)
    tuned = ekg.finetune(result.model, (train_set, test_set), bank=result.run_dir, normalization=None)

Everything is imported on first use, so ``import ekg`` stays light.
"""

__version__ = "0.1.0"

_API = {  # name -> the module that defines it
    "prune": "pruning", "PruneResult": "pruning", "finetune": "finetuning", "FinetuneResult": "finetuning",
    "run": "pipeline",
    "load_data": "data", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "Checkpoint": "checkpoint",
    "SearchConfig": "search", "TrainConfig": "train", "finetune_config": "train", "AugmentConfig": "data", "StreamConfig": "data",
    "Normalization": "data", "LandscapeConfig": "landscape", "StudyConfig": "study",
    "EkgError": "errors", "DataError": "errors", "CheckpointError": "errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ekg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value  # later look-ups skip this function (and a submodule import cannot shadow it)
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
