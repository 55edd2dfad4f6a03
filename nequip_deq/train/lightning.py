"""nequip's Lightning modules plus what DEQ training needs: solver statistics logged as
metrics and an optional Jacobian-regularisation loss term."""

import torch

from nequip.data import AtomicDataDict
from nequip.train import EMALightningModule, NequIPLightningModule

from .._keys import SOLVER_STATISTICS
from ..nn.fixed_point import DEQEquiformerLayer


class _DEQTraining:
    """Mixin over a :class:`~nequip.train.NequIPLightningModule`.

    - Logs the mean of ``deq_iterations``, ``deq_residual``, ``deq_adjoint_iterations`` and
      ``deq_adjoint_residual`` over each batch, for training (``train_deq/...``) and validation
      (``val_deq/...``), and the largest residuals (``.../max_deq_residual`` ...), so a solve
      that drifts towards non-convergence during training is visible in the logs.
    - ``jacobian_penalty_weight`` :math:`\\lambda > 0` adds
      :math:`\\lambda\\,\\|\\partial f/\\partial z\\|_F^2/\\dim z` (Hutchinson estimate at
      :math:`z^*`) to the training loss, which keeps :math:`f` contractive (the model must be
      built with ``jacobian_penalty: true``).
    """

    def _init_deq(self, jacobian_penalty_weight: float) -> None:
        if jacobian_penalty_weight < 0:
            raise ValueError(
                f"`jacobian_penalty_weight={jacobian_penalty_weight}` must be >= 0 (e.g. 1.0)."
            )
        self.jacobian_penalty_weight = float(jacobian_penalty_weight)
        self._deq_output = None

    def forward(self, inputs: AtomicDataDict.Type):
        out = super().forward(inputs)
        self._deq_output = out
        return out

    def _log_deq(self, stage: str, output: AtomicDataDict.Type) -> None:
        stats = {}
        for key in SOLVER_STATISTICS:
            if key in output:
                value = output[key].detach().to(torch.float64)
                stats[f"{stage}_deq/{key}"] = value.mean()
                if key.endswith("residual"):
                    stats[f"{stage}_deq/max_{key}"] = value.max()
        if stats:
            self.log_dict(stats, batch_size=int(AtomicDataDict.num_frames(output)))

    def training_step(self, batch, batch_idx, dataloader_idx=0):
        loss = super().training_step(batch, batch_idx, dataloader_idx)
        output = self._deq_output
        self._log_deq("train", output)
        if self.jacobian_penalty_weight > 0:
            penalties = [
                m.last_jacobian_penalty
                for m in self.model.modules()
                if isinstance(m, DEQEquiformerLayer) and m.last_jacobian_penalty is not None
            ]
            if not penalties:
                raise RuntimeError(
                    "`jacobian_penalty_weight > 0` but the model computed no Jacobian penalty: "
                    "build DEQEquiformerModel with `jacobian_penalty: true`."
                )
            penalty = torch.stack(penalties).sum()
            for m in self.model.modules():
                if isinstance(m, DEQEquiformerLayer):
                    m.last_jacobian_penalty = None
            self.log("train_deq/jacobian_penalty", penalty.detach())
            loss = loss + self.jacobian_penalty_weight * penalty * self.world_size
        self._deq_output = None
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        result = super().validation_step(batch, batch_idx, dataloader_idx)
        self._log_deq("val", self._deq_output)
        self._deq_output = None
        return result


class DEQLightningModule(_DEQTraining, NequIPLightningModule):
    """:class:`~nequip.train.NequIPLightningModule` with DEQ solver statistics and
    Jacobian regularisation (see :class:`_DEQTraining`).

    Args:
        jacobian_penalty_weight (float): weight of the Jacobian penalty (default 0: off)
        **kwargs: those of :class:`~nequip.train.NequIPLightningModule`
    """

    def __init__(self, *args, jacobian_penalty_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_deq(jacobian_penalty_weight)


class DEQEMALightningModule(_DEQTraining, EMALightningModule):
    """:class:`~nequip.train.EMALightningModule` (exponential moving average of the weights)
    with DEQ solver statistics and Jacobian regularisation (see :class:`_DEQTraining`)."""

    def __init__(self, *args, jacobian_penalty_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_deq(jacobian_penalty_weight)
