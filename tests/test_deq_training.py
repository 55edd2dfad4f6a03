"""DEQ training: the implicit training gradient against finite differences (also in a pass
that records a graph), the Jacobian-free gradient, training-mode forces, warm-started training,
train-time compilation, the backward solve's warnings, torchdeq's solvers."""

import numpy as np
import pytest
import torch

from nequip.data import AtomicDataDict

from nequip_deq._keys import (
    DEQ_BACKWARD_STATISTICS_KEY,
    DEQ_JACOBIAN_PENALTY_KEY,
    DEQ_PENALTY_STEP_KEY,
    DEQ_TOLERANCE_KEY,
    FRAME_INDEX_KEY,
)
from nequip_deq.train.fixed_point_store import FixedPointStore

from small_deq import (
    build,
    graph,
    rattled,
    deq_layer,
    loss_gradient_errors,
)


SPREAD = [
    "model.func.type_embed.embed_module.weight",
    "model.func.edge_degree_embed.radial.mlp.0.weight",
    "model.func.deq.blocks.0.branch_scales",
    "model.func.deq.blocks.0.attn.radial.mlp.2.weight",
    "model.func.deq.blocks.0.attn.value.dtp.tp.weight",
    "model.func.deq.blocks.0.ffn.gated.linear.bias",
    "model.func.deq.readout.0.attn.lin_dst.weight",
    "model.func.deq.readout.1.mlp_module.mlp.0.weight",
]


def test_implicit_training_gradient_matches_finite_differences():
    """Training differentiates the forces again (force loss -> parameters). The implicit
    training gradient (the default: one backward fixed-point solve, default grad_tol) agrees
    with central differences of the loss computed by converged solves, for parameters of
    the encoder, of f and of the readout; the unrolled gradient (K=3) does not."""
    data = graph(rattled("CH3CH2OH", 3))
    model = build("float64", f_tol=1e-11, b_tol=1e-11, f_max_iter=300, b_max_iter=300)
    assert deq_layer(model).train_implicit and deq_layer(model).grad_tol == 1e-6
    errors, out = loss_gradient_errors(model, data, SPREAD, np.random.default_rng(0))
    assert np.median(errors) <= 1e-4 and max(errors) <= 1e-3, errors
    # the backward solve reports its statistics (logged by nequip_deq.train)
    stats = out["deq_backward_statistics"]
    assert int(stats[0, 0]) > 1 and float(stats[0, 1]) <= 1e-6, stats

    unrolled = build(
        "float64", f_tol=1e-11, b_tol=1e-11, f_max_iter=300, b_max_iter=300,
        train_gradient="unroll", train_unroll_steps=3,
    )
    errors, out = loss_gradient_errors(unrolled, data, SPREAD, np.random.default_rng(0))
    assert np.median(errors) > 1e-3, errors


def test_implicit_gradient_holds_in_a_parameter_pass_that_records_a_graph():
    """The force pass and the parameter pass are told apart by their order, not by the grad
    mode: a parameter gradient taken with create_graph=True (a gradient penalty, a
    Hessian-vector product) keeps the implicit term, equal to the plain gradient, and says that
    it is not differentiable again."""
    data = graph(rattled("CH3CH2OH", 3))
    model = build("float64", f_tol=1e-11, b_tol=1e-11, f_max_iter=300, b_max_iter=300)
    target = torch.randn(data[AtomicDataDict.POSITIONS_KEY].shape, dtype=torch.float64)
    params = [dict(model.named_parameters())[n] for n in SPREAD]

    def gradient(create_graph):
        model.train()
        forces = model(dict(data))[AtomicDataDict.FORCE_KEY]
        loss = (forces - target).square().mean()
        return torch.autograd.grad(loss, params, create_graph=create_graph)

    plain = gradient(False)
    with pytest.warns(UserWarning, match="not differentiable again"):
        recorded = gradient(True)
    for a, b in zip(plain, recorded):
        torch.testing.assert_close(b.detach(), a, atol=1e-10, rtol=1e-7)


