"""Fixed-point solvers of the DEQ layer, per frame.

Every solve here is the damped iteration

.. math::
    s \\leftarrow s + \\beta\\,(T(s) - s)

of a map :math:`T` (the DEQ function :math:`f(\\cdot, x)` for the forward solve,
:math:`v \\mapsto \\partial R/\\partial z + J^\\top v` for the adjoint, see
:mod:`~nequip_deq.nn.fixed_point.layer`), where every frame of a batch stops updating once its own
relative residual (:func:`frame_residual`: the largest per-atom change over the frame's
root-mean-square norm) is below the tolerance. A frame therefore gives the same result alone
or in a batch, and every atom of a large system meets the tolerance.

The loop exists in three forms, one per way the model runs:

- a Python loop (eager and TorchScript): :meth:`FixedPointSolvers._iterate`,
  :meth:`FixedPointSolvers._adjoint`;
- ``torch.while_loop`` when nequip-compile traces the model for AOTInductor, so that compiled
  models also stop at the tolerance and profit from a warm start:
  :meth:`FixedPointSolvers._iterate_traced`, :meth:`FixedPointSolvers._adjoint_traced`;
- torchdeq's ``anderson`` / ``broyden`` for the training-time forward solve
  (:meth:`FixedPointSolvers._solve_torchdeq`).

The adjoint equation and the implicit gradient's backward equation are *linear*,
:math:`(I - M)\\,u = b`. In training (eager) they are solved by :func:`gmres` per frame, which
needs about a third of the operator applications of the plain iteration for the same
residual (7 against 21 at 1e-5 on a trained quickstart model); evaluation and deployed models
keep the plain iteration, which runs the same in eager, TorchScript and traced models.
"""

import warnings
from typing import Callable, List, Optional, Tuple

import torch

from nequip.data import AtomicDataDict
from nequip.nn import scatter


class FixedPointError(RuntimeError):
    """A fixed-point, adjoint or backward solve produced non-finite values."""


