"""A new user's first hour, verbatim: the installed `sidecar serve` started from a shell
that never activated the venv (PATH=/usr/bin:/bin), and the two lines it prints pasted
as they are into another such shell, make a key and an allowed call. The README shows
the same lines. (.ci/run runs the README's test command from a fresh clone the same way.)
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import ROOT, free_port, stop_process, wait_for

MINIMAL_PATH = "/usr/bin:/bin"


def hint_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "paste in another shell" in line)
    return [line.strip() for line in lines[start + 1:start + 3]]


def test_serve_hint_pasted_as_printed_makes_a_key_and_an_allowed_call(tmp_path):
    sidecar = Path(sys.executable).parent / "sidecar"
    assert sidecar.exists(), "the package's console script (deploy/install.sh installs it)"
    home = tmp_path / "home"
    home.mkdir()
    # A new user's shell: nothing but a minimal PATH and a HOME (and, so that the test
    # never touches this machine's own store, a state home of its own).
    shell = {"PATH": MINIMAL_PATH, "HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "st")}
    port, admin = free_port(), free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(sidecar), "serve"], cwd=tmp_path, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT,
                            env={**shell, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
                                 "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}"})
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                return r.status == 200
        wait_for(ready, 30, "sidecar serve")
        make_key, try_it = hint_lines(log.read_text())
        assert make_key.startswith("KEY=$(") and try_it.startswith("curl ")
        assert f"http://127.0.0.1:{port}/" in try_it

        elsewhere = tmp_path / "another" / "folder"
        elsewhere.mkdir(parents=True)
        pasted = subprocess.run(["/bin/bash", "-c", f"set -e\n{make_key}\n{try_it}\n"],
                                env=shell, cwd=elsewhere, capture_output=True, text=True,
                                timeout=60)
        assert pasted.returncode == 0, pasted.stderr
        assert pasted.stdout.splitlines()[0].startswith("HTTP/1.1 200"), pasted.stdout
        assert "x-key-type: standard" in pasted.stdout.lower()
    finally:
        stop_process(proc)


def test_the_readme_shows_what_serve_prints(monkeypatch):
    from sidecar.cli.main import build_parser, first_key_hint
    from sidecar.cli.parsing import command_name
    from sidecar.runtime.config import Settings

    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)   # the defaults, as in the README

    printed = first_key_hint(Settings(), build_parser().parse_args(["serve"]), True)
    readme = (ROOT / "README.md").read_text()
    for line in hint_lines(printed):
        assert line.replace(command_name(), ".venv/bin/sidecar") in readme, line
