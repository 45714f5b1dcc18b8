"""The FUSE device: whether this process may open ``/dev/fuse``, asked before a mount starts.

libfuse opens ``/dev/fuse`` itself and, when it may not, says only ``fuse_session_mount
failed`` (its own line on stderr names the device, but not why a user should care). Owns the
check and its messages: a missing device (no FUSE in the kernel, or a container started
without it) is ``NotInstalledError`` (exit 69); a device this user may not open (mode 0600,
as some systems ship it) is ``NoPermissionError`` (exit 77), naming the device's mode and
owner. The device is opened and closed at once: an open FUSE device with no mount on it is
nothing to the kernel.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat

from kitfs.errors import NoPermissionError, NotInstalledError

FUSE_DEVICE = "/dev/fuse"


def check_fuse_device(path: str = FUSE_DEVICE) -> None:
    """Raise the error a user can act on when ``path`` cannot be opened for reading and
    writing, as libfuse will open it; return when it can."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotInstalledError(
                f"{path} does not exist: kitfs mount needs FUSE (load the kernel module: "
                "modprobe fuse; in a container, start it with --device /dev/fuse)") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise NoPermissionError(
                f"cannot open {path}: {exc.strerror} ({_describe(path)}; you are "
                f"{_user_name(os.getuid())}); kitfs mount needs read and write access to it: "
                f"mount as root, or have an administrator give access (chmod 0666 {path} is "
                "the usual mode)") from None
        raise NotInstalledError(f"cannot open {path}: {exc.strerror}; kitfs mount needs "
                                "FUSE") from None
    os.close(fd)


def _describe(path: str) -> str:
    """``mode crw------- owner root:root``, or what stat said."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"stat: {exc.strerror}"
    return (f"mode {stat.filemode(st.st_mode)} owner {_user_name(st.st_uid)}:"
            f"{_group_name(st.st_gid)}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
