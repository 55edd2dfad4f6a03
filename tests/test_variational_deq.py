"""The variational DEQ (``fixed_point: variational``, nequip_deq/nn/fixed_point/variational.py): forces are
−dE/dx without an adjoint, the fixed point is a minimum of the energy, the fixed-point
Jacobian is symmetric (the Lagrangian DEQ's is not), the training gradient of a force loss
(Hessian solve) matches finite differences, rotations and mirrors act as they must, the ASE
calculator warm-starts it and runs shadow dynamics with it (no solve; forces exactly −dU/dx of
the shadow energy at the auxiliary state; a guard that solves instead), and what it does not
support is refused with the reason."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_stress
from scipy.spatial.transform import Rotation

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import NeighborListTransform

from nequip_deq._keys import DEQ_STATE_KEY, DEQ_TOLERANCE_KEY
from nequip_deq.integrations.ase import DEQCalculator
from nequip_deq.model import InvalidModelConfig
from nequip_deq.nn.fixed_point import variational
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer

from small_deq import (
    R_MAX,
    build,
    central_difference_forces,
    deq_layer,
    graph,
    loss_gradient_errors,
    mapper,
    rattled,
)

TIGHT = dict(f_tol=1e-11, f_max_iter=400)


def vbuild(dtype="float64", **overrides):
    return build(dtype, fixed_point="variational", **{**TIGHT, **overrides})


def potential_at(model, data):
    """``(layer, Φ)``: the variational layer of ``model`` and its total energy as a function of
    the latent state ``z`` ``(N, X)``, with the geometry of ``data`` held constant."""
    d = dict(data)
    for name, module in model.model.func.named_children():
        if name == "deq":
            break
        d = module(d)
    layer = model.model.func.deq
    x_hat = layer.injection.normalize(d[AtomicDataDict.NODE_FEATURES_KEY])
    weights = layer.edge_weights(d)
    return layer, lambda z: layer.potential(z, d, x_hat, weights).sum()


@pytest.mark.parametrize("readout_block", [True, False])
def test_forces_are_minus_dE_dx_without_an_adjoint(readout_block):
    """Central differences of the energy equal the forces; the model iterates, runs no
    adjoint, and its energy is the potential at the returned state; with the output block in
    the readout and with the linear readout of the state's scalars."""
    model = vbuild(readout_block=readout_block)
    data = graph(rattled("CH3CHO", 0))
    out = model(dict(data))
    assert isinstance(deq_layer(model), variational.VariationalDEQLayer)
    assert int(out["deq_iterations"][0]) > 5 and int(out["deq_adjoint_iterations"][0]) == 0
    numeric = central_difference_forces(model, data, 1e-4, [0, 3])
    analytic = out[AtomicDataDict.FORCE_KEY].detach()[[0, 3]]
    assert analytic.abs().max() > 1e-2
    torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=0)
    _, phi = potential_at(model, data)
    energy = float(phi(out["deq_state"]).detach())
    assert abs(energy - float(out[AtomicDataDict.TOTAL_ENERGY_KEY].detach())) < 1e-10


@pytest.mark.parametrize("readout_block", [True, False])
def test_fixed_point_is_a_minimum(readout_block):
    """At the returned state the gradient of the potential vanishes and the potential rises
    along random directions, by ½ε² uᵀHu with uᵀHu > 0 (Hessian-vector products)."""
    model = vbuild(readout_block=readout_block)
    data = graph(rattled("CH3CH2OH", 1))
    z_star = model(dict(data))["deq_state"].detach()
    _, phi = potential_at(model, data)
    z = z_star.clone().requires_grad_(True)
    gradient = torch.autograd.grad(phi(z), z, create_graph=True)[0]
    assert float(gradient.detach().norm()) < 1e-8 * float(z_star.norm())
    rng = torch.Generator().manual_seed(0)
    for _ in range(4):
        u = torch.randn(z_star.shape, generator=rng, dtype=z_star.dtype)
        u = u / u.norm()
        curvature = float((torch.autograd.grad(gradient, z, u, retain_graph=True)[0] * u).sum())
        assert curvature > 0
        eps = 1e-3
        rise = float(phi(z_star + eps * u) - phi(z_star))
        assert rise > 0 and abs(rise - 0.5 * eps**2 * curvature) < 1e-2 * rise, (rise, curvature)


