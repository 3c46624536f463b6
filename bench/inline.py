"""Inline bodies: small PUT and GET with bodies inline in catalog.db vs blob files, per body size.

For each body size, servers of this checkout run alternately with `ANVIL_INLINE_MAX=0` (every
body a blob file: fsync of the file, of its folder, then the WAL commit) and with the size inline
(body, record and journal event in one group-commit flush), for several interleaved rounds, so
the load of a shared machine hits both alike. 8 clients (bench/objects.py's load generator),
unique bodies. Prints one JSON document; the threshold `ANVIL_INLINE_MAX` was chosen from it.

    python bench/inline.py                       # 4, 16, 64, 128 KiB; 3 rounds of 4 s
    python bench/inline.py --sizes 4096 --rounds 1 --seconds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _one(size: int, mode: str, seconds: float) -> dict[str, Any]:
    os.environ["ANVIL_BENCH_SMALL_SIZE"] = str(size)  # before the client processes are spawned
    from bench import objects as ob
    from tests.helpers import AnvilServer

    ob.SMALL_SIZE = size
    inline_max = "0" if mode == "file" else str(max(size, 64 * 1024))
    clients = 8
    with tempfile.TemporaryDirectory(prefix="anvil-bench-inline-") as tmp:
        pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
        server = AnvilServer(Path(tmp) / "data", env={"PYTHONPATH": pythonpath, "ANVIL_INLINE_MAX": inline_max}).start()
        os.environ[ob.TOKEN_ENV] = server.auth_headers()["authorization"].removeprefix("Bearer ")
        load = ob.LoadGenerator(2, 4)
        try:
            with server.client() as c:
                c.create_bucket("bench")
            assert server.proc is not None
            load.run(server.port, "bench", "put", [[f"warm/{n}/"] for n in range(clients)], 0.5)
            with ob.Sampler(server.proc.pid) as s_put:
                put = load.run(server.port, "bench", "put", [[f"small/{n}/"] for n in range(clients)], seconds)
            keys = [k for conn in put.pop("written") for k in conn]
            with ob.Sampler(server.proc.pid) as s_get:
                get = load.run(server.port, "bench", "get", [keys[n::clients] for n in range(clients)], seconds)
            get.pop("written")
        finally:
            load.close()
            server.stop()
    return {
        "put_ops_per_s": put["ops_per_s"], "put_p50_ms": put["latency_ms"]["p50"],
        "put_cpu_ms_per_op": round(1000 * s_put.cpu_s / max(put["ops"], 1), 3),
        "get_ops_per_s": get["ops_per_s"], "get_p50_ms": get["latency_ms"]["p50"],
        "get_cpu_ms_per_op": round(1000 * s_get.cpu_s / max(get["ops"], 1), 3),
        "errors": put["errors"] + get["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,65536,131072", help="body sizes in bytes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for size in sizes:
            # Alternate which mode goes first, round by round.
            for mode in (("file", "inline") if r % 2 == 0 else ("inline", "file")):
                fig = _one(size, mode, args.seconds)
                runs.setdefault(f"{size}/{mode}", []).append(fig)
                print(json.dumps({"round": r + 1, "size": size, "mode": mode, **fig}), file=sys.stderr)
    summary = {}
    for size in sizes:
        row: dict[str, Any] = {}
        for mode in ("file", "inline"):
            figs = runs[f"{size}/{mode}"]
            row[mode] = {k: {"min": min(f[k] for f in figs), "median": statistics.median(f[k] for f in figs)}
                         for k in figs[0] if k != "errors"}
            row[mode]["errors"] = sum(f["errors"] for f in figs)
        row["put_inline_over_file"] = round(row["inline"]["put_ops_per_s"]["median"]
                                            / max(row["file"]["put_ops_per_s"]["median"], 1e-9), 2)
        row["get_inline_over_file"] = round(row["inline"]["get_ops_per_s"]["median"]
                                            / max(row["file"]["get_ops_per_s"]["median"], 1e-9), 2)
        summary[str(size)] = row
    print(json.dumps({
        "benchmark": "inline", "rounds": args.rounds, "seconds": args.seconds, "clients": 8,
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "sizes": summary, "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
