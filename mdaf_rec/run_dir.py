"""A run directory: the files ``mdaf-rec train`` writes, the lock that keeps two jobs out of one run, and the
decision whether a command starts afresh, resumes, or must refuse.

Layout (every name is defined here, except ``vocab/``: the vocabularies' own folder name,
:data:`mdaf_rec.data.vocab.VOCAB_DIR`, also used in a dataset's cache and a serving folder)::

    RUN_DIR/
      mdaf_rec_run.json  the marker: {"project": "mdaf_rec", "kind": "run", "format_version": 1}, written first
      config.yaml        the resolved config (loadable with --config)
      plan.json          the sharding plan used
      vocab/             the vocabularies the tables are indexed by
      metrics.jsonl      one line per finished epoch
      metrics.json       final metrics
      checkpoints/       index.json + epoch_K/ and step_S/ DCP folders (see mdaf_rec.checkpoint)
      tensorboard/       TensorBoard event files (loss, AUC, logloss, NE, gate mean, samples/s)
      train.log, training_curves.png, gate_histogram.png, gate_profile.png
      .lock              host, pid and job (run id, restart) of the job that holds the run (while it runs)

A folder is a run directory when it carries the marker, which ``mdaf-rec train`` writes into a new or empty
folder before any other file; only such a folder is ever overwritten, and then only the names above (inside
``checkpoints/`` only its own ``epoch_K`` / ``step_S`` folders and index), never through a symbolic link.
A run written by an earlier version has no marker: it is recognised by its ``config.yaml`` and
``checkpoints/index.json`` and may be resumed or read (eval, export), never overwritten.
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

from mdaf_rec.artifact import has_model_marker
from mdaf_rec.data.vocab import VOCAB_DIR
from mdaf_rec.errors import UserError
from mdaf_rec.marker import format_marker, is_format_marker

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
GATE_PROFILE_FILE = "gate_profile.png"
LOCK_FILE = ".lock"
MARKER_FILE = "mdaf_rec_run.json"
RUN_KIND = "run"
RUN_FORMAT_VERSION = 1

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
    def marker(self) -> Path:
        return self.path / MARKER_FILE

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
    def gate_profile(self) -> Path:
        return self.path / GATE_PROFILE_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def is_marked(self) -> bool:
        """True if the folder carries the run marker (a regular file, not a link) that ``mdaf-rec train`` wrote."""
        if self.marker.is_symlink() or not self.marker.is_file():
            return False
        try:
            return is_format_marker(json.loads(self.marker.read_text()), RUN_KIND, RUN_FORMAT_VERSION)
        except (OSError, ValueError):
            return False

    def is_legacy_run(self) -> bool:
        """True if the folder holds an unmarked run of an earlier version: a ``config.yaml`` and a checkpoint index."""
        return not self.is_marked() and self.config.is_file() and _has_checkpoint(self)

    def is_run(self) -> bool:
        """True if the folder is a run directory: marked, or a run of an earlier version."""
        return self.is_marked() or self.is_legacy_run()

    def require(self) -> "RunDir":
        """This run directory, if it holds a run written by ``mdaf-rec train``; a one-line error otherwise."""
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} does not exist")
        if not self.is_run():
            raise RunDirError(
                f"{self.path} is not a run directory of `mdaf-rec train` (it has no {MARKER_FILE}, nor the "
                f"{CONFIG_FILE} and {CHECKPOINTS_DIR}/index.json of an earlier version's run)"
            )
        return self

    def own_files(self) -> List[Path]:
        """The files, folders and links of this run that the tool wrote and that exist (``checkpoints/`` itself
        when it is a link, else its checkpoint folders and index); the marker is not among them."""
        names = (self.config, self.plan, self.vocab, self.metrics_log, self.metrics, self.tensorboard, self.log,
                 self.curves, self.gate_histogram, self.gate_profile)
        own = [p for p in names if os.path.lexists(p)]
        if self.checkpoints.is_symlink():
            own.append(self.checkpoints)
        elif self.checkpoints.is_dir():
            own += [p for p in self.checkpoints.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
            own += [p for p in (self.checkpoints / "index.json", self.checkpoints / "index.tmp") if os.path.lexists(p)]
        return own

    def links(self) -> List[Path]:
        """The run's own entries that are symbolic links (``--overwrite`` refuses to delete through them)."""
        return [p for p in self.own_files() if p.is_symlink()]

    def start_fresh(self) -> None:
        """Makes the folder a new run: the marker first into a new or empty folder; in a marked one, deletes what
        the earlier run wrote (never another file, never through a link: a link is removed, its target kept)."""
        if not self.is_marked():
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            doc = {**format_marker(RUN_KIND, RUN_FORMAT_VERSION), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
            return
        for p in self.own_files():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if self.checkpoints.is_dir() and not self.checkpoints.is_symlink() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()

    def entries(self) -> List[str]:
        """The names in the folder, but for the lock."""
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE) if self.path.is_dir() else []

    def truncate_metrics_log(self, epochs_done: int) -> None:
        """Keeps the ``metrics.jsonl`` lines of the first ``epochs_done`` epochs (a resumed run rewrites the rest).

        A torn last line (a crash while appending it) is dropped with a warning; any other line that is not
        a JSON object is a :class:`RunDirError` naming the file and line."""
        if not self.metrics_log.exists():
            return
        text = self.metrics_log.read_text(errors="replace")
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        records = []
        for number, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append((line, record))
            elif number == lines[-1][0] and not text.endswith("\n"):
                logger.warning("%s: dropping its torn last line %d (%r), left by an interrupted write",
                               self.metrics_log, number, line[:80])
            else:
                raise RunDirError(f"{self.metrics_log}: line {number} is not a JSON object ({line[:80]!r})")
        kept = [line for line, record in records if record.get("epoch", 0) <= epochs_done]
        if len(kept) != len(lines) or not text.endswith("\n"):
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
        overwrite: ``--overwrite`` (replace the own files of the marked run there; other files are never
            touched, and an unmarked folder is never overwritten).
    Raises:
        RunDirError: the folder is not empty and not a run directory (an export folder, a user's folder),
            holds a run of another config, a run of an earlier version with ``overwrite``, a run whose own
            files include a symbolic link when they would be deleted, or (with ``resume``) no checkpoint.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    if run.is_marked():
        if overwrite:
            return _fresh(run)
        if not run.config.is_file():  # a marked folder without a config: a run stopped before writing it
            if resume:
                raise RunDirError(f"--resume: {run.path} has no run to resume yet (no {CONFIG_FILE})")
            return _fresh(run)
        return _same_run(run, config, resume, "use another --out, or --overwrite to replace that run")
    if run.is_legacy_run():
        if overwrite:
            raise RunDirError(
                f"{run.path} holds a run of an earlier version (it has no {MARKER_FILE}), which is never overwritten: "
                "use another --out, or delete that run yourself"
            )
        return _same_run(run, config, resume, "use another --out")
    entries = run.entries()
    if resume:
        raise RunDirError(f"--resume: {run.path} is not a run directory (it has no {MARKER_FILE})")
    if not entries:
        return Start.FRESH
    what = ("a model folder written by `mdaf-rec export`" if has_model_marker(run.path)
            else f"not a run directory (no {MARKER_FILE})")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise RunDirError(
        f"--out {run.path} exists and is {what}: it holds {shown}; a run is written only into a new or empty "
        "folder: choose one (nothing was written or deleted)"
    )


def _fresh(run: RunDir) -> Start:
    """Start afresh in the marked ``run`` (its own files will be deleted), unless one of them is a link."""
    links = run.links()
    if links:
        raise RunDirError(
            f"{links[0]} is a symbolic link: starting afresh would delete the run's files, and never through a link; "
            "remove the link yourself (its target is kept) or use another --out (nothing was deleted)"
        )
    return Start.FRESH


def _same_run(run: RunDir, config: Dict[str, Any], resume: bool, elsewhere: str) -> Start:
    """Resume ``run`` if it is a run of ``config`` with a checkpoint, start afresh if it has none yet; refuse a
    run of another config (``elsewhere`` says what to do instead)."""
    diffs = config_differences(load_run_config(run), config)
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:6])
        raise RunDirError(
            f"{run.path} holds a run of another config ({shown}{'; ...' if len(diffs) > 6 else ''}); {elsewhere}"
        )
    if _has_checkpoint(run):
        return Start.RESUME
    if resume:
        raise RunDirError(f"--resume: {run.path} has no checkpoint yet (index {run.checkpoints / 'index.json'} is missing)")
    return _fresh(run)


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
