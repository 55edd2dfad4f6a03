"""nequip's Lightning modules plus what DEQ training needs: solver statistics logged as
metrics and an optional Jacobian-regularisation loss term."""

import warnings
from typing import Optional

import torch

from nequip.data import AtomicDataDict
from nequip.train import EMALightningModule, NequIPLightningModule

from .._keys import (
    DEQ_BACKWARD_STATISTICS_KEY,
    DEQ_JACOBIAN_PENALTY_KEY,
    DEQ_PENALTY_STEP_KEY,
    DEQ_TOLERANCE_KEY,
    SOLVER_STATISTICS,
)
from .fixed_point_store import FixedPointStore


class _DEQTraining:
    """Mixin over a :class:`~nequip.train.NequIPLightningModule`.

    - Logs the mean of ``deq_iterations``, ``deq_residual``, ``deq_adjoint_iterations`` and
      ``deq_adjoint_residual`` over each batch, for training (``train_deq/...``) and validation
      (``val_deq/...``), and the largest residuals (``.../max_deq_residual`` ...), so a solve
      that drifts towards non-convergence during training is visible in the logs; in training
      also the implicit gradient's backward solve (``train_deq/deq_backward_iterations``,
      ``train_deq/deq_backward_residual``, ``train_deq/max_deq_backward_residual``).
    - ``jacobian_penalty_weight`` :math:`\\lambda > 0` adds
      :math:`\\lambda\\,\\|\\partial f/\\partial z\\|_F^2/\\dim z` (Hutchinson estimate at
      :math:`z^*`) to the training loss, which keeps :math:`f` contractive (the model must be
      built with ``jacobian_penalty: true``), on every ``jacobian_penalty_every``-th training
      step (its estimate costs a second-order backward pass through :math:`f`); with weight 0
      the estimate is not computed at all.
    - ``warm_start_training``: start every training frame's solves from its fixed point of
      the previous epoch (:mod:`~nequip_deq.train.fixed_point_store`; needs the
      ``frame_index`` field that :class:`~nequip_deq.data.MD17DataModule` provides), logging
      the fraction of frames that started warm (``train_deq/warm_start_fraction``).
      Validation and test always start cold.
    - ``train_tol``: the relative tolerance of the forward, adjoint and backward solves in
      training steps only (validation, test and the trained model keep the model's ``f_tol``,
      ``b_tol``, ``grad_tol``): looser solves make training steps cheaper; the gradient is then
      exact to that tolerance.

    Nothing is changed on the model: a training batch carries these settings as inputs
    (``deq_tolerance``, ``deq_jacobian_penalty_step``), and the model returns what is logged
    and added to the loss as outputs (``deq_jacobian_penalty``; ``deq_backward_statistics``,
    filled by the backward pass).
    """

    def _init_deq(
        self,
        jacobian_penalty_weight: float,
        jacobian_penalty_every: int,
        warm_start_training: bool,
        train_tol: Optional[float],
    ) -> None:
        if jacobian_penalty_weight < 0:
            raise ValueError(
                f"`jacobian_penalty_weight={jacobian_penalty_weight}` must be >= 0 (e.g. 1.0)."
            )
        if int(jacobian_penalty_every) != jacobian_penalty_every or jacobian_penalty_every < 1:
            raise ValueError(
                f"`jacobian_penalty_every={jacobian_penalty_every}` must be a whole number of "
                "training steps >= 1 (1: every step)."
            )
        self.jacobian_penalty_every = int(jacobian_penalty_every)
        if train_tol is not None and not 0.0 < train_tol < 1.0:
            raise ValueError(
                f"`train_tol={train_tol}` must be a relative tolerance in (0, 1), e.g. 1e-3, "
                "or null to train at the model's tolerances."
            )
        self.train_tol = train_tol
        self.jacobian_penalty_weight = float(jacobian_penalty_weight)
        self.fixed_point_store = FixedPointStore() if warm_start_training else None
        self._warned_no_frame_index = False
        self._deq_output = None
        self._backward_statistics = None

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
        store = self.fixed_point_store
        if store is not None:
            warm = store.warm_start(batch)
            if warm is not None:
                self.log("train_deq/warm_start_fraction", warm)
            elif not self._warned_no_frame_index:
                self._warned_no_frame_index = True
                warnings.warn(
                    "`warm_start_training: true` but the training batches have no `frame_index` "
                    "field, so every training solve starts cold. nequip_deq.data.MD17DataModule "
                    "adds it; with another data module, add a per-frame integer `frame_index`."
                )
        penalty_step = (
            self.jacobian_penalty_weight > 0
            and self.global_step % self.jacobian_penalty_every == 0
        )
        self._training_inputs(batch, penalty_step)
        loss = super().training_step(batch, batch_idx, dataloader_idx)
        output = self._deq_output
        self._deq_output = None
        if store is not None:
            store.remember(batch, output)
        self._log_deq("train", output)
        self._backward_statistics = output.get(DEQ_BACKWARD_STATISTICS_KEY)
        if penalty_step:
            if DEQ_JACOBIAN_PENALTY_KEY not in output:
                raise RuntimeError(
                    "`jacobian_penalty_weight > 0` but the model computed no Jacobian penalty: "
                    "build DEQEquiformerModel with `jacobian_penalty: true`."
                )
            penalty = output[DEQ_JACOBIAN_PENALTY_KEY]
            self.log("train_deq/jacobian_penalty", penalty.detach())
            loss = loss + self.jacobian_penalty_weight * penalty * self.world_size
        if self.jacobian_penalty_weight > 0:
            # which steps computed it (between them the logged penalty keeps its last value)
            self.log("train_deq/jacobian_penalty_step", float(penalty_step))
        return loss

    def _training_inputs(self, batch: AtomicDataDict.Type, penalty_step: bool) -> None:
        """The training-step settings, as inputs of the model: ``train_tol`` as the call's
        tolerances, and whether this step computes the Jacobian penalty."""
        num_frames = AtomicDataDict.num_frames(batch)
        pos = batch[AtomicDataDict.POSITIONS_KEY]
        if self.train_tol is not None:
            batch[DEQ_TOLERANCE_KEY] = torch.full(
                (num_frames, 2), self.train_tol, dtype=pos.dtype, device=pos.device
            )
        batch[DEQ_PENALTY_STEP_KEY] = torch.full(
            (num_frames,), penalty_step, dtype=torch.bool, device=pos.device
        )

    def on_after_backward(self) -> None:
        super().on_after_backward()
        stats, self._backward_statistics = self._backward_statistics, None
        if stats is not None:  # the implicit gradient's backward solve (written by it)
            self.log_dict(
                {
                    "train_deq/deq_backward_iterations": stats[:, 0].mean(),
                    "train_deq/deq_backward_residual": stats[:, 1].mean(),
                    "train_deq/max_deq_backward_residual": stats[:, 1].max(),
                },
                batch_size=int(stats.shape[0]),
            )

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
        jacobian_penalty_every (int): compute it on every this many training steps (default 1)
        warm_start_training (bool): start each training frame's solves from its previous
            fixed point (default ``False``)
        train_tol (float): tolerance of all solves in training steps (default ``None``: the
            model's)
        **kwargs: those of :class:`~nequip.train.NequIPLightningModule`
    """

    def __init__(
        self,
        *args,
        jacobian_penalty_weight: float = 0.0,
        jacobian_penalty_every: int = 1,
        warm_start_training: bool = False,
        train_tol: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_deq(
            jacobian_penalty_weight, jacobian_penalty_every, warm_start_training, train_tol
        )


class DEQEMALightningModule(_DEQTraining, EMALightningModule):
    """:class:`~nequip.train.EMALightningModule` (exponential moving average of the weights)
    with DEQ solver statistics and Jacobian regularisation (see :class:`_DEQTraining`)."""

    def __init__(
        self,
        *args,
        jacobian_penalty_weight: float = 0.0,
        jacobian_penalty_every: int = 1,
        warm_start_training: bool = False,
        train_tol: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_deq(
            jacobian_penalty_weight, jacobian_penalty_every, warm_start_training, train_tol
        )
