"""Physics the published Equiformer lacks: continuity at the cutoff and E(3) parity."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.utils.global_state import set_global_state

from nequip_deq.model import EquiformerModel
from nequip_deq.nn.attention.graph_attention import envelope_softmax

R_MAX = 3.0
TYPES = ["H", "C", "O"]


@pytest.fixture(scope="module")
def float64_model():
    set_global_state()
    return EquiformerModel(
        seed=7,
        model_dtype="float64",
        type_names=TYPES,
        r_max=R_MAX,
        num_layers=2,
        irreps_node_features="8x0e+4x1o+4x2e",
        num_heads=2,
        num_basis=8,
        radial_mlp_width=16,
        num_output_features=16,
    )


def _evaluate(model, atoms, nl_radius):
    mapper = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
    )
    data = mapper(compute_neighborlist_(from_ase(atoms), r_max=nl_radius))
    out = model(data)
    return (
        out[AtomicDataDict.TOTAL_ENERGY_KEY].item(),
        out[AtomicDataDict.FORCE_KEY].detach().numpy(),
    )


def test_atom_crossing_cutoff_is_smooth(float64_model):
    """Move an O atom away from a C-H pair through r_max of both partners: energy and
    forces change by O(step) at every step, and the edge's presence at the cutoff does not
    matter (neighbour list at r_max vs 1.5 r_max give the same numbers)."""
    xs = np.linspace(R_MAX - 0.4, R_MAX + 1.6, 401)
    energies, forces = [], []
    for x in xs:
        atoms = Atoms("CHO", positions=[[0, 0, 0], [1.1, 0.0, 0], [x, 0.3, 0.0]])
        e_wide, f_wide = _evaluate(float64_model, atoms, 1.5 * R_MAX)
        e_tight, f_tight = _evaluate(float64_model, atoms, R_MAX)
        assert abs(e_wide - e_tight) < 1e-10
        np.testing.assert_allclose(f_wide, f_tight, atol=1e-10)
        energies.append(e_wide)
        forces.append(f_wide)
    energies, forces = np.array(energies), np.array(forces)
    step = xs[1] - xs[0]
    # the moving atom interacts before the crossings ...
    assert np.abs(forces[0, 2]).max() > 1e-3
    # ... and every step changes energy and forces by at most a smooth amount
    max_force = np.abs(forces).max()
    assert np.abs(np.diff(energies)).max() < 2 * max_force * step
    assert np.abs(np.diff(forces, axis=0)).max() < 0.1 * max(max_force, 1e-3)
    # forces are -dE/dx along the path (central differences)
    de_dx = np.gradient(energies, step)
    np.testing.assert_allclose(-de_dx[1:-1], forces[1:-1, 2, 0], atol=5e-3)
    # beyond both cutoffs the O atom feels nothing
    far = xs > np.sqrt((R_MAX + 1.1) ** 2)
    assert np.abs(forces[far][:, 2]).max() < 1e-12


def test_attention_weights_continuous_at_cutoff():
    """alpha_ij -> 0 continuously as u_ij -> 0; the remaining weights renormalise
    continuously; a centre with all neighbours at the cutoff gets zero weights, not NaN."""
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.7, 1.5]], dtype=torch.float64)
    center = torch.tensor([0, 0, 0])
    previous = None
    for u in torch.linspace(0.1, 1e-12, 201, dtype=torch.float64):
        cutoff = torch.tensor([[1.0], [0.5], [u]], dtype=torch.float64)
        alpha = envelope_softmax(logits, cutoff, center, 1)
        torch.testing.assert_close(alpha.sum(0), torch.ones(2, dtype=torch.float64))
        assert (alpha[2] <= u * 20).all()
        if previous is not None:
            assert (alpha - previous).abs().max() < 5e-3
        previous = alpha
    at_cutoff = torch.tensor([[1.0], [0.5], [0.0]], dtype=torch.float64)
    limit = envelope_softmax(logits, at_cutoff, center, 1)
    torch.testing.assert_close(limit, previous, atol=1e-10, rtol=0)
    zeros = envelope_softmax(logits, torch.zeros(3, 1, dtype=torch.float64), center, 1)
    assert torch.equal(zeros, torch.zeros_like(zeros))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_weights_stable_when_the_largest_logit_sits_at_the_cutoff(dtype):
    """The softmax is stabilised with max(z + log u), not max(z): an edge at (or next to) the
    cutoff with a logit far above the others must not push the others' terms to underflow.
    Reference: the same weights in float64 with the exact formula, and their gradients."""
    big = 120.0 if dtype == torch.float32 else 800.0  # exp(-big) underflows in dtype
    logits = torch.tensor([[big, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=dtype, requires_grad=True)
    cutoff = torch.tensor([[0.0], [1.0], [0.5]], dtype=dtype)
    center = torch.tensor([0, 0, 0])
    alpha = envelope_softmax(logits, cutoff, center, 1)
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5 * np.e, 0.5]], dtype=torch.float64)
    expected[:, 0] /= 1.0 + 0.5 * np.e
    expected[:, 1] /= 1.5
    torch.testing.assert_close(alpha.detach().double(), expected, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(alpha[1, 0], logits)
    assert torch.isfinite(grad).all()
    # d alpha_1 / d z_k = alpha_1 (delta_1k - alpha_k)
    torch.testing.assert_close(
        grad[:, 0].double(), float(expected[1, 0]) * (torch.tensor([0.0, 1.0, 0.0]).double() - expected[:, 0]),
        atol=1e-6, rtol=0,
    )
    # an edge just inside the cutoff (u tiny but positive) with a large logit: exact weights
    tiny_u = 1e-30 if dtype == torch.float32 else 1e-300
    near = torch.tensor([[tiny_u], [1.0], [0.5]], dtype=dtype)
    z = torch.tensor([[60.0], [0.0], [1.0]], dtype=dtype) if dtype == torch.float32 else \
        torch.tensor([[690.0], [0.0], [1.0]], dtype=dtype)
    terms = torch.log(near.double()) + z.double()
    reference = torch.softmax(terms, dim=0)
    torch.testing.assert_close(envelope_softmax(z, near, center, 1).double(), reference, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("parity", [True, False])
def test_mirror_images(parity):
    """parity=True (default): E(3)-equivariant, mirror images get equal energies and
    mirrored forces. parity=False is the published SE(3)-only model: a chiral molecule and its
    mirror image get different energies."""
    set_global_state()
    model = EquiformerModel(
        seed=3,
        model_dtype="float64",
        type_names=TYPES,
        r_max=4.0,
        num_layers=2,
        parity=parity,
        irreps_node_features="8x0e+4x1o+4x2e" if parity else "8x0e+4x1e+4x2e",
        num_heads=2,
        num_basis=8,
        radial_mlp_width=16,
        num_output_features=16,
    )
    # a chiral arrangement (no mirror symmetry)
    atoms = molecule("CH3CH2OH")
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
    mirror = atoms.copy()
    mirror.positions[:, 0] *= -1
    e, f = _evaluate(model, atoms, 4.0)
    e_m, f_m = _evaluate(model, mirror, 4.0)
    if parity:
        assert abs(e - e_m) < 1e-10
        np.testing.assert_allclose(f_m[:, 0], -f[:, 0], atol=1e-10)
        np.testing.assert_allclose(f_m[:, 1:], f[:, 1:], atol=1e-10)
    else:
        assert abs(e - e_m) > 1e-6
