"""LAMMPS, eager side: the inputs pair_style nequip builds (local positions, full neighbour
list with ghost images folded back onto their owners as cell shifts, LAMMPS box) give both
models' ASE energies, forces and virial; so does nequip's ML-IAP wrapper on one rank with ghost
atoms; type-map, wrong-target and unknown-element errors name the mismatch (the real LAMMPS
runs: test_lammps_run.py). The compiled models are called the same way in test_deploy.py
and test_deq_deploy.py."""

import numpy as np
import pytest
from ase.build import molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.integrations.ase import NequIPCalculator
from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
from nequip.utils.aoti_metadata import serialize_aoti_keys
from nequip.utils.global_state import set_global_state

from nequip_deq.integrations.ase import DEQCalculator
from nequip_deq.integrations.lammps import (
    LAMMPSTypeMapError,
    SingleRankMLIAPData,
    WrongCompileTarget,
    check_pair_model,
    lammps_frame,
    lammps_virial,
    pair_nequip_inputs,
)
from nequip_deq.model import DEQEquiformerModel, EquiformerModel
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer
from nequip_deq.integrations.ase import check_elements
from small_models import SMALL

TYPES = ["C", "H", "O"]
R_MAX = 4.0


def periodic_ethanol():
    """Ethanol in a small triclinic box, rotated off LAMMPS' orientation: with r_max 4 Å,
    atoms near the faces see periodic images of the others."""
    atoms = molecule("CH3CH2OH")
    atoms.cell = [[6.0, 0.0, 0.0], [1.0, 6.5, 0.0], [0.5, 0.3, 7.0]]
    atoms.pbc = True
    atoms.rotate(30, "z", rotate_cell=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def molecule_in_box():
    """A molecule in a box, LAMMPS `boundary f f f`: no ghosts."""
    atoms = molecule("CH3COOH")
    atoms.center(vacuum=8.0)
    return atoms


def edge_set(data):
    shifts = data[AtomicDataDict.EDGE_CELL_SHIFT_KEY].round().long().tolist()
    return sorted(zip(*data[AtomicDataDict.EDGE_INDEX_KEY].tolist(), map(tuple, shifts)))


@pytest.mark.parametrize("make", [periodic_ethanol, molecule_in_box])
def test_pair_style_neighbour_list_is_nequips(make):
    """Ghost images folded onto their owners give exactly nequip's periodic edges."""
    atoms = lammps_frame(make())
    ours = pair_nequip_inputs(atoms, R_MAX, TYPES, shuffle_seed=0)
    ref = compute_neighborlist_(from_ase(atoms), r_max=R_MAX)
    assert edge_set(ours) == edge_set(ref)
    np.testing.assert_allclose(ours[AtomicDataDict.CELL_KEY][0].numpy(), atoms.cell.array)
    cell = atoms.cell.array
    assert cell[0, 1] == cell[0, 2] == cell[1, 2] == 0.0  # LAMMPS' lower-triangular box


def build_model(name):
    """Small float64 models (the DEQ solved to 1e-10, so that it compares at 1e-8)."""
    set_global_state()
    kwargs = {k: v for k, v in SMALL.items() if k != "_target_"}
    kwargs.update(seed=2, model_dtype="float64", type_names=TYPES, r_max=R_MAX)
    if name == "equiformer":
        return EquiformerModel(**kwargs).eval()
    kwargs.pop("num_layers")
    return DEQEquiformerModel(**kwargs, f_tol=1e-10, b_tol=1e-10, f_max_iter=200, b_max_iter=200).eval()


@pytest.mark.parametrize("name", ["equiformer", "deq"])
def test_models_called_as_the_pair_style_match_ase(name):
    """Per-atom energies (summed), forces and virial from the pair style's inputs equal the
    ASE calculator's energy, forces and -stress*volume, for a periodic box with ghost atoms and
    a molecule in a box, with LAMMPS' edge order (shuffled) and type order (H C O)."""
    model = build_model(name)
    transforms = [
        ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}),
        NeighborListTransform(r_max=R_MAX),
    ]
    calc_cls = DEQCalculator if name == "deq" else NequIPCalculator
    for atoms in (lammps_frame(periodic_ethanol()), lammps_frame(molecule_in_box())):
        calc = calc_cls(model, device="cpu", transforms=transforms)
        inputs = pair_nequip_inputs(atoms, R_MAX, TYPES, lammps_elements=["H", "C", "O"], shuffle_seed=1)
        out = model(dict(inputs))
        ref = atoms.copy()
        ref.calc = calc
        energy = float(out[AtomicDataDict.PER_ATOM_ENERGY_KEY].detach().sum())
        assert abs(energy - ref.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(out[AtomicDataDict.FORCE_KEY].detach().numpy(), ref.get_forces(), atol=1e-7)
        stress = ref.get_stress(voigt=False)
        volume = ref.get_volume()
        expected = -stress * volume
        got = lammps_virial(out[AtomicDataDict.VIRIAL_KEY])
        np.testing.assert_allclose(got, expected[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]], atol=1e-7)


