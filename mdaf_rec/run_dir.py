"""A run directory: the files ``mdaf-rec train`` writes, the lock that keeps two jobs out of one run, and the
decision whether a command starts afresh, resumes, or must refuse.

Layout (every name is defined here, except ``vocab/``: the vocabularies' own folder name,
:data:`mdaf_rec.data.vocab.VOCAB_DIR`, also used in a dataset's cache and a serving folder)::

    RUN_DIR/
      config.yaml        the resolved config (loadable with --config)
      plan.json          the sharding plan used
      vocab/             the vocabularies the tables are indexed by
      metrics.jsonl      one line per finished epoch
      metrics.json       final metrics
      checkpoints/       index.json + epoch_K/ and step_S/ DCP folders (see mdaf_rec.checkpoint)
      tensorboard/       TensorBoard event files (loss, AUC, logloss, NE, gate mean, samples/s)
      train.log, training_curves.png, gate_histogram.png
      .lock              host + pid of the job that holds the run (while it runs)

The tool deletes only what it wrote: the names above, and inside ``checkpoints/`` only its own
``epoch_K`` / ``step_S`` folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Tuple

from mdaf_rec.data.vocab import VOCAB_DIR
from mdaf_rec.errors import UserError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
PLAN_FILE = "plan.json"
METRICS_LOG_FILE = "metrics.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"
CURVES_FILE = "training_curves.png"
GATE_HISTOGRAM_FILE = "gate_histogram.png"
LOCK_FILE = ".lock"

#: Checkpoint folder names the tool writes (and may delete).
CHECKPOINT_NAME = re.compile(r"^(epoch|step)_\d+$")

#: Config keys a resumed run may change; any other difference means "another run".
RESUMABLE_KEYS: Tuple[str, ...] = (
    "train.epochs",
    "train.patience",
    "train.log_every",
    "train.threads",
    "train.eval_batch_size",
    "train.pipeline",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.keep_step_checkpoints",
    "optimizer.lr",  # optimizer hyper-parameters are rebuilt from the config on resume (a new schedule)
    "optimizer.sparse_lr",
    "optimizer.weight_decay",
    "data.path",  # another copy of the same data: its vocabularies are checked against the checkpoint
    "data.num_workers",
    "data.vocab_dir",
    "eval.",
    "planning.",
)


class RunDirError(UserError):
    """The run directory cannot be used as asked (the message names it and says why)."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def plan(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def vocab(self) -> Path:
        return self.path / VOCAB_DIR

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def curves(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def gate_histogram(self) -> Path:
        return self.path / GATE_HISTOGRAM_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def is_run(self) -> bool:
        """True if the folder holds a run's ``config.yaml``."""
        return self.config.is_file()

    def require(self) -> "RunDir":
        """This run directory, if it holds a run written by ``mdaf-rec train``; a one-line error otherwise."""
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} does not exist")
        if not self.is_run():
            raise RunDirError(f"{self.path} is not a run directory of `mdaf-rec train` (it has no {CONFIG_FILE})")
        return self

    def own_files(self) -> List[Path]:
        """The files and folders of this run that the tool wrote and that exist."""
        names = (self.config, self.plan, self.vocab, self.metrics_log, self.metrics, self.tensorboard, self.log,
                 self.curves, self.gate_histogram)
        own = [p for p in names if p.exists()]
        if self.checkpoints.is_dir():
            own += [p for p in self.checkpoints.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
            own += [p for p in (self.checkpoints / "index.json", self.checkpoints / "index.tmp") if p.exists()]
        return own

    def clear(self) -> None:
        """Deletes what a previous run wrote here (never a file it did not write)."""
        for p in self.own_files():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()

    def foreign_entries(self) -> List[str]:
        """Names in the folder that are not this tool's."""
        if not self.path.is_dir():
            return []
        own = {CONFIG_FILE, PLAN_FILE, VOCAB_DIR, METRICS_LOG_FILE, METRICS_FILE, CHECKPOINTS_DIR, TENSORBOARD_DIR,
               LOG_FILE, CURVES_FILE, GATE_HISTOGRAM_FILE, LOCK_FILE}
        return sorted(p.name for p in self.path.iterdir() if p.name not in own)

    def truncate_metrics_log(self, epochs_done: int) -> None:
        """Keeps the ``metrics.jsonl`` lines of the first ``epochs_done`` epochs (a resumed run rewrites the rest)."""
        if not self.metrics_log.exists():
            return
        lines = [line for line in self.metrics_log.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs_done]
        if len(kept) != len(lines):
            self.metrics_log.write_text("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory: a ``.lock`` file holding the holder's host and pid.

    A lock left by a process that no longer runs on this host (``kill -9``, a launcher restart) is
    reclaimed with a message; a live holder, or one on another host, makes :meth:`acquire` fail at once.
    """

    def __init__(self, run: RunDir) -> None:
        self.path = run.lock
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise RunDirError(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('since')}); wait for it to finish, or delete {self.path} if that "
                        "process is gone"
                    ) from None
                logger.warning(
                    "reclaiming the lock of %s left by pid %s on %s, which no longer runs",
                    self.path.parent, holder.get("pid"), holder.get("host"),
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunDirError(f"{self.path}: could not take the run lock (another process keeps taking it)")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> Dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: Dict[str, Any]) -> bool:
        """True if the holder is a process of this host that no longer runs (or the file is unreadable)."""
        if not holder:
            return True
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell: another host's process may be alive
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------------------------------------------
# Start, resume or refuse
# --------------------------------------------------------------------------------------------------


class Start(str, Enum):
    """How a training command uses its run directory."""

    FRESH = "fresh"  # nothing of a previous run to keep: start at epoch 1
    RESUME = "resume"  # continue this run from its last checkpoint


def decide_start(run: RunDir, config: Dict[str, Any], resume: bool, overwrite: bool) -> Start:
    """Decides, before anything is written, whether a training into ``run`` starts afresh or resumes.

    Args:
        run: the run directory, an existing folder (the caller created it to take the run lock in it).
        config: the new run's resolved config as a nested dict.
        resume: ``--resume`` (the run must exist and have a checkpoint).
        overwrite: ``--overwrite`` (replace the run's own files; other files are never touched).
    Raises:
        RunDirError: the folder holds files that are not a run's, a run of another config, or (with
            ``resume``) no checkpoint.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    if not run.is_run():
        foreign = run.foreign_entries()
        own = [p.name for p in run.own_files()]
        if resume:
            raise RunDirError(f"--resume: {run.path} is not a run directory (no {CONFIG_FILE})")
        if not foreign and not own:
            return Start.FRESH
        if overwrite and not own:
            return Start.FRESH  # files of the user's stay as they are; ours go beside them
        raise RunDirError(
            f"--out {run.path} exists and is not a run directory (it holds {', '.join((foreign + own)[:5])}"
            f"{', ...' if len(foreign + own) > 5 else ''}); choose an empty or new folder"
            + ("" if overwrite else ", or pass --overwrite to write the run's files beside them")
            + (f" ({', '.join(own)} would be replaced: remove them first)" if own else "")
        )
    if overwrite:
        return Start.FRESH
    diffs = config_differences(load_run_config(run), config)
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:6])
        raise RunDirError(
            f"{run.path} holds a run of another config ({shown}{'; ...' if len(diffs) > 6 else ''}); "
            "use another --out, or --overwrite to replace that run"
        )
    if _has_checkpoint(run):
        return Start.RESUME
    if resume:
        raise RunDirError(f"--resume: {run.path} has no checkpoint yet (index {run.checkpoints / 'index.json'} is missing)")
    return Start.FRESH


def load_run_config(run: RunDir) -> Dict[str, Any]:
    """The run's ``config.yaml`` as a nested dict (one-line error if unreadable)."""
    import yaml

    try:
        data = yaml.safe_load(run.config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunDirError(f"{run.config}: cannot read the run's config ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{run.config}: not a run config (expected a mapping)")
    return data


def config_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every difference that a resume may not make."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [(k, flat_old.get(k), flat_new.get(k)) for k in keys if flat_old.get(k) != flat_new.get(k) and not _resumable(k)]


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings stay leaves)."""
    out: Dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _has_checkpoint(run: RunDir) -> bool:
    return (run.checkpoints / "index.json").is_file()