def test_fixed_point_jacobian_is_symmetric():
    """uᵀ J w = wᵀ J u for the variational map (J = I − S⁻¹H with one energy scale), and not
    for the Lagrangian DEQ's f (what made zero-iteration shadow dynamics unstable there)."""
    data = graph(rattled("CH3CHO", 2))
    rng = torch.Generator().manual_seed(1)

    def asymmetry(model, jacobian_vector):
        z_star = model(dict(data))["deq_state"].detach()
        u, w = (torch.randn(z_star.shape, generator=rng, dtype=z_star.dtype) for _ in range(2))
        a = float((u * jacobian_vector(z_star, w)).sum())
        b = float((w * jacobian_vector(z_star, u)).sum())
        return abs(a - b) / max(abs(a), abs(b))

    model = vbuild()
    _, phi = potential_at(model, data)

    def hessian_vector(z_star, v):
        z = z_star.clone().requires_grad_(True)
        return torch.autograd.grad(torch.autograd.grad(phi(z), z, create_graph=True)[0], z, v)[0]

    assert asymmetry(model, hessian_vector) < 1e-10
    lagrangian = build("float64")
    layer = deq_layer(lagrangian)
    d = dict(data)
    for name, module in lagrangian.model.func.named_children():
        if name == "deq":
            break
        d = module(d)
    x_hat = layer.injection.normalize(d[AtomicDataDict.NODE_FEATURES_KEY])
    weights = layer.edge_weights(d)

    def f_jacobian_vector(z_star, v):
        return torch.autograd.functional.jvp(lambda z: DEQEquiformerLayer.f(layer, z, d, x_hat, weights), z_star, v)[1]

    assert asymmetry(lagrangian, f_jacobian_vector) > 1e-3


def test_adaptive_steps_where_the_damped_iteration_diverges():
    """A nearly symmetric copper cell (every atom typed H) at a low stiffness gives the
    readout a Hessian with eigenvalues beyond what the damped iteration takes: its residual
    does not fall, while the solver, switching to Barzilai-Borwein steps, reaches the
    tolerance."""
    atoms = bulk("Cu") * (2, 2, 1)
    atoms.rattle(0.01, seed=0)
    data = compute_neighborlist_(from_ase(atoms), r_max=R_MAX)
    data[AtomicDataDict.ATOM_TYPE_KEY] = torch.zeros(len(atoms), dtype=torch.long)
    model = vbuild(stiffness=1.0, f_tol=1e-10)
    out = model(dict(data))
    assert float(out["deq_residual"][0]) <= 1e-10 and int(out["deq_iterations"][0]) < 100
    layer = deq_layer(model)
    layer._iterate = lambda *args: DEQEquiformerLayer._iterate(layer, *args)  # the plain iteration
    layer.f_max_iter = 100
    with pytest.warns(UserWarning, match="did not reach the tolerance"):
        model(dict(data))


# parameters of the encoder, of the block and of the readout
SPREAD = [
    "model.func.type_embed.embed_module.weight",
    "model.func.edge_degree_embed.radial.mlp.0.weight",
    "model.func.deq.blocks.0.branch_scales",
    "model.func.deq.blocks.0.attn.radial.mlp.2.weight",
    "model.func.deq.blocks.0.ffn.gated.linear.bias",
    "model.func.deq.readout.0.attn.lin_dst.weight",
    "model.func.deq.readout.1.mlp_module.mlp.0.weight",
]


def test_training_gradient_matches_finite_differences(monkeypatch):
    """The parameter gradient of a force loss in training (one conjugate-gradient solve with
    the Hessian of the potential) agrees with central differences of the converged loss, for
    parameters of the encoder, the block and the readout; the solve reports its statistics.
    Without it (the minimiser held constant) the gradient is wrong."""
    model = vbuild()
    data = graph(rattled("CH3CH2OH", 3))
    errors, out = loss_gradient_errors(model, data, SPREAD, np.random.default_rng(0))
    assert np.median(errors) <= 1e-4 and max(errors) <= 1e-3, errors
    stats = out["deq_backward_statistics"]
    assert int(stats[0, 0]) > 1 and float(stats[0, 1]) <= 1e-6, stats
    monkeypatch.setattr(variational, "attach_minimiser_gradient", lambda layer, data, x_hat, z, *args: z)
    errors, out = loss_gradient_errors(model, data, SPREAD, np.random.default_rng(0))
    assert np.median(errors) > 1e-3, errors


