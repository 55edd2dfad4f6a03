"""What LAMMPS' ``pair_style nequip`` hands a compiled model, reproduced in Python.

The pair style (``pair_nequip_allegro``, nequip mode: one MPI rank, ``newton off``) builds, every
step, from LAMMPS' full neighbour list of the local atoms:

- ``pos`` ``(n_local, 3)``: positions of the local atoms, wrapped into the box;
- ``edge_index`` ``(2, E)``: for every pair (local ``i``, neighbour ``j``) closer than ``r_max``,
  ``(i, owner(j))``, where a ghost atom ``j`` (a periodic image) is replaced by the local atom it
  copies (found through the atom tag);
- ``edge_cell_shift`` ``(E, 3)``: the whole lattice vectors between ``j`` and its owner,
  ``round((x_j - x_owner(j)) · cell⁻¹)``;
- ``cell`` ``(1, 3, 3)``: the LAMMPS box as rows ``(lx, 0, 0), (xy, ly, 0), (xz, yz, lz)``;
- ``atom_types``: the model type index of each LAMMPS type, from the element names listed
  after the model file in ``pair_coeff * * model.nequip.pt2 C H O``.

It reads ``atomic_energy`` (and sums the local ones), ``forces`` of the local atoms and
``virial`` ``(1, 3, 3)``. :func:`pair_nequip_inputs` builds those inputs from an ASE ``Atoms``
the same way (ghost images included), so that a compiled model can be checked against the ASE
calculator without LAMMPS; :func:`lammps_type_map` is the ``pair_coeff`` type mapping, with an
error that names a mismatch instead of LAMMPS' "All pair coeffs are not set";
:func:`check_pair_model` checks a compiled model and a ``pair_coeff`` element list before a
LAMMPS run (``nequip-deq-lammps-check``). :class:`SingleRankMLIAPData` does the same for the
ML-IAP route (``nequip-prepare-lmp-mliap``, ``pair_style mliap unified``).
"""

import itertools
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.lammps import Prism

from nequip.data import AtomicDataDict

from .._compile_targets import (
    PAIR_NEQUIP_DEQ_TARGET,
    STATE_CACHE_EXTRAPOLATION_METADATA_KEY,
    STATE_CACHE_METADATA_KEY,
    STATE_WIDTH_METADATA_KEY,
    compiled_target,
    solver_limits,
)

PAIR_TARGETS = ("pair_nequip", PAIR_NEQUIP_DEQ_TARGET)


class LAMMPSTypeMapError(ValueError):
    """The element names of a LAMMPS run do not fit the model's ``type_names``."""


class WrongCompileTarget(ValueError):
    """A compiled model's inputs/outputs are not those its caller passes/reads."""


def check_pair_model(metadata: dict, lammps_elements: Sequence[str]) -> List[str]:
    """Check a compiled model's metadata (``aoti_load_package(path).get_metadata()``) for
    ``pair_style nequip`` with ``pair_coeff * * <model> <lammps_elements>``. Raises
    :class:`WrongCompileTarget` or :class:`LAMMPSTypeMapError` naming the mismatch; returns
    notes (e.g. a DEQ model that will start cold every step)."""
    target = compiled_target(metadata)
    is_deq = STATE_WIDTH_METADATA_KEY in metadata
    if target not in PAIR_TARGETS:
        fix = (
            f"--target {PAIR_NEQUIP_DEQ_TARGET} --modifiers enable_DEQStateCache"
            if is_deq
            else "--target pair_nequip"
        )
        raise WrongCompileTarget(
            f"the model was compiled for `{target}` (inputs {metadata.get('nequip_aoti_inputs')}), "
            "but pair_style nequip passes only pos, edge_index, atom_types, cell and "
            f"edge_cell_shift: recompile with `nequip-compile ... --mode aotinductor {fix}`."
        )
    type_names = metadata["type_names"]
    type_names = type_names.split() if isinstance(type_names, str) else list(type_names)
    mapping = lammps_type_map(type_names, lammps_elements)
    notes = [
        f"LAMMPS type {i + 1} ({e}) -> model type {m} ({type_names[m]})"
        for i, (e, m) in enumerate(zip(lammps_elements, mapping))
    ]
    limits = solver_limits(metadata)
    if limits is not None:
        notes.append(
            f"DEQ solver: forward tolerance {limits['f_tol']:g} (cap {limits['f_max_iter']} "
            f"iterations), adjoint {limits['b_tol']:g} (cap {limits['b_max_iter']})"
        )
    if is_deq and STATE_CACHE_METADATA_KEY not in metadata:
        notes.append(
            "DEQ model without the state cache: every MD step starts the solver cold. Compile "
            f"with `--target {PAIR_NEQUIP_DEQ_TARGET} --modifiers enable_DEQStateCache` to reuse "
            "the previous fixed point."
        )
    elif is_deq:
        scheme = metadata.get(STATE_CACHE_EXTRAPOLATION_METADATA_KEY, "quadratic")
        notes.append(
            f"DEQ state cache for up to {metadata[STATE_CACHE_METADATA_KEY]} atoms (larger systems "
            f"start cold every step), {scheme} starting points."
        )
    return notes


