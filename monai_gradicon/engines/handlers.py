"""Ignite handlers for GradICON training: loss components, self-adaptive NCC weights, pictures.

* :class:`GradICONTermsHandler` copies every component of the last objective evaluation
  (``similarity``, ``regularizer``, ``transform_magnitude``, ``folds`` and the self-adaptive NCC
  weights ``gamma_1..gamma_Q`` of Eq. 7/8) into ``engine.state.output`` each iteration, and their epoch
  means into ``engine.state.metrics``, where MONAI's ``StatsHandler`` / ``TensorBoardStatsHandler``
  (and MLflow) log them without any glue. :func:`training_log_values` is the matching
  ``output_transform``.
* :class:`EpochSummaryHandler` writes the one line per epoch of a quiet training log (the epoch means of
  the losses and the validation metrics) and keeps the engines' own per-epoch chatter below INFO.
* :class:`RegistrationImageHandler` renders warped moving, fixed, checkerboard and deformed grid
  (:func:`monai_gradicon.visualize.overview_image`) and writes it to TensorBoard when ``tensorboard`` is
  installed, and/or as a PNG file.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from monai.utils import optional_import

from ..maps import Deformation, warp
from ..visualize import overview_image, save_overview_png
from .two_direction import GradICONTrainingLoss

Events, _ = optional_import("ignite.engine", name="Events")

__all__ = ["EpochSummaryHandler", "GradICONTermsHandler", "RegistrationImageHandler", "training_log_values"]


def training_log_values(output: Any) -> dict[str, float]:
    """``output_transform`` for ``StatsHandler``: the loss and every scalar GradICON component.

    Args:
        output: ``engine.state.output`` of a ``SupervisedTrainer`` built with ``decollate=False`` and a
            :class:`GradICONTermsHandler` attached.

    Returns:
        ``{"loss": ..., "similarity": ..., "regularizer": ..., "folds": ..., "gamma_q": ...}``.
    """
    if not isinstance(output, dict):
        raise ValueError(
            f"training_log_values expects the trainer output dict (build SupervisedTrainer with decollate=False), got {type(output).__name__}."
        )
    values = {"loss": float(torch.as_tensor(output["loss"]).detach().mean())} if "loss" in output else {}
    values.update({k: float(v) for k, v in output.items() if isinstance(v, float)})
    return values


class GradICONTermsHandler:
    """Expose the components of :class:`~monai_gradicon.engines.GradICONTrainingLoss` to MONAI logging.

    Each iteration's values go into ``engine.state.output``; their epoch means, and that of the trainer's
    ``loss``, into ``engine.state.metrics`` as ``<metric_prefix><name>`` (``train_loss``, ``train_similarity``...).

    Args:
        loss_function: the trainer's loss.
        metric_prefix: prefix of the epoch means in ``engine.state.metrics`` (default ``"train_"``).
    """

    def __init__(self, loss_function: GradICONTrainingLoss, metric_prefix: str = "train_") -> None:
        if not isinstance(loss_function, GradICONTrainingLoss):
            raise ValueError(f"loss_function must be a GradICONTrainingLoss, got {type(loss_function).__name__}.")
        self.loss_function = loss_function
        self.metric_prefix = metric_prefix
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Any) -> None:
        """Register on ``engine`` (epoch start: reset; each iteration: copy values; epoch end: means).

        Args:
            engine: the ignite engine (e.g. MONAI ``SupervisedTrainer``) using :attr:`loss_function`.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _reset(self, engine: Any) -> None:
        self._sums, self._count = {}, 0

    def _iteration(self, engine: Any) -> None:
        values = self.loss_function.log_values()
        if isinstance(engine.state.output, dict):
            engine.state.output.update(values)
            if "loss" in engine.state.output:
                values = {"loss": float(torch.as_tensor(engine.state.output["loss"]).detach().mean()), **values}
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1

    def _epoch(self, engine: Any) -> None:
        for k, v in self._sums.items():
            engine.state.metrics[f"{self.metric_prefix}{k}"] = v / max(self._count, 1)


