"""``DEQEquiformerModel``: a deep-equilibrium Equiformer with exact forces."""

from typing import Optional

from nequip.model import model_builder
from nequip.nn import AtomwiseLinear

from nequip_deq._keys import (
    DEQ_ADJOINT_STATE_KEY,
    DEQ_PENALTY_STEP_KEY,
    DEQ_STATE_KEY,
    DEQ_TOLERANCE_KEY,
)
from nequip_deq.nn.fixed_point.layer import GRADIENTS, SOLVERS, TRAIN_GRADIENTS, DEQEquiformerLayer
from nequip_deq.nn.graph_model import EagerForTrainTimeCompile
from nequip_deq.nn.fixed_point.injection import INJECTIONS
from nequip_deq.nn.fixed_point.variational import VariationalDEQLayer

from .architecture import EquiformerArchitecture, InvalidModelConfig, with_architecture_args

FIXED_POINTS = {"lagrangian": DEQEquiformerLayer, "variational": VariationalDEQLayer}


def check_deq_args(
    num_deq_layers, injection, damping, solver, f_tol, f_max_iter, b_tol, b_max_iter,
    gradient, train_gradient, train_unroll_steps, grad_tol, grad_max_iter, branch_scale,
    norm_eps, fixed_point="lagrangian", jacobian_penalty=False, stiffness=10.0, readout_block=True,
) -> None:
    """Refuse solver settings the model cannot run with, naming the argument and the fix."""
    if not isinstance(num_deq_layers, int) or num_deq_layers < 1:
        raise InvalidModelConfig(
            f"`num_deq_layers={num_deq_layers}`: need an integer >= 1 (1 or 2 is usual)."
        )
    for name, value, allowed in (
        ("fixed_point", fixed_point, FIXED_POINTS),
        ("injection", injection, INJECTIONS),
        ("solver", solver, SOLVERS),
        ("gradient", gradient, GRADIENTS),
        ("train_gradient", train_gradient, TRAIN_GRADIENTS),
    ):
        if value not in allowed:
            raise InvalidModelConfig(f"`{name}={value!r}` is unknown; use one of {list(allowed)}.")
    if fixed_point == "variational":
        for name, value, needed in (
            ("gradient", gradient, "implicit"),
            ("train_gradient", train_gradient, "implicit"),
            ("jacobian_penalty", jacobian_penalty, False),
        ):
            if value != needed:
                raise InvalidModelConfig(
                    f"`fixed_point: variational` with `{name}={value!r}`: the variational DEQ "
                    f"supports `{name}={needed!r}` only (its forces need no adjoint, and its "
                    "training gradient is the Hessian solve)."
                )
    if not isinstance(readout_block, bool):
        raise InvalidModelConfig(f"`readout_block={readout_block!r}` must be true or false.")
    if not stiffness > 0:
        raise InvalidModelConfig(f"`stiffness={stiffness}` must be > 0 (default 10).")
    if not 0.0 < damping <= 1.0:
        raise InvalidModelConfig(
            f"`damping={damping}` must be in (0, 1] (1: plain fixed-point iteration; "
            "0.5-0.8 if the solve oscillates)."
        )
    for name, tol in (("f_tol", f_tol), ("b_tol", b_tol), ("grad_tol", grad_tol)):
        if not 0.0 < tol < 1.0:
            raise InvalidModelConfig(
                f"`{name}={tol}` must be a relative residual tolerance in (0, 1), e.g. 1e-4."
            )
    for name, n in (
        ("f_max_iter", f_max_iter), ("b_max_iter", b_max_iter), ("grad_max_iter", grad_max_iter)
    ):
        if not isinstance(n, int) or n < 2:
            raise InvalidModelConfig(f"`{name}={n}` must be an integer >= 2, e.g. 60.")
    if not isinstance(train_unroll_steps, int) or train_unroll_steps < 0:
        raise InvalidModelConfig(
            f"`train_unroll_steps={train_unroll_steps}` must be an integer >= 0."
        )
    if not norm_eps > 0:
        raise InvalidModelConfig(f"`norm_eps={norm_eps}` must be > 0 (default 0.1).")
    if branch_scale is not None and not branch_scale > 0:
        raise InvalidModelConfig(
            f"`branch_scale={branch_scale}` must be > 0 (e.g. 0.1) or null for none."
        )


