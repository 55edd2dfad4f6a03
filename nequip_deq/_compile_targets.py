"""nequip-compile targets for DEQ models: ``ase_deq`` (ASE target plus the DEQ state) and
``pair_nequip_deq`` (LAMMPS ``pair_style nequip`` with the in-model state cache).

A compiled model takes ``deq_state`` / ``deq_adjoint_state`` (``(N, X)``: the previous
step's fixed point and adjoint; zeros = cold start) and ``deq_tolerance`` (``(1, 2)``: the
forward and adjoint tolerances of the call, so that one compiled model serves every
tolerance) and returns the new states together with the solver statistics, so that :class:`nequip_deq.integrations.ase.DEQCalculator` can warm-start
every MD step. The state width ``X`` is the model's; DEQ layers report it in the model metadata
(``deq_state_width``) and, when nequip-compile reads that metadata, tells these targets
(:func:`announce_model`) so that the example data used for tracing carries states of the
right shape.

``pair_nequip_deq`` has exactly ``pair_nequip``'s inputs (the pair style passes no state) and
``pair_nequip``'s outputs plus the solver statistics (the pair style reads the fields it needs
from the metadata's output list and ignores the rest). It requires the model modifier
``enable_DEQStateCache`` (``--modifiers enable_DEQStateCache``), which keeps the previous fixed
point inside the compiled model: see :mod:`nequip_deq.nn.fixed_point.state_cache`.
"""

import torch

from nequip.data import AtomicDataDict
from nequip.scripts._compile_utils import (
    ASE_OUTPUTS,
    LMP_OUTPUTS,
    PAIR_NEQUIP_INPUTS,
    register_compile_targets,
    single_frame_batch_map_settings,
    single_frame_data_settings,
)

from ._keys import DEQ_ADJOINT_STATE_KEY, DEQ_STATE_KEY, DEQ_TOLERANCE_KEY, SOLVER_STATISTICS

ASE_DEQ_TARGET = "ase_deq"
PAIR_NEQUIP_DEQ_TARGET = "pair_nequip_deq"
STATE_WIDTH_METADATA_KEY = "deq_state_width"
STATE_CACHE_METADATA_KEY = "deq_state_cache_atoms"
STATE_CACHE_EXTRAPOLATION_METADATA_KEY = "deq_state_cache_extrapolation"
STATE_CACHE_BYTES_METADATA_KEY = "deq_state_cache_bytes"  # its size in the model and in memory
# the DEQ's kind (``lagrangian`` / ``variational``) and damping: DEQCalculator solves a
# compiled variational DEQ by calls, with that damping
FIXED_POINT_METADATA_KEY = "deq_fixed_point"
DAMPING_METADATA_KEY = "deq_damping"
# the solver settings of a DEQ model (effective tolerances for its dtype), read back by
# DEQCalculator, nequip-deq-md and nequip-deq-lammps-check
SOLVER_METADATA_KEYS = ("deq_f_tol", "deq_f_max_iter", "deq_b_tol", "deq_b_max_iter")
_built = {"state_width": None, "state_cache": None, "variational": False}


def announce_model(state_width: int, state_cache: int, variational: bool = False) -> None:
    """Called by a DEQ layer when nequip-compile reads the model's metadata (which it does
    before tracing): the width ``X`` of the state, the state cache's capacity (0: none) and
    whether the DEQ is variational, so that the targets can trace with states of the right
    shape, check for the cache, and check a variational model as it runs compiled (with an
    infinite ``deq_tolerance``: no iteration inside the model). A
    packaged model (``.nequip.zip``) carries its own copy of this package; its layers reach
    this module through ``sys.modules`` (see :func:`announce_to_compile_targets`)."""
    _built["state_width"] = int(state_width)
    _built["state_cache"] = int(state_cache) if state_cache > 0 else None
    _built["variational"] = bool(variational)


def announce_to_compile_targets(state_width: int, state_cache: int, variational: bool = False) -> None:
    """:func:`announce_model` on the installed ``nequip_deq._compile_targets`` (the one whose
    targets nequip-compile uses), also from the copy of this code inside a packaged model."""
    import sys

    installed = sys.modules.get("nequip_deq._compile_targets")
    if installed is not None:
        installed.announce_model(state_width, state_cache, variational)


