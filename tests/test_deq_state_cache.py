"""The DEQ state cache inside the model (callers that pass no state, such as LAMMPS'
pair_style nequip): warm starts, cold fallbacks, its size, the calculator's starts."""

import pytest
import torch

from nequip.data import AtomicDataDict

from small_deq import (
    build,
    graph,
    rattled,
    deq_layer,
    calculator,
    short_trajectory,
    single_frame,
    with_state_cache,
)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_state_cache_warm_starts_callers_that_pass_no_state(dtype):
    """With enable_DEQStateCache the model keeps its last fixed point: consecutive MD steps
    start warm (fewer iterations) and give the cold results within the tolerance; another
    system, permuted atoms or a system over the capacity start cold and give identical
    results."""
    cached = with_state_cache(build(dtype, f_tol=1e-5, b_tol=1e-5))
    assert cached.metadata["deq_state_cache_atoms"] == "10000"
    plain = build(dtype, f_tol=1e-5, b_tol=1e-5)
    iters = lambda out: int(out["deq_iterations"][0] + out["deq_adjoint_iterations"][0])  # noqa: E731
    cold_iters, warm_iters = [], []
    for atoms in short_trajectory(steps=4):
        out, ref = cached(single_frame(atoms)), plain(single_frame(atoms))
        torch.testing.assert_close(out["forces"], ref["forces"], atol=1e-4, rtol=0)
        warm_iters.append(iters(out))
        cold_iters.append(iters(ref))
    # nothing stored at first; then the previous z*; then extrapolated from the last two
    assert warm_iters[0] == cold_iters[0]
    assert warm_iters[1] < 0.8 * cold_iters[1], (cold_iters, warm_iters)
    assert max(warm_iters[2:]) < 0.5 * min(cold_iters[2:]), (cold_iters, warm_iters)

    def cold_start_exact(atoms, model):
        out, ref = model(single_frame(atoms)), plain(single_frame(atoms))
        assert iters(out) == iters(ref)
        torch.testing.assert_close(out["forces"], ref["forces"], atol=0, rtol=0)

    permuted = short_trajectory(steps=4)[-1]
    permuted.positions = permuted.positions[::-1].copy()
    permuted.numbers = permuted.numbers[::-1].copy()  # same structure, atoms renumbered
    cold_start_exact(permuted, cached)
    cold_start_exact(rattled("CH3CHO", 0), cached)
    small = with_state_cache(build(dtype, f_tol=1e-5, b_tol=1e-5), capacity=4)
    for atoms in short_trajectory(steps=2):  # 9 atoms > 4: always cold
        cold_start_exact(atoms, small)


def test_state_cache_says_its_size(caplog):
    """The cache is fixed-size memory in the compiled model: the modifier says how much, per
    atom and in all, and the metadata records it."""
    width = 8 + 3 * 4 + 5 * 4  # the test model's 8x0e+4x1o+4x2e
    with caplog.at_level("INFO"):
        cached = with_state_cache(build("float64"), capacity=50)
    assert "DEQ state cache: 50 atoms x 22 states of 40 numbers (xlbomd start)" in caplog.text
    states = 50 * 22 * width * 8
    assert states < int(cached.metadata["deq_state_cache_bytes"]) < states + 50 * 64


@pytest.mark.parametrize("scheme", ["quadratic", "xlbomd"])
def test_state_cache_starts_as_the_calculator_does(scheme):
    """Over an MD trajectory long enough for the extended-Lagrangian recurrence to take over,
    the in-model cache (its ``extrapolation``, recorded in the metadata) starts every call
    where DEQCalculator with the same extrapolation starts it: the same iteration counts and
    fixed points, call by call; a bad scheme or capacity is refused."""
    from nequip_deq.nn.fixed_point.extrapolation import XLBOMD_ORDER

    model = build("float64", f_tol=1e-4, b_tol=1e-4)
    cached = with_state_cache(build("float64", f_tol=1e-4, b_tol=1e-4), extrapolation=scheme)
    assert cached.metadata["deq_state_cache_extrapolation"] == scheme
    calc = calculator(model, extrapolation=scheme)
    for atoms in short_trajectory(steps=XLBOMD_ORDER + 4):
        out = cached(single_frame(atoms))
        calc.get_forces(atoms.copy())
        assert int(out["deq_iterations"][0]) == calc.results["deq_iterations"]
        assert int(out["deq_adjoint_iterations"][0]) == calc.results["deq_adjoint_iterations"]
        torch.testing.assert_close(out["deq_state"], calc._starts.solutions[0][0], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"extrapolation 'cubic': choose one of \['quadratic', 'xlbomd'\]"):
        with_state_cache(build("float64"), extrapolation="cubic")
    with pytest.raises(ValueError, match=r"capacity 0.5 must be a whole number of atoms >= 1"):
        with_state_cache(build("float64"), capacity=0.5)


def test_state_cache_keeps_no_unconverged_state():
    """A solve that stops at its cap leaves nothing in the cache: the next step starts cold
    (same iterations as the plain model) instead of from an unconverged state."""
    cached = with_state_cache(build("float64", f_max_iter=3))
    plain = build("float64", f_max_iter=3)
    layer = deq_layer(cached)
    for atoms in short_trajectory(steps=2):
        with pytest.warns(UserWarning, match="did not reach the tolerance"):
            out, ref = cached(single_frame(atoms)), plain(single_frame(atoms))
        assert int(layer.state_cache.num_atoms[0]) == -1
        torch.testing.assert_close(out["deq_state"], ref["deq_state"], atol=0, rtol=0)


def test_state_cache_is_off_in_training_and_batches():
    """Training and batched calls never read or write the cache."""
    model = with_state_cache(build("float64"))
    layer = deq_layer(model)
    batch = AtomicDataDict.batched_from_list([graph(rattled("CH3CHO", 0)), graph(rattled("CH3CHO", 1))])
    model(batch)
    assert int(layer.state_cache.num_atoms[0]) == -1
    model.train()
    model(single_frame(rattled("CH3CHO", 0)))
    assert int(layer.state_cache.num_atoms[0]) == -1
    model.eval()
    model(single_frame(rattled("CH3CHO", 0)))
    assert int(layer.state_cache.num_atoms[0]) == 7
