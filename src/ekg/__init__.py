"""ekg: filter pruning of pretrained CNNs with EKG (Lee & Song, ECCV 2022)."""

__version__ = "0.1.0"
