"""A real Anvil server in a subprocess on a free loopback port, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from anvil.client import AnvilClient
from anvil.serveproc import wait_until_live

# -- the `anvil` CLI ---------------------------------------------------------------------------
# A new interpreter per CLI call costs ~0.4 s of CPU in imports alone (click, rich, httpx, pydantic
# and the models), and the suite makes hundreds of calls: most run in the test's own process
# through click's CliRunner, the same command code against the same real server, in the
# environment the subprocess would have had (os.environ is swapped for the call and put back).
# Real subprocesses stay where only a process shows the behaviour: `serve`, calls from other
# threads, and the first call of each command group (`backup`, `object`, `admin`...) in each test
# module, so every module still runs each group it uses once as `python -m anvil.cli.main`.
# ANVIL_TEST_CLI=subprocess runs every call as a subprocess (what the suite did before).
CLI_IN_PROCESS = os.environ.get("ANVIL_TEST_CLI", "") != "subprocess"
_SUBPROCESS_SEEN: set[tuple[str, str]] = set()


def run_anvil(args: list[str] | tuple[str, ...], *, env: dict[str, str] | None = None,
              input: bytes | str | None = None, text: bool = False, timeout: float = 300,
              cwd: str | Path | None = None, capture_output: bool = True) -> subprocess.CompletedProcess:
    """`anvil ARGS...` as `subprocess.run(..., capture_output=True)` would run it: the completed
    process (returncode, stdout, stderr as bytes, or str with text=True); env replaces the
    environment as subprocess's `env` does (None: this process's)."""
    assert capture_output, "run_anvil always captures the output"
    args = [str(a) for a in args]
    module = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    first = (module, args[0] if args else "") not in _SUBPROCESS_SEEN
    if (not CLI_IN_PROCESS or first or args[:1] == ["serve"]
            or threading.current_thread() is not threading.main_thread()):
        _SUBPROCESS_SEEN.add((module, args[0] if args else ""))
        return subprocess.run([sys.executable, "-m", "anvil.cli.main", *args], env=env, input=input,
                              capture_output=True, text=text, timeout=timeout, cwd=cwd)
    return _run_in_process(args, env, input, text, cwd)


def _run_in_process(args: list[str], env: dict[str, str] | None, input: bytes | str | None, text: bool,
                    cwd: str | Path | None) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from anvil.cli.main import cli

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli, args, input=input.encode() if isinstance(input, str) else input,
                                    prog_name="anvil")
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    stdout, stderr, code = result.stdout_bytes, result.stderr_bytes, result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # As the interpreter ends on an uncaught exception: its traceback on stderr, status 1.
        assert result.exc_info is not None
        stderr += "".join(traceback.format_exception(*result.exc_info)).encode()
        code = 1
    if text:
        return subprocess.CompletedProcess(["anvil", *args], code, stdout.decode(), stderr.decode())
    return subprocess.CompletedProcess(["anvil", *args], code, stdout, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AnvilServer:
    def __init__(self, storage_path: Path, *, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None):
        self.storage_path = Path(storage_path)
        self.port = free_port()
        self.env = env or {}
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.storage_path.parent / f"server-{self.port}-{uuid.uuid4().hex[:6]}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> AnvilServer:
        # 60 s, not 20: a start costs ~1 s of CPU, but a machine loaded by parallel runs took >20 s
        # of wall time (a failed start is an error of every test of the module). A quick start returns
        # as soon as the server answers, so the budget costs nothing.
        # Cheap argon2 costs: tests exchange many tokens; production costs are ~100 ms each.
        env = {**os.environ, "ANVIL_ARGON2_FAST": "1", **self.env, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(self.storage_path),
             "--listen", f"127.0.0.1:{self.port}", *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        if wait_until_live(self.proc, self.endpoint, timeout):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        self.kill()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def admin_credentials(self) -> dict[str, str]:
        """The first admin's credential, written by the server at first start."""
        return json.loads((self.storage_path / "bootstrap" / "first-admin.json").read_text())

    def client(self, **kwargs) -> AnvilClient:
        """An SDK client for this server, authenticated as the first admin unless credentials are given."""
        if "token" not in kwargs and "client_id" not in kwargs:
            cred = self.admin_credentials()
            kwargs.update(client_id=cred["client_id"], client_secret=cred["client_secret"])
        return AnvilClient(self.endpoint, **kwargs)

    def auth_headers(self) -> dict[str, str]:
        """`Authorization: Bearer ...` for the first admin, for tests that speak raw HTTP (httpx, SSE)."""
        from anvil.client import exchange_token

        cred = self.admin_credentials()
        token = exchange_token(self.endpoint, cred["client_id"], cred["client_secret"])["access_token"]
        return {"authorization": f"Bearer {token}"}

    def cli_env(self) -> dict[str, str]:
        """Environment for running the `anvil` CLI against this server (as the first admin) in a subprocess."""
        cred = self.admin_credentials()
        return {**os.environ, "ANVIL_ENDPOINT": self.endpoint, "ANVIL_CLIENT_ID": cred["client_id"],
                "ANVIL_CLIENT_SECRET": cred["client_secret"]}

    def cli(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run `anvil ARGS...` against this server; returns the completed process (bytes output)."""
        proc = run_anvil(args, env=self.cli_env(), input=input, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"anvil {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
        return proc

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> AnvilServer:
        self.stop()
        self.port = free_port()
        return self.start()


@contextmanager
def moto_server(log_dir: Path, timeout: float = 60) -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the life of the block; yields its endpoint."""
    port = free_port()
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def unique_bucket(prefix: str = "b") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Cli:
    """`anvil` CLI subprocesses with a fixed environment (the caller's, minus `scrub`, plus `env`)."""

    def __init__(self, env: dict[str, str], scrub: tuple[str, ...] = ()):
        self.env, self.scrub = env, scrub

    def run(self, *args: str, creds: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in self.scrub}
        return run_anvil(args, env={**base, **self.env, **(creds or {})}, text=True)

    def json(self, *args: str, **kw) -> dict:
        proc = self.run(*args, "--json", **kw)
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout)


