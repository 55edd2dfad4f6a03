r"""Starting points for the DEQ solves of consecutive MD steps.

Each MD step solves :math:`z^* = f(z^*, x)` (and the adjoint :math:`v^*`) anew. The solver
iterates to its tolerance from any start, so the start decides the cost of a step; and, because
a solve stops as soon as it is *within* tolerance, the start also decides *which* point within
tolerance the step returns. That history-dependent error is what makes a loosely solved DEQ
gain or lose energy in NVE (docs/deq.md). Two families of starts, applied alike to
:math:`z` and :math:`v` (states ``(N, X)``):

**Polynomial extrapolation** of the last solutions (:data:`EXTRAPOLATIONS`),
:math:`z_0 = \sum_j a_j z^*_{n-j}`: ``previous`` :math:`z^*_n`, ``linear``
:math:`2 z^*_n - z^*_{n-1}`, ``quadratic`` :math:`3 z^*_n - 3 z^*_{n-1} + z^*_{n-2}`, and
``aspc``, the predictor of Kolafa's always-stable predictor-corrector (J. Comput. Chem. 25,
335 (2004)), :math:`\tfrac52 z^*_n - 2 z^*_{n-1} + \tfrac12 z^*_{n-2}`. Each order starts
closer to the new solution, but none is time-reversible: the solve error is carried forward in
one direction and the energy drifts systematically (down for ``quadratic``, up for ``linear``).

**Extended Lagrangian** (``xlbomd``; Niklasson, Tymczak and Challacombe, Phys. Rev. Lett. 97,
123001 (2006); with the dissipation of Niklasson et al., J. Chem. Phys. 130, 214109 (2009)).
The start is an auxiliary state :math:`p` that follows the solutions as a harmonic oscillator
integrated by a time-reversible Verlet step,

.. math::

    p_{n+1} = 2 p_n - p_{n-1} + \kappa (z^*_n - p_n) + \alpha \sum_{k=0}^{K} c_k\, p_{n-k},

where :math:`z^*_n` is the solution of step :math:`n`, solved from :math:`p_n`. Without the
last term the recurrence is exactly time-reversible, so the solve errors do not accumulate
into a drift; the small dissipative term (:math:`\alpha`, :math:`c_k` from the 2009 paper's
table, :data:`XLBOMD`) damps the numerical noise that would otherwise build up in :math:`p`.
Until :math:`K + 1` steps of history exist the start is ``quadratic`` and :math:`p_n := z^*_n`.
"""

from typing import List, Optional, Tuple

import torch

# coefficients a_j of z*_n, z*_{n-1}, ... in the start of the next solve
EXTRAPOLATIONS = {
    "previous": (1.0,),
    "linear": (2.0, -1.0),
    "quadratic": (3.0, -3.0, 1.0),
    "aspc": (2.5, -2.0, 0.5),
}
# K -> (kappa, alpha, c_0..c_K) of dissipative XL-BOMD (Niklasson et al. 2009, table I). K = 7,
# the least dissipative of the table: on aspirin at tolerance 1e-3 K = 3 and 5 drifted +3.3 and
# +0.45 meV/atom/ps (docs/deq.md)
XLBOMD = {7: (1.86, 0.0016, (-36.0, 99.0, -88.0, 11.0, 32.0, -25.0, 8.0, -1.0))}
XLBOMD_ORDER = 7
SCHEMES = tuple(EXTRAPOLATIONS) + ("xlbomd",)
# the default: the fewest iterations matter less than energy conservation (docs/deq.md)
DEFAULT_SCHEME = "xlbomd"

State = Tuple[torch.Tensor, torch.Tensor]  # (z, v), each (N, X)


def xlbomd_coefficients(order: int = XLBOMD_ORDER) -> Tuple[float, List[float]]:
    """:math:`\\kappa` and the damping weights :math:`\\alpha c_0, \\dots, \\alpha c_K`."""
    kappa, alpha, c = XLBOMD[order]
    return float(kappa), [float(alpha * ck) for ck in c]


