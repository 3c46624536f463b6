"""One `anvil serve` child process on a loopback port: started, waited for until it answers
`/anvil/health/live`, stopped with SIGTERM (killed if it has not ended within the grace period).

The drill's isolated server and the dev cluster's nodes are both this. It imports nothing of Anvil,
so any layer may use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class ServeFailed(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_live(proc: subprocess.Popen, endpoint: str, timeout: float) -> bool:
    """Poll `endpoint`'s /anvil/health/live until it answers 200 (True), the process exits or
    `timeout` passes (False: the caller reports which, with its log)."""
    import httpx  # only the waiting needs it: `anvil` imported as a library does not

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(endpoint + "/anvil/health/live", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


class ServeProcess:
    def __init__(self, storage_path: Path, log_path: Path, *, port: int | None = None,
                 env: dict[str, str] | None = None, new_session: bool = False):
        self.storage_path = storage_path
        self.log_path = log_path
        self.port = port or free_port()
        self.env = env if env is not None else dict(os.environ)
        self.new_session = new_session  # a terminal's Ctrl-C reaches only the parent, which stops it
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(self.storage_path),
                 "--listen", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, env={**self.env, "PYTHONUNBUFFERED": "1"},
                start_new_session=self.new_session)
        if wait_until_live(self.proc, self.endpoint, timeout):
            return self
        if self.proc.poll() is not None:
            raise ServeFailed(f"exited with {self.proc.returncode}: {self.tail()}")
        self.stop()
        raise ServeFailed(f"did not start within {timeout}s: {self.tail()}")

    def signal_stop(self) -> None:
        """SIGTERM without waiting (to stop several servers at once, then `stop` each)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None:
            return
        self.signal_stop()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
