"""TensorBoard event files of a training run (``RUN_DIR/tensorboard/``), beside ``metrics.jsonl``.

``tensorboard --logdir RUN_DIR/tensorboard`` shows, against the global training step:

* every ``train.log_every`` steps: ``train/loss`` (mean loss of the steps since the previous point, over all
  ranks) and ``train/samples_per_sec`` (of those steps);
* every epoch: ``epoch/train_loss``, ``epoch/samples_per_sec`` (training only) and the validation metrics
  ``val/auc``, ``val/logloss``, ``val/ne``, ``val/gauc``, ``val/gate_mean`` (MDAF models);
* at the end: the same metrics of the test split with the best checkpoint, ``test/...``.

The values are the ones the recipe has already read to the host (the loss at its ``log_every`` reads, the
metrics of each evaluation): writing them adds no host sync and no collective. Rank 0 writes; the other
ranks hold a log that writes nothing. A resumed run drops the events its earlier attempt wrote after the
checkpoint it resumes from (TensorBoard's ``purge_step``), so the curves continue without duplicates.

The events are written with ``tensorboardX`` (numpy and protobuf only; PyTorch's own
``torch.utils.tensorboard`` needs the whole ``tensorboard`` package).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

#: Metrics of an evaluation written as ``<split>/<name>`` (``gate_mean`` from ``gate.mean``).
EVAL_SCALARS = ("auc", "logloss", "ne", "gauc")


class TensorBoardLog:
    """Scalars to TensorBoard event files in ``folder``; ``folder=None`` (ranks other than 0) writes nothing.

    Args:
        folder: the run's ``tensorboard/`` folder, or ``None``.
        purge_step: when resuming from global step ``S``: events of step ``S`` or later left by the earlier
            attempt are hidden.
    """

    def __init__(self, folder: Optional[Path], purge_step: Optional[int] = None) -> None:
        self._writer: Any = None
        if folder is not None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(folder), purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, Optional[float]]) -> None:
        """Writes ``tag -> value`` at global step ``step`` (``None`` and non-finite values are skipped)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), step)

    def evaluation(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """The headline metrics of one evaluation (``auc``, ``logloss``, ``ne``, ``gauc``, gate mean)."""
        values: Dict[str, Optional[float]] = {f"{split}/{k}": metrics.get(k) for k in EVAL_SCALARS}
        if "gate" in metrics:
            values[f"{split}/gate_mean"] = metrics["gate"]["mean"]
        self.scalars(step, values)

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
