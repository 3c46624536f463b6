"""Overhead of access logs + metrics on small GETs: the same workload against two servers of this
checkout, one with `--access-log FILE --metrics` and one with `--access-log off --no-metrics`,
in the same run, interleaved round by round (so a busy machine slows both alike).

Uses the raw-HTTP load generator of bench/objects.py (several client processes, keep-alive
sockets, authenticated requests). Reported per variant: small-GET ops/s and server CPU per
request in each round, their medians, and the overhead (on vs off) of both. Prints one JSON document.

    python bench/observability.py              # 3 rounds of 5 s per variant
    python bench/observability.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _objects_bench() -> Any:
    # Imported by name from bench/ (on sys.path, which spawned load processes inherit) so that
    # multiprocessing finds its worker function in the children.
    sys.path.insert(0, str(ROOT / "bench"))
    import objects

    return objects


def run(*, rounds: int, seconds: float, objects: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import AnvilServer

    bench = _objects_bench()
    processes, conns_per_process = 2, 4
    clients = processes * conns_per_process
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="anvil-bench-obs-") as tmp:
        tmp_path = Path(tmp)
        variants = {
            "off": ["--access-log", "off", "--no-metrics"],
            "on": ["--access-log", str(tmp_path / "access.log"), "--metrics"],
        }
        servers: dict[str, Any] = {}
        tokens: dict[str, str] = {}
        keys: dict[str, list[list[str]]] = {}
        # Load processes read the bearer token from their environment when spawned: one generator per server.
        loads: dict[str, Any] = {}
        try:
            for name, args in variants.items():
                (tmp_path / name).mkdir()
                srv = AnvilServer(tmp_path / name / "data", env={"PYTHONPATH": pythonpath}, extra_args=args).start()
                servers[name] = srv
                tokens[name] = srv.auth_headers()["authorization"].removeprefix("Bearer ")
                with srv.client() as c:
                    c.create_bucket("bench")
                    written = []
                    for n in range(objects):
                        key = f"small/{n}"
                        c.put_object("bench", key, os.urandom(bench.SMALL_SIZE))
                        written.append(key)
                keys[name] = [written[n::clients] for n in range(clients)]
                os.environ[bench.TOKEN_ENV] = tokens[name]
                loads[name] = bench.LoadGenerator(processes, conns_per_process)
                loads[name].run(srv.port, "bench", "get", keys[name], min(0.5, seconds))  # warm-up, not measured
            figures: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, srv in servers.items():
                    with bench.Sampler(srv.proc.pid) as sampler:
                        got = loads[name].run(srv.port, "bench", "get", keys[name], seconds)
                    assert got["errors"] == 0, got
                    figures[name].append({"ops_per_s": got["ops_per_s"],
                                          "server_cpu_us_per_op": round(1e6 * sampler.cpu_s / max(got["ops"], 1), 1),
                                          "p50_ms": got["latency_ms"]["p50"]})
            log_lines = sum(1 for _ in open(tmp_path / "access.log"))
        finally:
            for load in loads.values():
                load.close()
            for srv in servers.values():
                srv.stop()

    def median(name: str, field: str) -> float:
        values = sorted(f[field] for f in figures[name])
        return values[len(values) // 2]

    out: dict[str, Any] = {
        "benchmark": "observability-overhead", "workload": f"small GET ({bench.SMALL_SIZE} B), {clients} connections",
        "rounds": rounds, "seconds_per_round": seconds, "access_log_lines_written": log_lines,
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "variants": {name: {"args": variants[name], "rounds": figures[name],
                            "median_ops_per_s": median(name, "ops_per_s"),
                            "median_server_cpu_us_per_op": median(name, "server_cpu_us_per_op")}
                     for name in variants},
    }
    off, on = out["variants"]["off"], out["variants"]["on"]
    out["overhead"] = {
        # Throughput lost with logs + metrics on, and server CPU added per request (the steadier
        # figure on a shared machine).
        "throughput": round(1 - on["median_ops_per_s"] / off["median_ops_per_s"], 3),
        "server_cpu_per_op": round(on["median_server_cpu_us_per_op"] / off["median_server_cpu_us_per_op"] - 1, 3),
        "target": 0.10,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 0.3 s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.quick:
        print(json.dumps(run(rounds=1, seconds=0.3, objects=64), indent=2))
        return
    print(json.dumps(run(rounds=args.rounds, seconds=args.seconds, objects=512), indent=2))


if __name__ == "__main__":
    main()