def test_training_settings_are_inputs_and_statistics_are_outputs():
    """What nequip_deq.train passes and reads goes through the call, not through the layer's
    attributes: the Jacobian penalty is computed (with a graph) only in calls that ask for it,
    a call's ``deq_tolerance`` is also the tolerance of the training gradient's backward solve,
    whose iterations and residual the backward pass writes into ``deq_backward_statistics``."""
    model = build("float64", jacobian_penalty=True)
    model.train()
    data = graph(rattled("CH3CH2OH", 2))
    layer_settings = dict(vars(deq_layer(model)))

    def train_call(**inputs):
        out = model({**data, **inputs})
        out[AtomicDataDict.FORCE_KEY].square().sum().backward()
        return out

    plain = train_call()
    assert DEQ_JACOBIAN_PENALTY_KEY not in plain
    stats = plain[DEQ_BACKWARD_STATISTICS_KEY]
    assert stats.shape == (1, 2) and int(stats[0, 0]) > 1 and 0 < float(stats[0, 1]) <= 1e-6
    asked = train_call(**{
        DEQ_PENALTY_STEP_KEY: torch.ones(1, dtype=torch.bool),
        DEQ_TOLERANCE_KEY: torch.full((1, 2), 1e-3, dtype=torch.float64),
    })
    penalty = asked[DEQ_JACOBIAN_PENALTY_KEY]
    assert penalty.dim() == 0 and penalty.requires_grad and float(penalty.detach()) > 0
    loose = asked[DEQ_BACKWARD_STATISTICS_KEY]
    assert 1e-6 < float(loose[0, 1]) <= 1e-3 and int(loose[0, 0]) < int(stats[0, 0]), (loose, stats)
    assert float(asked["deq_residual"][0]) <= 1e-3 < 10 * float(asked["deq_residual"][0])
    assert {k: v for k, v in vars(deq_layer(model)).items() if k in layer_settings} == layer_settings


def test_jacobian_free_gradient_runs_no_backward_solve_and_points_downhill():
    """The shipped configs' training gradient (``train_gradient: unroll`` with K = 0, the
    Jacobian-free gradient): the training forces are the exact ones (the implicit gradient's,
    bit for bit), no backward solve runs, and the parameter gradient of a force loss is a
    descent direction of the exact loss (positive cosine with the implicit gradient) without
    being that gradient."""
    data = graph(rattled("CH3CH2OH", 3))
    target = torch.randn(data[AtomicDataDict.POSITIONS_KEY].shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))

    def force_loss_gradient(model):
        model.train()
        out = model(dict(data))
        loss = (out[AtomicDataDict.FORCE_KEY] - target).square().mean()
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        return torch.cat(flat), out

    solves = dict(f_tol=1e-11, b_tol=1e-11, f_max_iter=300, b_max_iter=300)
    exact, exact_out = force_loss_gradient(build("float64", **solves))
    free, free_out = force_loss_gradient(
        build("float64", train_gradient="unroll", train_unroll_steps=0, **solves)
    )
    assert torch.equal(free_out[AtomicDataDict.FORCE_KEY], exact_out[AtomicDataDict.FORCE_KEY])
    assert DEQ_BACKWARD_STATISTICS_KEY in exact_out and DEQ_BACKWARD_STATISTICS_KEY not in free_out
    cosine = float(exact @ free / (exact.norm() * free.norm()))
    assert 0.2 < cosine < 0.95, cosine  # 0.53 for this model and loss


def test_forces_in_training_are_the_evaluation_forces():
    """The implicit attachment changes gradients w.r.t. parameters only: forces computed in
    training mode equal those of evaluation mode (to the solver tolerance)."""
    model = build("float64")
    data = graph(rattled("CH3CH2OH", 4))
    ref = model(dict(data))[AtomicDataDict.FORCE_KEY]
    model.train()
    out = model(dict(data))[AtomicDataDict.FORCE_KEY]
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-8, rtol=0)


