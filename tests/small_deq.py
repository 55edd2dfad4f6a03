"""A small DEQ model (random weights, float64 or float32), the molecules it is tested on, and
the helpers the DEQ tests share: graphs, calculators, short trajectories, central
differences of forces and of the force-loss gradient."""

import numpy as np
import torch
from ase.build import molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.utils.global_state import set_global_state

from nequip_deq.integrations.ase import DEQCalculator
from nequip_deq.model import DEQEquiformerModel
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer

TYPES = ["H", "C", "O"]
R_MAX = 3.5
TOL = {"float64": 1e-10, "float32": 1e-5}


def build(dtype="float64", **overrides):
    set_global_state()
    kwargs = dict(
        seed=5, model_dtype=dtype, type_names=TYPES, r_max=R_MAX, l_max=2,
        irreps_node_features="8x0e+4x1o+4x2e", num_heads=2, num_basis=8,
        radial_mlp_width=16, num_output_features=16,
        f_tol=TOL[dtype], b_tol=TOL[dtype], f_max_iter=200, b_max_iter=200,
    )
    kwargs.update(overrides)
    model = DEQEquiformerModel(**kwargs)
    model.eval()
    return model


def mapper():
    return ChemicalSpeciesToAtomTypeMapper(
        model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
    )


def graph(atoms):
    return mapper()(compute_neighborlist_(from_ase(atoms), r_max=R_MAX))


def rattled(name, seed, amount=0.1):
    atoms = molecule(name)
    atoms.rattle(amount, seed=seed)
    return atoms


def deq_layer(model) -> DEQEquiformerLayer:
    return next(m for m in model.modules() if isinstance(m, DEQEquiformerLayer))


def central_difference_forces(model, data, eps, atoms_to_check):
    pos = data[AtomicDataDict.POSITIONS_KEY]
    numeric = torch.zeros(len(atoms_to_check), 3, dtype=torch.float64)
    for row, atom in enumerate(atoms_to_check):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                shifted = dict(data)
                shifted[AtomicDataDict.POSITIONS_KEY] = pos.clone()
                shifted[AtomicDataDict.POSITIONS_KEY][atom, k] += sign * eps
                energies.append(float(model(shifted)[AtomicDataDict.TOTAL_ENERGY_KEY].detach()))
            numeric[row, k] = -(energies[0] - energies[1]) / (2 * eps)
    return numeric


def calculator(model, warm_start=True, **kwargs):
    return DEQCalculator(
        model, device="cpu", warm_start=warm_start,
        transforms=[mapper(), NeighborListTransform(r_max=R_MAX)], **kwargs,
    )


def short_trajectory(name="CH3CH2OH", steps=6, seed=0):
    """Consecutive geometries 0.01 Å apart, like MD steps."""
    atoms = rattled(name, seed, 0.05)
    rng = np.random.default_rng(seed)
    velocity = rng.normal(size=(len(atoms), 3))
    velocity *= 0.01 / np.abs(velocity).max()
    frames = []
    for _ in range(steps):
        frames.append(atoms.copy())
        atoms.positions += velocity
    return frames


def single_frame(atoms):
    """What pair_style nequip passes: one frame, no batch fields, no state."""
    data = graph(atoms)
    return {k: v for k, v in data.items() if k not in (AtomicDataDict.BATCH_KEY, AtomicDataDict.NUM_NODES_KEY)}


def with_state_cache(model, **kwargs):
    from nequip.model.modify_utils import modify

    return modify(model, [{"modifier": "enable_DEQStateCache", **kwargs}])


def loss_gradient_errors(model, data, names, rng, eps=1e-5):
    """Relative errors of d(force loss)/d(theta) in training mode against central differences
    of the converged (evaluation-mode) loss, one random entry of each named parameter, and the
    training call's outputs (after its backward pass)."""
    target = torch.randn(data[AtomicDataDict.POSITIONS_KEY].shape, dtype=torch.float64)
    outputs = {}

    def loss():
        out = model(dict(data))
        outputs.update(out)
        return (out[AtomicDataDict.FORCE_KEY] - target).square().mean()

    params = dict(model.named_parameters())
    model.train()
    grads = torch.autograd.grad(loss(), [params[n] for n in names])
    trained = dict(outputs)
    model.eval()
    errors = []
    for name, grad in zip(names, grads):
        flat = params[name].detach().view(-1)
        idx = int(rng.integers(flat.numel()))
        with torch.no_grad():
            flat[idx] += eps
        up = float(loss())
        with torch.no_grad():
            flat[idx] -= 2 * eps
        down = float(loss())
        with torch.no_grad():
            flat[idx] += eps
        numeric = (up - down) / (2 * eps)
        errors.append(abs(float(grad.view(-1)[idx]) - numeric) / max(abs(numeric), 1e-8))
    return errors, trained


# parameters of the encoder, of f (attention, radial MLP, feed-forward, LayerScale) and of
# the readout: the implicit gradient reaches all three