class EpochSummaryHandler:
    """One log line per training epoch: ``Epoch: e/E -- train_loss: ... train_similarity: ... | val_mse: ...``.

    The line holds every scalar of the trainer's ``engine.state.metrics`` (the epoch means of
    :class:`GradICONTermsHandler`) and, when a validator is given, its metrics and the best key metric so
    far. A run's first epoch is announced once (``Training epochs s..E from iteration i``, which shows where a
    resumed run continues). With ``quiet_engines`` the trainer's and the validator's own loggers (ignite's
    "Epoch[n] Complete", "Engine run resuming", the checkpoint savers' "Saved checkpoint") only pass
    warnings, so that with a progress bar the log reads one line per epoch. Those loggers are ignite's
    per-class ones (``ignite.engine.engine.SupervisedTrainer``...), so every engine of that class in the
    process is quieted. Under ``torch.distributed`` only rank 0 writes; the engines are quieted on every rank.

    Args:
        validator: the evaluator run by the trainer's ``ValidationHandler``, or ``None``.
        quiet_engines: keep the engines' INFO messages out of the log (``False``: ignite's messages as usual).
        name: the logger to write to.
    """

    def __init__(self, validator: Any = None, quiet_engines: bool = True, name: str = "monai_gradicon.training") -> None:
        self.validator = validator
        self.quiet_engines = bool(quiet_engines)
        self.logger = logging.getLogger(name)
        self._announced = False

    def attach(self, engine: Any) -> None:
        """Register on ``engine`` (first epoch start: the announcement; each epoch end: the summary line).

        Args:
            engine: the trainer (an ignite engine, e.g. MONAI ``SupervisedTrainer``).
        """
        if self.quiet_engines:
            for quieted in (engine, self.validator):
                if quieted is not None and hasattr(quieted, "logger"):
                    quieted.logger.setLevel(logging.WARNING)
        engine.add_event_handler(Events.EPOCH_STARTED, self._announce)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    @staticmethod
    def _writes() -> bool:
        return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0

    def _announce(self, engine: Any) -> None:
        if self._announced:
            return
        self._announced = True
        state = engine.state
        if self._writes():
            self.logger.info(f"Training epochs {state.epoch}..{state.max_epochs} from iteration {state.iteration}.")

    @staticmethod
    def _scalars(metrics: dict) -> str:
        return " ".join(f"{k}: {float(v):.4f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1))

    def __call__(self, engine: Any) -> None:
        if not self._writes():
            return
        line = f"Epoch: {engine.state.epoch}/{engine.state.max_epochs} -- {self._scalars(engine.state.metrics)}"
        state = getattr(self.validator, "state", None)
        if state is not None and state.metrics:
            line += f" | {self._scalars(state.metrics)}"
            best = getattr(state, "best_metric", None)
            if getattr(state, "key_metric_name", None) and best is not None:
                line += f" (best {state.key_metric_name}: {float(best):.4f} at epoch {state.best_metric_epoch})"
        self.logger.info(line.rstrip(" -"))


class RegistrationImageHandler:
    """Picture of the registration of the last training batch: fixed | moving | warped | checkerboard | grid.

    Args:
        log_dir: TensorBoard log directory and folder of the PNG files.
        interval: every ``interval`` epochs.
        summary_writer: an existing ``SummaryWriter``; default: one is created in ``log_dir`` if
            ``tensorboard`` is importable, else only PNGs are written.
        save_png: also write ``<log_dir>/registration_epoch<N>.png``.
        tag: TensorBoard image tag.
    """

    def __init__(
        self,
        log_dir: str = "./runs",
        interval: int = 1,
        summary_writer: Any = None,
        save_png: bool = True,
        tag: str = "registration",
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.log_dir = str(log_dir)
        self.interval = int(interval)
        self.save_png = bool(save_png)
        self.tag = tag
        self._writer = summary_writer
        if self._writer is None:
            writer_cls, has_tb = optional_import("torch.utils.tensorboard", name="SummaryWriter")
            if has_tb and optional_import("tensorboard")[1]:
                self._writer = writer_cls(log_dir=self.log_dir)
        self.last_png: str | None = None

    def attach(self, engine: Any) -> None:
        """Register on ``engine`` to run at the end of every ``interval``-th epoch.

        Args:
            engine: the ignite engine (``SupervisedTrainer`` with ``decollate=False`` whose network is a
                :class:`~monai_gradicon.engines.BidirectionalRegistration`).
        """
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        pred = output.get("pred") if isinstance(output, dict) else None
        if not isinstance(pred, dict) or "phi_AB" not in pred:
            raise ValueError(
                "RegistrationImageHandler needs the trainer output of BidirectionalRegistration "
                "(SupervisedTrainer with decollate=False)."
            )
        with torch.no_grad():
            phi = pred["phi_AB"]
            ddf = phi.ddf() if isinstance(phi, Deformation) else phi
            moving, fixed = pred["moving"][:1].detach(), pred["fixed"][:1].detach()
            ddf = ddf[:1].detach()
            warped = warp(moving, ddf)
        epoch = engine.state.epoch
        if self._writer is not None:
            picture = overview_image(moving[0], fixed[0], warped[0], ddf[0])
            self._writer.add_image(self.tag, torch.from_numpy(picture)[None], epoch, dataformats="CHW")
            self._writer.flush()
        if self.save_png:
            os.makedirs(self.log_dir, exist_ok=True)
            self.last_png = save_overview_png(
                os.path.join(self.log_dir, f"registration_epoch{epoch}.png"),
                moving[0], fixed[0], warped[0], ddf[0], title=f"training batch, epoch {epoch}",
            )
