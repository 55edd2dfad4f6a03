"""Molecular-dynamics datasets in npz files (revised MD17, original MD17, MD22) for nequip.

Two layouts are recognised from the keys of the file:

========  =================  ==========  ===========  ===========
layout    atomic numbers     positions   energies     forces
========  =================  ==========  ===========  ===========
rmd17     ``nuclear_charges``  ``coords``  ``energies``  ``forces``
sgdml     ``z``              ``R``       ``E``        ``F``
========  =================  ==========  ===========  ===========

(``sgdml`` is the format of original MD17 and MD22.) Energies in kcal/mol and forces in
kcal/mol/Å are converted to eV and eV/Å. Frames become :class:`ase.Atoms` with a single-point
calculator and go through nequip's own ASE ingestion (:func:`nequip.data.ase.from_ase`).
"""

import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import ase
import ase.units
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from nequip.data import AtomicDataDict
from nequip.data.ase import from_ase
from nequip.data.dataset import AtomicDataset

from .._keys import FRAME_INDEX_KEY

LAYOUTS: Dict[str, Dict[str, str]] = {
    "rmd17": {"z": "nuclear_charges", "R": "coords", "E": "energies", "F": "forces"},
    "sgdml": {"z": "z", "R": "R", "E": "E", "F": "F"},
}
ENERGY_UNITS: Dict[str, float] = {
    "kcal/mol": ase.units.kcal / ase.units.mol,
    "eV": 1.0,
    "hartree": ase.units.Hartree,
}


class InvalidDataFile(ValueError):
    """An npz file that cannot be read as a molecular dataset."""


def _fail(path, key: Optional[str], problem: str):
    where = f"key `{key}` of " if key else ""
    raise InvalidDataFile(f"{where}`{path}`: {problem}")


def detect_layout(path, keys: Sequence[str]) -> Dict[str, str]:
    """The key layout (see module docstring) of a file with ``keys``."""
    for layout in LAYOUTS.values():
        if all(k in keys for k in layout.values()):
            return layout
    missing = {
        name: [k for k in layout.values() if k not in keys] for name, layout in LAYOUTS.items()
    }
    _fail(
        path,
        None,
        f"missing keys: it has {sorted(keys)}; an rMD17 file needs {missing['rmd17']} more, "
        f"an sGDML (MD17/MD22) file needs {missing['sgdml']} more.",
    )


# what numpy raises for a file that is not an npz, or a truncated or corrupt one
_UNREADABLE = (OSError, ValueError, zipfile.BadZipFile, EOFError)


def read_molecule_npz(
    path: Union[str, Path],
    energy_unit: str = "kcal/mol",
    frames: Optional[Sequence[int]] = None,
) -> List[ase.Atoms]:
    """Validate an rMD17/sGDML npz file and return its frames as ``ase.Atoms`` (eV, Å).

    Args:
        path: the npz file
        energy_unit: unit of the file's energies (forces are in that unit per Å):
            ``kcal/mol`` (MD17, rMD17, MD22), ``eV`` or ``hartree``
        frames: indices of the frames to return (default: all)

    Raises:
        InvalidDataFile: missing keys, inconsistent shapes or non-finite values, with the file,
            the key and the problem in the message.
    """
    if energy_unit not in ENERGY_UNITS:
        raise ValueError(
            f"`energy_unit={energy_unit!r}` is unknown; use one of {list(ENERGY_UNITS)}"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file `{path}`")
    with _open_npz(path) as npz:
        layout = detect_layout(path, list(npz.keys()))
        try:
            arrays = {name: np.asarray(npz[key]) for name, key in layout.items()}
        except _UNREADABLE as e:
            _fail(path, None, f"an array cannot be read ({type(e).__name__}: {e}); the file is corrupt")
    z, R, E, F = arrays["z"], arrays["R"], arrays["E"], arrays["F"]

    if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer) or (z < 1).any() or (z > 118).any():
        _fail(path, layout["z"], f"must be one atomic number (1..118) per atom, got shape {z.shape}, dtype {z.dtype}")
    n_atoms = z.shape[0]
    if R.ndim != 3 or R.shape[1:] != (n_atoms, 3):
        _fail(path, layout["R"], f"must have shape (frames, {n_atoms}, 3), got {R.shape}")
    n_frames = R.shape[0]
    if E.reshape(-1).shape[0] != n_frames or E.ndim > 2:
        _fail(path, layout["E"], f"must have one energy per frame ({n_frames}), got shape {E.shape}")
    if F.shape != R.shape:
        _fail(path, layout["F"], f"must have the shape of the positions {R.shape}, got {F.shape}")
    for name in ("R", "E", "F"):
        bad = ~np.isfinite(arrays[name])
        if bad.any():
            first = np.argwhere(bad)[0][0]
            _fail(path, layout[name], f"{int(bad.sum())} non-finite values (first in frame {first})")

    unit = ENERGY_UNITS[energy_unit]
    E = E.reshape(-1).astype(np.float64) * unit
    F = F.astype(np.float64) * unit
    indices = range(n_frames) if frames is None else frames
    atoms_list = []
    for i in indices:
        atoms = ase.Atoms(numbers=z, positions=R[i].astype(np.float64), pbc=False)
        atoms.calc = SinglePointCalculator(atoms, energy=float(E[i]), forces=F[i])
        atoms_list.append(atoms)
    return atoms_list


