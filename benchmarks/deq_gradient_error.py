"""How exact are DEQEquiformerModel's gradients? Measured against central finite differences
in float64 on a rattled ethanol molecule (solver tolerances 1e-11):

1. forces vs -dE/dx (the implicit/adjoint gradient; phantom gradient for comparison);
2. the parameter gradient of a force loss, d/dtheta mean|F - F_ref|^2, which training needs
   (forces differentiated a second time), over parameters spread across the encoder, f and
   the readout: ``train_gradient: implicit`` (the default; backward fixed-point solve at the
   default ``grad_tol`` and a tighter one) and ``train_gradient: unroll`` with K = 0 (z*, v*
   frozen), 1, 2, 3, 5, 8 differentiable refinement steps.

    python benchmarks/deq_gradient_error.py
"""

import warnings

import numpy as np
import torch
from ase.build import molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.utils.global_state import set_global_state

from nequip_deq.model import DEQEquiformerModel
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer

TYPES = ["H", "C", "O"]


def build(**overrides):
    set_global_state()
    kwargs = dict(
        seed=3, model_dtype="float64", type_names=TYPES, r_max=4.0,
        irreps_node_features="16x0e+8x1o+4x2e", num_heads=2, num_basis=8,
        radial_mlp_width=16, num_output_features=16, f_tol=1e-11, b_tol=1e-11,
        f_max_iter=300, b_max_iter=300,
    )
    kwargs.update(overrides)
    return DEQEquiformerModel(**kwargs).eval()


def structure():
    set_global_state()  # float64 positions
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=7)
    mapper = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
    )
    return mapper(compute_neighborlist_(from_ase(atoms), r_max=4.0))


def force_error(model, data, eps=1e-4):
    """Max |F + dE/dx| over all components, and max |F|."""
    forces = model(dict(data))[AtomicDataDict.FORCE_KEY].detach()
    pos = data[AtomicDataDict.POSITIONS_KEY]
    worst = 0.0
    for atom in range(pos.shape[0]):
        for k in range(3):
            e = []
            for sign in (1, -1):
                d = dict(data)
                d[AtomicDataDict.POSITIONS_KEY] = pos.clone()
                d[AtomicDataDict.POSITIONS_KEY][atom, k] += sign * eps
                e.append(float(model(d)[AtomicDataDict.TOTAL_ENERGY_KEY].detach()))
            worst = max(worst, abs(-(e[0] - e[1]) / (2 * eps) - float(forces[atom, k])))
    return worst, float(forces.abs().max())


def loss_gradient_error(model, data, params, target, eps=1e-5, analytic=None):
    """Relative error of d(force loss)/d(theta) in training mode (or of the given ``analytic``
    gradient) vs central differences of the converged (evaluation-mode) loss, over the
    parameter entries ``params``."""

    def loss():
        out = model(dict(data))
        return (out[AtomicDataDict.FORCE_KEY] - target).square().mean()

    errors = []
    for param, idx in params:
        if analytic is None:
            model.train()
            (grad,) = torch.autograd.grad(loss(), [param])
            model.eval()
        else:
            grad = analytic
        flat = param.detach().view(-1)
        with torch.no_grad():
            flat[idx] += eps
        up = float(loss().detach())
        with torch.no_grad():
            flat[idx] -= 2 * eps
        down = float(loss().detach())
        with torch.no_grad():
            flat[idx] += eps
        numeric = (up - down) / (2 * eps)
        errors.append(abs(float(grad.view(-1)[idx]) - numeric) / abs(numeric))
    return errors


def main():
    warnings.simplefilter("ignore")
    data = structure()
    print("1. forces vs central differences of the energy (float64, eps 1e-4)")
    for gradient in ("implicit", "phantom"):
        worst, scale = force_error(build(gradient=gradient, train_unroll_steps=1), data)
        print(f"   {gradient:9s} max |F - (-dE/dx)| = {worst:.2e} eV/Å (max |F| {scale:.2f})")

    print("2. parameter gradient of a force loss vs central differences (relative error)")
    model = build()
    layer = next(m for m in model.modules() if isinstance(m, DEQEquiformerLayer))
    rng = np.random.default_rng(0)
    named = {n: p for n, p in model.named_parameters() if p.numel() > 1}
    chosen = list(named)[:: max(1, len(named) // 8)][:8]
    params = [(named[n], int(rng.integers(named[n].numel()))) for n in chosen]
    target = torch.randn(data[AtomicDataDict.POSITIONS_KEY].shape, dtype=torch.float64)
    print("   parameters: " + ", ".join(chosen))
    default_tol = layer.grad_tol
    for tol in (default_tol, 1e-9):
        layer.grad_tol = tol
        errors = loss_gradient_error(model, data, params, target)
        print(f"   train_gradient=implicit, grad_tol={tol:g}: median {np.median(errors):.1e}, "
              f"max {max(errors):.1e}")
    # training with train_tol 1e-3: every solve of the training step at 1e-3, compared with
    # the loss of converged (tight) evaluation solves
    tight = (layer.f_tol, layer.b_tol)
    layer.grad_tol = 1e-3
    errors = []
    for param, idx in params:
        layer.f_tol = layer.b_tol = 1e-3
        model.train()
        out = model(dict(data))
        (grad,) = torch.autograd.grad((out[AtomicDataDict.FORCE_KEY] - target).square().mean(), [param])
        model.eval()
        layer.f_tol, layer.b_tol = tight
        errors.append(loss_gradient_error(model, data, [(param, idx)], target, analytic=grad)[0])
    print(f"   train_gradient=implicit, all training solves at 1e-3 (train_tol): median "
          f"{np.median(errors):.1e}, max {max(errors):.1e}")
    layer.grad_tol = default_tol
    layer.train_implicit = False
    for steps in (0, 1, 2, 3, 5, 8):
        layer.train_unroll_steps = steps
        errors = loss_gradient_error(model, data, params, target)
        print(f"   train_gradient=unroll, train_unroll_steps={steps}: median "
              f"{np.median(errors):.1e}, max {max(errors):.1e}")

if __name__ == "__main__":
    main()
