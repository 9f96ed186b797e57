"""The embedded default: a private redis-server under the state folder, supervised.

When no redis_url is set, `serve` starts redis-server on a unix socket in state_dir with
AOF on (so keys survive restarts), restarts it if it dies, and stops it on exit. The
pepper for key hashes is generated once and kept in state_dir/pepper (mode 0600).
The CLI uses the same socket; if no server is running, it starts one for the command.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .config import ConfigError, Settings, with_overrides


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
        if not self.socket.exists():
            return False
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(str(self.socket))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis_url: not set, and no redis-server on PATH for the "
                              "embedded default (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.running():
            raise ConfigError(f"state_dir: a redis-server already serves {self.socket}; "
                              "is another sidecar running on this state folder?")
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


def pepper_for(state_dir: str | Path) -> str:
    """The embedded default's pepper: made once, then read back."""
    path = Path(state_dir).resolve() / "pepper"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def resolve(settings: Settings) -> tuple[Settings, EmbeddedRedis | None]:
    """Settings with redis_url and key_pepper filled in for the embedded default.

    Starts the embedded redis-server unless one already answers on the state folder's
    socket (a running `serve`); the second value is the server we started, if any.
    """
    if not settings.embedded_redis:
        return settings, None
    embedded = EmbeddedRedis(settings.state_dir)
    started = None
    if not embedded.running():
        embedded.start()
        started = embedded
    pepper = settings.key_pepper or pepper_for(settings.state_dir)
    return with_overrides(settings, redis_url=embedded.url, key_pepper=pepper), started
