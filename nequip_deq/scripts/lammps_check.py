"""``nequip-deq-lammps-check``: check a compiled model for LAMMPS' ``pair_style nequip``
before a run.

Example::

    nequip-deq-lammps-check model.nequip.pt2 C H O   # the element list of your pair_coeff line

Exits with a message naming the problem when the model was compiled for another target or an
element is not among the model's ``type_names``; otherwise prints the type mapping, the cutoff
and, for DEQ models, whether MD steps will be warm-started.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="compiled model (.nequip.pt2)")
    parser.add_argument(
        "elements", nargs="+", help="element of each LAMMPS atom type, as after the model file in pair_coeff"
    )
    args = parser.parse_args(argv)

    import torch

    from nequip_deq.integrations.lammps import LAMMPSTypeMapError, WrongCompileTarget, check_pair_model

    if not args.model.endswith(".nequip.pt2"):
        print(f"error: {args.model}: pair_style nequip loads `.nequip.pt2` (AOTInductor) or "
              "`.nequip.pth` (TorchScript) files; this checks `.nequip.pt2`.", file=sys.stderr)
        return 2
    if not Path(args.model).is_file():
        print(f"error: {args.model}: no such file.", file=sys.stderr)
        return 2
    try:
        metadata = torch._inductor.aoti_load_package(args.model).get_metadata()
    except Exception as e:  # a truncated or foreign file: say which, not a traceback
        print(f"error: {args.model}: not a loadable AOTInductor package ({type(e).__name__}: "
              f"{e}); recompile it with nequip-compile --mode aotinductor.", file=sys.stderr)
        return 2
    try:
        notes = check_pair_model(metadata, args.elements)
    except (WrongCompileTarget, LAMMPSTypeMapError) as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}: OK for pair_style nequip (r_max {metadata['r_max']} Å)")
    print(f"  pair_coeff * * {args.model} {' '.join(args.elements)}")
    for note in notes:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
