"""The ``nequip-compile --target ase_deq`` compile target: the ASE target plus the DEQ state.

A compiled model takes ``deq_state`` / ``deq_adjoint_state`` (``(N, X)``: the previous
step's fixed point and adjoint; zeros = cold start) and returns the new ones together with the
solver statistics, so that :class:`nequip_deq.integrations.ase.DEQCalculator` can warm-start
every MD step. The state width ``X`` is the model's; DEQ layers report it in the model metadata
(``deq_state_width``) and the builder tells this target (:func:`set_state_width`) so that the
example data used for tracing carries states of the right shape.
"""

import torch

from nequip.data import AtomicDataDict
from nequip.scripts._compile_utils import (
    ASE_OUTPUTS,
    PAIR_NEQUIP_INPUTS,
    register_compile_targets,
    single_frame_batch_map_settings,
    single_frame_data_settings,
)

from ._keys import DEQ_ADJOINT_STATE_KEY, DEQ_STATE_KEY, SOLVER_STATISTICS

ASE_DEQ_TARGET = "ase_deq"
STATE_WIDTH_METADATA_KEY = "deq_state_width"
_state_width = {"value": None}


def set_state_width(width: int) -> None:
    """Called by the DEQ builder: the width ``X`` of the state of the model being built."""
    _state_width["value"] = int(width)


def _data_settings(data: AtomicDataDict.Type) -> AtomicDataDict.Type:
    width = _state_width["value"]
    if width is None:
        raise RuntimeError(
            f"compile target `{ASE_DEQ_TARGET}` is for nequip_deq.model.DEQEquiformerModel "
            "models; use `--target ase` (or `pair_nequip`) for other models."
        )
    data = single_frame_data_settings(data)
    num_atoms = data[AtomicDataDict.POSITIONS_KEY].shape[0]
    dtype = data[AtomicDataDict.POSITIONS_KEY].dtype
    # distinct tensors: export merges inputs that are the same object
    data[DEQ_STATE_KEY] = torch.zeros(num_atoms, width, dtype=dtype)
    data[DEQ_ADJOINT_STATE_KEY] = torch.zeros(num_atoms, width, dtype=dtype)
    return data


register_compile_targets(
    {
        ASE_DEQ_TARGET: {
            "input": PAIR_NEQUIP_INPUTS + [DEQ_STATE_KEY, DEQ_ADJOINT_STATE_KEY],
            "output": ASE_OUTPUTS
            + [DEQ_STATE_KEY, DEQ_ADJOINT_STATE_KEY]
            + list(SOLVER_STATISTICS),
            "batch_map_settings": single_frame_batch_map_settings,
            "data_settings": _data_settings,
        }
    }
)
