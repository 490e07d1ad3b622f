"""One job per stage of a run directory: a lock file with the holder's host and PID.

Two jobs training into the same checkpoints directory corrupt each other silently (one prunes what
the other resumes from), so a second job is refused with one line naming the holder. A lock is
stale, and taken over with a warning, when its holder is a dead process on this host, or when its
heartbeat (the file's mtime, touched every HEARTBEAT_S by a thread) is older than STALE_S: a job
killed -9 on one node and requeued on another must not be locked out forever.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from pipeline.errors import StageInputError

HEARTBEAT_S = 30.0
STALE_S = 300.0


class StageLock:
    def __init__(self, path: Path, host: str, log):
        self.path, self.host, self.log = Path(path), host, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise the one line that says who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"host": self.host, "pid": os.getpid(), "since": time.time()}).encode()
        for _ in range(2):  # the second try follows removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise StageInputError(holder) from None
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(body)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return
        raise StageInputError(f"{self.path}: could not take the lock (another job keeps recreating it)")

    @contextmanager
    def held(self, dist):
        """Rank 0 holds the lock for the block; if it cannot, every rank stops with its line."""
        refused = None
        if dist.is_main:
            try:
                self.acquire()
            except StageInputError as exc:
                refused = str(exc)
        refused = dist.broadcast_object(refused)
        if refused:
            raise StageInputError(refused)
        try:
            yield self
        finally:
            if dist.is_main:
                self.release()

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def _holder(self) -> str | None:
        """Why the existing lock is valid (the refusal line), or None after removing a stale one."""
        try:
            info = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile
        except (OSError, ValueError):
            info, age = {}, STALE_S + 1  # unreadable: a lock torn by a crash
        host, pid = info.get("host", "?"), info.get("pid", "?")
        dead_here = host == self.host and isinstance(pid, int) and not psutil.pid_exists(pid)
        if dead_here or age > STALE_S:
            why = f"process {pid} on {host} is gone" if dead_here else f"no heartbeat for {age:.0f} s"
            self.log.warning(f"{self.path}: stale lock ({why}), taken over")
            self.path.unlink(missing_ok=True)
            return None
        return (f"{self.path.parent} is in use by process {pid} on {host} (lock {self.path}); wait for it, "
                f"or if no such job runs, delete the lock")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return
