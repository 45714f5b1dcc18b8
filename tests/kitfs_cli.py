"""The one way the tests run the real ``kitfs`` command line: ``python -m kitfs`` in a subprocess.

``run_kitfs`` runs it to completion with a given environment and returns a ``Result``;
``kitfs_runner`` binds environment variables (a cache, a runtime directory, credential places)
for a test's ``kitfs(...)`` calls; ``kitfs_argv`` is the command itself, for tests that start
a long-lived kitfs with ``subprocess.Popen``. A ``prelude`` (Python run before ``kitfs.cli.main``
in the same process) fakes what the test cannot change from outside, such as one DNS name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str
    elapsed_s: float
    peak_rss_bytes: int | None = None  # the process's high-water mark of resident memory (VmHWM)

    @property
    def text(self) -> str:
        return self.stdout.decode()


def kitfs_argv(*args: str, prelude: str = "") -> list[str]:
    """``python -m kitfs ARGS``; with a prelude, ``python -c`` runs it, then the same ``main``."""
    if not prelude:
        return [sys.executable, "-m", "kitfs", *args]
    script = f"{prelude}\nimport sys\nfrom kitfs.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", script, *args]


# Writes the process's /proc status (VmHWM) to a file as it exits. (wait4's ru_maxrss would
# count the pages of the forking test process too: they survive exec.)
_STATUS_AT_EXIT = """import atexit
from pathlib import Path
atexit.register(lambda: Path({path!r}).write_text(Path("/proc/self/status").read_text()))"""


def run_kitfs(*args: str, env: Mapping[str, str] | None = None, check: bool = False,
              timeout_s: float = 120, prelude: str = "", measure_memory: bool = False) -> Result:
    """Run ``kitfs ARGS`` to its end; ``env`` is its whole environment (default: this one's).

    With ``check`` a non-zero exit or a traceback on stderr fails the test. With
    ``measure_memory`` the result has ``peak_rss_bytes``.
    """
    with tempfile.NamedTemporaryFile() as status:
        if measure_memory:
            prelude = _STATUS_AT_EXIT.format(path=status.name) + "\n" + prelude
        started = time.monotonic()
        done = subprocess.run(kitfs_argv(*args, prelude=prelude), capture_output=True,
                              env=dict(os.environ if env is None else env), timeout=timeout_s,
                              check=False)
        elapsed_s = time.monotonic() - started
        peak_rss_bytes = next(int(line.split()[1]) * 1024 for line in
                              Path(status.name).read_text().splitlines()
                              if line.startswith("VmHWM:")) if measure_memory else None
    result = Result(done.returncode, done.stdout, done.stderr.decode(errors="replace"), elapsed_s,
                    peak_rss_bytes)
    if check:
        assert result.returncode == 0, f"kitfs {' '.join(args)} exited {result.returncode}: {result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
    return result


class Kitfs(Protocol):
    def __call__(self, *args: str, check: bool = True, timeout_s: float = 120,
                 env: Mapping[str, str] | None = None) -> Result: ...


def kitfs_runner(**variables: str) -> Kitfs:
    """``run_kitfs`` with this environment plus ``variables`` (plus a call's own ``env``),
    checked unless a call says ``check=False``."""

    def run(*args: str, check: bool = True, timeout_s: float = 120,
            env: Mapping[str, str] | None = None) -> Result:
        return run_kitfs(*args, env={**os.environ, **variables, **(env or {})}, check=check,
                         timeout_s=timeout_s)

    return run