def lammps_type_map(model_type_names: Sequence[str], lammps_elements: Sequence[str]) -> List[int]:
    """Model type index of each LAMMPS type (1, 2, ... in the order of ``lammps_elements``),
    as ``pair_coeff * * model.nequip.pt2 <lammps_elements>`` sets it up. Raises
    :class:`LAMMPSTypeMapError` for an element the model does not know."""
    unknown = [e for e in lammps_elements if e not in model_type_names]
    if unknown:
        raise LAMMPSTypeMapError(
            f"pair_coeff names {unknown}, which the model does not know: its type_names are "
            f"{list(model_type_names)}. List, after the model file, one model type name per "
            f"LAMMPS atom type (here {len(lammps_elements)}), in the order of the data file's "
            "types."
        )
    return [list(model_type_names).index(e) for e in lammps_elements]


def lammps_frame(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` rotated into LAMMPS' box orientation (cell rows ``(lx, 0, 0)``,
    ``(xy, ly, 0)``, ``(xz, yz, lz)``) with positions wrapped into the box along periodic
    directions, as in an ASE-written LAMMPS data file."""
    prism = Prism(atoms.cell.array, atoms.pbc)
    xhi, yhi, zhi, xy, xz, yz = prism.get_lammps_prism()
    out = atoms.copy()
    out.calc = None
    out.set_cell([[xhi, 0.0, 0.0], [xy, yhi, 0.0], [xz, yz, zhi]], scale_atoms=False)
    out.positions = prism.vector_to_lammps(atoms.positions, wrap=True)
    return out


def ghost_images(atoms: Atoms, cutoff: float):
    """LAMMPS' local + ghost atoms: positions ``(n_all, 3)`` and owner index ``(n_all,)``; the
    first ``len(atoms)`` are the local atoms, the rest their periodic images within
    ``cutoff`` of the box (along periodic directions only)."""
    cell = atoms.cell.array
    local = atoms.positions
    # reach of the ghost shell in lattice units per direction: cutoff / plane spacing
    reach = cutoff * np.linalg.norm(np.linalg.inv(cell), axis=0)
    ranges = [range(-int(np.ceil(r)), int(np.ceil(r)) + 1) if p else range(1) for r, p in zip(reach, atoms.pbc)]
    positions, owners = [local], [np.arange(len(atoms))]
    frac_local = local @ np.linalg.inv(cell)
    for shift in itertools.product(*ranges):
        if shift == (0, 0, 0):
            continue
        frac = frac_local + np.array(shift, dtype=float)
        near = (frac >= -reach) & (frac <= 1.0 + reach)
        inside = np.all(near | ~atoms.pbc, axis=1)
        n = np.array(shift, dtype=float)
        positions.append(local[inside] + n @ cell)
        owners.append(np.nonzero(inside)[0])
    return np.concatenate(positions), np.concatenate(owners)


def neighbour_pairs(atoms: Atoms, everything: np.ndarray, r_max: float):
    """LAMMPS' full neighbour list of the local atoms: ``(i, j)`` with ``i`` local and ``j``
    an index into ``everything`` (local + ghost positions, :func:`ghost_images`) within
    ``r_max``; an atom is not its own neighbour, its images are."""
    dist = np.linalg.norm(everything[None, :, :] - atoms.positions[:, None, :], axis=-1)
    i, j = np.nonzero(dist <= r_max)
    keep = i != j
    return i[keep], j[keep]


def atom_types(
    atoms: Atoms, model_type_names: Sequence[str], lammps_elements: Optional[Sequence[str]] = None
) -> List[int]:
    """Model type index of each atom through the LAMMPS types ``lammps_elements`` (by default
    the distinct symbols of ``atoms`` in order of first appearance); raises
    :class:`LAMMPSTypeMapError` when an element has no type."""
    symbols = atoms.get_chemical_symbols()
    if lammps_elements is None:
        lammps_elements = list(dict.fromkeys(symbols))
    type_map = lammps_type_map(model_type_names, lammps_elements)
    missing = sorted(set(symbols) - set(lammps_elements))
    if missing:
        raise LAMMPSTypeMapError(f"atoms of {missing} have no LAMMPS type in {list(lammps_elements)}.")
    return [type_map[list(lammps_elements).index(s)] for s in symbols]


def pair_nequip_inputs(
    atoms: Atoms,
    r_max: float,
    model_type_names: Sequence[str],
    lammps_elements: Optional[Sequence[str]] = None,
    dtype: torch.dtype = torch.float64,
    shuffle_seed: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """The inputs ``pair_style nequip`` gives the model for ``atoms`` (already in LAMMPS'
    frame, see :func:`lammps_frame`): local positions, ``edge_index`` from the full neighbour
    list with ghosts mapped to their owners, ``edge_cell_shift``, ``cell``, ``atom_types``.

    Args:
        lammps_elements: element of each LAMMPS type (the ``pair_coeff`` list); by default the
            distinct symbols of ``atoms`` in order of first appearance
        shuffle_seed: permute the edges (LAMMPS' neighbour order is not nequip's)
    """
    cell = atoms.cell.array
    if abs(np.linalg.det(cell)) < 1e-9:
        raise ValueError("LAMMPS always has a box: give `atoms` a cell (e.g. atoms.center(vacuum=10)).")
    types = atom_types(atoms, model_type_names, lammps_elements)
    everything, owner = ghost_images(atoms, r_max)
    n_local = len(atoms)
    i, j = neighbour_pairs(atoms, everything, r_max)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(i))
        i, j = i[order], j[order]
    periodic_shift = everything[j] - atoms.positions[owner[j]]
    shifts = np.round(periodic_shift @ np.linalg.inv(cell))
    return {
        AtomicDataDict.POSITIONS_KEY: torch.as_tensor(atoms.positions[:n_local], dtype=dtype),
        AtomicDataDict.EDGE_INDEX_KEY: torch.as_tensor(np.stack([i, owner[j]]), dtype=torch.long),
        AtomicDataDict.ATOM_TYPE_KEY: torch.as_tensor(types, dtype=torch.long),
        AtomicDataDict.CELL_KEY: torch.as_tensor(cell, dtype=dtype).unsqueeze(0),
        AtomicDataDict.EDGE_CELL_SHIFT_KEY: torch.as_tensor(shifts, dtype=dtype),
    }


def lammps_virial(virial) -> np.ndarray:
    """LAMMPS' six virial components ``(xx, yy, zz, xy, xz, yz)`` (the pair style's, and
    ``fix external``'s) from a 3x3 virial: the model's ``virial`` ``(1, 3, 3)`` or an array."""
    v = torch.as_tensor(virial).detach().reshape(3, 3).double().numpy()
    return np.array([v[0, 0], v[1, 1], v[2, 2], v[0, 1], v[0, 2], v[1, 2]])


class SingleRankMLIAPData:
    """What LAMMPS ML-IAP hands a ``pair_style mliap unified`` model on one MPI rank, for
    checking a ``nequip-prepare-lmp-mliap`` file without LAMMPS: local + ghost atoms
    (:func:`ghost_images`), the pair list ``pair_i`` (local) / ``pair_j`` (local or ghost) with
    ``rij = x_j - x_i``, per-atom types ``elems``, and the two hooks a message-passing model
    uses: ``forward_exchange`` (ghost rows := their owners' rows) and ``reverse_exchange``
    (ghost rows added onto their owners). ``update_pair_forces_gpu`` applies pair forces as
    LAMMPS does (``f_i += f_ij``, ``f_j -= f_ij``) and folds ghost forces onto their owners:
    ``forces`` ``(n_local, 3)``.
    """

    def __init__(self, atoms: Atoms, r_max: float, model_type_names: Sequence[str]):
        positions, self.owner = ghost_images(atoms, r_max)
        self.nlocal, self.ntotal = len(atoms), len(positions)
        i, j = neighbour_pairs(atoms, positions, r_max)
        self.pair_i, self.pair_j = i.astype(np.int32), j.astype(np.int32)
        self.npairs = len(self.pair_i)
        self.rij = positions[self.pair_j] - positions[self.pair_i]
        local_types = np.array(atom_types(atoms, model_type_names), dtype=np.int32)
        self.elems = local_types[self.owner]
        self.eatoms = np.zeros(self.nlocal)
        self.energy = None
        self.forces = None

    def forward_exchange(self, src: torch.Tensor, dst: torch.Tensor, width: int) -> None:
        dst.copy_(src[torch.as_tensor(self.owner, device=src.device)])

    def reverse_exchange(self, src: torch.Tensor, dst: torch.Tensor, width: int) -> None:
        dst.zero_()
        dst.index_add_(0, torch.as_tensor(self.owner, device=src.device), src)

    def update_pair_forces_gpu(self, pair_forces: torch.Tensor) -> None:
        forces = torch.zeros(self.ntotal, 3, dtype=pair_forces.dtype)
        forces.index_add_(0, torch.as_tensor(self.pair_i, dtype=torch.long), pair_forces.cpu())
        forces.index_add_(0, torch.as_tensor(self.pair_j, dtype=torch.long), -pair_forces.cpu())
        local = torch.zeros(self.nlocal, 3, dtype=pair_forces.dtype)
        local.index_add_(0, torch.as_tensor(self.owner), forces)
        self.forces = local.numpy()
