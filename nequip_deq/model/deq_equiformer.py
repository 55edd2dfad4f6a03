"""``DEQEquiformerModel``: a deep-equilibrium Equiformer with exact forces."""

from typing import Dict, Optional, Sequence, Union

from nequip.model import model_builder
from nequip.model.energy_modules import _append_energy_modules
from nequip.nn import ForceStressOutput, SequentialGraphNetwork

from nequip_deq._compile_targets import set_state_width
from nequip_deq._keys import DEQ_ADJOINT_STATE_KEY, DEQ_STATE_KEY
from nequip_deq.nn import EquiformerBlock
from nequip_deq.nn.fixed_point import GRADIENTS, SOLVERS, DEQEquiformerLayer
from nequip_deq.nn.injection import INJECTIONS

from .equiformer import (
    InvalidModelConfig,
    check_equiformer_args,
    default_node_irreps,
    energy_readout,
    equiformer_encoder,
    parse_irreps,
)


def check_deq_args(
    num_deq_layers, injection, damping, solver, f_tol, f_max_iter, b_tol, b_max_iter,
    gradient, train_unroll_steps, branch_scale, norm_eps,
) -> None:
    """Refuse solver settings the model cannot run with, naming the argument and the fix."""
    if not isinstance(num_deq_layers, int) or num_deq_layers < 1:
        raise InvalidModelConfig(
            f"`num_deq_layers={num_deq_layers}`: need an integer >= 1 (1 or 2 is usual)."
        )
    for name, value, allowed in (
        ("injection", injection, INJECTIONS),
        ("solver", solver, SOLVERS),
        ("gradient", gradient, GRADIENTS),
    ):
        if value not in allowed:
            raise InvalidModelConfig(f"`{name}={value!r}` is unknown; use one of {list(allowed)}.")
    if not 0.0 < damping <= 1.0:
        raise InvalidModelConfig(
            f"`damping={damping}` must be in (0, 1] (1: plain fixed-point iteration; "
            "0.5-0.8 if the solve oscillates)."
        )
    for name, tol in (("f_tol", f_tol), ("b_tol", b_tol)):
        if not 0.0 < tol < 1.0:
            raise InvalidModelConfig(
                f"`{name}={tol}` must be a relative residual tolerance in (0, 1), e.g. 1e-4."
            )
    for name, n in (("f_max_iter", f_max_iter), ("b_max_iter", b_max_iter)):
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


@model_builder
def DEQEquiformerModel(
    r_max: float,
    type_names: Sequence[str],
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
    train_unroll_steps: int = 3,
    jacobian_penalty: bool = False,
    l_max: int = 2,
    parity: bool = True,
    irreps_node_features: Optional[str] = None,
    num_heads: int = 4,
    attention_type: str = "mlp",
    nonlinear_messages: bool = True,
    alpha_channels: int = 0,
    ffn_multiplier: int = 3,
    num_output_features: int = 512,
    radial_basis: str = "gaussian",
    num_basis: int = 32,
    polynomial_cutoff_p: float = 6.0,
    radial_mlp_depth: int = 2,
    radial_mlp_width: int = 64,
    readout_mlp_width: Optional[int] = None,
    avg_num_neighbors: Optional[float] = None,
    per_type_energy_scales: Optional[Union[float, Sequence[float]]] = None,
    per_type_energy_shifts: Optional[Union[float, Sequence[float]]] = None,
    per_type_energy_scales_trainable: bool = False,
    per_type_energy_shifts_trainable: bool = False,
    pair_potential: Optional[Dict] = None,
    do_derivatives: bool = True,
):
    """Deep-equilibrium Equiformer: the encoder (embeddings, edge features) runs once, then
    ``num_deq_layers`` weight-tied Equiformer blocks :math:`f(z, x)` are iterated to their fixed
    point :math:`z^* = f(z^*, x)` from :math:`z_0 = 0` (or a given warm start), and the energy is
    read out from :math:`z^*` as in :func:`EquiformerModel` (output block to scalars, MLP,
    per-type scale/shift). Forces and stress are exact derivatives of that energy through the
    fixed point (implicit function theorem, one adjoint solve; see
    :mod:`nequip_deq.nn.fixed_point`).

    DEQ arguments (the others are those of :func:`EquiformerModel`, without ``num_layers``):

    Args:
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
        train_unroll_steps (int): differentiable refinement iterations in training, which make
            the parameter gradient of the force loss accurate (``implicit``), or the K of the
            phantom gradient (default 3)
        jacobian_penalty (bool): output ``deq_jacobian_penalty`` in training, for the
            Jacobian-regularisation loss of :class:`nequip_deq.train.DEQLightningModule`
    """
    check_deq_args(
        num_deq_layers, injection, damping, solver, f_tol, f_max_iter, b_tol, b_max_iter,
        gradient, train_unroll_steps, branch_scale, norm_eps,
    )
    irreps = parse_irreps(
        "irreps_node_features",
        irreps_node_features if irreps_node_features is not None else default_node_irreps(parity),
    )
    check_equiformer_args(
        1, l_max, parity, irreps, num_heads, attention_type, radial_basis, avg_num_neighbors
    )
    if num_output_features < 1:
        raise InvalidModelConfig(f"`num_output_features={num_output_features}` must be >= 1.")

    modules = equiformer_encoder(
        r_max, type_names, irreps, l_max, parity, radial_basis, num_basis,
        polynomial_cutoff_p, radial_mlp_depth, radial_mlp_width, avg_num_neighbors,
        extra_inputs={DEQ_STATE_KEY: irreps, DEQ_ADJOINT_STATE_KEY: irreps},
    )
    encoded = modules["edge_degree_embed"].irreps_out
    block_kwargs = dict(
        num_heads=num_heads,
        attention_type=attention_type,
        nonlinear_messages=nonlinear_messages,
        alpha_channels=alpha_channels,
        radial_mlp_depth=radial_mlp_depth,
        radial_mlp_width=radial_mlp_width,
        ffn_multiplier=ffn_multiplier,
    )
    output_block = EquiformerBlock(
        irreps_out=f"{num_output_features}x0e", output_norm=True, irreps_in=encoded, **block_kwargs
    )
    readout = [output_block] + list(
        energy_readout(
            type_names,
            output_block.irreps_out,
            readout_mlp_width or num_output_features,
            per_type_energy_scales,
            per_type_energy_shifts,
            per_type_energy_scales_trainable,
            per_type_energy_shifts_trainable,
        ).values()
    )
    modules["deq"] = DEQEquiformerLayer(
        num_deq_layers=num_deq_layers,
        block_kwargs=dict(block_kwargs, branch_scale=branch_scale, norm_eps=norm_eps),
        readout=readout,
        injection=injection,
        damping=damping,
        solver=solver,
        f_tol=f_tol,
        f_max_iter=f_max_iter,
        b_tol=b_tol,
        b_max_iter=b_max_iter,
        gradient=gradient,
        train_unroll_steps=train_unroll_steps,
        jacobian_penalty=jacobian_penalty,
        irreps_in=encoded,
    )
    set_state_width(irreps.dim)
    energy_model = _append_energy_modules(
        SequentialGraphNetwork(modules), type_names=type_names, pair_potential=pair_potential
    )
    return ForceStressOutput(energy_model, do_derivatives)
