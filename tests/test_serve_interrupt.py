"""Ctrl-C stops `anvil serve` (and `make run`) cleanly at any moment: exit 0, no "Aborted!", no
traceback, no make error."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _read_all(fd: int, seconds: float) -> bytes:
    out = bytearray()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


@pytest.mark.parametrize("when", [0.3, 1.0, "serving"])
def test_sigint_stops_serve_quietly(tmp_path: Path, when: float | str) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(tmp_path / "d"),
                             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if when == "serving":
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/anvil/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
    else:
        time.sleep(float(when))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Aborted!" not in text and "Traceback" not in text and "KeyboardInterrupt" not in text, text
    if when == "serving":
        assert "stopped" in text.splitlines()[-1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_ctrl_c_on_make_run_is_clean(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    # -o: the venv is installed already (make must not reinstall it); output through a terminal, as a user sees it.
    cmd = ["make", "-s", "-C", str(ROOT), "-o", str(venv / ".installed"), "run", f"VENV={venv}",
           f"STORAGE_PATH={tmp_path / 'data'}", f"API_LISTEN_ADDR=127.0.0.1:{port}"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: make in its own terminal session
        os.execvpe(cmd[0], cmd, env)
    out = bytearray()
    deadline = time.monotonic() + 60
    while b"listening on" not in out and time.monotonic() < deadline:
        out += _read_all(fd, 0.5)
    os.write(fd, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground process group (make and anvil)
    out += _read_all(fd, 30)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode(errors="replace")
    assert "listening on" in text, text
    assert "make: ***" not in text and "Aborted!" not in text and "Traceback" not in text, text
    assert "stopped" in text
    # make itself ends by the same SIGINT (as it should): that is silent in a shell, unlike an error.
    assert os.waitstatus_to_exitcode(status) in (0, -signal.SIGINT), text
