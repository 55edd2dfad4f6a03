"""DEQEquiformerModel beyond the harness: exact forces through the fixed point, solver
residuals, refusal of partial forces, failure reporting, TorchScript, bad settings."""

import pytest
import torch

from nequip.data import AtomicDataDict
from nequip.nn import PartialForceOutput
from nequip.utils.global_state import set_global_state

from nequip_deq.model import InvalidModelConfig
from nequip_deq.nn.fixed_point.layer import FixedPointError, PartialForcesNotExact

from small_deq import (
    TOL,
    build,
    graph,
    rattled,
    deq_layer,
    central_difference_forces,
    single_frame,
    with_state_cache,
)


@pytest.mark.parametrize(
    "dtype, eps, atol, readout_block",
    [("float64", 1e-4, 1e-6, True), ("float32", 1e-2, 2e-3, True), ("float64", 1e-4, 1e-6, False)],
)
def test_forces_are_minus_dE_dx(dtype, eps, atol, readout_block):
    """Central differences of the reported energy equal the reported forces: the fixed point
    moves with the atoms and the adjoint accounts for it (also with the linear readout)."""
    model = build(dtype, readout_block=readout_block)
    data = graph(rattled("CH3CHO", 0))
    out = model(dict(data))
    assert int(out["deq_iterations"][0]) > 5  # it really iterates
    atoms_to_check = [0, 3]
    numeric = central_difference_forces(model, data, eps, atoms_to_check)
    analytic = out[AtomicDataDict.FORCE_KEY].detach().double()[atoms_to_check]
    assert analytic.abs().max() > 1e-2
    torch.testing.assert_close(analytic, numeric, atol=atol, rtol=0)


def test_phantom_gradient_is_not_exact():
    """The phantom-gradient option is there for comparison; its forces are measurably not
    -dE/dx (why it is not the default)."""
    model = build("float64", gradient="phantom", train_unroll_steps=1)
    data = graph(rattled("CH3CHO", 0))
    out = model(dict(data))
    numeric = central_difference_forces(model, data, 1e-4, [0, 3])
    analytic = out[AtomicDataDict.FORCE_KEY].detach().double()[[0, 3]]
    assert (analytic - numeric).abs().max() > 1e-3


def test_residuals_below_tolerance():
    """The reported statistics are true: recomputing f at the returned z* and the adjoint
    equation at the returned v* gives residuals below the tolerances."""
    model = build("float64")
    data = graph(rattled("CH3CH2OH", 1))
    out = model(dict(data))
    layer = deq_layer(model)
    assert float(out["deq_residual"][0]) <= TOL["float64"]
    assert float(out["deq_adjoint_residual"][0]) <= TOL["float64"]
    # independent check on the returned solutions, with the encoder output of this call
    d = dict(out)
    x = out[AtomicDataDict.NODE_FEATURES_KEY]
    assert x.shape == out["deq_state"].shape
    # node_features in the output is the encoder output (the DEQ layer writes only its fields)
    x_hat = layer.injection.normalize(x.detach())
    z = out["deq_state"].detach().requires_grad_(True)
    fz = layer.f(z, d, x_hat, layer.edge_weights(d))
    assert float(((fz - z).norm() / fz.norm()).detach()) < 1e-9
    g = torch.autograd.grad(layer.energy(z, d).sum(), z, retain_graph=True)[0]
    v = out["deq_adjoint_state"]
    jtv = torch.autograd.grad(fz, z, v)[0]
    assert float((g + jtv - v).norm() / (g + jtv).norm()) < 1e-9


def test_every_atom_of_a_large_box_meets_the_tolerance():
    """The convergence test is per atom: on a periodic box of 1125 atoms, every atom's
    forward and adjoint residual is below the tolerance (relative to the frame's RMS norm),
    not just the frame as a whole (a frame norm divides one atom's error by sqrt(N))."""
    tol = 1e-4
    model = build("float64", f_tol=tol, b_tol=tol)
    box = rattled("CH3CH2OH", 3, 0.05)
    box.center()
    box.cell = [5.0, 5.0, 5.0]
    box.pbc = True
    box = box.repeat((5, 5, 5))
    box.rattle(0.05, seed=4)
    assert len(box) >= 1000
    data = graph(box)
    out = model(dict(data))
    layer = deq_layer(model)
    x_hat = layer.injection.normalize(out[AtomicDataDict.NODE_FEATURES_KEY].detach())
    z = out["deq_state"].detach().requires_grad_(True)
    fz = layer.f(z, dict(out), x_hat, layer.edge_weights(dict(out)))
    g = torch.autograd.grad(layer.energy(z, dict(out)).sum(), z, retain_graph=True)[0]
    adjoint = g + torch.autograd.grad(fz, z, out["deq_adjoint_state"])[0]
    for new, old in ((fz.detach(), z.detach()), (adjoint, out["deq_adjoint_state"])):
        per_atom = (new - old).norm(dim=-1) / new.square().sum(-1).mean().sqrt()
        assert float(per_atom.max()) <= tol, float(per_atom.max())


def test_partial_forces_are_refused():
    """Per-atom energy gradients need one adjoint per atom: the model says so instead of
    returning inexact numbers."""
    model = build("float64")
    model.model = PartialForceOutput(model.model.func)
    with pytest.raises(PartialForcesNotExact, match="total energy"):
        model(dict(graph(rattled("CH3CHO", 0))))