@model_builder(compile_wrapper_class=EagerForTrainTimeCompile)
@with_architecture_args
def DEQEquiformerModel(
    fixed_point: str = "lagrangian",
    stiffness: float = 10.0,
    readout_block: bool = True,
    num_deq_layers: int = 1,
    injection: str = "add",
    branch_scale: Optional[float] = 0.1,
    norm_eps: float = 0.1,
    damping: float = 1.0,
    solver: str = "fixed_point_iter",
    f_tol: float = 1e-4,
    f_max_iter: int = 60,
    b_tol: float = 1e-4,
    b_max_iter: int = 60,
    gradient: str = "implicit",
    train_gradient: str = "implicit",
    train_unroll_steps: int = 3,
    grad_tol: float = 1e-6,
    grad_max_iter: int = 80,
    jacobian_penalty: bool = False,
    **kwargs,
):
    """Deep-equilibrium Equiformer: the encoder (embeddings, edge features) runs once, then
    ``num_deq_layers`` weight-tied Equiformer blocks :math:`f(z, x)` are iterated to their fixed
    point :math:`z^* = f(z^*, x)` from :math:`z_0 = 0` (or a given warm start), and the energy is
    read out from :math:`z^*` as in :func:`EquiformerModel` (output block to scalars, MLP,
    per-type scale/shift). Forces and stress are exact derivatives of that energy through the
    fixed point (implicit function theorem, one adjoint solve; see
    :mod:`nequip_deq.nn.fixed_point.layer`), and so is the parameter gradient of a force loss in
    training (``train_gradient: implicit``; :mod:`nequip_deq.nn.fixed_point.training_gradients`).

    ``fixed_point: variational`` makes the fixed point the minimiser of the energy instead
    (:mod:`nequip_deq.nn.fixed_point.variational`): :math:`E = \\Phi(z^*)`, :math:`z^* = \\arg\\min_z
    \\Phi(z, x)`, forces without an adjoint solve, a symmetric fixed-point Jacobian.

    DEQ arguments:

    Args:
        fixed_point (str): ``lagrangian`` (default: energy read out from the fixed point of the
            blocks, forces through an adjoint solve) or ``variational`` (the state minimises
            the energy; no adjoint; eager, or compiled for ``--target ase_deq`` only, and
            ``gradient``/``train_gradient`` ``implicit``, no ``jacobian_penalty``)
        stiffness (float): variational only: :math:`\\kappa`, the weight of the latent
            state's norm in the energy (default 10); the readout's curvature in the state must
            stay below it for the minimum to be unique and the iteration to converge
        readout_block (bool): the energy readout starts with an output block (an Equiformer
            block to ``num_output_features`` scalars, as in :func:`EquiformerModel`; default
            ``True``) or, with ``False``, with a linear map of the state's scalar channels.
            The variational potential runs its readout at every solver iteration and every
            shadow step, so without the block those cost one block less (one block in all)
        num_deq_layers (int): Equiformer blocks inside :math:`f` (default 1)
        injection (str): ``add`` (default; added to :math:`z` and rescaled to the
            injection's norm) or ``concat`` (linear map of :math:`[z, x]`)
        branch_scale (float): initial LayerScale of the residual branches of the blocks in
            :math:`f` (default 0.1; small keeps :math:`f` contractive; ``null``: none)
        norm_eps (float): variance floor of the layer norms inside :math:`f` (default 0.1).
            Their gain is at most :math:`1/\\sqrt{\\epsilon}`; with the usual 1e-5, nearly
            symmetric environments (vanishing ``l > 0`` features, e.g. a crystal) make
            :math:`f` non-contractive and the solve stalls
        damping (float): relaxation :math:`\\beta \\in (0, 1]` of
            :math:`z \\leftarrow z + \\beta (f(z) - z)` (default 1)
        solver (str): training-time forward solver: ``fixed_point_iter`` (default),
            ``anderson`` or ``broyden`` (torchdeq); evaluation and deployed models always use
            the damped fixed-point iteration
        f_tol (float): relative residual tolerance of the forward solve, per frame (1e-4)
        f_max_iter (int): iteration cap of the forward solve (60)
        b_tol (float): relative residual tolerance of the adjoint solve (1e-4)
        b_max_iter (int): iteration cap of the adjoint solve (60)
        gradient (str): ``implicit`` (exact forces, default) or ``phantom`` (K-step phantom
            gradient: forces are not −dE/dx, MD does not conserve energy; comparison only)
        train_gradient (str): how training differentiates the forces w.r.t. the parameters:
            ``implicit`` (default: one backward fixed-point solve, exact to ``grad_tol``,
            no graph recorded per iteration) or ``unroll`` (``train_unroll_steps``
            differentiable refinement iterations; error ~ contraction^K, memory ~ K)
        train_unroll_steps (int): K of ``train_gradient: unroll`` and of the phantom
            gradient (default 3)
        grad_tol (float): relative residual tolerance of the implicit gradient's backward
            solve (default 1e-6; floored at 2e-6 in float32)
        grad_max_iter (int): iteration cap of that solve (default 80)
        jacobian_penalty (bool): output ``deq_jacobian_penalty`` in the training calls that
            ask for it, for the Jacobian-regularisation loss of
            :class:`nequip_deq.train.DEQLightningModule`
    """
    check_deq_args(
        num_deq_layers, injection, damping, solver, f_tol, f_max_iter, b_tol, b_max_iter,
        gradient, train_gradient, train_unroll_steps, grad_tol, grad_max_iter, branch_scale,
        norm_eps, fixed_point, jacobian_penalty, stiffness, readout_block,
    )
    arch = EquiformerArchitecture.from_kwargs("DEQEquiformerModel", kwargs, DEQEquiformerModel.builder_args)
    modules = arch.encoder(
        extra_inputs={
            DEQ_STATE_KEY: arch.irreps,
            DEQ_ADJOINT_STATE_KEY: arch.irreps,
            DEQ_TOLERANCE_KEY: None,
            DEQ_PENALTY_STEP_KEY: None,
        }
    )
    encoded = modules["edge_degree_embed"].irreps_out
    if readout_block:
        to_scalars = arch.output_block(encoded)
    else:
        to_scalars = AtomwiseLinear(irreps_in=encoded, irreps_out=f"{arch.num_output_features}x0e")
    readout = [to_scalars] + list(arch.energy_readout(to_scalars.irreps_out).values())
    variational = {"stiffness": stiffness} if fixed_point == "variational" else {}
    modules["deq"] = FIXED_POINTS[fixed_point](
        **variational,
        num_deq_layers=num_deq_layers,
        block_kwargs=dict(arch.block_kwargs(), branch_scale=branch_scale, norm_eps=norm_eps),
        readout=readout,
        injection=injection,
        damping=damping,
        solver=solver,
        f_tol=f_tol,
        f_max_iter=f_max_iter,
        b_tol=b_tol,
        b_max_iter=b_max_iter,
        gradient=gradient,
        train_gradient=train_gradient,
        train_unroll_steps=train_unroll_steps,
        grad_tol=grad_tol,
        grad_max_iter=grad_max_iter,
        jacobian_penalty=jacobian_penalty,
        force_pass=arch.do_derivatives,
        irreps_in=encoded,
    )
    return arch.energy_model(modules)
