"""The README's backup commands, run literally (parsed out of README.md) in development mode.

The block after "Back up while the server runs" is executed line by line by bash, exactly as
written, in a folder whose `anvil-data` is a real development-mode server's STORAGE_PATH:
if the README changes, this test runs the new text; if the flow breaks, this test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import AnvilServer

README = Path(__file__).resolve().parents[1] / "README.md"
# Development mode, keys generated under secrets/: nothing about them may come from the test's env.
SCRUB = ("ANVIL_SECRET_ENCRYPTION_KEY", "ANVIL_SECRET_ENCRYPTION_KEY_ID", "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS",
         "JWT_SECRET", "ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET", "ANVIL_MODE", "ANVIL_BACKUP_PASSPHRASE",
         "ANVIL_BACKUP_REPO")


def readme_backup_commands() -> list[str]:
    text = README.read_text()
    intro = text.index("Back up while the server runs")
    block = re.search(r"```sh\n(.*?)```", text[intro:], re.S)
    assert block, "README: no sh block after 'Back up while the server runs'"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
    assert any(ln.startswith("anvil drill") for ln in lines), lines
    return lines


def test_readme_backup_commands_pass_literally_in_development_mode(tmp_path: Path) -> None:
    work = tmp_path / "tour"
    work.mkdir()
    srv = AnvilServer(work / "anvil-data", env={"ANVIL_MODE": "development"}).start()
    try:
        with srv.client() as c:
            c.create_bucket("photos", versioning="Enabled")
            c.put_object("photos", "cats/tom.jpg", b"not really a jpeg", metadata={"owner": "ana"})
        # `anvil` on PATH runs this checkout's CLI with this interpreter, like the venv's script.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "anvil"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m anvil.cli.main \"$@\"\n")
        shim.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in SCRUB}
        env.update({"PATH": f"{bin_dir}:{env['PATH']}", "ANVIL_ENDPOINT": srv.endpoint, "ANVIL_BACKUP_KDF": "test",
                    "ANVIL_ARGON2_FAST": "1"})
        script = "set -e\n" + "\n".join(f"echo '+ '{_quote(ln)}\n{ln}" for ln in readme_backup_commands()) + "\n"
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README backup flow failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        assert "DRILL PASSED" in proc.stdout, proc.stdout
        # The flow says loudly that it escrowed development-mode keys.
        assert "escrow" in (proc.stdout + proc.stderr).lower()
        assert (work / "drill-report.json").exists()
    finally:
        srv.stop()


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
