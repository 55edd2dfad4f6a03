"""EquiformerModel under nequip's train-time compilation (``compile_mode: compile``) against
eager: outputs and parameter gradients of a force-loss training step, and the time per step.

    python benchmarks/train_time_compile.py [--layers 3] [--steps 5]

Quickstart width (32x0e+16x1o+8x2e), a batch of 5 rMD17 aspirin frames, float32. nequip itself
runs its train-time-compile tests on GPUs only ("known compilation bugs ... on CPU"); this
script tells what happens on the machine it runs on. DEQEquiformerModel builds its eager model
for ``compile_mode: compile``, with a warning (the solvers' exact gradient cannot be traced).
"""

import argparse
import time
import traceback
import warnings


from nequip.data import AtomicDataDict
from nequip.utils.global_state import set_global_state

from nequip_deq.model import EquiformerModel

from deq_training_step import QUICKSTART, R_MAX, TYPES, aspirin_batch


def build(compile_mode: str, layers: int):
    set_global_state()
    return EquiformerModel(
        seed=0, model_dtype="float32", type_names=TYPES, r_max=R_MAX, num_layers=layers,
        irreps_node_features="32x0e+16x1o+8x2e", compile_mode=compile_mode, **QUICKSTART,
    )


def step(model, data):
    out = model(dict(data))
    loss = out[AtomicDataDict.FORCE_KEY].square().mean() + out[AtomicDataDict.TOTAL_ENERGY_KEY].square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def timed(model, data, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, data)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    eager = build("eager", args.layers)
    data = aspirin_batch(eager.eval())
    eager.train()
    ref_out, ref_grads = step(eager, data)
    print(f"eager: {timed(eager, data, args.steps):.3f} s / step", flush=True)
    try:
        compiled = build("compile", args.layers)
        compiled.load_state_dict(eager.state_dict())
        compiled.train()
        print("compile_mode=compile: first step traces and compiles (minutes) ...", flush=True)
        start = time.perf_counter()
        out, grads = step(compiled, data)
        print(f"  first step {time.perf_counter() - start:.0f} s")
    except Exception:
        print("compile_mode=compile FAILED on this machine:")
        traceback.print_exc(limit=3)
        return
    for key in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        diff = (out[key] - ref_out[key]).abs().max().item()
        print(f"  max |{key} compiled - eager| = {diff:.2e}")
    worst = max((grads[n] - g).abs().max().item() / g.abs().max().clamp_min(1e-12).item()
                for n, g in ref_grads.items())
    print(f"  largest relative parameter-gradient difference: {worst:.2e}")
    t_compiled = timed(compiled, data, args.steps)
    t_eager = timed(eager, data, args.steps)
    print(f"eager {t_eager:.3f} s / step, compiled {t_compiled:.3f} s / step "
          f"(speed-up x{t_eager / t_compiled:.2f})")


if __name__ == "__main__":
    main()