def test_warm_started_training_same_results_fewer_iterations():
    """The training store (warm_start_training) starts each frame's solves from its last
    fixed point: the same forces and loss gradient within the tolerances, fewer forward and
    adjoint iterations; frames it has not seen (or that changed size) start cold."""
    model = build("float64", f_tol=1e-8, b_tol=1e-8, grad_tol=1e-8)
    frames = [graph(rattled("CH3CH2OH", 6)), graph(rattled("CH3CHO", 7))]
    for index, frame in enumerate(frames):
        frame[FRAME_INDEX_KEY] = torch.tensor([10 + index])
    batch = AtomicDataDict.batched_from_list(frames)
    store = FixedPointStore()
    model.train()

    def step(b):
        out = model(b)
        param = deq_layer(model).blocks[0].attn.lin_src.weight
        (grad,) = torch.autograd.grad(out[AtomicDataDict.FORCE_KEY].square().sum(), [param])
        return out, grad

    assert store.warm_start(dict(batch)) == 0.0  # has frame keys, nothing stored: cold
    cold, cold_grad = step(dict(batch))
    store.remember(batch, cold)
    assert len(store) == 2
    warm_batch = dict(batch)
    assert store.warm_start(warm_batch) == 1.0
    warm, warm_grad = step(warm_batch)
    torch.testing.assert_close(warm["forces"], cold["forces"], atol=1e-6, rtol=0)
    torch.testing.assert_close(warm_grad, cold_grad, atol=1e-5 * float(cold_grad.abs().max()), rtol=0)
    for key in ("deq_iterations", "deq_adjoint_iterations"):
        assert (warm[key] < cold[key]).all(), (key, warm[key], cold[key])
    # a batch with an unseen frame: that frame starts cold, the known one warm
    other = graph(rattled("CH3CH2OH", 8))
    other[FRAME_INDEX_KEY] = torch.tensor([99])
    mixed = AtomicDataDict.batched_from_list([frames[0], other])
    assert store.warm_start(mixed) == 0.5
    n0 = frames[0][AtomicDataDict.POSITIONS_KEY].shape[0]
    assert mixed["deq_state"][:n0].abs().sum() > 0 and mixed["deq_state"][n0:].abs().sum() == 0
    # without frame keys the store does nothing and says so
    assert store.warm_start(dict(graph(rattled("CH3CH2OH", 9)))) is None


def test_train_time_compile_trains_eagerly_and_says_so():
    """nequip's `compile_mode: compile` would trace away the exact training gradient: the
    DEQ builds its eager model instead (so nequip-package, which builds every compile mode,
    can package it), says so, and trains with the same exact gradient."""
    from nequip.nn.compile import CompileGraphModel

    with pytest.warns(UserWarning, match=r"does not compile at train time .*runs eagerly"):
        model = build("float64", compile_mode="compile")
    assert not isinstance(model, CompileGraphModel)
    reference = build("float64")
    data = graph(rattled("CH3CHO", 0))
    for m in (model, reference):
        m.train()
    grads = [
        torch.autograd.grad(m(dict(data))[AtomicDataDict.FORCE_KEY].square().sum(),
                            [deq_layer(m).blocks[0].attn.lin_src.weight])[0]
        for m in (model, reference)
    ]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


def test_unconverged_backward_solve_warns():
    model = build("float64", grad_max_iter=2)
    data = graph(rattled("CH3CH2OH", 5))
    model.train()
    out = model(dict(data))
    with pytest.warns(UserWarning, match="backward solve did not reach"):
        out[AtomicDataDict.FORCE_KEY].square().sum().backward()


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_torchdeq_training_solvers(solver):
    """In training the forward solve may use torchdeq's solvers (per frame, packed); they
    reach the fixed point of the evaluation iteration, also at a per-call tolerance
    (``deq_tolerance``, one row per frame, as ``train_tol`` passes it)."""
    model = build("float64", solver=solver, f_tol=1e-9)
    frames = [graph(rattled("CH3CHO", 1)), graph(rattled("CH3CH2OH", 2))]
    batch = AtomicDataDict.batched_from_list(frames)
    ref = model(dict(batch))
    model.train()
    out = model(dict(batch))
    torch.testing.assert_close(out["deq_state"], ref["deq_state"], atol=1e-6, rtol=0)
    assert (out["deq_residual"] < 1e-8).all()
    loose = dict(batch, **{DEQ_TOLERANCE_KEY: torch.tensor([[1e-3, 1e-3], [1e-2, 1e-2]], dtype=torch.float64)})
    out = model(loose)
    assert (out["deq_residual"] < 1e-3).all() and (out["deq_iterations"] < ref["deq_iterations"]).all()
