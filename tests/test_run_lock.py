"""The run directory's lock: the takeover rule (same job from any host, a dead process of this host) and
one-line refusals of anything else (a live or foreign holder, a file that is not a lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from mdaf_rec.run_dir import RunDir, RunDirError, RunLock

OTHER_HOST = "node-17.cluster"


def _lock(tmp_path: Path, holder: Any) -> RunLock:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lock.write_text(holder if isinstance(holder, str) else json.dumps(holder))
    return RunLock(run)


def _job(monkeypatch: pytest.MonkeyPatch, run_id: Optional[str], restart: Optional[int]) -> None:
    for name, value in (("TORCHELASTIC_RUN_ID", run_id), ("TORCHELASTIC_RESTART_COUNT", restart)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


def _holder(host: str = OTHER_HOST, pid: int = 4242, **job: Any) -> Dict[str, Any]:
    return {"host": host, "pid": pid, "since": "2026-12-03 08:00:00", **job}


@pytest.mark.parametrize("held_restart, my_restart", [(0, 1), (2, 3), (0, 0)])
def test_an_earlier_attempt_of_the_same_job_on_another_host_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, held_restart: int, my_restart: int
) -> None:
    """torchrun's restarts count up; a TorchX --max_retries retry keeps the app id (torchrun's rdzv id) and starts
    torchrun's count at 0 again, maybe on another host."""
    _job(monkeypatch, "mdaf-rec-train-x7k2", my_restart)
    lock = _lock(tmp_path, _holder(run_id="mdaf-rec-train-x7k2", restart=held_restart))
    lock.acquire()
    written = json.loads(lock.path.read_text())
    assert (written["host"], written["pid"], written["run_id"], written["restart"]) == (
        socket.gethostname(), os.getpid(), "mdaf-rec-train-x7k2", my_restart)
    assert f"left by pid 4242 on {OTHER_HOST}" in caplog.text and "earlier attempt of this job" in caplog.text
    lock.release()
    assert not lock.path.exists()


@pytest.mark.parametrize(
    "job, held",
    [
        (("job-b", 0), {"run_id": "job-a", "restart": 0}),  # another job
        (("job-a", 0), {"run_id": "job-a", "restart": 1}),  # a later attempt of this job holds it
        (("none", 1), {"run_id": "none", "restart": 0}),  # torchrun's default rdzv id: shared by unrelated jobs
        ((None, None), {}),  # no launcher, lock of an older version
    ],
)
def test_another_hosts_lock_of_another_job_is_refused_naming_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job, held
) -> None:
    _job(monkeypatch, *job)
    lock = _lock(tmp_path, _holder(**held))
    with pytest.raises(RunDirError, match=f"is in use by pid 4242 on {OTHER_HOST} .*delete .*.lock if that process"):
        lock.acquire()
    assert json.loads(lock.path.read_text())["host"] == OTHER_HOST and not lock.held


def test_a_dead_process_of_this_host_is_reclaimed_and_a_live_one_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _job(monkeypatch, None, None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = _lock(tmp_path, _holder(host=socket.gethostname(), pid=gone.pid))
    lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    lock.path.write_text(json.dumps(_holder(host=socket.gethostname(), pid=os.getppid(), run_id="job-a")))
    with pytest.raises(RunDirError, match=f"in use by pid {os.getppid()} on .*job job-a restart 0"):
        lock.acquire()


@pytest.mark.parametrize(
    "contents",
    [
        '{"host": "h", "pid": "12ab"}',  # non-numeric pid
        '{"host": "h", "pid": 1180591620717411303424}',  # 2**70: os.kill raised OverflowError
        '{"host": "h", "pid": -5}',
        '{"host": "h", "pid": 12, "restart": "x"}',
        '{"pid": 12}',
        "[1, 2]",
        "not json",
        "",
    ],
)
def test_a_file_that_is_not_a_lock_is_a_one_line_error_naming_it(tmp_path: Path, contents: str) -> None:
    lock = _lock(tmp_path, contents)
    with pytest.raises(RunDirError) as info:
        lock.acquire()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{lock.path}: not a run lock")
    assert f"delete it if no training job is using {lock.path.parent}" in message
    assert lock.path.read_text() == contents  # left alone
