"""Data: rMD17 / MD17 / MD22 npz ingestion into nequip's pipeline."""

from .molecule_npz import (
    MoleculeNPZDataset,
    InvalidDataFile,
    read_molecule_npz,
    num_frames,
)
from .datamodule import MD17DataModule

__all__ = [
    "MoleculeNPZDataset",
    "InvalidDataFile",
    "read_molecule_npz",
    "num_frames",
    "MD17DataModule",
]
