"""Training-only gradients of the DEQ layer: the parameter gradient of a force loss.

Forces come from the Lagrangian (:mod:`~nequip_deq.nn.fixed_point.layer`)

.. math::
    \\mathcal{L}(w, p, \\theta) = R(z) + \\langle v, f(z) - z \\rangle ,\\qquad w = (z, v),

at :math:`w^* = (z^*, v^*)`, as :math:`F = -\\partial_p \\mathcal{L}` with :math:`w` held fixed
(:math:`p`: positions and cell; :math:`\\theta`: parameters). Training differentiates
:math:`F` again, and :math:`w^*` moves with :math:`\\theta`:

.. math::
    \\frac{dF}{d\\theta} = -\\partial_\\theta\\partial_p\\mathcal{L}
        - \\partial_w\\partial_p\\mathcal{L}\\;\\frac{dw^*}{d\\theta}.

:math:`w^*` is the fixed point of

.. math::
    \\Phi(z, v) = \\big(f(z),\\ \\partial_z R(z) + J(z)^\\top v\\big) = w + \\partial_{(v, z)}\\mathcal{L},

so by the implicit function theorem
:math:`dw^*/d\\theta = (I - \\partial_w\\Phi)^{-1}\\partial_\\theta\\Phi`. A loss cotangent
:math:`a` arriving at :math:`w` therefore contributes :math:`u^\\top\\partial_\\theta\\Phi`,
where :math:`u` solves the *backward fixed point*

.. math::
    u = a + (\\partial_w \\Phi)^\\top u,\\qquad
    (\\partial_w \\Phi)^\\top \\begin{pmatrix}\\alpha\\\\ \\beta\\end{pmatrix} =
    \\begin{pmatrix} J^\\top\\alpha + H\\beta \\\\ J\\beta \\end{pmatrix},\\qquad
    H = \\partial_z^2 \\mathcal{L} .

The equation is linear in :math:`u` (solved per frame by GMRES,
:func:`~nequip_deq.nn.fixed_point.solvers.gmres`); the operator is block-triangular with :math:`J` and
:math:`J^\\top` on its diagonal, so it is as well conditioned as the adjoint. One product with
:math:`(\\partial_w\\Phi)^\\top` is one backward pass through the graph of a single application
of :math:`\\Phi` (recorded once per backward solve), whatever the number of iterations: the
memory grows with them only by GMRES's Krylov basis (one vector per iteration).

:class:`ImplicitTrainingGradient` attaches :math:`w^*` to the graph as a function of the
parameters. One trap: the forces must stay the partial derivative :math:`-\\partial_p\\mathcal{L}`
at fixed :math:`w`. The attachment depends on the encoder output :math:`\\hat x` (for the
encoder's parameters), which depends on the positions; the force pass (``create_graph=True``)
would then add :math:`\\partial_w\\mathcal{L}\\, dw^*/dp`, which vanishes at the fixed point, but
whose :math:`\\theta`-derivative does not. So the first backward pass through the attachment,
the force pass (nequip's force output differentiates the energy once, inside the model's
forward; the layer is told at build time whether the model has one, ``force_pass``), passes no
gradient (the exact value, :math:`\\partial_w\\mathcal{L} = 0`), and every later pass, the
parameter gradient, gets the implicit gradient, whatever the grad mode it runs in;
:math:`\\Phi` is rebuilt there on detached geometry, so it carries the parameter dependence
only. That gradient is exact to first order; it is not itself differentiable (a parameter
pass with ``create_graph=True`` warns that second derivatives through the fixed point miss the
solve's dependence on the parameters).

``unroll`` (the alternative, ``train_gradient: unroll``) differentiates ``K`` refinement steps
of both fixed points instead: its error decays like (contraction factor)^K, its memory grows
with K.

**Variational fixed points** (:class:`~nequip_deq.nn.fixed_point.variational.VariationalDEQLayer`). There the
energy is :math:`E = \\Phi(z^*)` at the minimiser of :math:`\\Phi(z, p, \\theta)`, so
:math:`F = -\\partial_p\\Phi` at :math:`z^*` and

.. math::
    \\frac{dF}{d\\theta} = -\\partial_\\theta\\partial_p\\Phi - \\partial_z\\partial_p\\Phi\\;
        \\frac{dz^*}{d\\theta},\\qquad
    \\frac{dz^*}{d\\theta} = -H^{-1}\\,\\partial_\\theta\\nabla_z\\Phi,\\qquad
    H = \\nabla_z^2\\Phi ,

from :math:`\\nabla_z\\Phi(z^*) = 0`. A cotangent :math:`a` arriving at :math:`z` contributes
:math:`-u^\\top\\partial_\\theta\\nabla_z\\Phi` with :math:`H u = a`: one linear solve with the
*symmetric* Hessian, positive definite at a minimum, by conjugate gradients
(:func:`~nequip_deq.nn.fixed_point.solvers.conjugate_gradient`; one Hessian-vector product is one double
backward pass through a recorded :math:`\\nabla_z\\Phi`). The attachment is the same
:class:`ImplicitTrainingGradient` (the force pass passes nothing: :math:`\\nabla_z\\Phi = 0`).
"""

