"""The previous fixed point kept inside a DEQ model, for callers that pass no state.

LAMMPS' ``pair_style nequip`` calls a compiled model once per MD step with positions, edges,
types and cell only: it has no way to hand back the previous step's :math:`z^*`. With the
cache enabled (model modifier ``enable_DEQStateCache``, e.g. ``nequip-compile ... --modifiers
enable_DEQStateCache``), the DEQ layer keeps the last calls' :math:`z^*` and :math:`v^*` (and,
for the extended-Lagrangian start, its auxiliary states) and the last positions and types in
buffers. The next call starts from them when it is *the same system a moment later*:

- the same number of atoms :math:`N \\le` ``capacity``,
- the same type at every index,
- every atom moved less than ``max_displacement`` (minimum image in the cell, so atoms that
  LAMMPS wraps back into the box at re-neighbouring still match),

and from zeros (cold start) otherwise. A call whose solves did not converge, or whose states
are not finite, leaves nothing to start from: the next call starts cold. Because the solvers iterate to their tolerance from
any start, results depend on the history only within the solver tolerance; the cache changes
how many iterations a step costs, not what it returns.

Buffers are fixed-size (``capacity`` atoms; an AOTInductor model cannot grow them) and not
saved in checkpoints: ``6 X`` numbers per atom with the quadratic start, ``22 X`` with
``xlbomd`` (``X``: the state width). Systems larger than ``capacity`` run cold every step.
"""

from typing import List, Optional, Tuple

import torch

from nequip.data import AtomicDataDict

from .extrapolation import (
    DEFAULT_SCHEME,
    EXTRAPOLATIONS,
    XLBOMD_ORDER,
    polynomial_start,
    xlbomd_coefficients,
    xlbomd_start,
)

DEFAULT_CAPACITY = 10000
DEFAULT_MAX_DISPLACEMENT = 0.5  # Å; MD moves atoms ~0.01-0.05 Å per step
CACHE_SCHEMES = ("quadratic", "xlbomd")


