"""One store per state folder, wherever a command runs; one `serve` per store; a port held
by any other process is refused. All with real `sidecar` processes, real redis-servers
and real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, start_sidecar, stop_process, wait_for
from live import alive, children

from sidecar.schema.keys import KeyType, key_type

BODY = b'{"model":"gpt-5.5","messages":[]}'


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: no SIDECAR_* settings, their own HOME and state home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(HOME=str(tmp / "home"), XDG_STATE_HOME=str(tmp / "xdg"), **extra)
    return env


def cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def serve_once(env: dict[str, str], *args: str, cwd: Path,
               **settings: str) -> subprocess.CompletedProcess:
    """A `serve` expected to refuse at once (bounded: a hang fails the test)."""
    env = {**env, **{"SIDECAR_" + k.upper(): v for k, v in settings.items()}}
    return cli(env, "serve", *args, cwd=cwd)


def one_line(done: subprocess.CompletedProcess, rc: int, *fragments: str) -> str:
    assert done.returncode == rc, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def authz(car, key: str) -> int:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(car.url + "/authz/v1/chat/completions", data=BODY,
                                 headers={"Authorization": f"Bearer {key}"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def start_sidecar_env(tmp: Path, env: dict[str, str], *args: str, **settings: str):
    """start_sidecar on the embedded default with `env` (SIDECAR_* in it included)."""
    return start_sidecar(tmp, None, *args, env=env, **settings)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def redis_children(pid: int) -> list[int]:
    return [p for p in children(pid)
            if Path(f"/proc/{p}/comm").read_text().strip() == "redis-server"]


def redis_processes_under(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "redis-server" in cmdline and str(path) in cmdline:
            found.append(int(proc.name))
    return found


@pytest.fixture
def cleanup():
    """Stops whatever a test started, even when it failed midway."""
    procs: list[subprocess.Popen] = []
    dirs: list[Path] = []
    yield procs, dirs
    for proc in procs:
        stop_process(proc)
    for path in dirs:
        for pid in redis_processes_under(path):
            os.kill(pid, signal.SIGKILL)


# -- item 3: one store, wherever the command runs ------------------------------------------

def test_cli_with_no_store_says_where_it_looked_and_makes_nothing(tmp_path):
    env = base_env(tmp_path)
    default = tmp_path / "xdg" / "llm-key-sidecar"
    for args in (["keys", "list"], ["keys", "create", "--quota", "1"], ["admin", "bootstrap"]):
        line = one_line(cli(env, *args, cwd=tmp_path / "elsewhere"), 1, str(default),
                        "serve", "--state-dir")
        assert "default state_dir" in line
    assert not default.exists()
    assert list((tmp_path / "elsewhere").iterdir()) == []   # no .sidecar-state here either

    named = tmp_path / "mine"
    one_line(cli(env, "keys", "list", "--state-dir", str(named), cwd=tmp_path), 1,
             str(named))
    assert not named.exists()


def test_cli_from_any_directory_uses_the_running_servers_store(tmp_path, cleanup):
    procs, dirs = cleanup
    env = base_env(tmp_path)
    state = tmp_path / "xdg" / "llm-key-sidecar"          # the default, from XDG_STATE_HOME
    dirs.append(state)
    serve_dir = tmp_path / "serve-here"
    serve_dir.mkdir()
    car = start_sidecar_env(serve_dir, env)
    procs.append(car.proc)
    assert (state / "pepper").exists() and len(redis_children(car.proc.pid)) == 1

    # From two other folders, by relative path and through the environment too.
    made = cli(env, "keys", "create", "--quota", "2", "--quiet", cwd=tmp_path / "a" / "b")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert authz(car, key) == 200          # the server's Redis, the server's pepper
    listed = cli({**env, "SIDECAR_STATE_DIR": "../xdg/llm-key-sidecar"}, "keys", "list",
                 "--json", cwd=tmp_path / "a")
    assert listed.returncode == 0, listed.stderr
    assert [v["quota_used"] for v in json.loads(listed.stdout)] == [1]
    # The CLI used the server's redis-server: none of its own, no store beside it.
    assert redis_processes_under(state) == redis_children(car.proc.pid)
    assert not list(tmp_path.rglob(".sidecar-state"))


def test_cli_never_writes_beside_a_server_whose_redis_is_down(tmp_path, cleanup):
    """While the server cannot reach its Redis (it answers 503), the CLI must not start a
    Redis of its own on the same folder and report a key that the server cannot see."""
    procs, dirs = cleanup
    env = base_env(tmp_path)
    dirs.append(tmp_path / "xdg")
    car = start_sidecar_env(tmp_path / "run", env)
    procs.append(car.proc)
    [redis_pid] = redis_children(car.proc.pid)
    os.kill(redis_pid, signal.SIGSTOP)       # a hung Redis: the socket exists, no answer
    try:
        assert authz(car, "sk-" + "a" * 40) == 503
        done = cli(env, "keys", "create", "--quota", "1", cwd=tmp_path)
        one_line(done, 1, "no Redis answering", f"pid {car.proc.pid}", "nothing changed")
        assert redis_processes_under(tmp_path / "xdg") == [redis_pid]
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    listed = cli(env, "keys", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr


def test_without_a_server_the_cli_starts_redis_for_the_command_and_stops_it(tmp_path,
                                                                            cleanup):
    procs, dirs = cleanup
    state = tmp_path / "state"
    dirs.append(state)
    env = base_env(tmp_path, SIDECAR_STATE_DIR=str(state))
    car = start_sidecar_env(tmp_path / "run", env)      # creates the store, then stops
    stop_process(car.proc)
    assert redis_processes_under(state) == []

    done = cli(env, "keys", "create", "--name", "emb", "--quota", "4", "--json",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert key_type(made["key"]) is KeyType.standard
    assert (state / "pepper").stat().st_mode & 0o077 == 0
    assert redis_processes_under(state) == []
    # The next command reads the AOF back; the next server serves the key.
    done = cli(env, "keys", "list", "--json", cwd=ROOT)
    assert [(v["id"], v["quota_remaining"]) for v in json.loads(done.stdout)] == [
        (made["id"], 4)]
    assert made["key"] not in done.stdout
    car = start_sidecar_env(tmp_path / "run", env)
    procs.append(car.proc)
    assert authz(car, made["key"]) == 200


# -- item 4: one serve per store; ports held by others are refused ------------------------

def test_a_second_serve_on_the_same_store_refuses(tmp_path, cleanup):
    procs, dirs = cleanup
    env = base_env(tmp_path)
    dirs.append(tmp_path / "xdg")
    first = start_sidecar_env(tmp_path / "one", env)
    procs.append(first.proc)
    key = cli(env, "keys", "create", "--unlimited", "--quiet", cwd=tmp_path).stdout.strip()

    for args in ((), ("--workers", "2")):
        second = serve_once(env, *args, cwd=tmp_path / "two",
                            listen=f"127.0.0.1:{free_port()}",
                            admin_listen=f"127.0.0.1:{free_port()}")
        one_line(second, 1, "another `sidecar serve`", f"pid {first.proc.pid}",
                 str(tmp_path / "xdg" / "llm-key-sidecar"))
    # The first one never noticed: same Redis, still serving.
    assert first.proc.poll() is None and len(redis_children(first.proc.pid)) == 1
    assert authz(first, key) == 200

    # A serve killed outright leaves its redis-server behind; the next one takes over.
    [orphan] = redis_children(first.proc.pid)
    first.proc.kill()
    first.proc.wait(10)
    assert alive(orphan)
    again = start_sidecar_env(tmp_path / "three", env)
    procs.append(again.proc)
    wait_for(lambda: not alive(orphan), 10, "the orphaned redis-server to stop")
    assert authz(again, key) == 200       # its AOF was written before it stopped


def listener(port: int, reuse_port: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_held_by_another_process_is_address_in_use(tmp_path, cleanup, which,
                                                          reuse_port, workers):
    procs, dirs = cleanup
    env = base_env(tmp_path)
    dirs.append(tmp_path / "xdg")
    ports = {"listen": free_port(), "admin_listen": free_port()}
    held = listener(ports[which], reuse_port)   # another process's listener, as a socket
    try:
        done = serve_once(env, "--workers", workers, cwd=tmp_path,
                          **{k: f"127.0.0.1:{p}" for k, p in ports.items()})
    finally:
        held.close()
    one_line(done, 1, f"{which}: 127.0.0.1:{ports[which]}: address in use")
    assert redis_processes_under(tmp_path / "xdg") == []   # refused before starting Redis


def test_two_servers_with_their_own_stores_cannot_share_a_port(tmp_path, cleanup):
    """SO_REUSEPORT is only for one server's own workers: a second server (other store,
    same data-plane port) is refused even while the first runs --workers 2."""
    procs, dirs = cleanup
    env = base_env(tmp_path)
    dirs.append(tmp_path)
    port = free_port()
    first = start_sidecar_env(tmp_path / "one", {**env, "SIDECAR_STATE_DIR":
                                                 str(tmp_path / "s1")},
                              "--workers", "2", listen=f"127.0.0.1:{port}")
    procs.append(first.proc)
    wait_for(lambda: len(children(first.proc.pid)) >= 3, 20, "two workers")
    wait_for(lambda: listening(port), 20, "the workers' port")   # bound, not just forked
    second = serve_once({**env, "SIDECAR_STATE_DIR": str(tmp_path / "s2")}, cwd=tmp_path,
                        listen=f"127.0.0.1:{port}",
                        admin_listen=f"127.0.0.1:{free_port()}")
    one_line(second, 1, f"listen: 127.0.0.1:{port}: address in use")
