"""A run folder owned by one process at a time, cleaned of what interrupted runs left behind.

``with RunFolder(path):`` creates the folder (and any missing parents), takes its lock and removes temporary files
left by writes that were killed halfway. On leaving, it releases the lock and removes the folders it created if
they are still empty, so a run that fails before writing anything leaves nothing behind.

The lock is the file ``run.lock``, holding its owner's pid and host, with an exclusive ``flock`` on it. The
operating system drops a ``flock`` when its process dies however it dies (even by SIGKILL), so a lock file that can
be locked again belongs to a dead process: it is stale, and the next run says so and takes it over.
"""

import fcntl
import os
import socket
from pathlib import Path

from minivit import checkpoint

LOCK_NAME = "run.lock"


class RunLocked(Exception):
    """Another process is working in this run folder."""


class RunFolder:
    """The output folder of one training run, locked while the run works in it."""

    def __init__(self, path, log=print):
        self.path, self.log = Path(path), log
        self.lock_path = self.path / LOCK_NAME
        self._fd, self._created = None, []

    def __enter__(self):
        self._created = make_folders(self.path)
        try:
            self._lock()
            for tmp in checkpoint.remove_stale_temporaries(self.path):
                self.log(f"removed {tmp}, left by a write that was interrupted")
        except BaseException:  # Ctrl-C included: leave nothing behind
            self._release()
            raise
        return self

    def __exit__(self, *exc):
        self._release()

    def _release(self):
        if self._fd is not None:
            self.lock_path.unlink(missing_ok=True)  # before closing: the next owner always locks a fresh file
            os.close(self._fd)
            self._fd = None
        remove_empty_folders(self._created)

    def _lock(self):
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd) or "another process"
                os.close(fd)
                raise RunLocked(f"{self.path} is in use by {owner} (lock file {self.lock_path}); wait for that run "
                                "to end, or choose another --out") from None
            if _same_file(fd, self.lock_path):
                break
            os.close(fd)  # the owner removed the file while we opened it: lock the new one
        self._fd = fd
        stale = _read(fd)
        if stale:
            self.log(f"{self.lock_path}: {stale} is no longer running; taking over its stale lock")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)


def make_folders(path):
    """Create the folder ``path`` and its missing parents; return the folders created, deepest first."""
    path = Path(path)
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_folders(folders):
    """Remove each folder (deepest first, as ``make_folders`` lists them) until one is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: something was written there
            break


def _read(fd):
    return os.pread(fd, 200, 0).decode(errors="replace").strip()


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