def polynomial_start(history: torch.Tensor, coefficients: List[float]) -> torch.Tensor:
    """:math:`\\sum_j a_j h_j` for ``history`` ``(H, N, X)``, newest first, ``H >= len(a)``
    (TorchScript-able: the LAMMPS state cache uses it too)."""
    start = coefficients[0] * history[0]
    for j in range(1, len(coefficients)):
        start = start + coefficients[j] * history[j]
    return start


def xlbomd_start(
    auxiliary: torch.Tensor, solution: torch.Tensor, kappa: float, damping: List[float]
) -> torch.Tensor:
    """:math:`p_{n+1}` of the recurrence in the module docstring from ``auxiliary``
    :math:`p_n, \\dots, p_{n-K}` ``(K + 1, N, X)`` and the solution :math:`z^*_n` ``(N, X)``
    (``kappa``, ``damping`` from :func:`xlbomd_coefficients`; TorchScript-able)."""
    start = (2.0 - kappa) * auxiliary[0] - auxiliary[1] + kappa * solution
    for k, c in enumerate(damping):
        start = start + c * auxiliary[k]
    return start


def _stacked(states: List[State]) -> State:
    return torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])


def extrapolate(history: List[State], scheme: str) -> State:
    """Polynomial start from ``history`` (solutions ``(z*, v*)``, newest first) by
    :data:`EXTRAPOLATIONS` ``[scheme]``, or by the highest order the history allows
    (``linear`` when a three-point scheme has two solutions, ``previous`` with one)."""
    coefficients = EXTRAPOLATIONS[scheme]
    if len(history) < len(coefficients):
        coefficients = EXTRAPOLATIONS[("previous", "linear")[len(history) - 1]]
    return tuple(polynomial_start(h, list(coefficients)) for h in _stacked(history))


class StartingPoints:
    """The history of one system's solves and the start of its next one (``scheme``: one of
    :data:`SCHEMES`; see the module docstring). :meth:`start` gives ``None`` (a cold start)
    until a solution is recorded; :meth:`reset` forgets everything (a new system)."""

    def __init__(self, scheme: str = DEFAULT_SCHEME):
        if scheme not in SCHEMES:
            raise ValueError(f"extrapolation {scheme!r}: choose one of {list(SCHEMES)}.")
        self.scheme = scheme
        self.reset()

    def reset(self) -> None:
        self.solutions: List[State] = []  # newest first, as many as the schemes need
        self.auxiliary: List[State] = []  # xlbomd: p_n, p_{n-1}, ..., p_{n-K}
        self._next: Optional[State] = None
        self._next_is_xl = False

    def __len__(self) -> int:
        return len(self.solutions)

    @property
    def from_recurrence(self) -> bool:
        """Whether the next start is the extended-Lagrangian auxiliary state :math:`p_{n+1}`
        (``xlbomd`` with its full history) rather than an extrapolation."""
        return self._next_is_xl

    def start(self) -> Optional[State]:
        """``(z0, v0)`` for the next solve, or ``None`` with no history."""
        return self._next

    def record(self, solution: State) -> None:
        """Keep the solution of the solve that started from :meth:`start`, and work out the
        next start."""
        self.solutions = ([solution] + self.solutions)[:3]
        if self.scheme != "xlbomd":
            self._next = extrapolate(self.solutions, self.scheme)
            return
        # p_n is the start this solve used when that came from the recurrence, else z*_n
        p_n = self._next if self._next_is_xl else solution
        self.auxiliary = ([p_n] + self.auxiliary)[: XLBOMD_ORDER + 1]
        if len(self.auxiliary) <= XLBOMD_ORDER:
            self._next, self._next_is_xl = extrapolate(self.solutions, "quadratic"), False
            return
        kappa, damping = xlbomd_coefficients()
        self._next = tuple(
            xlbomd_start(p, z, kappa, damping) for p, z in zip(_stacked(self.auxiliary), solution)
        )
        self._next_is_xl = True
