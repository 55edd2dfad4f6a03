"""Write the LAMMPS data files of this directory with ASE (``python make_data.py``).

- ``aspirin.data``: one rMD17 aspirin molecule (first test frame) in a 30 Å box, for
  ``boundary f f f``;
- ``aspirin_box.data``: 8 aspirin molecules on a 2x2x2 grid (random orientations, 11 Å apart)
  in a periodic 22 Å box (168 atoms): the many-molecule, periodic set-up with ghost atoms.
  rMD17 models never saw two molecules interact: this box exercises the machinery, it is not a
  model of condensed aspirin.

Atom types follow the order C H O (``specorder``), so the pair_coeff line of the inputs is
``pair_coeff * * <model> C H O``; ``nequip-deq-lammps-check <model> C H O`` checks a model
against it.
"""

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from nequip_deq._resolvers import bundled_data_path
from nequip_deq.data import read_molecule_npz

HERE = Path(__file__).parent
SPECORDER = ["C", "H", "O"]


def aspirin() -> Atoms:
    atoms = read_molecule_npz(bundled_data_path("rmd17_aspirin_test_01_first200.npz"), frames=[0])[0]
    atoms.calc = None
    atoms.positions -= atoms.get_center_of_mass()
    return atoms


def molecule_in_box(box: float = 30.0) -> Atoms:
    atoms = aspirin()
    atoms.cell = [box, box, box]
    atoms.pbc = False
    atoms.positions += box / 2
    return atoms


def periodic_box(grid: int = 2, spacing: float = 11.0, seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    box = Atoms(cell=[grid * spacing] * 3, pbc=True)
    for index in np.ndindex(grid, grid, grid):
        mol = aspirin()
        mol.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center=(0, 0, 0))
        mol.positions += (np.array(index) + 0.5) * spacing
        box += mol
    return box


def main() -> None:
    for name, atoms in (("aspirin.data", molecule_in_box()), ("aspirin_box.data", periodic_box())):
        write(HERE / name, atoms, format="lammps-data", specorder=SPECORDER, masses=True, units="metal", atom_style="atomic")
        print(f"wrote {name}: {len(atoms)} atoms, box {atoms.cell.lengths().round(2).tolist()} Å")


if __name__ == "__main__":
    main()
