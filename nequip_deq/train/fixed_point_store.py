"""Warm-started DEQ training: each training frame's last fixed point, reused next epoch.

A training frame's fixed point :math:`z^*` and adjoint :math:`v^*` change little from one
epoch to the next (the parameters move a little), so starting the next epoch's solves there
instead of at zero saves iterations. The solves still run to their tolerances from any start:
the store changes how many iterations a step costs, not what it computes (beyond the
tolerances).

Frames are keyed by ``frame_index``, which :class:`~nequip_deq.data.MoleculeNPZDataset` adds
(index of the frame in its file). The store lives on the model's device, outside the model and
outside checkpoints: after a restart it refills itself during the first epoch (cold starts
meanwhile); in DDP each process keeps the frames it has seen (a frame a process has not seen
starts cold). Memory: two ``(atoms, X)`` tensors per training frame.
"""

from typing import Dict, Optional, Tuple

import torch

from nequip.data import AtomicDataDict

from .._keys import DEQ_ADJOINT_STATE_KEY, DEQ_STATE_KEY, FRAME_INDEX_KEY


class FixedPointStore:
    """Per-frame :math:`(z^*, v^*)` from the last training step that saw the frame."""

    def __init__(self):
        self.states: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.states)

    @staticmethod
    def _frames(batch: AtomicDataDict.Type):
        """Frame keys and per-frame atom counts of a batch (``None`` without keys)."""
        if FRAME_INDEX_KEY not in batch:
            return None, None
        keys = batch[FRAME_INDEX_KEY].reshape(-1).tolist()
        counts = batch[AtomicDataDict.NUM_NODES_KEY].reshape(-1).tolist()
        return keys, counts

    def warm_start(self, batch: AtomicDataDict.Type) -> Optional[float]:
        """Put the stored states of the batch's frames into ``batch`` as the solvers' starting
        points (``deq_state``, ``deq_adjoint_state``; zeros for frames not seen yet). Returns
        the fraction of the batch's frames that start warm, or ``None`` when the batch has no
        frame keys."""
        keys, counts = self._frames(batch)
        if keys is None:
            return None
        known = [self.states.get(k) for k in keys]
        width = next((s[0].shape[1] for s in known if s is not None), None)
        if width is None:
            return 0.0  # nothing stored yet: cold start
        pos = batch[AtomicDataDict.POSITIONS_KEY]
        z, v, warm = [], [], 0
        for state, n in zip(known, counts):
            if state is not None and state[0].shape[0] == n:
                z.append(state[0])
                v.append(state[1])
                warm += 1
            else:
                zero = pos.new_zeros(n, width)
                z.append(zero)
                v.append(zero)
        batch[DEQ_STATE_KEY] = torch.cat(z).to(pos.device)
        batch[DEQ_ADJOINT_STATE_KEY] = torch.cat(v).to(pos.device)
        return warm / len(keys)

    def remember(self, batch: AtomicDataDict.Type, output: AtomicDataDict.Type) -> None:
        """Keep the solutions of this step, per frame."""
        keys, counts = self._frames(batch)
        if keys is None or DEQ_STATE_KEY not in output:
            return
        z = output[DEQ_STATE_KEY].detach().split(counts)
        v = output[DEQ_ADJOINT_STATE_KEY].detach().split(counts)
        for k, zk, vk in zip(keys, z, v):
            self.states[k] = (zk.clone(), vk.clone())

