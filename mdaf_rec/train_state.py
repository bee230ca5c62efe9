"""What a training run carries across a restart: one typed object, written and read by the same code."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class TrainState:
    """The position and bookkeeping of a training run (``state.json`` of every checkpoint).

    Attributes:
        epochs_done: finished epochs.
        step: global optimizer steps taken.
        epoch_batches: global batches of the unfinished epoch ``epochs_done + 1`` already trained (an
            in-epoch checkpoint); 0 at an epoch boundary.
        epoch_loss_sum: this rank's sum of per-step losses over those batches (float64, exact).
        epoch_samples: global samples of those batches.
        epoch_seconds: training seconds spent in those batches.
        best_score: best validation score so far (``train.monitor``; a checkpoint of an earlier version
            holds it as ``best_auc``: its runs monitored AUC).
        best_epoch: epoch of ``best_score``.
        bad_epochs: epochs since ``best_score`` improved (early stopping).
        lr_scale: factor on every configured learning rate (dense and tables), lowered by
            ``train.lr_decay_on_plateau`` after each epoch without a better validation score.
        train_seconds: training seconds of finished epochs (evaluation excluded).
        train_samples: global samples of finished epochs.
        vocab_fingerprint: fingerprint of the vocabularies the tables are indexed by.
        world_size: processes of the job that wrote the checkpoint.
        init_from: where a warm-started run began (``train.init_from``: source checkpoint, its epoch and step,
            the tables that grew, whether the optimizer state was taken); ``None`` for a fresh start.
    """

    epochs_done: int = 0
    step: int = 0
    epoch_batches: int = 0
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    lr_scale: float = 1.0
    train_seconds: float = 0.0
    train_samples: int = 0
    vocab_fingerprint: Optional[str] = None
    world_size: int = 1
    init_from: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "TrainState":
        """Reads a ``state.json``; keys this version does not know are an error, missing ones take defaults."""
        if "best_auc" in data:  # written before train.monitor: AUC was the score
            data = {("best_score" if k == "best_auc" else k): v for k, v in data.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training-state keys {unknown}")
        return cls(**data)

    def finish_epoch(self) -> None:
        """Folds the finished epoch's counters into the run totals."""
        self.epochs_done += 1
        self.train_seconds += self.epoch_seconds
        self.train_samples += self.epoch_samples
        self.epoch_batches, self.epoch_loss_sum, self.epoch_samples, self.epoch_seconds = 0, 0.0, 0, 0.0
