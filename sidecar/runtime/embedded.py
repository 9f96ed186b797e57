"""The embedded default: a private redis-server under the state folder, supervised.

When no redis_url is set, `serve` starts redis-server on a unix socket in the state folder
(config.state_path) with AOF on (so keys survive restarts), restarts it if it dies, and
stops it on exit. The pepper for key hashes is generated once and kept in
state_dir/pepper (mode 0600).

One process at a time owns a state folder: it holds an flock on state_dir/serve.lock and
is the only one that starts redis-server there. A `serve` holds it for its lifetime, so
a second `serve` on the same folder refuses to start. A CLI command finding the lock held
by a `serve` uses that server's redis-server (its socket) and never starts its own; with
no `serve` running it takes the lock, starts redis-server for the command and stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .config import ConfigError, Refused, Settings, state_path, with_overrides

LOCK_WAIT_S = 30.0   # how long to wait out a CLI command that holds the state folder


class EmbeddedRedis:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir).resolve()
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def running(self) -> bool:
        """Is some redis-server answering on our socket (ours or another process's)?"""
        return self._send(b"PING\r\n").startswith(b"+PONG")

    def _send(self, command: bytes) -> bytes:
        if not self.socket.exists():
            return b""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(str(self.socket))
            s.sendall(command)
            return s.recv(16)
        return b""

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server. Call it holding the state folder's lock (StateLock)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis_url: not set, and no redis-server on PATH for the "
                              "embedded default (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stop_orphan(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # our Ctrl-C reaches us, not it: we stop it in order
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"embedded redis-server exited ({self.proc.returncode}); "
                                  f"see {self.dir / 'redis.log'}")
            if self.running():
                return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"embedded redis-server did not answer within {timeout}s")

    def _stop_orphan(self, timeout: float) -> None:
        """A redis-server answering while we hold the lock was left by a process that died
        without stopping it (kill -9): nobody supervises it. SHUTDOWN writes its AOF and
        ends it, so the server we start reads every key back."""
        if not self.running():
            return
        self._send(b"SHUTDOWN\r\n")
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise Refused(f"state_dir {self.dir}: a redis-server left by an earlier run "
                              f"still answers on {self.socket} and would not shut down")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # redis flushes the AOF on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class StateLock:
    """state_dir/serve.lock, flock'ed by the one process that runs redis-server on the
    folder; the file says who ("serve PID" or "cli PID"). The kernel drops the lock when
    that process ends, however it ends, and child processes do not inherit it."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "serve.lock"
        self.fd: int | None = None

    def take(self, role: str) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{role} {os.getpid()}\n".encode(), 0)
        self.fd = fd
        return True

    def holder(self) -> tuple[str, int]:
        """(role, pid) written by the holder; ('', 0) in the instant before it writes."""
        with contextlib.suppress(OSError, ValueError):
            role, pid = self.path.read_text().split()
            return role, int(pid)
        return "", 0

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the descriptor drops the flock
            self.fd = None


def claim(state_dir: Path, role: str, wait: float = LOCK_WAIT_S) -> StateLock | int:
    """Take the state folder as `role`: the lock, or the pid of the `serve` that holds it.
    A CLI command holding it is waited for (it is brief)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = StateLock(state_dir)
    deadline = time.monotonic() + wait
    while not lock.take(role):
        who, pid = lock.holder()
        if who == "serve":
            return pid
        if time.monotonic() > deadline:
            raise Refused(f"state_dir {state_dir}: still in use by process {pid} after "
                          f"{wait:g}s")
        time.sleep(0.05)
    return lock


def store_exists(state_dir: Path) -> bool:
    """Has a `serve` ever run on this folder (its pepper or its AOF is there)?"""
    return (state_dir / "pepper").exists() or (state_dir / "appendonlydir").exists()


def pepper_for(state_dir: str | Path) -> str:
    """The embedded default's pepper: made once, then read back."""
    path = Path(state_dir).resolve() / "pepper"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def for_serve(settings: Settings) -> tuple[StateLock, EmbeddedRedis]:
    """The state folder for `serve`, locked for the server's lifetime (a second `serve` on
    it is refused). redis-server is started by start()."""
    state = state_path(settings)
    got = claim(state, "serve")
    if isinstance(got, int):
        raise Refused(f"state_dir {state}: another `sidecar serve` (pid {got}) is running "
                      "on it; stop it first, or give this one its own --state-dir")
    return got, EmbeddedRedis(state)


def start(settings: Settings, embedded: EmbeddedRedis) -> Settings:
    """Start the locked folder's redis-server; settings with redis_url and pepper set."""
    embedded.start()
    pepper = settings.key_pepper or pepper_for(embedded.dir)
    return with_overrides(settings, redis_url=embedded.url, key_pepper=pepper)


def for_command(settings: Settings) -> tuple[Settings, EmbeddedRedis | None, StateLock | None]:
    """Settings for one CLI command on an existing store: the running `serve`'s
    redis-server when there is one (never a second server beside it), else one started
    for the command (the caller stops it and releases the lock)."""
    state = state_path(settings)
    got = claim(state, "cli")
    embedded = EmbeddedRedis(state)
    if isinstance(got, int):
        if not embedded.running():
            raise Refused(f"the `sidecar serve` (pid {got}) on {state} has no Redis answering "
                          f"on {embedded.socket} (see {state / 'redis.log'}); nothing changed")
        pepper = settings.key_pepper or pepper_for(state)
        return with_overrides(settings, redis_url=embedded.url, key_pepper=pepper), None, None
    try:
        return start(settings, embedded), embedded, got
    except BaseException:
        embedded.stop()
        got.release()
        raise
