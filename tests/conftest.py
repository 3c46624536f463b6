from __future__ import annotations

import os

import pytest

from anvil.client import AnvilClient
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client

# Every storage root preallocates a free-space reserve (32 MiB by default); a run creates over a
# hundred roots, so the suite keeps them small. The full-disk tests use the real defaults.
os.environ.setdefault("ANVIL_DISK_RESERVE", "1M")


# -- the record-store engines ----------------------------------------------------------------
# A module marked `pytestmark = pytest.mark.both_engines` runs every test twice: against the
# embedded SQLite catalog and against a real PostgreSQL server (tests/pg.py) through
# `anvil serve --records`. Other modules run on SQLite only.
ENGINES = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_engines: run the module against SQLite and PostgreSQL record stores")
    config.addinivalue_line("markers", "only_cases(predicate): generate only the cases whose params satisfy it")


def pytest_terminal_summary(terminalreporter) -> None:
    """Say it loudly at the end of the run when the PostgreSQL half of the suite could not run."""
    from tests.pg import MISSING, pg_bin_dir

    if pg_bin_dir() is None:
        terminalreporter.write_sep("!", "POSTGRESQL TESTS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(MISSING, red=True, bold=True)


# -- the order of modules, for xdist ---------------------------------------------------------
# `--dist loadfile` (pyproject.toml) gives each worker whole modules in collection order, so a
# slow module collected last is the run's tail: the slowest modules (measured with --durations=0,
# slowest first) are collected first, then the others by test count, largest first (xdist's own
# heuristic). Only whole modules move; the order inside a module is kept.
SLOWEST_MODULES = (
    "test_bench_smoke.py", "test_backup_e2e.py", "test_artefacts.py", "test_backup_repo.py",
    "test_authz_api.py", "test_backup_participants_more.py", "test_backup_interrupted.py",
    "test_backup_s3.py", "test_full_disk.py", "test_backup_admin.py", "test_bench_scale_smoke.py",
    "test_identity.py", "test_identity_cli.py", "test_bench_search_smoke.py", "test_authz_decisions.py",
    # Few tests but many servers, restarts or CLI runs each: never at the tail either.
    "test_pitr.py", "test_cli.py", "test_repair_from_backup.py", "test_crash.py", "test_cluster.py",
    "test_readme_tour.py", "test_readme_backup_flow.py", "test_identity_lifecycle.py", "test_identity_keys.py",
    "test_backup_anvil_s3.py", "test_cli_terminal.py", "test_inline.py", "test_pg_backup.py",
    "test_observability.py", "test_s3_cli.py", "test_replay.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `@pytest.mark.only_cases(predicate)`: of a parametrised product (engines included), generate only the
    # cases whose parameters satisfy the predicate, instead of skipping the others at run time.
    dropped = [item for item in items if (m := item.get_closest_marker("only_cases")) is not None
               and hasattr(item, "callspec") and not m.args[0](item.callspec.params)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in gone]
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    counts: dict[str, int] = {}
    for item in items:
        counts[item.nodeid.split("::")[0]] = counts.get(item.nodeid.split("::")[0], 0) + 1

    def key(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        name = path.rsplit("/", 1)[-1]
        return (0, rank[name]) if name in rank else (1, -counts[path])

    items.sort(key=key)  # stable: each module keeps its own order


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_engines"):
        metafunc.parametrize("engine", ENGINES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server per test session (xdist worker); skipped LOUDLY without binaries."""
    from tests.helpers import free_port
    from tests.pg import MISSING, PostgresServer, pg_bin_dir

    bin_dir = pg_bin_dir()
    if bin_dir is None:
        import warnings

        warnings.warn(MISSING, stacklevel=1)
        pytest.skip(MISSING)
    srv = PostgresServer(bin_dir, free_port(), durable=False).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def migrated_template(postgres) -> str:
    """A database `anvil admin migrate` migrated once per session (xdist worker): each module's store
    is a copy of it (CREATE DATABASE ... TEMPLATE), as a migrated store, for a fraction of the cost."""
    from tests.pg import migrate

    url = postgres.new_database()
    migrate(url)
    return url.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def records_url(engine: str, request: pytest.FixtureRequest) -> str | None:
    """None for the embedded catalog; else a fresh, migrated PostgreSQL database's URL."""
    if engine == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database(template=request.getfixturevalue("migrated_template"))


@pytest.fixture
def new_catalog(engine: str, tmp_path, request: pytest.FixtureRequest):
    """Make bare catalogs (no server) of the module's engine: `new_catalog()` is a fresh store with
    the journal's schema; `new_catalog(url=...)` another node's catalog on the same PostgreSQL
    store. All are closed after the test."""
    from anvil.storage import Catalog

    made: list = []

    def make(url: str | None = None):
        if engine == "sqlite":
            cat = Catalog(tmp_path / f"catalog-{len(made)}.db")
        else:
            from anvil.storage.pg import PgCatalog

            if url is None:
                url = request.getfixturevalue("postgres").new_database()
                PgCatalog(url, apply_migrations=True).close()
            cat = PgCatalog(url)
        made.append(cat)
        return cat

    yield make
    for cat in reversed(made):
        cat.close()


def engine_env(records_url: str | None) -> dict[str, str]:
    """The server environment for an engine (ANVIL_RECORDS_URL is what `serve --records` reads)."""
    return {"ANVIL_RECORDS_URL": records_url} if records_url else {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, records_url: str | None):
    """One real server per test module (each test uses its own buckets)."""
    srv = AnvilServer(tmp_path_factory.mktemp("anvil") / "data", env=engine_env(records_url)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3(server: AnvilServer):
    """A boto3 S3 client of the module's server, signing as the first admin application."""
    return s3_client(server)


@pytest.fixture
def client(server: AnvilServer):
    with server.client() as c:
        yield c


@pytest.fixture
def bucket(client: AnvilClient) -> str:
    name = unique_bucket()
    client.create_bucket(name)
    return name


@pytest.fixture
def versioned_bucket(client: AnvilClient) -> str:
    name = unique_bucket("v")
    client.create_bucket(name, versioning="Enabled")
    return name


# Every native API answer checked against the OpenAPI document (tests/openapi_check.py), when asked.
_RESPONSES = None
if os.environ.get("ANVIL_VALIDATE_RESPONSES") == "1":
    from tests.openapi_check import install

    _RESPONSES = install()


@pytest.fixture(autouse=True)
def _openapi_responses():
    if _RESPONSES is None:
        yield
        return
    before = len(_RESPONSES.violations)
    yield
    new = _RESPONSES.violations[before:]
    if new:
        pytest.fail("answers that do not match the OpenAPI document:\n  " + "\n  ".join(dict.fromkeys(new)),
                    pytrace=False)
