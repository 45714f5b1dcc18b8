"""The mount daemon's life: start, become ready, serve, stop cleanly. The one module of the
mount that serves with pyfuse3 (its requests are answered by ``kitfs.mount.filesystem``);
starting it in the background and unmounting are ``kitfs.mount.control``'s.

Process model: one daemon process per mount (pyfuse3 serves one mount per process). Mounts
share the cache directory (SQLite WAL + per-chunk files are safe across processes) and its
quota, and a crash takes down only its own mount. ``kitfs mount`` without ``--foreground``
starts the daemon as a detached child and returns when the daemon says it is ready (or
prints why it is not); with ``--foreground`` (systemd, debugging) this process is the daemon
and tells systemd ``READY=1`` through ``$NOTIFY_SOCKET``.

Ready means: the reference is resolved and pinned, the manifest and config are checked, the
FUSE mount is made. No layer data is fetched and no index is built before that.

Stopping: ``fusermount3 -u``/``umount``/``kitfs umount`` end the FUSE session; SIGTERM,
SIGINT and SIGHUP make the daemon unmount itself. Either way it exits 0 after removing its
status file.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyfuse3
import trio

from kitfs.core.modelkit import (
    EVERYTHING,
    KitSession,
    ModelKit,
    SessionOptions,
    open_session,
    verification_label,
)
from kitfs.core.verify import VerifyState
from kitfs.errors import KitfsError, UsageError
from kitfs.format.filter import Selection
from kitfs.format.reference import Reference
from kitfs.mount import status
from kitfs.mount.auditing import MountAudit
from kitfs.mount.filesystem import READ_SECONDS_BUCKETS, KitFilesystem
from kitfs.mount.readiness import Readiness
from kitfs.mount.record import BlobStatus, MountFigures, MountStatus, ReadSeconds
from kitfs.mount.status import sd_notify

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 1.0
READ_AHEAD_KB = 1024  # 1 MiB FUSE read requests instead of 128 KiB (docs: 2x throughput)
MAX_FUSE_TASKS = 64  # concurrent FUSE requests in flight (readers never wait on each other)


@dataclass(frozen=True)
class MountOptions:
    reference: str
    mountpoint: Path
    session: SessionOptions
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    allow_other: bool = False
    read_ahead_kb: int = READ_AHEAD_KB
    audit_log: Path | None = None  # kitfs.audit's file; None: no audit log
    selection: Selection = EVERYTHING  # --filter: the parts of the kit the mount shows


# --- the daemon -----------------------------------------------------------------------------


def created_mtime_ns(created: str | None) -> int:
    """The manifest's ``org.opencontainers.image.created`` as nanoseconds, else 0."""
    if not created:
        return 0
    try:
        return int(datetime.fromisoformat(created).timestamp() * 1_000_000_000)
    except ValueError:
        return 0


def check_mountpoint(mountpoint: Path) -> None:
    """A directory we may mount on; a dead FUSE mount left there by a crash is cleared."""
    try:
        os.statvfs(mountpoint)  # not stat: the kernel may answer that from its attribute cache
    except OSError as exc:
        # A FUSE mount whose daemon died: "Transport endpoint is not connected" (or, on newer
        # kernels, "Software caused connection abort").
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            log.warning("%s: clearing a dead FUSE mount left by a crashed daemon", mountpoint)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        elif exc.errno == errno.ENOENT:
            raise UsageError(f"mountpoint {str(mountpoint)!r} does not exist") from None
        else:
            raise UsageError(f"mountpoint {str(mountpoint)!r}: {exc.strerror}") from None
    if not mountpoint.is_dir():
        raise UsageError(f"mountpoint {str(mountpoint)!r} is not a directory")
    existing = status.find_mount(mountpoint)
    if existing is not None and existing.fstype == status.FSTYPE:
        raise UsageError(f"{str(mountpoint)!r} is already a kitfs mount (of {existing.source})")


def fuse_options(options: MountOptions) -> set[str]:
    """Read-only, permission checks by the kernel, shown as ``fuse.kitfs`` with the reference
    as its source (a reference has no commas, which would split libfuse's option string)."""
    chosen = {"ro", "default_permissions", "subtype=kitfs", "fsname=" + options.reference}
    if options.allow_other:
        chosen.add("allow_other")
    return chosen


def raise_read_ahead(mountpoint: Path, read_ahead_kb: int) -> bool:
    """Raise the mount's read-ahead so the kernel sends 1 MiB reads (root only; quiet else)."""
    mount = status.find_mount(mountpoint)
    if mount is None:
        return False
    path = Path("/sys/class/bdi") / mount.device / "read_ahead_kb"
    try:
        path.write_text(str(read_ahead_kb))
    except OSError as exc:
        log.debug("read-ahead left as is (%s: %s)", path, exc.strerror)
        return False
    log.debug("read-ahead %s KiB on %s", read_ahead_kb, path)
    return True


