"""``mdaf-rec`` commands in fresh processes, without paying the imports in each.

A command-line test needs a process of its own: its exit status, its stdout and stderr, and process-wide state
(the process group, signal handlers, torch's thread count, logging) that must not leak between commands. But
``python -m mdaf_rec.cli`` spends ~6 CPU-seconds importing torch, TorchRec and FBGEMM before it reads its
arguments, which was half of the suite's time. So each test process starts one multiprocessing *forkserver*
that imports the command line's modules once; every command is a new process forked from it, which runs
``mdaf_rec.cli.main`` with the command's arguments, environment and working directory and exits with its
status, its stdout and stderr going to files. Commands that must run as a user launches them (the console
script, torchrun, signals, resource limits) still use :mod:`subprocess`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Dict, Sequence

# What a command imports before it does anything (every subcommand's module and the heavy libraries).
PRELOAD = ["torch", "torchrec", "mdaf_rec.cli", "mdaf_rec.train", "mdaf_rec.export", "mdaf_rec.predict"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _command(argv: Sequence[str], env: Dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """The forked process: ``mdaf-rec ARGV`` in ``cwd`` with ``env``, stdout / stderr into the two files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from mdaf_rec import cli

    sys.argv = [str(Path(cli.__file__).with_name("__main__.py")), *argv]
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(argv: Sequence[str], env: Dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``mdaf-rec ARGV`` in a new process forked from the preloaded server; returns what
    :func:`subprocess.run` would (text stdout / stderr, the exit status or minus the killing signal)."""
    with tempfile.TemporaryDirectory(prefix="mdaf-cli-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = _context.Process(target=_command, args=(list(argv), dict(env), str(cwd), out, err))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["mdaf-rec", *argv], timeout)
        stdout, stderr = Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")
    return subprocess.CompletedProcess(["mdaf-rec", *argv], process.exitcode, stdout, stderr)
