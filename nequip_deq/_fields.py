"""Registers the DEQ data fields with nequip (node/graph fields, integer fields), so that
batching, ``frame_from_batched`` and compiled models handle them."""

from nequip.data import register_fields

from ._keys import (
    ADJOINT_ITERATIONS_KEY,
    DEQ_ADJOINT_STATE_KEY,
    DEQ_BACKWARD_STATISTICS_KEY,
    DEQ_PENALTY_STEP_KEY,
    DEQ_STATE_KEY,
    DEQ_TOLERANCE_KEY,
    FRAME_INDEX_KEY,
    SOLVER_ITERATIONS_KEY,
    SOLVER_STATISTICS,
)

register_fields(
    node_fields=[DEQ_STATE_KEY, DEQ_ADJOINT_STATE_KEY],
    graph_fields=list(SOLVER_STATISTICS)
    + [FRAME_INDEX_KEY, DEQ_TOLERANCE_KEY, DEQ_PENALTY_STEP_KEY, DEQ_BACKWARD_STATISTICS_KEY],
    long_fields=[SOLVER_ITERATIONS_KEY, ADJOINT_ITERATIONS_KEY, FRAME_INDEX_KEY],
)