def num_frames(path: Union[str, Path]) -> int:
    """Number of frames of an rMD17/sGDML npz file, without loading the arrays."""
    with _open_npz(path) as npz:
        layout = detect_layout(path, list(npz.keys()))
        try:
            return int(npz[layout["R"]].shape[0])
        except _UNREADABLE as e:
            _fail(path, layout["R"], f"cannot be read ({type(e).__name__}: {e}); the file is corrupt")


def frame_key(path: Union[str, Path], index: int) -> int:
    """A key of frame ``index`` of the file ``path`` that no frame of another file has: the
    index in the low 32 bits, a 30-bit checksum of the file's absolute path above them."""
    file_id = zlib.crc32(str(Path(path).resolve()).encode()) & (2**30 - 1)
    return file_id * 2**32 + int(index)


def _open_npz(path):
    """``np.load`` of an npz file, or :class:`InvalidDataFile` saying that it is not one."""
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as e:
        _fail(path, None, f"not a readable npz file ({type(e).__name__}: {e})")


class MoleculeNPZDataset(AtomicDataset):
    """nequip dataset of an rMD17 or sGDML (MD17, MD22) npz file, in eV and Å.

    The whole file is validated on construction (see :func:`read_molecule_npz`). Every frame
    carries a key unique to it as ``frame_index`` (a graph field; :func:`frame_key`): the key
    under which warm-started DEQ training keeps the frame's fixed point
    (:mod:`nequip_deq.train`), distinct across files.

    Args:
        file_path (str): the npz file
        transforms (List[Callable]): nequip data transforms (type mapper, neighbour list, ...)
        energy_unit (str): unit of the file's energies, ``kcal/mol`` by default
        max_frames (int): keep only the first ``max_frames`` frames
    """

    def __init__(
        self,
        file_path: str,
        transforms: List[Callable] = [],
        energy_unit: str = "kcal/mol",
        max_frames: Optional[int] = None,
    ):
        super().__init__(transforms=transforms)
        self.file_path = file_path
        frames = None if max_frames is None else range(min(max_frames, num_frames(file_path)))
        self.data_list: List[AtomicDataDict.Type] = []
        for index, atoms in enumerate(read_molecule_npz(file_path, energy_unit, frames)):
            data = from_ase(atoms)
            data[FRAME_INDEX_KEY] = torch.tensor([frame_key(file_path, index)], dtype=torch.long)
            self.data_list.append(data)

    def __len__(self) -> int:
        return len(self.data_list)

    def _get_data_list(
        self, indices: Union[List[int], torch.Tensor, slice]
    ) -> List[AtomicDataDict.Type]:
        if isinstance(indices, slice):
            return self.data_list[indices]
        return [self.data_list[int(i)] for i in indices]
