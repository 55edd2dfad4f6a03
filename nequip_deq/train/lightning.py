"""nequip's Lightning modules plus what DEQ training needs: solver statistics logged as
metrics and an optional Jacobian-regularisation loss term."""

import warnings
from typing import Optional

import torch

from nequip.data import AtomicDataDict
from nequip.train import EMALightningModule, NequIPLightningModule

from .._keys import SOLVER_STATISTICS
from ..nn.fixed_point import DEQEquiformerLayer
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
        layers = [m for m in self.model.modules() if isinstance(m, DEQEquiformerLayer)]
        saved = [(m.f_tol, m.b_tol, m.grad_tol, m.jacobian_penalty) for m in layers]
        penalty_step = (
            self.jacobian_penalty_weight > 0
            and self.global_step % self.jacobian_penalty_every == 0
        )
        for m in layers:
            if self.train_tol is not None:
                m.f_tol = m.b_tol = m.grad_tol = self.train_tol
            m.jacobian_penalty = m.jacobian_penalty and penalty_step
        try:
            loss = super().training_step(batch, batch_idx, dataloader_idx)
        finally:
            for m, settings in zip(layers, saved):
                m.f_tol, m.b_tol, m.grad_tol, m.jacobian_penalty = settings
        output = self._deq_output
        if store is not None:
            store.remember(batch, output)
        self._log_deq("train", output)
        if penalty_step:
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
        if self.jacobian_penalty_weight > 0:
            # which steps computed it (between them the logged penalty keeps its last value)
            self.log("train_deq/jacobian_penalty_step", float(penalty_step))
        self._deq_output = None
        return loss

    def on_after_backward(self) -> None:
        super().on_after_backward()
        for m in self.model.modules():
            if isinstance(m, DEQEquiformerLayer) and m.last_backward_statistics is not None:
                stats = m.last_backward_statistics
                m.last_backward_statistics = None
                iters = stats["iterations"].detach().to(torch.float64)
                res = stats["residual"].detach().to(torch.float64)
                self.log_dict(
                    {
                        "train_deq/deq_backward_iterations": iters.mean(),
                        "train_deq/deq_backward_residual": res.mean(),
                        "train_deq/max_deq_backward_residual": res.max(),
                    },
                    batch_size=int(iters.numel()),
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
