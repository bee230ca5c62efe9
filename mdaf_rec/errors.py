"""The base class of errors caused by the user's input."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (a config, a data file, a checkpoint, a plan, a command-line value).

    Its message names the file, key or row at fault. The ``mdaf-rec`` command line prints it as one line
    (``mdaf-rec: error: <message>``, no traceback) and exits with status 2; anything else is a bug and keeps
    its traceback.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a command, with what to do next as its message: the ``mdaf-rec`` command line
    prints ``mdaf-rec: interrupted: <message>`` (any other ``KeyboardInterrupt``: ``mdaf-rec: interrupted``),
    no traceback, and exits with status 130."""
