"""Conditioning of the variational DEQ's minimisation at initialisation: for a few stiffnesses
:math:`\\kappa`, the solver iterations of a cold solve and the extreme eigenvalues of
:math:`(\\kappa S)^{-1}H` at the solution (power iteration with Hessian-vector products), on a
molecule and on nequip's harness cell (4 copper atoms, all typed alike: nearly symmetric
environments).

    python benchmarks/variational_spectrum.py

The models are the small float64 test models of tests/small_deq.py (seed 5, 8x0e+4x1o+4x2e)
and tests/test_deq_model.py (seed 123) with random weights; docs/deq.md quotes the output.
"""

import warnings

import torch
from ase.build import bulk, molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.utils.global_state import set_global_state

from nequip_deq.model import DEQEquiformerModel

TYPES = ["H", "C", "O"]
SMALL = dict(
    model_dtype="float64", type_names=TYPES, l_max=2, irreps_node_features="8x0e+4x1o+4x2e",
    num_heads=2, num_basis=8, radial_mlp_width=16, num_output_features=16,
    fixed_point="variational", f_max_iter=400,
)


def layer_input(model, data):
    """The variational layer and the data its forward receives."""
    d = dict(data)
    for name, module in model.model.func.named_children():
        if name == "deq":
            return module, d
        d = module(d)


def extreme_eigenvalues(model, data, z_star, steps=200):
    """Smallest and largest eigenvalue of (κS)⁻¹H at ``z_star`` (power iteration, and power
    iteration on the shifted operator)."""
    layer, d = layer_input(model, data)
    x_hat = layer.injection.normalize(d[AtomicDataDict.NODE_FEATURES_KEY])
    weights = layer.edge_weights(d)
    z = z_star.clone().requires_grad_(True)
    gradient = torch.autograd.grad(layer.potential(z, d, x_hat, weights).sum(), z, create_graph=True)[0]
    metric = layer.metric(d, z_star)

    def apply(v):
        return torch.autograd.grad(gradient, z, v, retain_graph=True)[0] / metric

    def power(operator):
        v = torch.randn(z_star.shape, generator=torch.Generator().manual_seed(0), dtype=z_star.dtype)
        for _ in range(steps):
            w = operator(v)
            value = float((v * w).sum() / (v * v).sum())
            v = w / w.norm()
        return value

    largest = power(apply)
    return largest - power(lambda v: largest * v - apply(v)), largest


def main() -> int:
    warnings.simplefilter("ignore")
    set_global_state()
    ethanal = molecule("CH3CHO")
    ethanal.rattle(0.1, seed=0)
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES})
    copper = bulk("Cu") * (2, 2, 1)
    copper.rattle()  # as nequip's Cu_bulk fixture
    cu = compute_neighborlist_(from_ase(copper), r_max=3.5)
    cu[AtomicDataDict.ATOM_TYPE_KEY] = torch.zeros(len(copper), dtype=torch.long)
    cases = [
        ("CH3CHO, seed 5, r_max 3.5, tolerance 1e-8", mapper(compute_neighborlist_(from_ase(ethanal), r_max=3.5)),
         dict(seed=5, r_max=3.5, f_tol=1e-8), (5.0, 10.0, 20.0)),
        ("Cu cell, seed 123, r_max 4, tolerance 1e-12", cu,
         dict(seed=123, r_max=4.0, f_tol=1e-12, avg_num_neighbors=5.0), (20.0, 40.0, 80.0)),
    ]
    print("| system | κ | iterations | eig min of (κS)⁻¹H | eig max |")
    print("|---|---|---|---|---|")
    for name, data, settings, stiffnesses in cases:
        for kappa in stiffnesses:
            model = DEQEquiformerModel(**SMALL, **settings, stiffness=kappa).eval()
            out = model(dict(data))
            low, high = extreme_eigenvalues(model, data, out["deq_state"].detach())
            print(f"| {name} | {kappa:g} | {int(out['deq_iterations'][0])} | {low:.2f} | {high:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
