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
      .lock              host, pid and job (run id, restart) of the job that holds the run (while it runs)

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
from typing import Any, Dict, List, Optional, Tuple

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


# Linux's largest pid_max (2**22): a lock naming a larger pid was not written by this tool.
_PID_MAX = 4_194_304


def job_identity() -> Tuple[Optional[str], int]:
    """This process's job: torchrun's ``TORCHELASTIC_RUN_ID`` (TorchX passes its app id as ``--rdzv_id``;
    ``None`` outside torchrun and for torchrun's default ``none``, which unrelated jobs share) and
    ``TORCHELASTIC_RESTART_COUNT`` (0 outside torchrun)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return (None if run_id == "none" else run_id), (int(restart) if restart.isdigit() else 0)


class RunLock:
    """An exclusive lock on a run directory: a ``.lock`` file naming its holder (JSON: ``host``, ``pid``,
    ``since``, and the job: ``run_id``, ``restart``, see :func:`job_identity`).

    Takeover rule (``docs/launch.md``, "One job per run directory"): an existing lock is taken over, with a
    message, when

    * it was written by the same job (same ``run_id``) at the same or an earlier restart, from any host:
      one job runs one rank 0 at a time, and torchrun's restarts and a TorchX ``--max_retries`` retry (same
      app id, torchrun's count back at 0, maybe another host) start only after the attempt before them
      stopped; or
    * its holder is a process of this host that no longer runs (``kill -9``, a replaced worker).

    Any other holder makes :meth:`acquire` fail at once naming it; a file that is not such a lock (bad JSON,
    no host, a pid that is not one) fails naming the file, with what to do.
    """

    def __init__(self, run: RunDir) -> None:
        self.path = run.lock
        self.held = False

    def acquire(self) -> None:
        run_id, restart = job_identity()
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "run_id": run_id, "restart": restart}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    reason = self._takeover_reason(holder, run_id, restart)
                    if reason is None:
                        raise RunDirError(
                            f"{self.path.parent} is in use by {_describe(holder)}; wait for it to finish, or delete "
                            f"{self.path} if that process is gone"
                        ) from None
                    logger.warning("reclaiming the lock of %s left by %s: %s", self.path.parent, _describe(holder), reason)
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

    def _holder(self) -> Optional[Dict[str, Any]]:
        """The lock's contents; ``None`` if it vanished meanwhile. Anything but a lock this tool writes is refused."""
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot read the run lock ({e.strerror})") from None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        pid = holder.get("pid") if isinstance(holder, dict) else None
        if (not isinstance(holder, dict) or not isinstance(holder.get("host"), str) or type(pid) is not int
                or not 0 < pid <= _PID_MAX or type(holder.get("restart", 0)) is not int):
            raise RunDirError(
                f"{self.path}: not a run lock (JSON with a host and a pid) but {text[:80]!r}; delete it if no "
                f"training job is using {self.path.parent}"
            )
        return holder

    @staticmethod
    def _takeover_reason(holder: Dict[str, Any], run_id: Optional[str], restart: int) -> Optional[str]:
        """Why ``holder``'s lock may be taken over (the rule in the class docstring), or ``None``."""
        if run_id is not None and holder.get("run_id") == run_id and holder.get("restart", 0) <= restart:
            return f"an earlier attempt of this job (run id {run_id}, now restart {restart})"
        if holder["host"] != socket.gethostname():
            return None  # cannot tell: another host's process may be alive
        pid = holder["pid"]
        if pid == os.getpid():
            return "this process"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "it no longer runs"
        except PermissionError:
            return None
        return "it no longer runs" if _is_zombie(pid) else None


def _describe(holder: Dict[str, Any]) -> str:
    job = f", job {holder['run_id']} restart {holder.get('restart', 0)}" if holder.get("run_id") else ""
    return f"pid {holder['pid']} on {holder['host']} (since {holder.get('since')}{job})"


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
