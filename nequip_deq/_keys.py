"""Names of the data fields DEQ models read and write (registered in :mod:`._fields`).
``Final`` so that TorchScript can read them inside ``forward``."""

from typing import Final

# node fields, (num_atoms, X): fixed point z* and adjoint v*; as inputs they are the solver's
# starting points (warm start), as outputs the solutions of this call
DEQ_STATE_KEY: Final[str] = "deq_state"
DEQ_ADJOINT_STATE_KEY: Final[str] = "deq_adjoint_state"

# graph field, (num_frames, 2): forward and adjoint tolerances of this call, overriding the
# model's f_tol / b_tol (an input of models compiled for ase_deq: DEQCalculator(tolerance=...))
DEQ_TOLERANCE_KEY: Final[str] = "deq_tolerance"

# training only (nequip_deq.train passes and reads them; the model needs none of them):
# graph field, (num_frames,) bool, input: compute the Jacobian penalty in this training call (a
# model built with ``jacobian_penalty: true``); 0-dim output: the penalty, with its graph
DEQ_PENALTY_STEP_KEY: Final[str] = "deq_jacobian_penalty_step"
DEQ_JACOBIAN_PENALTY_KEY: Final[str] = "deq_jacobian_penalty"
# graph field, (num_frames, 2), output of a training call: iterations and relative residual of
# the implicit gradient's backward solve, written when the backward pass runs (zeros before)
DEQ_BACKWARD_STATISTICS_KEY: Final[str] = "deq_backward_statistics"

# graph fields, (num_frames,): solver statistics of this call
SOLVER_ITERATIONS_KEY: Final[str] = "deq_iterations"  # forward fixed-point iterations
SOLVER_RESIDUAL_KEY: Final[str] = "deq_residual"  # final relative residual of the forward solve
ADJOINT_ITERATIONS_KEY: Final[str] = "deq_adjoint_iterations"  # adjoint iterations
ADJOINT_RESIDUAL_KEY: Final[str] = "deq_adjoint_residual"  # final relative residual of the adjoint solve

# graph field, (num_frames,): index of the frame in its data file (MoleculeNPZDataset), the key
# of the training-time fixed-point store (warm-started training, nequip_deq.train)
FRAME_INDEX_KEY: Final[str] = "frame_index"

SOLVER_STATISTICS = (
    SOLVER_ITERATIONS_KEY,
    SOLVER_RESIDUAL_KEY,
    ADJOINT_ITERATIONS_KEY,
    ADJOINT_RESIDUAL_KEY,
)
