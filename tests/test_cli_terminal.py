"""What the CLI draws on a terminal and what it prints into a pipe (docs/cli.md): progress bars
for large transfers only on a TTY, tables that adapt to the terminal and never cut ids."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

from tests.helpers import AnvilServer, unique_bucket

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_tty(server: AnvilServer, *args: str, columns: int = 100, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `anvil ARGS` with stdout and stderr on a pseudo-terminal; (exit status, what it drew)."""
    leader, follower = pty.openpty()
    env = {**server.cli_env(), "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm-256color", **(env or {})}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", *args], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = bytearray()
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    return proc.wait(60), ANSI.sub("", out.decode(errors="replace"))


def test_large_put_and_get_show_progress_on_a_terminal_only(server: AnvilServer, tmp_path: Path) -> None:
    bucket = unique_bucket("tty")
    server.cli("bucket", "create", bucket)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))  # above one part: the multipart path
    status, drawn = on_tty(server, "object", "put", bucket, "big.bin", str(big))
    assert status == 0, drawn
    assert "put big.bin" in drawn and "MB" in drawn and "/s" in drawn, drawn  # bytes, rate
    assert "version" in drawn
    status, drawn = on_tty(server, "object", "get", bucket, "big.bin", str(tmp_path / "copy.bin"))
    assert status == 0 and "get big.bin" in drawn and "/s" in drawn, drawn
    assert (tmp_path / "copy.bin").read_bytes() == big.read_bytes()
    # Piped: no bar, no control sequences; the result line only.
    piped = server.cli("object", "put", bucket, "big2.bin", str(big))
    assert piped.stderr == b"" and b"\x1b[" not in piped.stdout and piped.stdout.startswith(b"put ")
    piped = server.cli("object", "get", bucket, "big2.bin", str(tmp_path / "copy2.bin"))
    assert piped.stderr == b"" and (tmp_path / "copy2.bin").read_bytes() == big.read_bytes()


def test_tables_never_cut_ids(server: AnvilServer) -> None:
    bucket = unique_bucket("tbl")
    server.cli("bucket", "create", bucket, "--versioning", "Enabled")
    key = "a/" + "k" * 120  # far wider than any terminal column
    server.cli("object", "put", bucket, key, "-", input=b"x")
    piped = server.cli("object", "versions", bucket).stdout.decode()
    assert key in piped and "…" not in piped  # whole, on one line, however narrow the default
    header, row = piped.splitlines()[:2]
    assert header.split() == ["key", "version", "latest", "size", "modified"]
    assert row.split()[0] == key
    status, drawn = on_tty(server, "object", "versions", bucket, columns=60)
    assert status == 0 and "…" not in drawn, drawn
    lines = drawn.splitlines()
    assert lines and max(len(line.rstrip()) for line in lines) <= 60, drawn  # fits the terminal
    joined = "".join(ch for ch in drawn if ch not in "│┃ \r\n")
    assert "kkkkkkkkkkkkkkkkkkkk" in joined


def test_backup_verify_shows_progress_on_a_terminal_only(server: AnvilServer, tmp_path: Path) -> None:
    backup_env = {"ANVIL_BACKUP_PASSPHRASE": "terminal passphrase", "ANVIL_BACKUP_KDF": "test"}
    repo = f"file://{tmp_path / 'repo'}"
    bucket = unique_bucket("bk")
    server.cli("bucket", "create", bucket)
    server.cli("object", "put", bucket, "blob", "-", input=os.urandom(6 * 1024 * 1024))
    env = {**server.cli_env(), **backup_env}
    for args in (("backup", "init", "--repo", repo),
                 ("backup", "create", "--repo", repo, "--endpoint", server.endpoint)):
        proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", *args], env=env, capture_output=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    status, drawn = on_tty(server, "backup", "verify", "--repo", repo, "--read-data", env=backup_env)
    assert status == 0 and "reading packs" in drawn and "MB" in drawn, drawn  # bytes done/total (fast: no rate)
    piped = subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", "verify", "--repo", repo,
                            "--read-data"], env=env, capture_output=True, timeout=300)
    assert piped.returncode == 0 and b"reading packs" not in piped.stderr and b"\x1b[" not in piped.stderr