def test_rotations_and_mirrors():
    """A rotated (and a mirrored) molecule has the same energy, rotated (mirrored) forces and a
    latent state that transforms like the features."""
    model = vbuild()
    atoms = rattled("CH3CHO", 4)
    out = model(dict(graph(atoms)))
    for matrix in (Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix(), np.diag([1.0, -1.0, 1.0])):
        moved = atoms.copy()
        moved.positions = atoms.positions @ matrix.T
        other = model(dict(graph(moved)))
        assert abs(float(other[AtomicDataDict.TOTAL_ENERGY_KEY]) - float(out[AtomicDataDict.TOTAL_ENERGY_KEY])) < 1e-9
        expected = out[AtomicDataDict.FORCE_KEY].detach().numpy() @ matrix.T
        np.testing.assert_allclose(other[AtomicDataDict.FORCE_KEY].detach().numpy(), expected, atol=1e-8)


def test_calculator_warm_starts_it():
    """DEQCalculator passes the previous minimiser as the start: the next MD-like frame needs
    fewer iterations and gives the cold result."""
    model = vbuild(f_tol=1e-8)
    transforms = [mapper(), NeighborListTransform(r_max=R_MAX)]
    warm = DEQCalculator(model, device="cpu", transforms=transforms)
    cold = DEQCalculator(model, device="cpu", transforms=transforms, warm_start=False)
    atoms = rattled("CH3CH2OH", 5)
    iterations = []
    for step in range(3):
        atoms.positions += 0.003 * np.random.default_rng(step).normal(size=atoms.positions.shape)
        forces = warm.get_forces(atoms.copy())
        np.testing.assert_allclose(forces, cold.get_forces(atoms.copy()), atol=1e-6)
        iterations.append(warm.results["deq_iterations"])
        assert warm.results["deq_adjoint_iterations"] == 0
    assert max(iterations[1:]) < 0.7 * iterations[0], iterations


def periodic(name, seed, edge):
    """``rattled(name, seed)`` in a periodic cubic cell of ``edge`` Å, sheared a little (edges
    cross the boundary at r_max 3.5 Å)."""
    atoms = rattled(name, seed)
    atoms.set_cell(np.diag([edge] * 3) + 0.3 * np.triu(np.ones((3, 3)), 1))
    atoms.pbc = True
    return atoms


def test_stress_is_the_strain_derivative_alone_and_batched():
    """In evaluation one backward pass gives the residual and, through a first-order energy
    term, the forces and stress: the stress equals central differences of the energy under
    strain, and two periodic frames of different sizes in one batch give each frame's own
    energy, forces and stress."""
    from nequip.data import AtomicDataDict as D

    model = vbuild()
    transforms = [mapper(), NeighborListTransform(r_max=R_MAX)]
    calc = DEQCalculator(model, device="cpu", transforms=transforms, warm_start=False)
    frames = [periodic("CH3CH2OH", 2, 4.5), periodic("CH3CHO", 3, 4.0)]
    singles = []
    for atoms in frames:
        atoms.calc = calc
        stress = atoms.get_stress()
        assert np.abs(stress).max() > 1e-3
        np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-7, rtol=0)
        singles.append(model(dict(graph(atoms))))
    out = model(D.batched_from_list([graph(atoms) for atoms in frames]))
    torch.testing.assert_close(out[D.TOTAL_ENERGY_KEY].detach(), torch.cat([o[D.TOTAL_ENERGY_KEY] for o in singles]).detach())
    torch.testing.assert_close(out[D.FORCE_KEY].detach(), torch.cat([o[D.FORCE_KEY] for o in singles]).detach())
    torch.testing.assert_close(out[D.STRESS_KEY].detach(), torch.cat([o[D.STRESS_KEY] for o in singles]).detach())


def md_frames(atoms, steps):
    """Positions along a smooth, MD-like path (each atom oscillating about its start)."""
    rng = np.random.default_rng(7)
    amplitude, phase = rng.normal(scale=0.05, size=(2,) + atoms.positions.shape)
    for k in range(steps):
        frame = atoms.copy()
        frame.positions = atoms.positions + amplitude * np.sin(0.15 * k + phase)
        yield frame


