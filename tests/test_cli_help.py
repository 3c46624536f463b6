"""Every `anvil` command explains itself, and shell completion works (docs/cli.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import click
from click.testing import CliRunner

from anvil.cli.main import cli


def walk(cmd: click.Command, path: tuple[str, ...] = ("anvil",)) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):  # lazy groups load their subcommands here
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name} but cannot load it"
            yield from walk(sub, (*path, name))


def test_every_command_has_help_text() -> None:
    commands = list(walk(cli))
    leaves = [(p, c) for p, c in commands if not isinstance(c, click.Group)]
    assert len(leaves) > 50  # the walk really reached the leaves
    missing = [" ".join(p) for p, c in commands if not (c.help or "").strip()]
    assert not missing, f"commands without help text: {missing}"
    runner = CliRunner()
    for path, command in leaves:
        result = runner.invoke(cli, [*path[1:], "--help"], prog_name="anvil")
        assert result.exit_code == 0, (path, result.output)
        first_line = (command.help or "").strip().splitlines()[0]
        assert first_line.split()[0] in result.output, (path, result.output)


def _complete(shell: str, words: str) -> str:
    env = {**os.environ, "_ANVIL_COMPLETE": f"{shell}_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    proc = subprocess.run([sys.executable, "-c", "from anvil.cli.main import main; main()"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_shell_completion_scripts_and_answers() -> None:
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef anvil"), ("fish", "complete")):
        env = {**os.environ, "_ANVIL_COMPLETE": f"{shell}_source"}
        proc = subprocess.run([sys.executable, "-c", "from anvil.cli.main import main; main()"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and marker in proc.stdout, (shell, proc.stdout, proc.stderr)
    # bash: one "type,value" per line; the subcommands of `anvil ob`, then of `anvil object `.
    assert "plain,object" in _complete("bash", "anvil ob").splitlines()
    assert {"plain,put", "plain,get", "plain,ls"} <= set(_complete("bash", "anvil object ").splitlines())
    assert "plain,--storage-path" in _complete("bash", "anvil serve --st").splitlines()


# An offline command must not pay for what it never uses: the SDK (httpx, the pydantic models), the
# other command groups, the authz grammar (lark).
_HEAVY = ("anvil.client", "httpx", "anvil.api_models", "pydantic", "lark", "anvil.cli.backup", "anvil.cli.authz")
_JSON_UNUSED = ("rich", "rich.console", "cryptography.hazmat.primitives.asymmetric.ed25519", "anvil.authz.schema",
                "anvil.authz.relationships", "tantivy", "anvil.indexes.engine", "anvil.indexes.service")
_PROBE = """
import sys
from anvil.cli.main import main
sys.argv = ["anvil", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("LOADED", *sorted(m for m in %r if m in sys.modules))
"""


def test_offline_commands_load_neither_the_sdk_nor_other_groups(tmp_path) -> None:
    from anvil.runtime import Anvil

    Anvil(tmp_path / "data").close()
    for args in (["fsck", "--help"], ["fsck", "--storage-path", str(tmp_path / "data"), "--json"]):
        proc = subprocess.run([sys.executable, "-c", _PROBE % (_HEAVY,), *args], capture_output=True, text=True,
                              timeout=60)
        loaded = proc.stdout.rsplit("LOADED", 1)[-1].split()
        assert "LOADED" in proc.stdout and loaded == [], (args, loaded, proc.stderr[-2000:])
    # Printing JSON, fsck needs no console (rich), a store without PersonalDB groups no signature
    # code, one without authorisation records not the schema language, and one without index
    # definitions not the index engine or service (~30, ~5, ~20 and ~20 ms).
    proc = subprocess.run([sys.executable, "-c", _PROBE % (_HEAVY + _JSON_UNUSED,), "fsck", "--deep", "--storage-path",
                           str(tmp_path / "data"), "--json"], capture_output=True, text=True, timeout=60)
    loaded = proc.stdout.rsplit("LOADED", 1)[-1].split()
    assert '"ok": true' in proc.stdout and loaded == [], (loaded, proc.stderr[-2000:])
    # A command that talks to a server loads the SDK (the probe above can tell).
    proc = subprocess.run([sys.executable, "-c", _PROBE % (_HEAVY,), "bucket", "ls", "--endpoint",
                           "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert {"anvil.client", "httpx"} <= set(proc.stdout.rsplit("LOADED", 1)[-1].split()), proc.stdout
