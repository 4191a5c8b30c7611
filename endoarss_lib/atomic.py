"""Atomic file writes (readers see the old file or the new one, never half of one), the clean-up of what a killed
write leaves, and a folder lock (one writer at a time, a dead owner's lock taken over)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "write_bytes_atomic", "copy_atomic",
           "remove_stale_temporaries", "TEMP_SUFFIX", "folder_lock", "LockHeld", "process_alive", "why_not_written"]

TEMP_SUFFIX = ".tmp"  # every temporary file of this module is a hidden ".<stem>.<random><suffix>.tmp" beside its target

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; rename it into place on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON (indented, non-JSON values as strings) atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def copy_atomic(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a file atomically (the copy appears whole or not at all)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 600.0, recursive: bool = False) -> int:
    """Delete this module's temporary files (``.*.tmp``) older than ``older_than_s`` in ``folder``: what a write
    killed mid-way leaves behind (a live writer's file is younger). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, removed = time.time(), 0
    for p in (folder.rglob if recursive else folder.glob)(f".*{TEMP_SUFFIX}"):
        try:
            if p.is_file() and now - p.stat().st_mtime > older_than_s:
                p.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def why_not_written(path: str | os.PathLike, exc: BaseException) -> str:
    """Why a write to ``path`` failed, in words, with what to do: a full disk, a read-only or foreign folder, a name
    too long, or the error itself (torch reports a full disk as ``[enforce fail at inline_container.cc]``)."""
    path = Path(path)
    folder = next((p for p in [path.parent, *path.parents] if p.exists()), None)
    code = getattr(exc, "errno", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    free = None
    if folder is not None:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            pass
    if code == errno.ENOSPC or code == errno.EDQUOT or (free is not None and free < 64 * 2 ** 20):
        left = f" ({free / 2 ** 20:.0f} MiB free on {folder})" if free is not None else ""
        return f"the disk is full{left}; free some space or choose an out_dir on another disk"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or (folder is not None and not os.access(folder, os.W_OK)):
        return (f"{folder or path} is not writable (read-only file system or missing permission: {text}); choose a "
                f"writable out_dir")
    if code == errno.ENAMETOOLONG:
        return "a file or folder name is too long (at most 255 bytes per name); choose a shorter run_name / out_dir"
    return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------------------------ folder lock

class LockHeld(RuntimeError):
    """A folder is locked by another live process; the message names the lock file and its owner."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_record(what: str, info: dict | None = None) -> dict:
    return {**(info or {}), "pid": os.getpid(), "host": socket.gethostname(), "what": what, "token": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read_lock(lock: Path) -> dict | None:
    try:
        held = json.loads(lock.read_text())
        return held if isinstance(held, dict) and isinstance(held.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _create_lock(lock: Path, owner: dict) -> bool:
    """Create ``lock`` holding ``owner`` if it does not exist (O_EXCL); False if it does."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    return True


def _owner_is_gone(lock: Path, held: dict | None, host: str) -> bool:
    """A lock whose owner process is dead (same host) or that was never completed (unreadable, over a minute old)."""
    if held is None:
        try:
            return time.time() - lock.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    return held.get("host") == host and not process_alive(held["pid"])


def _acquire(lock: Path, owner: dict, wait_for=None, poll_s: float = 1.0) -> None:
    tries, told, unwritten = 0, False, 0
    while tries < 5:
        tries += 1
        if _create_lock(lock, owner):
            return
        held = _read_lock(lock)
        if held is None and unwritten < 40 and lock.exists() and not _owner_is_gone(lock, held, owner["host"]):
            unwritten += 1  # created a moment ago, its owner record not written yet: look again shortly
            time.sleep(0.05)
            tries -= 1
            continue
        if not _owner_is_gone(lock, held, owner["host"]):
            if held is not None and wait_for is not None and wait_for(held):
                if not told:  # the same work is under way: wait for it instead of refusing
                    warnings.warn(f"{lock}: pid {held['pid']} (since {held.get('started')}) is doing the same "
                                  f"{owner['what']} in {lock.parent}; waiting for it to finish", stacklevel=4)
                    told = True
                time.sleep(poll_s)
                tries = 0
                continue
            if held is None:
                raise LockHeld(f"{lock}: another {owner['what']} is just taking this folder's lock; try again, or "
                               f"remove {lock} if no {owner['what']} runs on this folder")
            where = "this machine" if held.get("host") == owner["host"] else f"host {held.get('host')!r}"
            since = held.get("started", "an unknown time")
            raise LockHeld(f"{lock}: a {held.get('what', owner['what'])} already works in {lock.parent} (pid "
                           f"{held['pid']} on {where}, since {since}); two at once would overwrite each other's "
                           f"files. Wait for it to finish (or stop it); if that process no longer exists, remove "
                           f"{lock}")
        stale = lock.with_name(f".{lock.name}.stale-{owner['token']}")
        try:
            os.rename(lock, stale)
        except FileNotFoundError:
            continue
        if _read_lock(stale) != held:  # another process replaced the lock meanwhile: give it back and retry
            if not _create_lock(lock, _read_lock(stale) or {}):
                stale.unlink(missing_ok=True)
            continue
        stale.unlink(missing_ok=True)
        if held is not None:
            warnings.warn(f"{lock}: took over the lock of {held.get('what', 'a process')} pid {held['pid']} "
                          f"(started {held.get('started')}), which is no longer running", stacklevel=4)
    raise LockHeld(f"{lock}: could not take the lock (other processes keep taking it); try again")


@contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".lock", what: str = "process", info: dict | None = None,
                wait_for=None, poll_s: float = 1.0) -> Iterator[Path]:
    """Hold ``folder/name`` while the block runs: one ``what`` at a time works in ``folder``.

    The lock file (created with O_EXCL) records the owner's pid, host and start time (and ``info``). A lock whose
    owner process is dead (killed, so it could not release it) is taken over with a warning; a live owner gives
    :class:`LockHeld` naming the lock file and the pid, unless ``wait_for(owner record)`` is true: then this call
    waits (polling every ``poll_s`` seconds) until the owner releases the lock or dies. The lock is removed on exit,
    if it is still ours.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    owner = _owner_record(what, info)
    _acquire(lock, owner, wait_for, poll_s)
    try:
        yield lock
    finally:
        if (_read_lock(lock) or {}).get("token") == owner["token"]:
            lock.unlink(missing_ok=True)
