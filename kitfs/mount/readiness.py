"""The readiness pipe between ``kitfs mount`` and the daemon it starts: both ends of it.

The daemon (``Readiness``, given the pipe's write end by ``--ready-fd``) writes one line per
warning logged on its way (``WARNING message``: a tag mounted from the cache's memory of it,
say), then exactly one outcome, ``READY`` or ``ERROR exit-code message``, and closes the
pipe. It tells systemd the same (``READY=1``) when it has a notification socket. The parent
(``wait_ready``) prints each warning as it comes and returns the outcome; a pipe closed
without one, or no outcome in time, is ``None``.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kitfs.mount.status import sd_notify

if TYPE_CHECKING:
    from kitfs.core.modelkit import ModelKit

_READY = "READY"
_ERROR = "ERROR "
_WARNING = "WARNING "


class Readiness(logging.Handler):
    """The daemon's end: tells whoever waits (the ``kitfs mount`` parent through the pipe,
    and systemd) the outcome, and the parent each warning logged until then."""

    def __init__(self, ready_fd: int | None) -> None:
        super().__init__(logging.WARNING)
        self._fd = ready_fd
        if ready_fd is not None:
            logging.getLogger("kitfs").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd is not None and record.levelno == logging.WARNING:
            message = " ".join(record.getMessage().split())  # one line
            try:
                os.write(self._fd, f"{_WARNING}{message}\n".encode())
            except OSError:
                pass

    def _send(self, line: str) -> None:
        logging.getLogger("kitfs").removeHandler(self)
        if self._fd is None:
            return
        try:
            os.write(self._fd, line.encode() + b"\n")
            os.close(self._fd)
        except OSError:
            pass  # the parent is gone; nothing to tell
        self._fd = None

    def ready(self, kit: ModelKit, mountpoint: Path) -> None:
        sd_notify(f"READY=1\nSTATUS=serving {kit.reference} at {mountpoint}")
        self._send(_READY)

    def failed(self, exit_code: int, message: str) -> None:
        self._send(f"{_ERROR}{exit_code} {message}")


@dataclass(frozen=True)
class Outcome:
    """What the daemon said: ready (``exit_code`` 0), or failed with its code and message."""

    exit_code: int
    message: str = ""


def wait_ready(read_fd: int, timeout_s: float) -> Outcome | None:
    """The parent's end: read the pipe until the daemon's outcome, printing its warnings to
    stderr (``kitfs: WARNING: ...``); None when the pipe closed without an outcome or none
    came within ``timeout_s``. Closes ``read_fd``."""
    buffered = b""
    deadline = time.monotonic() + timeout_s
    with os.fdopen(read_fd, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(pipe.fileno(), 4096)
            if not chunk:
                break
            buffered += chunk
            while b"\n" in buffered:
                line, _, buffered = buffered.partition(b"\n")
                outcome = _outcome(line.decode(errors="replace").strip())
                if outcome is not None:
                    return outcome
    return _outcome(buffered.decode(errors="replace").strip())


def _outcome(line: str) -> Outcome | None:
    """A line's outcome; a warning is printed (None), and so is anything else."""
    if line == _READY:
        return Outcome(0)
    if line.startswith(_ERROR):
        code, _, message = line.removeprefix(_ERROR).partition(" ")
        if code.lstrip("-").isdigit():
            return Outcome(int(code), message)
    if line.startswith(_WARNING):  # logged by the daemon on its way
        print(f"kitfs: WARNING: {line.removeprefix(_WARNING)}", file=sys.stderr)
    return None