def mliap_wrapper(model):
    """nequip's ML-IAP module (what `nequip-prepare-lmp-mliap --no-compile` saves) around an
    in-memory model instead of a file."""
    from nequip.integrations.lammps_mliap.lmp_mliap_wrapper import NequIPLAMMPSMLIAPWrapper

    wrapper = object.__new__(NequIPLAMMPSMLIAPWrapper)
    wrapper.model_key, wrapper.modifiers, wrapper.compile, wrapper.tf32 = "sole_model", [], False, False
    wrapper.model = wrapper.device = wrapper.nl_pruner = None
    wrapper.rcutfac = 0.5 * R_MAX
    wrapper.element_types = list(TYPES)
    wrapper._load_model_from_bytes = lambda: model
    return wrapper


@pytest.mark.parametrize("name", ["equiformer", "deq"])
def test_mliap_model_path_matches_ase(name):
    """LAMMPS ML-IAP on one rank with periodic images: nequip's ML-IAP wrapper (ghost-exchange
    modifier, energy model, forces from edge-vector gradients) gives the ASE energy and
    forces: every block exchanges ghost features, ghost energies are not counted. The DEQ's
    solves run to their caps there, whatever their residuals, so that all ranks iterate (and
    exchange ghosts) equally often."""
    pytest.importorskip("lammps.mliap.mliap_unified_abc")
    model = build_model(name)
    ref_model = build_model(name)
    atoms = lammps_frame(periodic_ethanol())
    lmp = SingleRankMLIAPData(atoms, R_MAX, TYPES)
    assert lmp.ntotal > 3 * lmp.nlocal  # ghost atoms matter here
    wrapper = mliap_wrapper(model)
    counts = []  # DEQ: iterations of each solve
    for layer in model.modules():
        if isinstance(layer, DEQEquiformerLayer):
            layer.register_forward_hook(lambda m, i, out: counts.append(
                (int(out["deq_iterations"][0]), int(out["deq_adjoint_iterations"][0]), m.f_max_iter, m.b_max_iter)))
    wrapper.compute_forces(lmp)
    if name == "deq":  # every rank runs the same count (each iteration exchanges ghosts): the caps
        assert counts and all(f == f_cap and b == b_cap for f, b, f_cap, b_cap in counts), counts
    ref = atoms.copy()
    transforms = [
        ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}),
        NeighborListTransform(r_max=R_MAX),
    ]
    ref.calc = NequIPCalculator(ref_model, device="cpu", transforms=transforms)
    assert abs(float(lmp.energy) - ref.get_potential_energy()) < 1e-8
    np.testing.assert_allclose(lmp.eatoms.sum(), ref.get_potential_energy(), atol=1e-8)
    np.testing.assert_allclose(lmp.forces, ref.get_forces(), atol=1e-7)


def metadata_for(target, **extra):
    spec = COMPILE_TARGET_DICT[target]
    meta = {
        "nequip_aoti_inputs": serialize_aoti_keys(spec["input"]),
        "nequip_aoti_outputs": serialize_aoti_keys(spec["output"]),
        "type_names": " ".join(TYPES),
        "r_max": str(R_MAX),
    }
    meta.update(extra)
    return meta


def test_pair_model_checks_name_the_mismatch():
    assert "LAMMPS type 2 (H) -> model type 1 (H)" in check_pair_model(metadata_for("pair_nequip"), ["C", "H", "O"])
    with pytest.raises(WrongCompileTarget, match=r"compiled for `ase`.*--target pair_nequip`"):
        check_pair_model(metadata_for("ase"), TYPES)
    with pytest.raises(WrongCompileTarget, match=r"`ase_deq`.*--target pair_nequip_deq --modifiers enable_DEQStateCache"):
        check_pair_model(metadata_for("ase_deq", deq_state_width="40"), TYPES)
    with pytest.raises(LAMMPSTypeMapError, match=r"pair_coeff names \['N'\].*type_names are \['C', 'H', 'O'\]"):
        check_pair_model(metadata_for("pair_nequip"), ["C", "H", "N"])
    cold = check_pair_model(metadata_for("pair_nequip", deq_state_width="40"), TYPES)
    assert any("starts the solver cold" in note for note in cold)
    warm = check_pair_model(
        metadata_for("pair_nequip_deq", deq_state_width="40", deq_state_cache_atoms="10000"), TYPES
    )
    assert any("state cache for up to 10000 atoms" in note for note in warm)


def test_unknown_elements_are_refused_before_running():
    atoms = molecule("CH3CONH2")  # N: unknown to a C/H/O model
    atoms.center(vacuum=5.0)
    with pytest.raises(LAMMPSTypeMapError, match=r"\['N'\]"):
        pair_nequip_inputs(atoms, R_MAX, TYPES, lammps_elements=["C", "H", "O", "N"])
    with pytest.raises(LAMMPSTypeMapError, match=r"atoms of \['N'\] have no LAMMPS type"):
        pair_nequip_inputs(atoms, R_MAX, TYPES, lammps_elements=["C", "H", "O"])
    calc = NequIPCalculator(
        build_model("equiformer"), device="cpu",
        transforms=[ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES), NeighborListTransform(r_max=R_MAX)],
    )
    with pytest.raises(ValueError, match=r"contains \['N'\].*type_names are \['C', 'H', 'O'\]"):
        check_elements(atoms, calc)
    with pytest.raises(ValueError, match="LAMMPS always has a box"):
        pair_nequip_inputs(molecule("H2O"), R_MAX, TYPES)

