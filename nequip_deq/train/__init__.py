"""Lightning modules for training DEQ models with ``nequip-train``."""

from .lightning import DEQLightningModule, DEQEMALightningModule

__all__ = ["DEQLightningModule", "DEQEMALightningModule"]
