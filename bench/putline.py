"""Where a small PUT's latency goes with 8 clients: a timeline of the catalog writer, per source tree.

Runs `bench/objects.py`'s small-PUT workload (4 KiB, 2 client processes x 4 keep-alive connections,
raw HTTP/1.1) against a real `anvil serve` of each `--variant NAME=SRC_DIR`, interleaved over `--reps`
repetitions. The server is traced from outside its code: a `sitecustomize` put first on its
PYTHONPATH wraps, in the server process only, the writer's `Catalog._apply` (a batch gathered),
`Catalog._before_commit` (its statements done, COMMIT next) and `Catalog._commit` (committed), and
stamps each queued job (`catalog._Job`) with the time it was submitted. Per batch that gives:

  gather_ms     from the later of (the first job's submit, the end of the previous batch) to the
                batch's start: the writer waiting for more writers while one is queued (on main), or
                waking up and taking the GIL (a batch that gathers while its statements run)
  statements_ms the batch's transaction up to COMMIT (BEGIN, each mutation, the journal rows; and,
                where the batch grows while its statements run, the waits for the next writers)
  commit_ms     COMMIT: the WAL write and its fsync (synchronous=FULL)
  resolve_ms    the callers' outcomes settled and the listeners called (the event loop woken)
  idle_ms       the writer waiting for a first job

and the batch-size histogram, the PUT rate and latency, and each server thread's CPU over the phase
(from /proc/PID/task/*/stat): the event loop's and the writer's busy fraction. Prints JSON.

    python bench/putline.py --variant main=../main/src --variant branch=src --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import objects as native_bench  # noqa: E402

# Runs in the server process (PYTHONPATH's first entry): records the writer's batches in memory and
# writes them to $PUTLINE_OUT at exit (the server stops on SIGTERM, gracefully).
SITECUSTOMIZE = textwrap.dedent('''
    import atexit, json, os, threading, time

    def _trace():
        from anvil.storage import catalog as c
        clock = time.monotonic
        rows = []
        state = {"end": 0.0, "writer": 0}
        job_class = c._Job

        def stamped_job(*args, **kwargs):
            job = job_class(*args, **kwargs)
            job.t_submit = clock()
            return job

        c._Job = stamped_job
        apply, before_commit, commit = c.Catalog._apply, c.Catalog._before_commit, c.Catalog._commit

        def traced_apply(self, batch, *more):
            start = clock()
            state["writer"] = threading.get_native_id()
            state["row"] = row = [start, 0, 0.0, 0.0, state["end"], 0.0, 0.0, 0.0]
            apply(self, batch, *more)
            # (the batch may have grown while its statements ran)
            row[1:4] = len(batch), min(j.t_submit for j in batch), max(j.t_submit for j in batch)
            row[7] = state["end"] = clock()
            rows.append(row)

        def traced_before_commit(self, *args):
            before_commit(self, *args)
            state["row"][5] = clock()

        def traced_commit(self, *args):
            outcome = commit(self, *args)
            state["row"][6] = clock()
            return outcome

        c.Catalog._apply, c.Catalog._before_commit, c.Catalog._commit = (
            traced_apply, traced_before_commit, traced_commit)

        def dump():
            with open(os.environ["PUTLINE_OUT"], "w") as f:
                json.dump({"writer_tid": state["writer"], "rows": rows}, f)

        atexit.register(dump)

    _trace()
''')


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each of the process's threads, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _batches(rows: list[list[float]], t0: float, t1: float) -> dict[str, Any]:
    """Per-batch figures (medians and totals, ms) of the batches that started inside [t0, t1]."""
    rows = [r for r in rows if t0 <= r[0] <= t1]
    if not rows:
        return {}
    sizes = [r[1] for r in rows]
    wall = (t1 - t0) * 1000

    def parts(row: list[float]) -> dict[str, float]:
        start, _, first, _, prev_end, statements_end, commit_end, end = row
        waiting_from = max(first, prev_end)
        return {"idle_ms": max(0.0, first - prev_end) * 1000, "gather_ms": (start - waiting_from) * 1000,
                "statements_ms": (statements_end - start) * 1000, "commit_ms": (commit_end - statements_end) * 1000,
                "resolve_ms": (end - commit_end) * 1000, "submit_spread_ms": (row[3] - first) * 1000}

    table = [parts(r) for r in rows]
    names = table[0].keys()
    histogram: dict[int, int] = {}
    for s in sizes:
        histogram[s] = histogram.get(s, 0) + 1
    return {
        "batches": len(rows), "mean_batch": round(sum(sizes) / len(rows), 2),
        "batch_size_histogram": dict(sorted(histogram.items())),
        "median_ms": {n: round(statistics.median(t[n] for t in table), 3) for n in names},
        # Where the writer thread's wall time went over the phase (fractions of the phase).
        "writer_wall_fraction": {n: round(sum(t[n] for t in table) / wall, 3) for n in names
                                 if n != "submit_spread_ms"},
    }


def run(variants: dict[str, str], reps: int, seconds: float, data_dir: str | None = None,
        processes: int = 2, conns_per_process: int = 4) -> dict[str, Any]:
    from tests.helpers import AnvilServer

    clients = processes * conns_per_process
    out: dict[str, Any] = {"load_average_before": os.getloadavg(), "clients": f"{processes} x {conns_per_process}",
                           "runs": []}
    with tempfile.TemporaryDirectory(prefix="anvil-putline-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for rep in range(reps):
            order = list(variants.items())
            if rep % 2:
                order.reverse()
            for name, src in order:
                trace = Path(tmp) / f"trace-{name}-{rep}.json"
                env = {"PYTHONPATH": os.pathsep.join((str(site), str(Path(src).resolve()))),
                       "PUTLINE_OUT": str(trace)}
                server = AnvilServer(Path(data_dir or tmp) / f"data-{name}-{rep}", env=env).start()
                # The client processes read the token from the environment they were spawned with, and a
                # server's token works only on that server: a fresh load generator per server.
                os.environ[native_bench.TOKEN_ENV] = server.auth_headers()["authorization"].removeprefix("Bearer ")
                load = native_bench.LoadGenerator(processes, conns_per_process)
                try:
                    with server.client() as c:
                        c.create_bucket("bench")
                    load.run(server.port, "bench", "put", [[f"warm/{n}/"] for n in range(clients)], 0.5)
                    pid = server.proc.pid
                    cpu0, t0 = _thread_cpu(pid), time.monotonic()
                    put = load.run(server.port, "bench", "put", [[f"p/{n}/"] for n in range(clients)], seconds)
                    cpu1, t1 = _thread_cpu(pid), time.monotonic()
                finally:
                    load.close()
                    server.stop()
                put.pop("written")
                traced = json.loads(trace.read_text())
                window = (t1 - t0)
                threads = sorted(((cpu1[t] - cpu0.get(t, 0.0), t) for t in cpu1), reverse=True)
                writer = traced["writer_tid"]
                busiest = threads[0]
                run_fig = {
                    "variant": name, "rep": rep, "put_ops_per_s": put["ops_per_s"], "latency_ms": put["latency_ms"],
                    "server_cpu_ms_per_put": round(1000 * sum(c for c, _ in threads) / max(put["ops"], 1), 3),
                    "loop_busy_fraction": round(next(c for c, t in threads if t == pid) / window, 3),
                    "writer_busy_fraction": round(next((c for c, t in threads if t == writer), 0.0) / window, 3),
                    "busiest_thread": "loop" if busiest[1] == pid else ("writer" if busiest[1] == writer else "other"),
                    **_batches(traced["rows"], t0, t1),
                }
                out["runs"].append(run_fig)
                print(json.dumps(run_fig), file=sys.stderr)
    out["load_average_after"] = os.getloadavg()
    summary: dict[str, Any] = {}
    for name in variants:
        runs = [r for r in out["runs"] if r["variant"] == name]
        rates = sorted(r["put_ops_per_s"] for r in runs)
        summary[name] = {"put_ops_per_s_runs": [r["put_ops_per_s"] for r in runs], "min": rates[0],
                         "median": statistics.median(rates),
                         "p50_ms_median": statistics.median(r["latency_ms"]["p50"] for r in runs),
                         "mean_batch_median": statistics.median(r.get("mean_batch", 0) for r in runs)}
    out["summary"] = summary
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--processes", type=int, default=2, help="client processes (bench/objects.py: 2)")
    ap.add_argument("--conns", type=int, default=4, help="keep-alive connections per client process (4)")
    ap.add_argument("--data-dir", help="where the servers' stores go (default: the temporary folder); /dev/shm "
                    "takes the disk out: an fsync there costs next to nothing, so what is left is the CPU and the "
                    "hand-offs between the event loop and the writer")
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"branch": str(ROOT / "src")}
    print(json.dumps(run(variants, args.reps, args.seconds, args.data_dir, args.processes, args.conns), indent=2))


if __name__ == "__main__":
    main()