def populate_small_objects(path: Path, objects: int, *, bucket: str = "bench", seed: int = 5,
                           prefixes: int = 1000) -> int:
    """A store of `objects` unique small objects (1-4 KiB: inline bodies), written in this process
    with no server (the load is not what is measured); returns their bytes. Bench and tests use it."""
    import random

    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil

    rng = random.Random(seed)
    anvil = Anvil(path)
    total = 0
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, bucket)
        pending = []
        for i in range(objects):
            data = rng.randbytes(rng.randint(1024, 4096))
            total += len(data)
            pending.append(anvil.objects.submit_put_object(ctx, bucket, f"p{i % prefixes:04d}/o{i:08d}",
                                                           anvil.objects.store_bytes(data)))
            if len(pending) >= 512:
                for f in pending:
                    f.result()
                pending.clear()
        for f in pending:
            f.result()
    finally:
        anvil.close()
    return total


def blob_file_hashes(root: Path) -> dict[str, str]:
    """Every blob file under `root / "blobs"`: its name -> the SHA-256 of its bytes."""
    import hashlib

    out = {}
    for dirpath, _, names in os.walk(root / "blobs"):
        for n in names:
            if len(n) == 64:
                out[n] = hashlib.sha256((Path(dirpath) / n).read_bytes()).hexdigest()
    return out


def local_changeset(tmp_path: Path, sql: str, schema: str, setup: str = "") -> bytes:
    """A real session changeset, as a replica makes one: `sql` run on a fresh database with `schema`
    (and `setup` run before recording)."""
    from anvil.storage import sqlitefile as sf

    db = sf.Database(tmp_path / f"cs-{uuid.uuid4().hex[:6]}.sqlite")
    try:
        db.script(schema)
        if setup:
            db.script(setup)
        db.start_session()
        db.script(sql)
        return db.take_changeset()
    finally:
        db.close()


def assert_fsck_clean(storage: Path) -> None:
    """Offline `anvil fsck --deep`: exit 0 and no finding but orphan blobs (an unacknowledged write's
    body may have reached blobs/ before the kill; gc collects it after its grace period)."""
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "fsck", "--deep", "--json",
                           "--storage-path", str(storage)], capture_output=True, timeout=120)
    report = json.loads(proc.stdout)
    found = [(f["severity"], f["invariant"], f["detail"][:200]) for f in report["findings"]
             if f["invariant"] != "blobs.orphan"]
    assert proc.returncode == 0 and report["ok"] and not found, found