def frame_residual(
    new: torch.Tensor, old: torch.Tensor, batch: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Relative change per frame, measured at its worst atom:

    .. math::
        r = \\max_i \\|new_i - old_i\\| \\,/\\, \\big(\\tfrac{1}{n}\\textstyle\\sum_i
            \\|new_i\\|^2\\big)^{1/2}

    over the frame's ``n`` atoms ``i``: the largest per-atom change relative to the frame's
    root-mean-square feature norm. Unlike the frame norm :math:`\\|new - old\\|_F/\\|new\\|_F`,
    which divides one atom's error by :math:`\\sqrt{n}`, it does not loosen with system size:
    below the tolerance, *every* atom of a large box is. ``new``, ``old`` ``(N, X)``,
    ``batch`` ``(N,)`` -> ``(num_frames,)``."""
    change = (new - old).square().sum(-1).sqrt()
    worst = torch.zeros(num_frames, dtype=new.dtype, device=new.device).scatter_reduce(
        0, batch, change, reduce="amax", include_self=False
    )
    atoms = scatter(torch.ones_like(change), batch, dim=0, dim_size=num_frames)
    mean_square = scatter(new.square().sum(-1), batch, dim=0, dim_size=num_frames) / atoms.clamp_min(1.0)
    return worst / (mean_square.sqrt() + 1e-30)


def damped_step(
    s: torch.Tensor,
    t: torch.Tensor,
    iters: torch.Tensor,
    res: torch.Tensor,
    active: torch.Tensor,
    batch: torch.Tensor,
    num_frames: int,
    tol: float,
    damping: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update :math:`s \\leftarrow s + \\beta (t - s)` of the frames still ``active``
    (``t = T(s)``); returns the new ``(s, iters, res, active)``. A frame stays active while
    its residual is above ``tol`` (a NaN residual counts as not converged)."""
    r = frame_residual(t, s, batch, num_frames)
    s = torch.where(active[batch].unsqueeze(-1), s + damping * (t - s), s)
    res = torch.where(active, r, res)
    iters = iters + active.long()
    active = active & ~(r <= tol)
    return s, iters, res, active


def solver_start(
    num_frames: int, like: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration counts (zeros), residuals (inf) and active flags (all) per frame."""
    iters = torch.zeros(num_frames, dtype=torch.long, device=like.device)
    res = torch.full((num_frames,), float("inf"), dtype=like.dtype, device=like.device)
    active = torch.ones(num_frames, dtype=torch.bool, device=like.device)
    return iters, res, active


TF32_TOLERANCE_FLOOR = 1e-3


def tolerance_floor(dtype: torch.dtype) -> float:
    """The smallest relative residual a solve in ``dtype`` can reliably reach: float32
    cannot resolve residuals much below 1e-6, so its tolerances are raised to 2e-6; with TF32
    matrix products (``nequip-compile --tf32``, nequip's TF32 scheduler: 10-bit mantissas,
    relative rounding ~5e-4) to 1e-3. Read when the model runs (eager) or is traced
    (compiled: the TF32 setting of the compile is the model's)."""
    if dtype != torch.float32:
        return 0.0
    if not torch.jit.is_scripting():
        if _tf32_matmuls():
            return TF32_TOLERANCE_FLOOR
    return 2e-6


@torch.jit.unused
def _tf32_matmuls() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


@torch.jit.unused
def check_solution(
    what: str, s: torch.Tensor, iters: torch.Tensor, res: torch.Tensor, tol: float
) -> None:
    """Raise on non-finite solutions, warn when a frame ended above the tolerance (a number,
    or one per frame)."""
    if not bool(torch.isfinite(s).all()):
        raise FixedPointError(
            f"DEQ {what} produced non-finite values after {iters.tolist()} iterations (last "
            f"relative residuals {res.tolist()}). Lower `damping`, the learning rate or "
            "`branch_scale`, or add `jacobian_penalty`."
        )
    if not bool((res <= tol).all()):
        tol = tol.tolist() if torch.is_tensor(tol) else f"{tol:g}"
        warnings.warn(
            f"DEQ {what} did not reach the tolerance {tol}: relative residuals "
            f"{res.tolist()} after {iters.tolist()} iterations; results carry that error "
            "(raise the iteration cap, lower `damping`, or loosen the tolerance)."
        )


@torch.jit.unused
def frame_products(batch: torch.Tensor, num_frames: int) -> Tuple[Callable, Callable]:
    """The per-frame inner product :math:`\\langle p, q\\rangle` ``(num_frames,)`` of states
    ``(N, D)`` and the broadcast of a per-frame number to the frame's atoms ``(N, 1)``, for
    the Krylov solvers."""

    def dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return scatter((p * q).sum(-1), batch, dim=0, dim_size=num_frames)

    def per_atom(t: torch.Tensor) -> torch.Tensor:
        return t[batch].unsqueeze(-1)

    return dot, per_atom


@torch.jit.unused
def gmres(
    apply_operator: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    batch: torch.Tensor,
    num_frames: int,
    tol: float,
    max_iter: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve :math:`A x = b` for every frame (``b``, ``x0``: ``(N, D)``; ``apply_operator``:
    :math:`x \\mapsto A x`, block-diagonal over frames) by GMRES without restarts: the Krylov
    basis and the least-squares problem :math:`\\min_y \\|\\beta e_1 - \\bar H y\\|` are kept
    per frame (inner products are sums over each frame's atoms), so each frame converges as if
    it were solved alone. The least-squares problem is kept triangular by Givens rotations,
    :math:`Q \\bar H = R`, :math:`g = Q \\beta e_1`: its residual is :math:`|g_{j+1}|` and
    :math:`y = R^{-1} g` by back substitution. A frame whose right-hand side is zero, or whose
    Krylov space stops growing (a breakdown: its solution is then exact), gets zero columns;
    their diagonal entries are taken as 1, which leaves the solution of that frame as it was
    instead of dividing by zero. Stops when every frame's relative residual
    :math:`\\|b - A x\\| / \\|x\\|` (frame norms: the residual GMRES minimises and knows
    without an extra operator application; training solves only) is at most ``tol``, or after
    ``max_iter`` operator applications.

    Returns ``x``, the applications after which each frame reached ``tol`` (``max_iter`` if it
    did not) and each frame's final relative residual."""

    dot, per_atom = frame_products(batch, num_frames)

    r0 = b - apply_operator(x0) if bool((x0 != 0).any()) else b
    beta = dot(r0, r0).sqrt()
    basis = [r0 / per_atom(beta.clamp_min(1e-30))]
    x0_norm2 = dot(x0, x0)
    x0_basis = [dot(x0, basis[0])]  # <x0, V_i>, for |x| = |x0 + V y|
    triangle = b.new_zeros(num_frames, max_iter, max_iter)  # R, column by column
    rotations = []  # (cos, sin) per frame, one pair per column
    g = b.new_zeros(num_frames, max_iter + 1)
    g[:, 0] = beta
    iters = torch.full((num_frames,), max_iter, dtype=torch.long, device=b.device)
    done = beta == 0
    iters = torch.where(done, torch.zeros_like(iters), iters)
    y = b.new_zeros(num_frames, 0)
    res = torch.zeros(num_frames, dtype=b.dtype, device=b.device)
    for j in range(max_iter):
        w = apply_operator(basis[j])
        column = []
        for i in range(j + 1):  # modified Gram-Schmidt, per frame
            h = dot(w, basis[i])
            column.append(h)
            w = w - per_atom(h) * basis[i]
        below = dot(w, w).sqrt()
        basis.append(w / per_atom(below.clamp_min(1e-30)))
        x0_basis.append(dot(x0, basis[-1]))
        for i, (c, s) in enumerate(rotations):  # the earlier rotations, on the new column
            column[i], column[i + 1] = c * column[i] + s * column[i + 1], c * column[i + 1] - s * column[i]
        c, s, column[j] = _givens(column[j], below)
        rotations.append((c, s))
        g[:, j + 1] = -s * g[:, j]
        g[:, j] = c * g[:, j]
        triangle[:, : j + 1, j] = torch.stack(column, -1)
        r = triangle[:, : j + 1, : j + 1]
        diagonal = r.diagonal(dim1=-2, dim2=-1)
        r = r + torch.diag_embed((diagonal == 0).to(r.dtype))  # zero columns: keep y as it was
        y = torch.linalg.solve_triangular(r, g[:, : j + 1, None], upper=True).squeeze(-1)
        x_norm2 = x0_norm2 + 2 * (torch.stack(x0_basis[: j + 1], -1) * y).sum(-1) + y.square().sum(-1)
        res = g[:, j + 1].abs() / x_norm2.clamp_min(0).sqrt().clamp_min(1e-30)
        res = torch.where(beta == 0, torch.zeros_like(res), res)
        newly = ~done & (res <= tol)
        iters = torch.where(newly, torch.full_like(iters, j + 1), iters)
        done = done | newly
        if bool(done.all()):
            break
    x = x0
    for i in range(y.shape[1]):
        x = x + per_atom(y[:, i]) * basis[i]
    return x, iters, res


def _givens(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame, the rotation :math:`(c, s)` with :math:`c a + s b = r`, :math:`c b - s a = 0`,
    and :math:`r = \\sqrt{a^2 + b^2}`; the identity where both are zero."""
    r = torch.hypot(a, b)
    zero = r == 0
    safe = torch.where(zero, torch.ones_like(r), r)
    c = torch.where(zero, torch.ones_like(r), a / safe)
    s = torch.where(zero, torch.zeros_like(r), b / safe)
    return c, s, r


@torch.jit.unused
def conjugate_gradient(
    apply_operator: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    batch: torch.Tensor,
    num_frames: int,
    tol: float,
    max_iter: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve :math:`A x = b` for a symmetric positive-definite :math:`A` (block-diagonal over
    frames; ``apply_operator``: :math:`x \\mapsto A x`) by conjugate gradients from
    :math:`x = 0`, every frame with its own step sizes (inner products are sums over the
    frame's atoms), so each frame converges as if it were solved alone. A frame stops updating
    once its relative residual :math:`\\|b - A x\\| / \\|b\\|` is at most ``tol`` (a zero
    right-hand side is solved at once). ``b`` ``(N, D)``.

    Returns ``x``, the operator applications after which each frame reached ``tol``
    (``max_iter`` if it did not) and each frame's final relative residual. A direction of
    non-positive curvature (the operator is not positive definite there) stops that frame
    with a non-finite residual, which :func:`check_solution` reports."""

    dot, per_atom = frame_products(batch, num_frames)

    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    b_norm = dot(b, b).sqrt()
    rr = dot(r, r)
    res = rr.sqrt() / b_norm.clamp_min(1e-300)
    res = torch.where(b_norm == 0, torch.zeros_like(res), res)
    active = res > tol
    iters = torch.zeros(num_frames, dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = apply_operator(p)
        curvature = dot(p, ap)
        alpha = torch.where(active & (curvature > 0), rr / curvature.clamp_min(1e-300), torch.zeros_like(rr))
        x = x + per_atom(alpha) * p
        r = r - per_atom(alpha) * ap
        rr_new = dot(r, r)
        iters = iters + active.long()
        res = torch.where(active, rr_new.sqrt() / b_norm.clamp_min(1e-300), res)
        res = torch.where(active & ~(curvature > 0), torch.full_like(res, float("nan")), res)
        beta = rr_new / rr.clamp_min(1e-300)
        p = torch.where(per_atom(active), r + per_atom(beta) * p, p)
        rr = torch.where(active, rr_new, rr)
        active = active & (res > tol)
    return x, iters, res


@torch.jit.unused
def _while(step: Callable, state, max_trips: int):
    """``state = (s, iters, res, active) <- step(*state)`` as a ``torch.while_loop`` (exportable:
    a compiled model stops at the tolerance) until no frame is active or after ``max_trips``
    trips; returns ``(s, iters, res)``.

    The loop counts down from a tensor made outside it: a Python number read by the loop's
    condition is traced as a constant once and as an input once when two loops with different
    caps share this code, and nequip-compile's two traces of a model must agree."""

    def cond(left, s, iters, res, active):
        return (left > 0) & active.any()

    def body(left, s, iters, res, active):
        return (left - 1,) + tuple(step(s, iters, res, active))

    left = torch.full((), max_trips, dtype=torch.long, device=state[0].device)
    _, s, iters, res, _ = torch.while_loop(cond, body, (left,) + tuple(state))
    return s, iters, res


class FixedPointSolvers:
    """The forward and adjoint solves of :class:`~nequip_deq.nn.fixed_point.layer.DEQEquiformerLayer`
    (a mixin: it uses the layer's ``f``, ``energy``, ``damping``, ``f_max_iter`` and
    ``b_max_iter``).

    Shapes: states ``(N, X)``, ``batch`` ``(N,)``; every solver returns the solution, the
    iterations ``(num_frames,)`` and the last relative residual ``(num_frames,)`` per frame.
    ``weights`` are the blocks' precomputed radial weights
    (:meth:`~nequip_deq.nn.fixed_point.layer.DEQEquiformerLayer.edge_weights`).
    """

    # ---- Python loops (eager and TorchScript) ----------------------------------------

    def _iterate(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward solve :math:`z = f(z, x)` from ``z``."""
        iters, res, active = solver_start(num_frames, z)
        with torch.no_grad():
            for _ in range(self.f_max_iter):
                fz = self.f(z, data, x_hat, weights)
                z, iters, res, active = damped_step(
                    z, fz, iters, res, active, batch, num_frames, tol, self.damping
                )
                if not bool(active.any()):
                    break
        return z, iters, res

    def _adjoint(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z_star: torch.Tensor,
        v: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adjoint solve :math:`v = g + J^\\top v` from ``v``, with
        :math:`g = \\partial R/\\partial z` and :math:`J = \\partial f/\\partial z` at
        :math:`z^*` (vector-Jacobian products by autograd on one recorded :math:`f(z^*)`).
        Needs grad mode (the caller enables it). Also returns that recorded :math:`f(z^*)`,
        whose graph reaches the geometry: the Lagrangian reuses it instead of applying
        :math:`f` once more."""
        z = z_star.detach().requires_grad_(True)
        e = self.energy(z, data).sum()
        g_opt = torch.autograd.grad([e], [z])[0]
        assert g_opt is not None
        g = g_opt.detach()
        fz = self.f(z, data, x_hat, weights)
        iters, res, active = solver_start(num_frames, z)
        for _ in range(self.b_max_iter):
            grad_out: List[Optional[torch.Tensor]] = [v]
            jtv = torch.autograd.grad([fz], [z], grad_out, retain_graph=True)[0]
            assert jtv is not None
            v, iters, res, active = damped_step(
                v, g + jtv.detach(), iters, res, active, batch, num_frames, tol, self.damping
            )
            if not bool(active.any()):
                break
        return v.detach(), iters, res, fz

    @torch.jit.unused
    def _adjoint_eager(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z_star: torch.Tensor,
        v0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adjoint solve of an eager call: :meth:`_adjoint` in evaluation (the
        iteration of TorchScript and compiled models), :func:`gmres` on
        :math:`(I - J^\\top) v = g` in training. Runs in grad mode (eager callers may be under
        ``no_grad``). Returns the solution, iterations, residuals and the recorded
        :math:`f(z^*)`."""
        if not self.training:
            with torch.enable_grad():
                v, iters, res, fz = self._adjoint(
                    data, x_hat, weights, z_star, v0, batch, num_frames, tol
                )
        else:
            with torch.enable_grad():
                z = z_star.detach().requires_grad_(True)
                g = torch.autograd.grad(self.energy(z, data).sum(), z)[0].detach()
                fz = self.f(z, data, x_hat, weights)

            def operator(v: torch.Tensor) -> torch.Tensor:
                return v - torch.autograd.grad(fz, z, v, retain_graph=True)[0]

            v, iters, res = gmres(operator, g, v0, batch, num_frames, tol, self.b_max_iter)
        return v.detach(), iters, res, fz

    # ---- torch.while_loop (traced for AOTInductor) ------------------------------------

    @torch.jit.unused
    def _loop_data(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """The fields the blocks read, with ``edge_index`` re-made from clones of its rows:
        a ``torch.while_loop`` body must not capture the graph input itself."""
        d = {k: data[k] for k in (AtomicDataDict.EDGE_ATTRS_KEY, AtomicDataDict.EDGE_CUTOFF_KEY)}
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        d[AtomicDataDict.EDGE_INDEX_KEY] = torch.stack(
            [edge_index[0].clone(), edge_index[1].clone()]
        )
        return d

    @torch.jit.unused
    def _iterate_traced(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self._loop_data(data)
        batch = batch.clone()
        max_iter, damping = self.f_max_iter, self.damping

        def step(z, iters, res, active):  # one iteration per trip: max_iter trips at most
            return damped_step(
                z, self.f(z, d, x_hat, weights), iters, res, active, batch, num_frames, tol, damping
            )

        iters, res, active = solver_start(num_frames, z0)
        with torch.no_grad():
            z, iters, res = _while(step, (z0, iters, res, active), max_iter)
        return z, iters, res

    @torch.jit.unused
    def _adjoint_traced(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z_star: torch.Tensor,
        v0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_adjoint` for AOTInductor. A ``torch.while_loop`` body cannot use a graph
        recorded outside it, so every iteration records :math:`f(z^*)` anew for its product
        (products unrolled before the loop on one shared recording returned wrong solutions
        from AOTInductor when the loop then made no trip: tried and reverted)."""
        z_star = z_star.detach()
        with torch.enable_grad():
            z = z_star.requires_grad_(True)
            g = torch.autograd.grad(self.energy(z, data).sum(), z)[0]
        d = self._loop_data(data)
        g = g.detach()
        z_star = z_star.detach().clone()
        batch = batch.clone()
        damping = self.damping

        def step(v, iters, res, active):
            _, vjp = torch.func.vjp(lambda zz: self.f(zz, d, x_hat, weights), z_star)
            return damped_step(v, g + vjp(v)[0], iters, res, active, batch, num_frames, tol, damping)

        iters, res, active = solver_start(num_frames, v0)
        with torch.no_grad():
            return _while(step, (v0, iters, res, active), self.b_max_iter)

    # ---- torchdeq (training-time forward solve) ----------------------------------------

    @torch.jit.unused
    def _solve_torchdeq(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """torchdeq's ``anderson`` / ``broyden`` on frames packed as
        ``(num_frames, max_atoms*X)`` (zero padding), so that its per-sample mixing and
        residuals are per frame. ``tol``: a number, or per frame ``(num_frames,)`` (the
        ``deq_tolerance`` input, e.g. ``train_tol``); torchdeq stops when every frame is below
        one number, the smallest."""
        from torchdeq.solver import get_solver

        tol = float(torch.as_tensor(tol).min())

        counts = torch.bincount(batch, minlength=num_frames)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(batch.numel(), device=batch.device) - first[batch]
        width = z0.shape[-1]
        max_atoms = int(counts.max())

        def pack(z):
            out = z.new_zeros(num_frames, max_atoms, width)
            out[batch, slot] = z
            return out.reshape(num_frames, -1)

        def unpack(p):
            return p.reshape(num_frames, max_atoms, width)[batch, slot]

        kwargs = {"tau": self.damping} if self.solver == "anderson" else {}
        with torch.no_grad():
            packed, _, info = get_solver(self.solver)(
                lambda p: pack(self.f(unpack(p), data, x_hat, weights)),
                pack(z0),
                max_iter=self.f_max_iter,
                tol=tol,
                stop_mode="rel",
                **kwargs,
            )
        iters = info["nstep"].reshape(-1).to(torch.long)
        return unpack(packed), iters, info["rel_lowest"].reshape(-1).to(z0.dtype)
