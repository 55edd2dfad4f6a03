"""The per-frame solvers on small linear problems with known solutions: GMRES (training's
adjoint and implicit-gradient solves), the damped iteration (NaN residuals never count as
converged) and its per-atom residual."""

import pytest
import torch

from nequip_deq.nn.fixed_point.solvers import damped_step, frame_residual, gmres, solver_start


def block_system(sizes, width=3, seed=0):
    """A random contractive linear map M per frame (block-diagonal over frames), right-hand
    sides b, and the exact solutions of (I - M) x = b."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    blocks = []
    for n in sizes:
        m = torch.randn(n * width, n * width, generator=g, dtype=torch.float64)
        blocks.append(0.7 * m / torch.linalg.matrix_norm(m, ord=2))
    b = torch.randn(sum(sizes), width, generator=g, dtype=torch.float64)
    exact, offset = [], 0
    for n, m in zip(sizes, blocks):
        rhs = b[offset : offset + n].reshape(-1)
        exact.append(torch.linalg.solve(torch.eye(n * width, dtype=torch.float64) - m, rhs).reshape(n, width))
        offset += n

    def operator(x):
        out, offset = [], 0
        for n, m in zip(sizes, blocks):
            out.append(x[offset : offset + n] - (m @ x[offset : offset + n].reshape(-1)).reshape(n, width))
            offset += n
        return torch.cat(out)

    return operator, b, torch.cat(exact), batch


def test_gmres_solves_each_frame_to_its_tolerance():
    sizes = [4, 7, 5]
    operator, b, exact, batch = block_system(sizes)
    x, iters, res = gmres(operator, b, torch.zeros_like(b), batch, len(sizes), 1e-10, 60)
    torch.testing.assert_close(x, exact, atol=1e-8, rtol=0)
    assert (res <= 1e-10).all() and (iters <= 3 * max(sizes)).all(), (iters, res)
    # warm start from the solution: converged at once
    x2, iters2, _ = gmres(operator, b, exact, batch, len(sizes), 1e-8, 60)
    torch.testing.assert_close(x2, exact, atol=1e-8, rtol=0)
    assert (iters2 <= 1).all(), iters2
    # a frame with b = 0 has x = 0 and needs no iteration; the others are unaffected
    b0 = b.clone()
    b0[batch == 1] = 0
    x3, iters3, _ = gmres(operator, b0, torch.zeros_like(b), batch, len(sizes), 1e-10, 60)
    assert int(iters3[1]) == 0 and x3[batch == 1].abs().max() == 0
    torch.testing.assert_close(x3[batch == 0], exact[batch == 0], atol=1e-8, rtol=0)


def test_gmres_breakdown_of_one_frame_leaves_it_exact_and_the_others_unaffected():
    """A frame whose Krylov space stops growing after one application (there A = 2I) is solved
    exactly at once; its later, empty columns neither divide by zero nor move it while the
    other frames iterate on (the least-squares problem stays triangular, no rank assumption)."""
    operator, b, exact, batch = block_system([4, 6], seed=2)
    first = batch == 0

    def breaks_down(x):
        return torch.where(first[:, None], 2 * x, operator(x))

    x, iters, res = gmres(breaks_down, b, torch.zeros_like(b), batch, 2, 1e-10, 60)
    assert bool(torch.isfinite(x).all()) and int(iters[0]) == 1 and int(iters[1]) > 1, iters
    torch.testing.assert_close(x[first], b[first] / 2, atol=1e-12, rtol=0)
    torch.testing.assert_close(x[~first], exact[~first], atol=1e-8, rtol=0)


def test_gmres_needs_fewer_operator_applications_than_iteration():
    operator, b, exact, batch = block_system([6, 6], seed=1)
    _, iters, _ = gmres(operator, b, torch.zeros_like(b), batch, 2, 1e-8, 60)
    s = torch.zeros_like(b)
    it, res, active = solver_start(2, b)
    for _ in range(200):
        s, it, res, active = damped_step(s, b + s - operator(s), it, res, active, batch, 2, 1e-8, 1.0)
        if not active.any():
            break
    torch.testing.assert_close(s, exact, atol=1e-6, rtol=0)
    assert (iters < it).all(), (iters, it)


def test_nan_residual_is_not_converged():
    s = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.full_like(s, float("nan"))
    it, res, active = solver_start(1, s)
    _, it, res, active = damped_step(s, t, it, res, active, torch.zeros(3, dtype=torch.long), 1, 1e-4, 1.0)
    assert bool(active[0]) and torch.isnan(res[0])


@pytest.mark.parametrize("num_atoms", [10, 1000])
def test_residual_is_per_atom_and_size_independent(num_atoms):
    """One atom off by delta gives residual delta / RMS norm, whatever the system size (the
    frame norm would give delta / (sqrt(N) RMS): one atom far above tolerance would pass)."""
    new = torch.ones(num_atoms, 4, dtype=torch.float64)  # RMS norm 2
    old = new.clone()
    old[num_atoms // 2, 1] += 0.01
    batch = torch.zeros(num_atoms, dtype=torch.long)
    torch.testing.assert_close(frame_residual(new, old, batch, 1), torch.tensor([0.005], dtype=torch.float64))
    # frames of a batch are measured apart
    both = frame_residual(torch.cat([new, new]), torch.cat([old, new]), torch.cat([batch, batch + 1]), 2)
    torch.testing.assert_close(both, torch.tensor([0.005, 0.0], dtype=torch.float64))
