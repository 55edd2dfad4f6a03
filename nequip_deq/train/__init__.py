"""Training with ``nequip-train``: Lightning modules for DEQ models, the per-epoch progress
line, and the warm-start store of DEQ training."""

from .lightning import DEQLightningModule, DEQEMALightningModule
from .progress import EpochSummary

__all__ = ["DEQLightningModule", "DEQEMALightningModule", "EpochSummary"]