class DEQStateCache(torch.nn.Module):
    """The last calls' fixed points and adjoints, and the last positions and types
    (``capacity`` rows each).

    A matching call starts as :class:`~nequip_deq.integrations.ase.DEQCalculator` does
    (:mod:`~nequip_deq.nn.fixed_point.extrapolation`): with ``extrapolation="quadratic"`` from
    :math:`3 z^*_{n} - 3 z^*_{n-1} + z^*_{n-2}` when the three previous calls were the same
    system, :math:`2 z^*_{n} - z^*_{n-1}` after two, :math:`z^*_n` after one; with ``"xlbomd"``
    from the extended-Lagrangian auxiliary state once :math:`K + 1` calls of the same system
    are stored (quadratic until then); from zeros otherwise; the adjoint alike.

    Every read of a buffer goes through rows that depend on the input's atom count
    (``index_select``), and a call reads and writes ``N`` rows, never the whole capacity.
    (AOTInductor folds expressions of buffers alone into compile-time constants, even for
    buffers the model mutates; with every read tied to the input nothing can be folded, and a
    model compiled for a static atom count would only ever start cold.)

    Args:
        capacity: largest number of atoms whose state is kept (0: disabled)
        width: state width ``X`` (the dimension of the node-feature irreps)
        dtype: dtype of the states (the model dtype)
        max_displacement: largest per-atom move (Å) for which a call counts as the same system
        extrapolation: ``xlbomd`` (default; keeps ``K + 1`` more states per atom) or ``quadratic``
    """

    def __init__(
        self,
        capacity: int,
        width: int,
        dtype: torch.dtype = torch.float32,
        max_displacement: float = DEFAULT_MAX_DISPLACEMENT,
        extrapolation: str = DEFAULT_SCHEME,
    ):
        super().__init__()
        if extrapolation not in CACHE_SCHEMES:
            raise ValueError(
                f"state cache extrapolation {extrapolation!r}: choose one of {list(CACHE_SCHEMES)}."
            )
        self.capacity = int(capacity)
        self.width = int(width)
        self.max_displacement = float(max_displacement)
        self.extrapolation = extrapolation
        self.xlbomd = extrapolation == "xlbomd"
        # the polynomial starts after 0, 1 and 2 older calls of the same system
        self.polynomials: List[List[float]] = [
            list(EXTRAPOLATIONS[name]) for name in ("previous", "linear", "quadratic")
        ]
        self.xl_kappa, self.xl_damping = xlbomd_coefficients()
        # consecutive calls of one system after which the start has its full order
        self.full_depth = XLBOMD_ORDER if self.xlbomd else 2
        kept = XLBOMD_ORDER + 1 if self.xlbomd else 0
        buffers = {
            "num_atoms": torch.full((1,), -1, dtype=torch.long),
            "types": torch.full((self.capacity,), -1, dtype=torch.long),
            "positions": torch.zeros(self.capacity, 3, dtype=torch.float64),
            # per row: how many older calls (up to full_depth) were the same system
            "depth": torch.zeros(self.capacity, dtype=torch.long),
            # solutions z*_n, z*_{n-1}, z*_{n-2} (and v*); xlbomd: p_n ... p_{n-K}
            "states": torch.zeros(3, self.capacity, width, dtype=dtype),
            "adjoints": torch.zeros(3, self.capacity, width, dtype=dtype),
            "aux_states": torch.zeros(kept, self.capacity, width, dtype=dtype),
            "aux_adjoints": torch.zeros(kept, self.capacity, width, dtype=dtype),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    @torch.jit.unused
    def nbytes(self) -> int:
        """Memory of the buffers: what the cache adds to a compiled model and to the memory
        of the device it runs on."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.jit.unused
    def describe(self) -> str:
        """One line for the user: capacity, states per atom, size."""
        per_atom = sum(b.shape[0] for b in (self.states, self.adjoints, self.aux_states, self.aux_adjoints))
        return (
            f"DEQ state cache: {self.capacity} atoms x {per_atom} states of {self.width} numbers "
            f"({self.extrapolation} start) = {self.nbytes() / 2**20:.0f} MiB, in the compiled "
            "model and in memory where it runs; larger systems run cold."
        )

    def _rows(self, n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Buffer row of each of ``n`` atoms (clamped to the capacity) and whether it fits:
        gathers and scatters with these keep every shape ``n`` or ``capacity``, which export
        can trace without guards on ``n``."""
        idx = torch.arange(n, device=device)
        return idx.clamp(max=self.capacity - 1), idx < self.capacity

    def _stored(self, buffer: torch.Tensor, n: int, fill: float, dim: int = 0) -> torch.Tensor:
        """The first ``n`` stored rows along ``dim`` (``fill`` beyond the capacity)."""
        rows, fits = self._rows(n, buffer.device)
        got = buffer.index_select(dim, rows)
        shape = [1] * got.dim()
        shape[dim] = n
        return torch.where(fits.reshape(shape), got, torch.full_like(got, fill))

    def matches(
        self, pos: torch.Tensor, types: torch.Tensor, cell: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """0-dim bool: is this the stored system a moment later (see the module docstring)?"""
        n = pos.shape[0]
        same_size = self.num_atoms[0] == n
        same_types = (self._stored(self.types, n, -1.0) == types).all()
        move = pos.detach().to(torch.float64) - self._stored(self.positions, n, 0.0)
        if cell is not None:
            move = _minimum_image(move, cell.detach().to(torch.float64).reshape(3, 3))
        small = move.square().sum(-1).max() < self.max_displacement**2
        return same_size & same_types & small

    def _depth(self, n: int) -> torch.Tensor:
        """0-dim: how many older calls of this system every one of the ``n`` rows has."""
        return self._stored(self.depth, n, 0.0).min()

    def _start(
        self, solutions: torch.Tensor, auxiliary: torch.Tensor, hit: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:
        n = zero.shape[0]
        s = self._stored(solutions, n, 0.0, dim=1).to(zero.dtype)
        depth = self._depth(n)
        start = s[0]
        for older in range(1, len(self.polynomials)):
            start = torch.where(depth >= older, polynomial_start(s, self.polynomials[older]), start)
        if self.xlbomd:
            p = self._stored(auxiliary, n, 0.0, dim=1).to(zero.dtype)
            xl = xlbomd_start(p, s[0], self.xl_kappa, self.xl_damping)
            start = torch.where(depth >= self.full_depth, xl, start)
        return torch.where(hit, start, zero)

    def lookup(
        self, pos: torch.Tensor, types: torch.Tensor, cell: Optional[torch.Tensor], zero: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Starting points ``(z0, v0)``, each like ``zero`` ``(N, X)`` (see the class
        docstring), and whether the call :meth:`matches` the stored system."""
        hit = self.matches(pos, types, cell)
        z0 = self._start(self.states, self.aux_states, hit, zero)
        v0 = self._start(self.adjoints, self.aux_adjoints, hit, zero)
        return z0, v0, hit

    def _push(self, buffer: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
        """Shift the history ``buffer`` ``(H, capacity, X)`` one step older in ``rows`` and put
        ``new`` ``(N, X)`` in front."""
        older = buffer.index_select(1, rows)[:-1]
        buffer.index_copy_(1, rows, torch.cat([new.detach().to(buffer.dtype).unsqueeze(0), older], 0))

    def store(
        self,
        pos: torch.Tensor,
        types: torch.Tensor,
        starts: Tuple[torch.Tensor, torch.Tensor],
        solutions: Tuple[torch.Tensor, torch.Tensor],
        hit: torch.Tensor,
        good: torch.Tensor,
    ) -> None:
        """Keep this call's system and solutions ``(z*, v*)`` (``starts``, ``hit``: from
        :meth:`lookup`). A system larger than the capacity, or solutions that are not ``good``
        (0-dim bool: both solves converged, all values finite), are marked unmatchable: the
        next call starts cold instead of from them."""
        n = pos.shape[0]
        rows, _ = self._rows(n, pos.device)
        if self.xlbomd:  # p_n: the start, when it came from the recurrence; else z*_n
            from_recurrence = hit & (self._depth(n) >= self.full_depth)
            self._push(self.aux_states, rows, torch.where(from_recurrence, starts[0], solutions[0]))
            self._push(self.aux_adjoints, rows, torch.where(from_recurrence, starts[1], solutions[1]))
        self._push(self.states, rows, solutions[0])
        self._push(self.adjoints, rows, solutions[1])
        depth = (self.depth.index_select(0, rows) + 1).clamp(max=self.full_depth)
        self.depth.index_copy_(0, rows, torch.where(hit, depth, torch.zeros_like(depth)))
        self.types.index_copy_(0, rows, types)
        self.positions.index_copy_(0, rows, pos.detach().to(torch.float64))
        size = torch.full_like(self.num_atoms, n)
        self.num_atoms.copy_(torch.where((size <= self.capacity) & good, size, -1))


def _minimum_image(move: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Displacements ``(N, 3)`` reduced by whole lattice vectors of ``cell`` ``(3, 3)`` (rows
    are lattice vectors); unchanged for a singular (e.g. zero) cell. The 3x3 inverse is
    written out (cross products over the determinant) to stay clear of LAPACK calls in
    compiled models."""
    a, b, c = cell[0], cell[1], cell[2]
    cofactors = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=1)
    det = torch.dot(a, cofactors[:, 0])
    regular = det.abs() > 1e-6
    inverse = cofactors / torch.where(regular, det, torch.ones_like(det))
    frac = move @ inverse
    reduced = move - torch.round(frac) @ cell
    return torch.where(regular, reduced, move)


def cache_inputs(
    data: AtomicDataDict.Type,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Positions, types and (if present) cell of a single-frame ``data``."""
    cell: Optional[torch.Tensor] = None
    if AtomicDataDict.CELL_KEY in data:
        cell = data[AtomicDataDict.CELL_KEY]
    return data[AtomicDataDict.POSITIONS_KEY], data[AtomicDataDict.ATOM_TYPE_KEY], cell