import warnings
from typing import Callable, List, Optional, Tuple

import torch

from nequip.data import AtomicDataDict

from .solvers import check_solution, conjugate_gradient, gmres


class ImplicitTrainingGradient(torch.autograd.Function):
    """Identity on :math:`(z^*, v^*)` whose backward is the implicit gradient (module
    docstring). Inputs: ``solve`` (a closure mapping the cotangents of :math:`z, v` to the
    gradients of ``inputs``), ``force_passes`` (how many of the first backward passes are
    force passes, which get nothing: 1 in a model with a force output, else 0), :math:`z^*`,
    :math:`v^*` (detached) and the tensors the gradient flows to (:math:`\\hat x` and the
    layer's parameters)."""

    @staticmethod
    def forward(ctx, solve: Callable, force_passes: int, z: torch.Tensor, v: torch.Tensor, *inputs: torch.Tensor):
        ctx.solve = solve
        ctx.force_passes_left = force_passes
        ctx.num_inputs = len(inputs)
        return z.clone(), v.clone()

    @staticmethod
    def backward(ctx, grad_z: Optional[torch.Tensor], grad_v: Optional[torch.Tensor]):
        none = (None, None, None, None)
        if ctx.force_passes_left > 0:
            # the force pass: dL/dw = 0 at the fixed point; passing it on would only plant a
            # wrong second-order term (module docstring)
            ctx.force_passes_left -= 1
            return none + (None,) * ctx.num_inputs
        if torch.is_grad_enabled():
            warnings.warn(
                "a parameter gradient with create_graph=True through a DEQ's fixed point: its "
                "first derivatives are exact, but they are not differentiable again (second "
                "derivatives miss the fixed point's dependence on the parameters)."
            )
        return none + tuple(ctx.solve(grad_z, grad_v))