def shadow_energy(model, atoms, p):
    """U(x; p): the model's energy at the state ``p``, not solved (tolerance above any
    residual)."""
    data = graph(atoms)
    data[DEQ_STATE_KEY] = p
    data[DEQ_TOLERANCE_KEY] = torch.full((1, 2), float("inf"), dtype=p.dtype)
    return model(data)


def test_shadow_dynamics_steps_give_the_shadow_forces():
    """With ``shadow=True`` the first eight calls solve (the recurrence's history), later calls
    run no iteration; their forces are exactly −dU/dx of the shadow energy at the auxiliary
    state (central differences at fixed p), and close to the converged model's."""
    model = vbuild(f_tol=1e-8)
    transforms = [mapper(), NeighborListTransform(r_max=R_MAX)]
    shadow = DEQCalculator(model, device="cpu", transforms=transforms, shadow=True)
    cold = DEQCalculator(model, device="cpu", transforms=transforms, warm_start=False)
    flags, iterations, errors = [], [], []
    for frame in md_frames(rattled("CH3CH2OH", 6), 14):
        p = shadow._starts.start()
        forces = shadow.get_forces(frame.copy())
        flags.append(shadow.results["deq_shadow"])
        iterations.append(shadow.results["deq_iterations"])
        errors.append(np.abs(forces - cold.get_forces(frame.copy())).max())
    assert flags == [False] * 8 + [True] * 6 and iterations[8:] == [0] * 6, (flags, iterations)
    assert max(errors[8:]) < 5e-3 and max(errors[:8]) < 1e-6, errors
    out = shadow_energy(model, frame, p[0])
    np.testing.assert_allclose(out[AtomicDataDict.FORCE_KEY].detach().numpy(), forces, atol=1e-10)
    numeric = central_difference_forces(
        lambda d: shadow_energy(model, frame_at(frame, d), p[0]), graph(frame), 1e-4, [0, 4]
    )
    torch.testing.assert_close(torch.as_tensor(forces[[0, 4]]), numeric, atol=1e-7, rtol=0)


def frame_at(atoms, data):
    moved = atoms.copy()
    moved.positions = data[AtomicDataDict.POSITIONS_KEY].detach().numpy()
    return moved


def test_shadow_guard_solves_instead_and_says_so():
    """A shadow step whose auxiliary state is further from the solution than ``shadow_bound``
    is solved to tolerance instead, with one warning naming the call; shadow dynamics needs a
    variational DEQ with the extended-Lagrangian recurrence."""
    model = vbuild(f_tol=1e-8)
    transforms = [mapper(), NeighborListTransform(r_max=R_MAX)]
    calc = DEQCalculator(model, device="cpu", transforms=transforms, shadow=True, shadow_bound=1e-12)
    with pytest.warns(UserWarning, match="shadow step at call 9: .* solving this step") as caught:
        for frame in md_frames(rattled("CH3CH2OH", 6), 11):
            calc.get_forces(frame.copy())
            assert not calc.results["deq_shadow"] and calc.results["deq_iterations"] > 0
    assert sum("shadow step" in str(w.message) for w in caught) == 1
    with pytest.raises(ValueError, match="shadow dynamics needs a variational DEQ"):
        DEQCalculator(build("float64"), device="cpu", transforms=transforms, shadow=True)
    with pytest.raises(ValueError, match="extrapolation 'quadratic'"):
        DEQCalculator(model, device="cpu", transforms=transforms, shadow=True, extrapolation="quadratic")


def test_what_it_does_not_support_is_refused(monkeypatch):
    """The phantom gradient, the unrolled training gradient and the Jacobian penalty are
    refused at build time, an unknown fixed-point kind lists the known ones, and a compile
    (traced) call without a state (any target but ``ase_deq``) or with the LAMMPS state cache
    names the target to use."""
    for override in ({"gradient": "phantom"}, {"train_gradient": "unroll"}, {"jacobian_penalty": True}):
        name = next(iter(override))
        with pytest.raises(InvalidModelConfig, match=f"`fixed_point: variational` with `{name}="):
            vbuild(**override)
    with pytest.raises(InvalidModelConfig, match=r"`fixed_point='minimum'` is unknown.*'lagrangian', 'variational'"):
        build("float64", fixed_point="minimum")
    model = vbuild()
    monkeypatch.setattr(variational, "_call_mode", lambda: "traced")
    with pytest.raises(RuntimeError, match="compile it with `--target ase_deq` and without"):
        model(dict(graph(rattled("CH3CHO", 0))))