def status_record(options: MountOptions, kit: ModelKit, session: KitSession,
                  fs: KitFilesystem, started: float) -> MountStatus:
    """This daemon's status record (``kitfs.mount.record``), as of now."""
    fetched = session.registry_statistics()
    blobs = [BlobStatus(digest=str(source.placement.descriptor.digest),
                        path=source.placement.claim or ".",
                        state=verification_label(VerifyState.of(
                            session.store.blob_state(source.content.key))))
             for source in kit.layers]
    return MountStatus(
        pid=os.getpid(), reference=options.reference, digest=str(kit.reference.digest),
        mountpoint=str(options.mountpoint), cache_dir=str(options.session.cache_dir),
        verify=options.session.verify.value, started=started,
        bytes_fetched=fetched.blob_bytes, registry_requests=fetched.requests,
        bytes_served=fs.counters.bytes_served, reads=fs.counters.reads,
        errors=fs.counters.errors, requests=fs.counters.requests,
        cache_hit_ratio=session.reader.stats.hit_ratio, blobs=blobs,
        metrics=mount_figures(options, session, fs),
    )


def mount_figures(options: MountOptions, session: KitSession, fs: KitFilesystem) -> MountFigures:
    """The figures ``kitfs metrics`` exposes for this mount (``kitfs.mount.metrics``)."""
    fetched = session.registry_statistics()
    counters = fs.counters
    chunks = session.store.chunks
    return MountFigures(
        fetched_bytes_by_host=dict(fetched.blob_bytes_by_host),
        registry_requests=fetched.requests, registry_retries=fetched.retries,
        registry_fallbacks=fetched.fallbacks, fetches_in_flight=fetched.in_flight,
        served_bytes=counters.bytes_served, requests_by_outcome=dict(counters.outcomes),
        read_seconds=ReadSeconds(bounds=list(READ_SECONDS_BUCKETS),
                                 counts=list(counters.read_buckets), sum=counters.read_seconds),
        cache_hits=session.reader.stats.chunk_hits, cache_misses=session.reader.stats.chunk_misses,
        verification_failures=counters.verification_failures,
        cache_quota_bytes=options.session.cache_size_bytes,
        cache_evicted_files=chunks.quota.evicted_files,
        cache_evicted_bytes=chunks.quota.evicted_bytes,
    )


async def serve(options: MountOptions, readiness: Readiness) -> int:
    """Mount, serve until unmounted or signalled, unmount. Returns the exit code."""
    mountpoint = options.mountpoint.absolute()
    check_mountpoint(mountpoint)
    status.make_runtime_dir()  # for the status file, rewritten every second from now on
    async with open_session(options.session) as session:
        kit = await session.open(Reference.parse(options.reference), options.selection)
        fs = KitFilesystem(session, kit, uid=options.uid, gid=options.gid,
                           mtime_ns=created_mtime_ns(kit.created))
        try:
            pyfuse3.init(fs, str(mountpoint), fuse_options(options))
        except RuntimeError as exc:
            raise UsageError(f"cannot mount on {str(mountpoint)!r}: {exc}") from None
        started = time.time()
        audit_events = MountAudit(options.audit_log, options)
        fs.on_verification_failure = audit_events.failure
        try:

            def publish() -> list[BlobStatus]:
                """Write the status record; returns its blobs."""
                session.store.check_database()  # kitfs.db deleted under us: see the store
                record = status_record(options, kit, session, fs, started)
                status.write_status(record)
                return record.blobs

            async def become_ready() -> None:
                # A stat through the mount is answered only once the kernel has finished FUSE
                # INIT (which also resets read-ahead, so raise it after): then the mount works.
                await trio.to_thread.run_sync(os.stat, mountpoint)
                raise_read_ahead(mountpoint, options.read_ahead_kb)
                audit_events.mounted(kit, session, publish())  # before anyone is told it works
                log.info("mounted %s (%s) at %s", options.reference, kit.reference.digest, mountpoint)
                readiness.ready(kit, mountpoint)
                await _publish_every(lambda: audit_events.layers(publish()))

            async with trio.open_nursery() as nursery:
                fs.background = nursery
                nursery.start_soon(become_ready, name="ready")
                nursery.start_soon(_terminate_on_signals, name="signals")
                await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            sd_notify("STOPPING=1")
            still_mounted = _is_ours(mountpoint)
            pyfuse3.close(unmount=still_mounted)
            status.remove_status(os.getpid())
            audit_events.unmounted(session.registry_statistics().blob_bytes, fs.counters.bytes_served)
            log.info("unmounted %s", mountpoint)
    return 0


def _is_ours(mountpoint: Path) -> bool:
    mount = status.find_mount(mountpoint)
    return mount is not None and mount.fstype == status.FSTYPE


async def _publish_every(publish: Callable[[], None]) -> None:
    while True:
        await trio.sleep(STATUS_INTERVAL_S)
        try:
            publish()
        except OSError as exc:
            log.warning("could not write the status file: %s", exc)


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run_foreground(options: MountOptions, ready_fd: int | None) -> int:
    """Be the daemon (``kitfs mount --foreground``)."""
    readiness = Readiness(ready_fd)
    try:
        return trio.run(serve, options, readiness)
    except KitfsError as exc:
        error = exc
    except BaseExceptionGroup as group:
        from kitfs.errors import unwrap_group

        found = unwrap_group(group)
        if not isinstance(found, KitfsError):
            raise
        error = found
    log.error("mount failed: %s", error)
    MountAudit(options.audit_log, options).failed(error.exit_code, str(error))
    readiness.failed(error.exit_code, str(error))
    raise error