def _require_deq(target: str) -> int:
    width = _built["state_width"]
    if width is None:
        raise RuntimeError(
            f"compile target `{target}` is for nequip_deq.model.DEQEquiformerModel models; "
            "use `--target ase` or `--target pair_nequip` for other models."
        )
    return width


def _pair_data_settings(data: AtomicDataDict.Type) -> AtomicDataDict.Type:
    _require_deq(PAIR_NEQUIP_DEQ_TARGET)
    if _built["state_cache"] is None:
        raise RuntimeError(
            f"compile target `{PAIR_NEQUIP_DEQ_TARGET}` warm-starts every MD step from a state "
            "kept inside the model: add `--modifiers enable_DEQStateCache` to nequip-compile "
            "(or use `--target pair_nequip` for a model that starts cold every step)."
        )
    return single_frame_data_settings(data)


def _data_settings(data: AtomicDataDict.Type) -> AtomicDataDict.Type:
    width = _require_deq(ASE_DEQ_TARGET)
    data = single_frame_data_settings(data)
    num_atoms = data[AtomicDataDict.POSITIONS_KEY].shape[0]
    dtype = data[AtomicDataDict.POSITIONS_KEY].dtype
    # distinct tensors: export merges inputs that are the same object
    data[DEQ_STATE_KEY] = torch.zeros(num_atoms, width, dtype=dtype)
    data[DEQ_ADJOINT_STATE_KEY] = torch.zeros(num_atoms, width, dtype=dtype)
    # a variational model does not iterate compiled: nequip-compile's check of the eager model
    # against the compiled one must not iterate either
    tolerance = float("inf") if _built["variational"] else 1e-4
    data[DEQ_TOLERANCE_KEY] = torch.full((1, 2), tolerance, dtype=dtype)
    return data


register_compile_targets(
    {
        ASE_DEQ_TARGET: {
            "input": PAIR_NEQUIP_INPUTS + [DEQ_STATE_KEY, DEQ_ADJOINT_STATE_KEY, DEQ_TOLERANCE_KEY],
            "output": ASE_OUTPUTS
            + [DEQ_STATE_KEY, DEQ_ADJOINT_STATE_KEY]
            + list(SOLVER_STATISTICS),
            "batch_map_settings": single_frame_batch_map_settings,
            "data_settings": _data_settings,
        },
        PAIR_NEQUIP_DEQ_TARGET: {
            "input": list(PAIR_NEQUIP_INPUTS),
            "output": LMP_OUTPUTS + list(SOLVER_STATISTICS),
            "batch_map_settings": single_frame_batch_map_settings,
            "data_settings": _pair_data_settings,
        },
    }
)


def compiled_target(metadata: dict) -> str:
    """Name of the nequip-compile target whose inputs and outputs a compiled model's metadata
    lists (``custom`` when none matches)."""
    from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
    from nequip.utils.aoti_metadata import (
        NEQUIP_AOTI_INPUTS_KEY,
        NEQUIP_AOTI_OUTPUTS_KEY,
        parse_aoti_keys,
    )

    inputs = parse_aoti_keys(metadata.get(NEQUIP_AOTI_INPUTS_KEY, ""))
    outputs = parse_aoti_keys(metadata.get(NEQUIP_AOTI_OUTPUTS_KEY, ""))
    for name, target in COMPILE_TARGET_DICT.items():
        if list(target["input"]) == inputs and list(target["output"]) == outputs:
            return name
    return "custom"


def solver_limits(metadata: dict):
    """The solver tolerances and iteration caps a compiled DEQ model records
    (``{"f_tol": ..., "f_max_iter": ..., "b_tol": ..., "b_max_iter": ...}``), or ``None`` for a
    model that records none (not a DEQ, or compiled before they were recorded)."""
    if not all(k in metadata for k in SOLVER_METADATA_KEYS):
        return None
    return {
        k[len("deq_"):]: (int if k.endswith("max_iter") else float)(metadata[k])
        for k in SOLVER_METADATA_KEYS
    }
