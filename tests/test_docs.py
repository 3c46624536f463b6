"""The docs keep up with the code: what the code registers or exposes is documented somewhere.

- every registered recovery participant is named in `docs/architecture.md` or `docs/backup.md`;
- every native API error code (`anvil.errors.HTTP_STATUS`, plus any `AnvilError("Code", ...)`
  literal in `src/anvil`) appears under `docs/`;
- every CLI command path (walked from the click group) appears in `docs/*.md`, as
  `anvil <path>` or, for a subcommand, as its path text (`backup create`);
- nothing in the repository points at files outside it (`../shared`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from anvil.cli.main import cli
from anvil.errors import HTTP_STATUS
from anvil.runtime import recovery_participants

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src"

_RAISED_CODE = re.compile(r"""AnvilError\(\s*["']([A-Za-z]+)["']""")


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))


def _error_codes() -> set[str]:
    codes = set(HTTP_STATUS)
    for path in (SRC / "anvil").rglob("*.py"):
        codes |= set(_RAISED_CODE.findall(path.read_text(encoding="utf-8")))
    return codes


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # lazy groups load their subcommands here
        cmd = group.get_command(ctx, name)
        assert cmd is not None, f"{name} is listed but cannot be loaded"
        path = (*prefix, name)
        yield " ".join(path)
        if isinstance(cmd, click.Group):
            yield from _command_paths(cmd, path)


def _mentions(text: str, phrase: str) -> bool:
    """`phrase` as whole words (so `bucket ls` does not match inside `admin bucket lsx`)."""
    return re.search(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", text) is not None


def test_every_participant_is_documented() -> None:
    text = "\n".join((DOCS / name).read_text(encoding="utf-8") for name in ("architecture.md", "backup.md"))
    names = [p.name for p in recovery_participants()]
    assert names, "no recovery participants registered"
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"participants not named (as `name`) in docs/architecture.md or docs/backup.md: {missing}"


def test_every_error_code_is_documented() -> None:
    codes = _error_codes()
    assert "NotFound" in codes and "Internal" in codes  # the collection itself works
    text = _docs_text()
    missing = sorted(c for c in codes if not _mentions(text, c))
    assert not missing, f"error codes not documented under docs/ (add them to docs/architecture.md): {missing}"


def test_error_codes_raised_are_registered() -> None:
    """A literal code outside HTTP_STATUS would fail at runtime (AnvilError refuses it)."""
    unknown = sorted(_error_codes() - set(HTTP_STATUS))
    assert not unknown, f"AnvilError codes missing from anvil.errors.HTTP_STATUS: {unknown}"


def test_every_cli_command_is_documented() -> None:
    paths = list(_command_paths(cli))
    assert "backup create" in paths  # the walk reaches nested groups
    text = _docs_text()
    missing = [p for p in paths
               if not _mentions(text, f"anvil {p}") and not (" " in p and _mentions(text, p))]
    assert not missing, f"CLI commands not mentioned in docs/*.md (as `anvil <path>`): {missing}"


def _repo_text_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*"))]
    # Build artefacts (src/*.egg-info, caches) are regenerated and not part of the repository.
    files += [p for p in sorted(SRC.rglob("*"))
              if not any(part.endswith(".egg-info") or part == "__pycache__" for part in p.relative_to(SRC).parts)]
    return [p for p in files if p.is_file()]


@pytest.mark.parametrize("needle", ["../shared"])
def test_nothing_points_outside_the_repository(needle: str) -> None:
    offenders = []
    for path in _repo_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not offenders, f"files referring to {needle} (outside the repository): {offenders}"
