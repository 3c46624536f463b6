"""`bench/scale.py --quick` runs end to end and prints every documented figure for each step.

Only the shape is checked: performance claims belong to the benchmark's own output, never to a
timed assertion here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scale_bench_quick_prints_every_figure_per_step() -> None:
    # The cheap repository KDF: the run's backup commands are checked for their figures, not their key.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "ANVIL_BACKUP_KDF": "test"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--steps", "100,200",
                           "--processes", "1", "--conns", "2"], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "scale" and doc["quick"] is True
    assert {"load_average_before", "load_average_after"} <= doc["machine"].keys()
    steps = doc["steps"]
    assert [s["objects"] for s in steps] == [100, 200]
    for s in steps:
        assert s["put"]["objects"] == 100 and s["put"]["errors"] == 0 and s["put"]["ops_per_s"] > 0
        for phase in ("get_alone", "get_while_listing"):
            assert s[phase]["ops"] > 0 and s[phase]["errors"] == 0
            assert {"p50_ms", "p99_ms", "max_ms"} <= s[phase].keys()
        assert s["get_while_listing"]["listings"] > 0
        # 100 keys over 1,000 prefixes: every key is its own common prefix.
        assert s["listing"]["delimiter_prefixes"] == min(s["objects"], 1000)
        assert {"first_page_ms", "middle_page_ms", "delimiter_ms"} <= s["listing"].keys()
        for name in ("full_listing", "full_listing_lean", "full_listing_s3", "full_listing_s3_lean"):
            assert s[name]["keys"] == s["objects"], name
            assert {"keys_per_s", "client_cpu_us_per_key", "server_cpu_us_per_key"} <= s[name].keys()
        assert {"rss_mib", "anon_mib", "uss_mib", "threads"} <= s["memory_at_rest"].keys()
        assert s["watch_status_ms"] > 0 and s["fsck_seconds"] > 0
        assert {"with_new_objects_seconds", "no_change_incremental_seconds", "server_peak_rss_mib",
                "server_rss_after_mib"} <= s["backup"].keys()
        assert s["rss"]["at_rest_mib"] > 0
    assert "growth" not in steps[0] and steps[1]["growth"]["full_listing.keys"] == 2.0
    assert {"delimiter_listing_ms", "get_p99_while_listing_ms", "rss_mib", "full_listing_keys_per_s", "no_errors",
            "all_met"} <= doc["targets"].keys()
