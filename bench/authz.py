"""Authorisation benchmark: check latency and throughput, and lookup resources, on a graph of
1 million relationships (10,000 users, nested groups, documents in nested folders).

    PYTHONPATH=src python bench/authz.py [--relationships 1000000] [--checks 20000] [--path DIR] [--quick]

The graph (all numbers scale with --relationships; at 1M):
- 10,000 users; 1,000 groups of ~10 users; every group of the first 100 holds 9 subgroups
  (group nesting two deep);
- a folder tree of 10,000 folders (10 roots, each folder with up to 10 children), each folder
  viewable by one group;
- documents, each in one folder with one direct viewer user, to fill up to N relationships;
- user `star` is the only member of group `stars`, which views one subtree holding 10,000
  documents (the lookup-resources figure).

It runs in-process against `AuthzService` (the code every route calls), through the real
catalog and journal: relationships are written in batches of 1000 like a client would. Checks
are random (document, user) pairs at the newest revision: a first pass (no answer cached; the
shared row cache fills as it goes, as on a live server) and the same pairs again (answers
cached). Lookups run with both caches emptied first.
Targets (2 cores): check p99 <= 5 ms, >= 5,000 checks/s, lookup of 10,000 <= 500 ms.
`listing_bound_bucket`: a bucket bound to relationships (--listing-keys objects, a user who sees
10%), listed whole through the routes' listing code, keys decided by one lookup resources versus
one check per key.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from anvil.context import DEV_PRINCIPAL, RequestContext  # noqa: E402
from anvil.runtime import Anvil  # noqa: E402

SCHEMA = """
definition user {}

definition group {
    relation member: user | group#member
}

definition folder {
    relation parent: folder
    relation viewer: user | group#member
    permission view = viewer + parent->view
}