def test_unconverged_solve_is_reported_and_nonfinite_raises():
    model = build("float64", f_max_iter=3)
    data = graph(rattled("CH3CHO", 0))
    with pytest.warns(UserWarning, match=r"forward solve did not reach the tolerance .*after \[3\]"):
        out = model(dict(data))
    assert float(out["deq_residual"][0]) > TOL["float64"]
    model = build("float64")
    with torch.no_grad():
        deq_layer(model).blocks[0].ffn.parameters().__next__().fill_(float("nan"))
    with pytest.raises(FixedPointError, match="non-finite"):
        model(dict(data))


V2_BLOCKS = dict(block_type="v2", l_max=3, irreps_node_features="4x0e+4x1o+4x2e+4x3o", m_max=2)


@pytest.mark.parametrize("blocks", [{}, V2_BLOCKS], ids=["v1", "v2"])
def test_torchscript_matches_eager(blocks):
    """Scripted (nequip's TorchScript build, the deployment path on torch < 2.10), the model
    runs its own solver loops and gives the eager numbers and iteration counts, with
    Equiformer (v1) and EquiformerV2 (v2) blocks; the state cache starts the next call warm."""
    from e3nn.util.jit import script
    from nequip.utils.compile import conditional_torchscript_mode

    set_global_state()
    with conditional_torchscript_mode(True):
        model = build("float64", **blocks)
    data = graph(rattled("CH3CHO", 0))
    ref = model(dict(data))
    scripted = script(model)
    out = scripted(dict(data))
    for key in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        torch.testing.assert_close(out[key], ref[key], atol=1e-9, rtol=0)
    assert torch.equal(out["deq_iterations"], ref["deq_iterations"])
    assert torch.equal(out["deq_adjoint_iterations"], ref["deq_adjoint_iterations"])
    # the in-model state cache scripts too: the second call of the same frame starts warm
    with conditional_torchscript_mode(True):
        cached = script(with_state_cache(build("float64", **blocks)))
    first, second = cached(single_frame(rattled("CH3CHO", 0))), cached(single_frame(rattled("CH3CHO", 0)))
    assert int(second["deq_iterations"][0]) < int(first["deq_iterations"][0])
    torch.testing.assert_close(second["forces"], first["forces"], atol=1e-8, rtol=0)


def test_callers_that_check_nothing_get_an_error_not_inexact_forces():
    """Scripted or compiled and called without a state (LAMMPS pair_style nequip), a model
    whose solve ends above its tolerance at the cap, or gives non-finite values, raises with
    the reason and the fix instead of returning the forces; with a state passed (DEQCalculator,
    which checks the results itself) it returns them."""
    from e3nn.util.jit import script
    from nequip.utils.compile import conditional_torchscript_mode

    set_global_state()
    with conditional_torchscript_mode(True):
        capped = script(with_state_cache(build("float64", f_max_iter=3)))
        model = script(build("float64"))
    frame = single_frame(rattled("CH3CHO", 0))
    with pytest.raises(torch.jit.Error, match="ended above its tolerance at its iteration cap.*set_DEQSolverTolerances f_max_iter="):
        capped(dict(frame))
    broken = dict(frame)
    broken[AtomicDataDict.POSITIONS_KEY] = broken[AtomicDataDict.POSITIONS_KEY].clone()
    broken[AtomicDataDict.POSITIONS_KEY][0, 0] = float("nan")
    with pytest.raises(torch.jit.Error, match="non-finite values"):
        model(broken)
    width = deq_layer(build("float64")).injection.norm.irreps.dim
    broken["deq_state"] = torch.zeros(7, width, dtype=torch.float64)
    assert not torch.isfinite(model(broken)[AtomicDataDict.FORCE_KEY]).all()


@pytest.mark.parametrize(
    "override, words",
    [
        ({"f_tol": 0.0}, ["f_tol=0.0"]),
        ({"b_max_iter": 1}, ["b_max_iter=1"]),
        ({"damping": 1.5}, ["damping=1.5", "(0, 1]"]),
        ({"injection": "multiply"}, ["injection='multiply'", "add", "concat"]),
        ({"solver": "newton"}, ["solver='newton'", "anderson"]),
        ({"gradient": "one-step"}, ["gradient='one-step'", "implicit", "phantom"]),
        ({"train_gradient": "exact"}, ["train_gradient='exact'", "implicit", "unroll"]),
        ({"grad_tol": 2.0}, ["grad_tol=2.0"]),
        ({"grad_max_iter": 0}, ["grad_max_iter=0"]),
        ({"num_layers": 3}, ["num_layers", "num_deq_layers"]),
        ({"num_deq_layers": 0}, ["num_deq_layers=0"]),
        ({"norm_eps": 0.0}, ["norm_eps=0.0"]),
        ({"branch_scale": -1.0}, ["branch_scale=-1.0"]),
        ({"readout_block": "no"}, ["readout_block='no'", "true or false"]),
        ({"num_heads": 3}, ["num_heads=3", "does not divide"]),
    ],
)
def test_bad_settings_are_refused(override, words):
    with pytest.raises(InvalidModelConfig) as err:
        build("float32", **override)
    for word in words:
        assert word in str(err.value), str(err.value)