def attach_implicit_gradient(
    layer,
    data: AtomicDataDict.Type,
    x_hat: torch.Tensor,
    z_star: torch.Tensor,
    v_star: torch.Tensor,
    batch: torch.Tensor,
    num_frames: int,
    tol: float,
    max_iter: int,
    statistics: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:math:`(z^*, v^*)` as functions of the parameters and :math:`\\hat x` (through
    :class:`ImplicitTrainingGradient`). ``layer`` is the DEQ layer (``f``, ``energy``,
    ``edge_weights``, ``force_pass``); the backward solve writes its iterations and residual
    per frame into ``statistics`` ``(num_frames, 2)`` when it runs."""
    params = [p for p in layer.parameters() if p.requires_grad]
    geometry = {k: v.detach() for k, v in data.items()}
    x_fixed = x_hat.detach()
    z_fixed, v_fixed = z_star.detach(), v_star.detach()

    def solve(grad_z: Optional[torch.Tensor], grad_v: Optional[torch.Tensor]):
        a = torch.cat(
            [
                grad_z if grad_z is not None else torch.zeros_like(z_fixed),
                grad_v if grad_v is not None else torch.zeros_like(v_fixed),
            ],
            dim=-1,
        )
        grads, iters, res = backward_solve(
            layer, geometry, x_fixed, params, z_fixed, v_fixed, a, batch, num_frames, tol,
            max_iter,
        )
        record_statistics(statistics, iters, res)
        return grads

    return ImplicitTrainingGradient.apply(solve, int(layer.force_pass), z_fixed, v_fixed, x_hat, *params)


def record_statistics(statistics: torch.Tensor, iters: torch.Tensor, res: torch.Tensor) -> None:
    """Write a backward solve's iterations and residuals ``(num_frames,)`` into the call's
    ``statistics`` output ``(num_frames, 2)`` (a tensor outside autograd, filled in place)."""
    statistics[:, 0] = iters.to(statistics.dtype)
    statistics[:, 1] = res.detach().to(statistics.dtype)


def backward_solve(
    layer,
    data: AtomicDataDict.Type,
    x_hat: torch.Tensor,
    params: List[torch.Tensor],
    z_star: torch.Tensor,
    v_star: torch.Tensor,
    a: torch.Tensor,
    batch: torch.Tensor,
    num_frames: int,
    tol: float,
    max_iter: int,
) -> Tuple[List[Optional[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Solve :math:`u = a + (\\partial_w\\Phi)^\\top u` per frame by GMRES (``a``, ``u``:
    ``(N, 2X)``, the cotangents of :math:`(z, v)` side by side) and return
    :math:`u^\\top \\partial\\Phi/\\partial(\\hat x, \\theta)` for ``[x_hat] + params``, with
    the iterations and last relative residual per frame."""
    width = z_star.shape[-1]
    with torch.enable_grad():
        z = z_star.clone().requires_grad_(True)
        v = v_star.clone().requires_grad_(True)
        x = x_hat.clone().requires_grad_(True)
        weights = layer.edge_weights(data)
        fz = layer.f(z, data, x, weights)
        e = layer.energy(z, data).sum()
        # the adjoint map dR/dz + J^T v, recorded so that it can be differentiated again
        phi_v = torch.autograd.grad([e, fz], [z], [None, v], create_graph=True)[0]

    def operator(u: torch.Tensor) -> torch.Tensor:
        # (I - dPhi/dw^T) u: one backward pass through the recorded application of Phi
        gz, gv = torch.autograd.grad(
            [fz, phi_v], [z, v], [u[:, :width], u[:, width:]], retain_graph=True,
            allow_unused=True,
        )
        return u - torch.cat([gz, gv if gv is not None else torch.zeros_like(gz)], dim=-1)

    u, iters, res = gmres(operator, a, torch.zeros_like(a), batch, num_frames, tol, max_iter)
    check_solution("implicit-gradient backward solve", u, iters, res, tol)
    grads = torch.autograd.grad(
        [fz, phi_v], [x] + params, [u[:, :width], u[:, width:]], allow_unused=True
    )
    return list(grads), iters, res


def attach_minimiser_gradient(
    layer,
    data: AtomicDataDict.Type,
    x_hat: torch.Tensor,
    z_star: torch.Tensor,
    batch: torch.Tensor,
    num_frames: int,
    tol: float,
    max_iter: int,
    statistics: torch.Tensor,
) -> torch.Tensor:
    """:math:`z^*` of a variational layer (``potential``, ``edge_weights``, ``force_pass``) as a function of
    the parameters and :math:`\\hat x`, with the Hessian solve of the module docstring in its
    backward; the solve writes its statistics into ``statistics`` as
    :func:`attach_implicit_gradient`'s does."""
    params = [p for p in layer.parameters() if p.requires_grad]
    geometry = {k: v.detach() for k, v in data.items()}
    x_fixed, z_fixed = x_hat.detach(), z_star.detach()

    def solve(grad_z: Optional[torch.Tensor], grad_v: Optional[torch.Tensor]):
        if grad_z is None:
            return [None] * (1 + len(params))
        with torch.enable_grad():
            z = z_fixed.clone().requires_grad_(True)
            x = x_fixed.clone().requires_grad_(True)
            phi = layer.potential(z, geometry, x, layer.edge_weights(geometry)).sum()
            gradient = torch.autograd.grad([phi], [z], create_graph=True)[0]

        def hessian_product(u: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad([gradient], [z], [u], retain_graph=True)[0]

        u, iters, res = conjugate_gradient(hessian_product, grad_z, batch, num_frames, tol, max_iter)
        check_solution("implicit-gradient Hessian solve", u, iters, res, tol)
        record_statistics(statistics, iters, res)
        return list(torch.autograd.grad([gradient], [x] + params, [-u], allow_unused=True))

    z, _ = ImplicitTrainingGradient.apply(
        solve, int(layer.force_pass), z_fixed, torch.zeros_like(z_fixed), x_hat, *params
    )
    return z


def unroll(
    layer,
    z: torch.Tensor,
    v: torch.Tensor,
    data: AtomicDataDict.Type,
    x_hat: torch.Tensor,
    weights: List[torch.Tensor],
    steps: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``steps`` differentiable iterations of both fixed points from :math:`(z^*, v^*)`:
    their derivatives w.r.t. parameters and positions approximate those of the exact fixed
    points (error ~ contraction factor^steps)."""
    for _ in range(steps):
        z = layer.f(z, data, x_hat, weights)
    for _ in range(steps):
        fz = layer.f(z, data, x_hat, weights)
        e = layer.energy(z, data).sum()
        # d/dz (R(z) + <v, f(z)>) = dR/dz + J^T v
        v = torch.autograd.grad([e, fz], [z], [torch.ones_like(e), v], create_graph=True)[0]
    return z, v


def jacobian_penalty(
    layer,
    data: AtomicDataDict.Type,
    x_hat: torch.Tensor,
    weights: List[torch.Tensor],
    z_star: torch.Tensor,
) -> torch.Tensor:
    """torchdeq's Hutchinson estimate of :math:`\\|\\partial f/\\partial z\\|_F^2 / \\dim z` at
    :math:`z^*`, with its graph (for a Jacobian-regularisation loss)."""
    from torchdeq.loss import jac_reg

    z = z_star.detach().requires_grad_(True)
    return jac_reg(layer.f(z, data, x_hat, weights), z)