definition document {
    relation folder: folder
    relation viewer: user | group#member
    relation banned: user
    permission view = (viewer + folder->view) - banned
}
"""

CTX = RequestContext(DEV_PRINCIPAL)


def build(anvil: Anvil, total: int, rng: random.Random) -> tuple[dict[str, int], list[tuple[str, str]]]:
    scale = total / 1_000_000
    users = max(100, int(10_000 * scale))
    groups = max(20, int(1_000 * scale))
    folders = max(100, int(10_000 * scale))
    star_docs = max(100, int(10_000 * scale))
    rels: list[str] = []
    for g in range(groups):
        for _ in range(10):
            rels.append(f"group:g{g}#member@user:u{rng.randrange(users)}")
    for g in range(min(100, groups // 10)):
        for k in range(1, 10):
            rels.append(f"group:g{g}#member@group:g{g * 9 + 100 + k}#member")
    for f in range(folders):
        if f >= 10:
            rels.append(f"folder:f{f}#parent@folder:f{(f - 10) // 10}")
        rels.append(f"folder:f{f}#viewer@group:g{rng.randrange(groups)}#member")
    # The star subtree: a folder of its own (under no other) holding star_docs documents in 100 subfolders.
    rels.append("group:stars#member@user:star")
    rels.append("folder:star#viewer@group:stars#member")
    for s in range(100):
        rels.append(f"folder:star{s}#parent@folder:star")
    for d in range(star_docs):
        rels.append(f"document:s{d}#folder@folder:star{d % 100}")
    d = 0
    granted: list[tuple[str, str]] = []  # (document, a user it names directly): checks that answer yes
    while len(rels) < total:
        rels.append(f"document:d{d}#folder@folder:f{rng.randrange(folders)}")
        viewer = f"user:u{rng.randrange(users)}"
        rels.append(f"document:d{d}#viewer@{viewer}")
        granted.append((f"document:d{d}", viewer))
        if d % 50 == 0:
            rels.append(f"document:d{d}#banned@user:u{rng.randrange(users)}")
        d += 1
    rels = list(dict.fromkeys(rels))[:total]  # random picks may repeat; a batch names each once
    t0 = time.perf_counter()
    for i in range(0, len(rels), 1000):
        anvil.authz.write_relationships(CTX, [{"operation": "touch", "relationship": r} for r in rels[i:i + 1000]])
    granted = granted[: max(0, d - 1)]  # the last document may have been cut off by the total
    granted += [(f"document:s{i}", "user:star") for i in range(star_docs)]  # via group, folder and parent
    return ({"relationships": len(rels), "users": users, "groups": groups, "folders": folders, "documents": d,
             "star_documents": star_docs, "load_seconds": round(time.perf_counter() - t0, 1)}, granted)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def run_checks(anvil: Anvil, pairs: list[tuple[str, str]]) -> dict[str, float]:
    lat: list[float] = []
    allowed = 0
    t0 = time.perf_counter()
    for doc, user in pairs:
        s = time.perf_counter()
        r = anvil.authz.check(DEV_PRINCIPAL, doc, "view", user)
        lat.append((time.perf_counter() - s) * 1000)
        allowed += r["permissionship"] == "has_permission"
    wall = time.perf_counter() - t0
    return {"checks": len(pairs), "checks_per_s": round(len(pairs) / wall), "p50_ms": round(pct(lat, 0.5), 3),
            "p99_ms": round(pct(lat, 0.99), 3), "mean_ms": round(statistics.mean(lat), 3),
            "allowed_fraction": round(allowed / len(pairs), 3)}


def run_http(store: Path, pairs: list[tuple[str, str]], bulk: list[tuple[str, str]],
             clients: int) -> dict[str, float]:
    """Checks through `anvil serve` and the SDK (HTTP, bearer token, JSON): `pairs` one per request from
    `clients` threads, then `bulk` 100 per request (a fresh server: its caches start empty)."""
    import socket
    import subprocess
    import threading

    import httpx

    from anvil.client import AnvilClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(store),
                             "--listen", f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            try:
                if httpx.get(endpoint + "/anvil/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        cred = json.loads((store / "bootstrap" / "first-admin.json").read_text())
        lat: list[float] = []
        lock = threading.Lock()
        share = [pairs[i::clients] for i in range(clients)]

        def work(mine: list[tuple[str, str]]) -> None:
            with AnvilClient(endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
                c.authz_check("document:d0", "view", "user:u0", tenant="default")  # token exchange, connection
                local = []
                for doc, user in mine:
                    s = time.perf_counter()
                    c.authz_check(doc, "view", user, tenant="default")
                    local.append((time.perf_counter() - s) * 1000)
            with lock:
                lat.extend(local)

        threads = [threading.Thread(target=work, args=(m,)) for m in share]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        # Bulk check: 100 pairs per request, one client (the per-request cost is paid once per 100).
        with AnvilClient(endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
            items = [{"resource": d, "permission": "view", "subject": u} for d, u in bulk]
            t1 = time.perf_counter()
            for i in range(0, len(items), 100):
                c.authz_bulk_check(items[i:i + 100], tenant="default")
            bulk_wall = time.perf_counter() - t1
    finally:
        proc.terminate()
        proc.wait(30)
    return {"checks": len(lat), "clients": clients, "checks_per_s": round(len(lat) / wall),
            "p50_ms": round(pct(lat, 0.5), 3), "p99_ms": round(pct(lat, 0.99), 3),
            "bulk_100_checks_per_s": round(len(items) / bulk_wall)}


def run_listing(anvil: Anvil, n_keys: int, rng: random.Random) -> dict[str, object]:
    """A bound bucket of `n_keys` objects, a user who may see 10% of them: the whole listing (pages of
    1000) through the listing code the routes use, deciding keys by one lookup-resources versus by one
    check per key (docs/authz.md, "Listings by lookup"). Caches are emptied before each run."""
    from anvil.api.access import BindingAccess, list_objects_filtered
    from anvil.context import Principal

    bucket = "listing-bench"
    anvil.objects.create_bucket(CTX, bucket)
    info = anvil.objects.store_bytes(b"x")
    keys = [f"dir{i % 10}/doc{i:07d}.txt" for i in range(n_keys)]
    for i in range(0, n_keys, 1000):
        futures = [anvil.objects.submit_put_object(CTX, bucket, k, info) for k in keys[i:i + 1000]]
        for f in futures:
            f.result()
    visible = sorted(rng.sample(keys, n_keys // 10))
    from anvil.authz.binding import object_id

    for i in range(0, len(visible), 1000):
        anvil.authz.write_relationships(CTX, [{"operation": "touch", "relationship":
                                               f"document:{object_id(bucket, k)}#viewer@user:lister"}
                                              for k in visible[i:i + 1000]])
    anvil.authz.put_binding(CTX, bucket, {"resource_type": "document", "read": "view", "write": "view"})
    who = Principal(tenant=CTX.principal.tenant, subject="bench", scopes=("*",), acting_for="user:lister")
    out: dict[str, object] = {"keys": n_keys, "visible": len(visible)}
    for mode in ("lookup", "check"):
        times = []
        for _ in range(3):
            anvil.authz.cache = type(anvil.authz.cache)()
            anvil.authz.rows = type(anvil.authz.rows)()
            s = time.perf_counter()
            kf = BindingAccess(anvil, listing=mode).key_filter(who, "object:list", bucket)
            got: list[str] = []
            token = None
            while True:
                page = list_objects_filtered(anvil.objects, kf, bucket, prefix="", delimiter="", start_after="",
                                             max_keys=1000, token=token)
                got += [o.key for o in page.objects]
                if not page.truncated:
                    break
                token = page.next_token
            times.append((time.perf_counter() - s) * 1000)
            assert got == visible, (mode, len(got), len(visible))
        out[f"by_{mode}_ms"] = round(statistics.median(times), 1)
    # The catalog walk alone (no decisions), for scale.
    s = time.perf_counter()
    token = None
    while True:
        res = anvil.objects.list_objects(bucket, max_keys=1000, token=token)
        if not res.truncated:
            break
        token = res.next_token
    out["unfiltered_listing_ms"] = round((time.perf_counter() - s) * 1000, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--relationships", type=int, default=1_000_000)
    ap.add_argument("--checks", type=int, default=20_000)
    ap.add_argument("--path", default=None, help="Store directory (default: a temporary one).")
    ap.add_argument("--quick", action="store_true", help="20,000 relationships and 2,000 checks (a smoke run).")
    ap.add_argument("--listing-keys", type=int, default=20_000,
                    help="Keys of the bound bucket the listing figure lists (a user sees 10%%; 0: skip).")
    ap.add_argument("--http-clients", type=int, default=4,
                    help="Also check through `anvil serve` with this many client threads (0: skip).")
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]  # shared machine: how busy it was
    if args.quick:
        args.relationships, args.checks, args.listing_keys = 20_000, 2_000, 2_000
    os.environ.setdefault("ANVIL_ARGON2_FAST", "1")
    rng = random.Random(14)
    with tempfile.TemporaryDirectory(prefix="anvil-authz-bench-") as tmp:
        anvil = Anvil(Path(args.path or tmp) / "data")
        try:
            anvil.authz.write_schema(CTX, SCHEMA)
            graph, granted = build(anvil, args.relationships, rng)
            docs = graph["documents"]
            # Half random pairs (nearly all denied: every branch is explored), half pairs that are allowed
            # (directly, or for `star` through group, folder and parent folder).
            pairs = [(f"document:d{rng.randrange(docs)}", f"user:u{rng.randrange(graph['users'])}")
                     for _ in range(args.checks // 2)]
            pairs += rng.sample(granted, min(len(granted), args.checks - len(pairs)))
            rng.shuffle(pairs)
            cold = run_checks(anvil, pairs)
            warm = run_checks(anvil, pairs)
            lookups = []
            found = 0
            for _ in range(5):
                # Cold: neither answers nor relationship rows cached (the answer cache would reply at once).
                anvil.authz.cache = type(anvil.authz.cache)()
                anvil.authz.rows = type(anvil.authz.rows)()
                s = time.perf_counter()
                res = anvil.authz.lookup_resources(DEV_PRINCIPAL, "document", "view", "user:star")
                lookups.append((time.perf_counter() - s) * 1000)
                found = len(res["resources"])
            listing = run_listing(anvil, args.listing_keys, rng) if args.listing_keys > 0 else None
        finally:
            anvil.close()
        quarter = max(1, len(pairs) // 4)
        http = run_http(Path(args.path or tmp) / "data", pairs[:quarter], pairs[quarter:2 * quarter],
                        args.http_clients) if args.http_clients > 0 else None
    lookup = {"found": found, "median_ms": round(statistics.median(lookups), 1), "max_ms": round(max(lookups), 1)}
    targets = {
        "check_p99_ms": {"target": 5.0, "value": cold["p99_ms"], "met": cold["p99_ms"] <= 5.0},
        "checks_per_s": {"target": 5000, "value": cold["checks_per_s"], "met": cold["checks_per_s"] >= 5000},
        "lookup_resources_ms": {"target": 500, "value": lookup["median_ms"], "met": lookup["median_ms"] <= 500},
    }
    targets["all_met"] = all(t["met"] for t in targets.values())  # type: ignore[index]
    print(json.dumps({"benchmark": "authz", "quick": args.quick, "cpus": os.cpu_count(), "graph": graph,
                      "check_first_pass": cold, "check_repeat": warm, "check_http": http, "lookup_resources": lookup,
                      "listing_bound_bucket": listing, "targets": targets,
                      "load_average_before": load_before,
                      "load_average_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))


if __name__ == "__main__":
    main()
