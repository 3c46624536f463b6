"""A watcher survives the server being killed with SIGKILL mid-stream and resumes with nothing lost."""

from __future__ import annotations

import threading
import time

from tests.helpers import AnvilServer, unique_bucket
from tests.test_watch_api import journal_seqs


def test_sdk_iterator_resumes_after_sigkill_and_restart(tmp_path):
    server = AnvilServer(tmp_path / "data").start()
    try:
        client = server.client()
        bucket = unique_bucket()
        client.create_bucket(bucket)
        start = client.health()["journal"]["seq"]
        got: list[dict] = []
        errors: list[BaseException] = []
        done = threading.Event()
        killed = threading.Event()
        reconnects: list[int] = []

        def watcher() -> None:
            try:
                with server.client() as c, c.watch(bucket, after=start, heartbeat=0.5, reconnect_timeout=30) as st:
                    for ev in st:
                        got.append(ev)
                        if len(got) == 5:
                            killed.wait(30)  # hold the stream open, behind the writer, until the kill
                        if len(got) >= 80:
                            break
                    reconnects.append(st.reconnects)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)
            finally:
                done.set()

        t = threading.Thread(target=watcher)
        t.start()
        for i in range(40):
            client.put_object(bucket, f"before/{i:02d}", b"x")
        while len(got) < 5:
            time.sleep(0.01)
        server.kill()  # SIGKILL mid-stream: no graceful close of the SSE connection
        assert len(got) == 5  # the watcher is behind: 35 acknowledged events not yet handed out
        killed.set()
        time.sleep(0.3)
        server.start()  # same port: the iterator reconnects to the same endpoint by itself
        for i in range(40):
            client.put_object(bucket, f"after/{i:02d}", b"x")
        assert done.wait(60), "the watcher did not finish"
        t.join()
        assert not errors, errors
        assert reconnects and reconnects[0] >= 1
        seqs = [e["seq"] for e in got]
        assert seqs == journal_seqs(client, bucket, start)
        assert [e["key"] for e in got] == [f"before/{i:02d}" for i in range(40)] + [f"after/{i:02d}" for i in range(40)]
        client.close()
    finally:
        server.stop()
