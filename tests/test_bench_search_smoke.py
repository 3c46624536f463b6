"""`bench/search.py` on a small corpus runs end to end and prints every figure (shape only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_search_bench_small_prints_every_figure(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "search.py"), "--docs", "800", "--queries", "30",
                           "--vector-queries", "20", "--fresh-seconds", "1", "--repeat", "1",
                           "--cache", str(tmp_path / "corpus.json")], env=env, capture_output=True, timeout=280)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["corpus"]["documents"] == 800 and doc["corpus"]["dimension"] == 384
    assert doc["fulltext_indexing"]["docs_per_second"] > 0 and doc["vector_indexing"]["docs_per_second"] > 0
    assert {"lag_p50_ms", "lag_p99_ms", "achieved_writes_per_second"} <= doc["freshness"].keys()
    for name in ("anvil", "anvil_snippets", "fts5"):
        assert {"qps", "p50", "p99"} <= doc["fulltext"][name].keys()
    assert doc["fulltext"]["qps_ratio_anvil_over_fts5"] > 0
    assert 0 <= doc["vector"]["recall_at_10"] <= 1 and 0 <= doc["vector"]["filtered_recall_at_10_1pct"] <= 1
    assert len(doc["load_average_start"]) == 3 and len(doc["load_average_end"]) == 3
    reopen = doc["vector_reopen"]  # the saved HNSW graph loaded, and rebuilt without it
    assert reopen["vectors"] == 800 and reopen["loaded_seconds"] >= 0 and reopen["rebuilt_seconds"] > 0
