"""The model's side of a training run: what a model brings to the shared trainer.

:class:`fastseq.training.trainer.Trainer` owns the run: seeding, devices and
processes (torchrun/DDP), precision, the optimizer and learning-rate schedule,
gradient accumulation and clipping, the fault policy, evaluation scheduling,
checkpoints (atomic, resumable, best-K), logs, curves and ``metrics.json``.
A :class:`Task` owns everything model-specific, through these calls (in order)::

    task.setup(runtime)          # every rank: prepare data (rank 0 writes), load eval data
    task.train_batches()         # every rank: the epoch's batches, resumable at any batch
    task.build_model()           # every rank, right after the RNGs are seeded
    # each update, each micro-batch of this rank:
    task.num_tokens(batch)       #   loss normaliser, before the forward pass
    task.loss(model, batch)      #   -> (mean loss over those tokens, their count)
    # each evaluation, rank 0:
    task.validate(model)         # -> {"val_loss": ..., other metrics}
    task.score(metrics)          # -> lower is better (best-K, early stopping)
    # every checkpoint: task.checkpoint_extras(); last.pt: task.train_state() per rank
    task.finish(model, best)     # rank 0, best weights loaded: final test -> metrics.json

A second model plugs in by implementing a Task (and a :class:`TrainConfig`
subclass for its fields); it copies nothing of the loop.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, Mapping, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

from fastseq.training.config import TrainConfig
from fastseq.training.distributed import Context
from fastseq.training.precision import Precision


@dataclass(frozen=True)
class Runtime:
    """Where and how the run trains, handed to :meth:`Task.setup`.

    Attributes:
        ctx: this process's rank and world size, and the collectives.
        device: the device the model and batches go to.
        precision: ``precision.autocast()`` wraps forward passes (fp32: a null context).
        out: the run's output directory (checkpoints, logs, test outputs).
    """

    ctx: Context
    device: torch.device
    precision: Precision
    out: Path


class TrainBatches(Protocol):
    """An epoch of training batches, all ranks together, resumable at any batch
    (e.g. :class:`fastseq.data.batching.StreamingBatches`)."""

    @property
    def num_batches(self) -> int:
        """Global batches per epoch (the same every epoch)."""

    def iterate(self, epoch: int, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[Tuple[int, Any]]:
        """``(g, batch)`` for the global batch indices ``g >= start`` with
        ``g % world_size == rank``, in increasing order; an epoch's batches
        depend only on the seed and ``epoch``."""


class Task(abc.ABC):
    """A model's part of training (see the module docstring).

    Args:
        cfg: the run's config (a :class:`TrainConfig` subclass with the task's fields).

    Class attributes:
        checkpoint_format: the ``format`` of this task's checkpoints (``"fastseq.<model>"``).
        metrics: the validation metrics :meth:`validate` returns, in eval-log column
            order, each ``"min"`` or ``"max"`` (better); ``val_loss`` is required.
        plot_metric: ``(metric, title)`` for the second panel of ``curves.png``, or None.
    """

    checkpoint_format: ClassVar[str]
    metrics: ClassVar[Mapping[str, str]] = {"val_loss": "min"}
    plot_metric: ClassVar[Optional[Tuple[str, str]]] = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.runtime: Optional[Runtime] = None

    # ----------------------------------------------------------------- data and model

    def setup(self, runtime: Runtime) -> None:
        """Prepare the data on every rank: rank 0 writes what is missing, the others
        wait (``runtime.ctx.barrier()``) and read. Load the validation data.

        Must not draw from torch's global random generator: :meth:`build_model`
        follows and initialises the weights from it. The default stores ``runtime``.
        """
        self.runtime = runtime

    @abc.abstractmethod
    def train_batches(self) -> TrainBatches:
        """The training batches (see :class:`TrainBatches`), on every rank."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on CPU (the trainer moves it); called right after seeding."""

    # ----------------------------------------------------------------- training

    @abc.abstractmethod
    def num_tokens(self, batch: Any) -> int:
        """The number of tokens :meth:`loss` averages over, known before the forward
        pass: each micro-batch's loss is weighted by its share of the global batch."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tuple[Tensor, int]:
        """Forward ``batch`` (move it to ``runtime.device``; forward under
        ``runtime.precision.autocast()``) and return (mean loss over its tokens, a
        0-dim tensor to backpropagate; the number of those tokens).

        ``model`` is in training mode and may be the DistributedDataParallel wrapper."""

    def train_state(self) -> Any:
        """This rank's task state that an exact resume needs (plain data and CPU
        tensors, e.g. a language model's carried hidden state); gathered on rank 0
        and saved in ``last.pt``, one entry per rank. Default: None."""
        return None

    def load_train_state(self, state: Any) -> None:
        """Restore what :meth:`train_state` returned (resuming with the same world size)."""

    # ----------------------------------------------------------------- evaluation

    @abc.abstractmethod
    def validate(self, model: nn.Module) -> Dict[str, float]:
        """Validation metrics of ``model`` (rank 0): the keys of :attr:`metrics`, in
        order; ``val_loss`` NaN when there is no validation data. Leave ``model``
        in the mode it came in."""

    def score(self, metrics: Mapping[str, float]) -> float:
        """The evaluation's score for best-K retention and early stopping: lower is
        better, NaN if unavailable (the latest state then counts as the best).

        Default: ``cfg.best_metric``, negated for a ``"max"`` metric; the validation
        loss when that metric is missing or NaN."""
        name = self.cfg.best_metric
        value = metrics.get(name, math.nan)
        if math.isnan(value):
            return metrics.get("val_loss", math.nan)
        return -value if self.metrics.get(name) == "max" else value

    def describe(self, metrics: Mapping[str, float]) -> str:
        """One line of the evaluation's metrics for the progress output."""
        return ", ".join(f"{name} {metrics[name]:.3f}" for name in self.metrics if name in metrics)

    # ----------------------------------------------------------------- checkpoints and end

    def checkpoint_extras(self) -> Dict[str, Any]:
        """What every checkpoint carries besides the weights so that inference needs
        nothing else (model config, tokenizers): plain data, tensors, bytes."""
        return {}

    def finish(self, model: nn.Module, best: Mapping[str, Any]) -> Dict[str, Any]:
        """After training, on rank 0, with the best checkpoint's weights loaded in
        ``model`` (``best`` is that checkpoint): the final test. Returns the entries
        it adds to ``metrics.json`` and the result of ``train``."""
        return {}
