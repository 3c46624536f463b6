"""The `anvil` CLI against a real server: bucket and object commands, --json, exit codes, endpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import AnvilServer, free_port, unique_bucket


def j(server: AnvilServer, *args: str, input: bytes | None = None) -> object:
    return json.loads(server.cli(*args, "--json", input=input).stdout)


def test_bucket_commands(server: AnvilServer) -> None:
    name = unique_bucket("cli")
    assert j(server, "bucket", "create", name)["name"] == name
    assert name in [b["name"] for b in j(server, "bucket", "ls")]
    assert j(server, "bucket", "versioning", name) == {"bucket": name, "versioning": "Unversioned"}
    assert j(server, "bucket", "versioning", name, "Enabled")["versioning"] == "Enabled"
    assert j(server, "bucket", "versioning", name)["versioning"] == "Enabled"
    assert j(server, "bucket", "rm", name)["deleted"] is True
    assert name not in [b["name"] for b in j(server, "bucket", "ls")]
    # Human output works too.
    other = unique_bucket("cli")
    out = server.cli("bucket", "create", other, "--versioning", "Enabled").stdout.decode()
    assert other in out
    assert other in server.cli("bucket", "ls").stdout.decode()


def test_bucket_errors_exit_nonzero(server: AnvilServer) -> None:
    proc = server.cli("bucket", "create", "Bad_Name", "--json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "InvalidArgument"
    proc = server.cli("bucket", "rm", unique_bucket("none"), check=False)
    assert proc.returncode == 1 and b"NotFound" in proc.stderr
    proc = server.cli("bucket", "versioning", unique_bucket("none"), "Sometimes", check=False)
    assert proc.returncode == 2  # a usage error from click, before any request


def test_object_commands(server: AnvilServer, tmp_path: Path) -> None:
    b = unique_bucket("cli")
    server.cli("bucket", "create", b, "--versioning", "Enabled")
    src = tmp_path / "in.bin"
    body = os.urandom(200_000)
    src.write_bytes(body)
    put = j(server, "object", "put", b, "dir/file.bin", str(src), "--content-type", "application/x-t",
            "--meta", "owner=zoë", "--meta", "n=1")
    assert put["etag"] == hashlib.md5(body).hexdigest()
    # From stdin.
    put2 = j(server, "object", "put", b, "stdin.txt", "-", input=b"from stdin")
    assert put2["size"] == 10
    # Get to a file and to stdout.
    dest = tmp_path / "out.bin"
    info = j(server, "object", "get", b, "dir/file.bin", str(dest))
    assert dest.read_bytes() == body and info["size"] == len(body)
    assert server.cli("object", "get", b, "stdin.txt").stdout == b"from stdin"
    assert server.cli("object", "get", b, "stdin.txt", "--range", "bytes=5-").stdout == b"stdin"
    assert server.cli("object", "get", b, "stdin.txt", "--range", "bytes=-3").stdout == b"din"
    head = j(server, "object", "head", b, "dir/file.bin")
    assert head["metadata"] == {"owner": "zoë", "n": "1"} and head["content_type"] == "application/x-t"
    assert head["sha256"] == hashlib.sha256(body).hexdigest()
    # Listing with and without a delimiter.
    assert [o["key"] for o in j(server, "object", "ls", b)] == ["dir/file.bin", "stdin.txt"]
    assert j(server, "object", "ls", b, "--delimiter", "/") == [
        next(o for o in j(server, "object", "ls", b) if o["key"] == "stdin.txt"), {"prefix": "dir/"}]
    assert [o["key"] for o in j(server, "object", "ls", b, "--prefix", "dir/")] == ["dir/file.bin"]
    assert len(j(server, "object", "ls", b, "--limit", "1")) == 1
    # Copy: metadata copied, or replaced with --meta.
    cp = j(server, "object", "cp", b, "dir/file.bin", b, "copy.bin")
    assert cp["etag"] == put["etag"]
    assert j(server, "object", "head", b, "copy.bin")["metadata"] == {"owner": "zoë", "n": "1"}
    j(server, "object", "cp", b, "dir/file.bin", b, "copy2.bin", "--meta", "fresh=yes")
    assert j(server, "object", "head", b, "copy2.bin")["metadata"] == {"fresh": "yes"}
    # Versions, delete markers and version-specific commands.
    v2 = j(server, "object", "put", b, "stdin.txt", "-", input=b"second")["version_id"]
    rm = j(server, "object", "rm", b, "stdin.txt")
    assert rm["delete_marker"] is True
    versions = j(server, "object", "versions", b, "--prefix", "stdin")
    assert [(v["version_id"], v["delete_marker"]) for v in versions] == [
        (rm["version_id"], True), (v2, False), (put2["version_id"], False)]
    assert server.cli("object", "get", b, "stdin.txt", "--version-id", put2["version_id"]).stdout == b"from stdin"
    j(server, "object", "cp", b, "stdin.txt", b, "old.txt", "--source-version-id", put2["version_id"])
    assert server.cli("object", "get", b, "old.txt").stdout == b"from stdin"
    assert j(server, "object", "head", b, "stdin.txt", "--version-id", v2)["size"] == 6
    j(server, "object", "rm", b, "stdin.txt", "--version-id", rm["version_id"])
    assert server.cli("object", "get", b, "stdin.txt").stdout == b"second"
    # Human-readable forms run too.
    assert b"dir/" in server.cli("object", "ls", b, "--delimiter", "/").stdout
    assert b"stdin.txt" in server.cli("object", "versions", b).stdout


def test_object_errors_exit_nonzero(server: AnvilServer, tmp_path: Path) -> None:
    b = unique_bucket("cli")
    server.cli("bucket", "create", b)
    for args in (("object", "get", b, "missing"), ("object", "head", b, "missing"),
                 ("object", "get", b, "_anvil/x"), ("object", "cp", b, "missing", b, "dst")):
        proc = server.cli(*args, "--json", check=False)
        assert proc.returncode == 1, args
        assert json.loads(proc.stdout)["error"]["code"] in ("NotFound", "UnauthorizedReservedNamespace")
    proc = server.cli("object", "put", b, "_anvil/x", "-", "--json", input=b"x", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["status"] == 403
    proc = server.cli("object", "put", b, "k", str(tmp_path / "does-not-exist"), check=False)
    assert proc.returncode != 0
    proc = server.cli("object", "put", b, "k", "-", "--meta", "novalue", input=b"x", check=False)
    assert proc.returncode == 2
    proc = server.cli("object", "get", b, "missing", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and b"NotFound" in proc.stderr
    assert j(server, "object", "ls", b) == []


def test_endpoint_flag_and_env(server: AnvilServer) -> None:
    env = {k: v for k, v in server.cli_env().items() if k != "ANVIL_ENDPOINT"}
    base = [sys.executable, "-m", "anvil.cli.main"]
    name = unique_bucket("ep")
    proc = subprocess.run([*base, "bucket", "create", name, "--endpoint", server.endpoint, "--json"],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["name"] == name
    proc = subprocess.run([*base, "bucket", "ls", "--json"], env={**env, "ANVIL_ENDPOINT": server.endpoint},
                          capture_output=True, timeout=60)
    assert name in [b["name"] for b in json.loads(proc.stdout)]
    # --endpoint wins over the environment.
    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([*base, "bucket", "ls", "--json", "--endpoint", server.endpoint],
                          env={**env, "ANVIL_ENDPOINT": dead}, capture_output=True, timeout=60)
    assert proc.returncode == 0
    # Nothing listening: a clear error and a non-zero exit, not a traceback.
    proc = subprocess.run([*base, "bucket", "ls", "--endpoint", dead], env=env, capture_output=True, timeout=60)
    assert proc.returncode != 0 and b"Traceback" not in proc.stderr and proc.stderr.strip()
