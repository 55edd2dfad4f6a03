"""A training run a user can watch: one line per epoch, and wall time as a metric."""

import time

import torch
from lightning.pytorch.callbacks import Callback


class EpochSummary(Callback):
    """Prints one line after every validation pass and logs the wall time since training
    started as ``time/elapsed_s`` (so learning curves can be drawn against training time):

    ``epoch 4 | 312 s | val loss 1.234 | energy MAE 45.1 meV | force MAE 98.7 meV/Å | DEQ iterations 11.2 + 14.0``

    The energy and force MAEs are nequip's ``val0_epoch/total_energy_mae`` and
    ``val0_epoch/forces_mae`` (eV, eV/Å, printed in meV); the DEQ iterations (forward +
    adjoint, mean per frame) appear for DEQ models trained with
    :class:`~nequip_deq.train.DEQLightningModule`.
    """

    def __init__(self):
        super().__init__()
        self._start = None
        self._validated_at = None  # wall time of the validation pass to report

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def _elapsed(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self._start is None:
            return
        self._validated_at = self._elapsed()
        pl_module.log("time/elapsed_s", self._validated_at, rank_zero_only=True, sync_dist=False)

    def on_validation_end(self, trainer, pl_module):
        if self._validated_at is None or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)}
        parts = [f"epoch {trainer.current_epoch}", f"{self._validated_at:.0f} s"]
        self._validated_at = None
        if "val0_epoch/weighted_sum" in m:
            parts.append(f"val loss {m['val0_epoch/weighted_sum']:.4g}")
        if "val0_epoch/total_energy_mae" in m:
            parts.append(f"energy MAE {1000 * m['val0_epoch/total_energy_mae']:.1f} meV")
        if "val0_epoch/forces_mae" in m:
            parts.append(f"force MAE {1000 * m['val0_epoch/forces_mae']:.1f} meV/Å")
        if "val_deq/deq_iterations" in m:
            parts.append(
                f"DEQ iterations {m['val_deq/deq_iterations']:.1f} + "
                f"{m.get('val_deq/deq_adjoint_iterations', 0.0):.1f}"
            )
        print(" | ".join(parts), flush=True)
