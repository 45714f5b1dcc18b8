"""The one exception tree of kitfs.

Every error kitfs raises on purpose is a ``KitfsError``. Each class says what a FUSE caller sees
(``errno``) and what the command line exits with (``exit_code``); the FUSE boundary and
``cli.main`` are the only places that translate, so the mapping lives here and nowhere else::

    KitfsError                      EIO       exit 70 (EX_SOFTWARE)
    ├── UsageError                  EINVAL    exit 64 (EX_USAGE)   bad option or argument
    │   └── InvalidReferenceError   EINVAL    exit 64              malformed registry/repo:tag
    ├── NotFoundError               ENOENT    exit 66 (EX_NOINPUT) tag, repo, blob or path missing
    ├── FormatError                 EIO       exit 65 (EX_DATAERR) manifest, config or tar is malformed
    │   └── UnsafeEntryError        EIO       exit 65              tar entry kit unpack refuses
    ├── IntegrityError              EIO       exit 65              bytes do not match their digest
    ├── RemoteError                 EIO       exit 69 (EX_UNAVAILABLE) registry failed after retries
    │   ├── RemoteTimeoutError      EIO       exit 69              ... or did not answer in time
    │   └── AuthError               EACCES    exit 77 (EX_NOPERM)  credentials refused
    ├── CacheError                  EIO       exit 74 (EX_IOERR)   local cache unusable
    ├── NotInstalledError           EIO       exit 69 (EX_UNAVAILABLE) an optional part is missing
    └── NoPermissionError           EACCES    exit 77 (EX_NOPERM)  a local resource is refused

This module imports nothing from kitfs.
"""

from __future__ import annotations

import copy
import errno as _errno
import os
from typing import ClassVar


class KitfsError(Exception):
    """Base of every error kitfs raises on purpose."""

    errno: ClassVar[int] = _errno.EIO
    exit_code: ClassVar[int] = os.EX_SOFTWARE


class UsageError(KitfsError):
    """A command-line option or argument is wrong."""

    errno = _errno.EINVAL
    exit_code = os.EX_USAGE


class InvalidReferenceError(UsageError):
    """A reference string is not ``registry/repo[:tag][@digest]``."""


class NotFoundError(KitfsError):
    """A tag, repository, blob, index entry or path does not exist."""

    errno = _errno.ENOENT
    exit_code = os.EX_NOINPUT


class FormatError(KitfsError):
    """A manifest, config, index or tar layer is malformed or unsupported."""

    exit_code = os.EX_DATAERR


class UnsafeEntryError(FormatError):
    """A tar entry that ``kit unpack`` refuses (absolute, ``..``, link, device, FIFO...)."""


class IntegrityError(KitfsError):
    """Bytes do not match the digest or checksum they must match."""

    exit_code = os.EX_DATAERR


class RemoteError(KitfsError):
    """The registry failed, after the retries the client allows."""

    exit_code = os.EX_UNAVAILABLE


class RemoteTimeoutError(RemoteError):
    """The registry did not answer within the configured time."""


class AuthError(RemoteError):
    """The registry refused the credentials (or there were none and it wants some)."""

    errno = _errno.EACCES
    exit_code = os.EX_NOPERM


class CacheError(KitfsError):
    """The local cache cannot be used (not the same as full: a full cache is not an error)."""

    exit_code = os.EX_IOERR


class NotInstalledError(KitfsError):
    """What a command needs is not installed (``kitfs mount`` without the ``mount`` extra)."""

    exit_code = os.EX_UNAVAILABLE


class NoPermissionError(KitfsError):
    """This user may not use a local resource kitfs needs (``/dev/fuse`` for ``kitfs mount``)."""

    errno = _errno.EACCES
    exit_code = os.EX_NOPERM


def copy_for_waiter(error: BaseException) -> BaseException:
    """A copy of an error shared by several waiters (of one fetch, one indexing): each raises
    its own instance, so tracebacks do not pile up on one object; the original is chained."""
    twin = copy.copy(error)
    twin.__cause__ = error
    return twin


def unwrap_group(exc: BaseException) -> BaseException:
    """The ``KitfsError`` inside an exception group from a nursery, if there is one.

    trio wraps errors raised in nursery tasks in ``ExceptionGroup``s; users must see the
    error itself ("blob ... not found"), not the group. Non-kitfs errors are left wrapped.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = unwrap_group(inner)
            if isinstance(found, KitfsError):
                return found
    return exc
