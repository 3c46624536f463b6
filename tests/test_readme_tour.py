"""The README's five-minute tour, run literally: every ```sh and ```python block of the section, in
order, as one bash script, in a folder whose `anvil-data` is a real development-mode server's
STORAGE_PATH (the tour's `make run`). If the README changes, this runs the new text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import AnvilServer

README = Path(__file__).resolve().parents[1] / "README.md"
# A new user's shell: nothing Anvil-related comes from the test's environment.
SCRUB = ("ANVIL_SECRET_ENCRYPTION_KEY", "ANVIL_SECRET_ENCRYPTION_KEY_ID", "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS",
         "JWT_SECRET", "ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET", "ANVIL_MODE", "ANVIL_BACKUP_PASSPHRASE",
         "ANVIL_BACKUP_REPO", "ANVIL_ENDPOINT", "ANVIL_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def tour_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index("## Five-minute tour")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```(sh|python)\n(.*?)```", text[start:end], re.S)
    assert [lang for lang, _ in blocks].count("python") == 1 and len(blocks) >= 5, blocks
    return blocks


def tour_script() -> str:
    """One bash script: sh blocks line by line (each echoed first, `set -e`), the python block fed to
    `python` on stdin exactly as written."""
    parts = ["set -e"]
    for lang, body in tour_blocks():
        if lang == "sh":
            lines = [ln for ln in body.splitlines() if ln.strip()]
            # A line ending in a backslash continues on the next: join them as the shell would.
            joined: list[str] = []
            for ln in lines:
                if joined and joined[-1].endswith("\\"):
                    joined[-1] = joined[-1] + "\n" + ln
                else:
                    joined.append(ln)
            parts += [f"echo '+ '{_quote(ln)}\n{ln}" for ln in joined]
        else:
            parts.append(f"echo '+ python <tour block>'\npython - <<'ANVIL_TOUR_PYTHON'\n{body}ANVIL_TOUR_PYTHON")
    return "\n".join(parts) + "\n"


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "tour"
    work.mkdir()
    srv = AnvilServer(work / "anvil-data", env={"ANVIL_MODE": "development"}).start()
    try:
        # `anvil` and `python` on PATH run this checkout with this interpreter, like the venv's; `aws`
        # is the venv's too (a dev dependency).
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, target in (("anvil", f"{sys.executable} -m anvil.cli.main"), ("python", sys.executable)):
            shim = bin_dir / name
            shim.write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
            shim.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in SCRUB}
        env.update({"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}", "ANVIL_BACKUP_KDF": "test",
                    "ANVIL_ARGON2_FAST": "1", "AWS_CONFIG_FILE": "/dev/null",
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
        proc = subprocess.run(["bash", "-c", tour_script()], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README tour failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}"
        assert "b'ell'" in proc.stdout  # the Python block's print
        assert "DRILL PASSED" in proc.stdout, out
        assert (work / "copy.jpg").read_bytes() == (work / "tom.jpg").read_bytes()
        assert (work / "tail.bin").exists()
        assert proc.stdout.count('"kind": "object.') >= 3  # the watch block printed its events
        with srv.client() as c:
            assert c.head_object("photos", "big.iso")["size"] == 40 * 1024 * 1024  # the aws block
            assert c.head_object("docs", "big.iso")["parts_count"]  # multipart, as the comment says
    finally:
        srv.stop()


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
