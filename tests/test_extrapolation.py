"""Starting points of MD solves: polynomial extrapolations and the extended-Lagrangian
recurrence (exact on polynomial trajectories, stable, time-reversible without damping)."""

import numpy as np
import pytest
import torch

from nequip_deq.integrations.ase import DEQCalculator

from small_deq import (
    build,
)


def test_starting_point_extrapolations():
    """Each scheme reproduces the polynomials it is exact for, drops to the order the history
    allows, and an unknown name is refused."""
    from nequip_deq.nn.fixed_point.extrapolation import extrapolate

    t = torch.arange(4.0)
    history = [((2 + 3 * t[i] + t[i] ** 2) * torch.ones(2), -(t[i] ** 2) * torch.ones(2)) for i in (2, 1, 0)]
    target = 2 + 3 * 3.0 + 9.0
    assert torch.allclose(extrapolate(history, "quadratic")[0], torch.full((2,), target))
    assert torch.allclose(extrapolate(history, "quadratic")[1], torch.full((2,), -9.0))
    assert torch.allclose(extrapolate(history, "linear")[0], torch.full((2,), 2 * 12.0 - 6.0))
    assert torch.allclose(extrapolate(history, "previous")[0], torch.full((2,), 12.0))
    aspc = extrapolate(history, "aspc")[0]  # exact to first order: between previous and quadratic
    assert 12.0 < float(aspc[0]) < target
    assert torch.allclose(extrapolate(history[:2], "quadratic")[0], torch.full((2,), 18.0))
    assert torch.allclose(extrapolate(history[:1], "aspc")[0], torch.full((2,), 12.0))
    with pytest.raises(ValueError, match="extrapolation 'cubic'"):
        DEQCalculator(build("float64"), device="cpu", extrapolation="cubic")


def test_extended_lagrangian_start():
    """xlbomd: quadratic starts until K + 1 steps of history exist; then the auxiliary state
    follows a linear trajectory exactly (its dissipation vanishes on linear histories), comes
    back to a constant solution from a disturbed start without blowing up, and tracks a smooth
    oscillation; every other scheme leaves no auxiliary state."""
    from nequip_deq.nn.fixed_point.extrapolation import XLBOMD_ORDER, StartingPoints

    def state(value):
        return value * torch.ones(3), -value * torch.ones(3)

    starts = StartingPoints("xlbomd")
    assert starts.start() is None
    for n in range(XLBOMD_ORDER + 4):
        starts.record(state(1.0 + 0.5 * n))
        if n >= 2:  # quadratic during the warm-up, the recurrence after it: both exact here
            assert torch.allclose(starts.start()[0], torch.full((3,), 1.0 + 0.5 * (n + 1)))
            assert torch.allclose(starts.start()[1], torch.full((3,), -(1.0 + 0.5 * (n + 1))))
    assert len(starts.auxiliary) == XLBOMD_ORDER + 1
    starts._next = state(1.5)  # a solve that started far off ...
    for _ in range(1000):  # ... and a solution that no longer moves
        starts.record(state(1.0))
    assert torch.allclose(starts.start()[0], torch.ones(3), atol=1e-6)
    starts.reset()
    errors = []
    for n in range(400):
        starts.record(state(float(np.sin(0.05 * n))))
        if n > 50:
            errors.append(abs(float(starts.start()[0][0]) - np.sin(0.05 * (n + 1))))
    assert max(errors) < 0.01, max(errors)
    quadratic = StartingPoints("quadratic")
    quadratic.record(state(1.0))
    assert quadratic.auxiliary == [] and torch.allclose(quadratic.start()[0], torch.ones(3))


def test_extended_lagrangian_recurrence_is_time_reversible_without_damping():
    """The auxiliary state's Verlet step without its dissipative term, run backwards from its
    newest states with the same solutions in reverse order, retraces its states to round-off;
    with the dissipation of Niklasson et al. it does not (which is the dissipation's purpose)."""
    from nequip_deq.nn.fixed_point.extrapolation import XLBOMD_ORDER as K, xlbomd_coefficients, xlbomd_start

    kappa, damping = xlbomd_coefficients()
    rng = np.random.default_rng(0)
    for weights, reversible in (([0.0] * (K + 1), True), (damping, False)):
        states = [torch.as_tensor(rng.normal(size=(4, 5))) for _ in range(K + 1)]  # oldest first
        solutions = {}
        for n in range(K, K + 50):  # p_{n+1} from p_n, p_{n-1}, ... and z*_n
            solutions[n] = torch.as_tensor(rng.normal(size=(4, 5)))
            states.append(xlbomd_start(torch.stack(states[::-1][: K + 1]), solutions[n], kappa, weights))
        back = states[::-1][: K + 1]  # time reversed: p_m, ..., p_{m-K}, the newest last
        for n in range(len(states) - 1 - K, K, -1):  # p_{n-1} from p_n, p_{n+1}, ... and z*_n
            back.append(xlbomd_start(torch.stack(back[::-1][: K + 1]), solutions[n], kappa, weights))
        error = float((back[-1] - states[K]).abs().max())
        assert (error < 1e-9) == reversible, (reversible, error)
