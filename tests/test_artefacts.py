"""Artefacts against a real server: safetensors models written by `safetensors`, a real git
repository, `huggingface_hub` downloading from Anvil, signatures, tags, deltas and bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save_file

from anvil import artefact_format as mf
from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def _model(d: Path, seed: int = 0, *, extra: dict[str, np.ndarray] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"embed.weight": rng.standard_normal((64, 32)).astype(np.float32),
               "layer.0.bias": np.arange(32, dtype=np.int64)}, str(d / "model-00001.safetensors"))
    save_file({"head.weight": rng.standard_normal((32, 16)).astype(np.float16), **(extra or {})},
              str(d / "model-00002.safetensors"))
    (d / "config.json").write_text(json.dumps({"hidden": 32, "seed": seed}))
    (d / "tokenizer").mkdir(exist_ok=True)
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    return d


def _blob_bytes(server: AnvilServer) -> int:
    return sum(p.stat().st_size for p in (server.storage_path / "blobs" / "sha256").rglob("*")
               if p.is_file() and not p.name.endswith(".chunks"))


def _journal_kinds(client: AnvilClient) -> list[str]:
    events = client._json("GET", "/anvil/v1/admin/journal", params={"after": 0, "limit": 100000})
    return [e["kind"] for e in events["events"]]


def test_push_pull_tensors_and_journal(client: AnvilClient, bucket: str, tmp_path: Path) -> None:
    src = _model(tmp_path / "m")
    res = client.push_model(bucket, "tiny", src, tag="v1")
    assert res["created"] and res["tag"]["id"] == res["id"] and res["uploaded"] == 4 and res["tensors"] == 3
    info = client.artefact_describe(bucket, "tiny", "v1")
    assert info["id"] == res["id"] == mf.artefact_id(info["manifest"])
    assert sorted(f["path"] for f in info["files"]) == ["config.json", "model-00001.safetensors",
                                                        "model-00002.safetensors", "tokenizer/vocab.txt"]
    # The tensor index and single-tensor reads match what safetensors wrote.
    tensors = {t["name"]: t for t in client.list_tensors(bucket, "tiny", "v1")}
    assert set(tensors) == {"embed.weight", "layer.0.bias", "head.weight"}
    assert tensors["embed.weight"]["dtype"] == "F32" and tensors["embed.weight"]["shape"] == [64, 32]
    from safetensors.numpy import load_file

    want = load_file(str(src / "model-00001.safetensors"))["embed.weight"]
    data, dtype, shape = client.get_tensor(bucket, "tiny", res["id"], "embed.weight")
    assert dtype == "F32" and shape == [64, 32]
    assert np.array_equal(np.frombuffer(data, dtype=np.float32).reshape(shape), want)
    with pytest.raises(AnvilAPIError) as e:
        client.get_tensor(bucket, "tiny", "v1", "no.such.tensor")
    assert e.value.code == "NotFound" and "no.such.tensor" in e.value.message
    # Pull verifies every file and reproduces the directory.
    out = tmp_path / "out"
    assert client.pull_artefact(bucket, "tiny", "v1", out)["files"] == 4
    for p in src.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()
    assert client.verify_artefact(bucket, "tiny", "v1")["ok"] is True
    kinds = _journal_kinds(client)
    assert "artefact.push" in kinds and "artefact.tag" in kinds
    # Pushing the same directory again is the same id, and uploads nothing.
    again = client.push_model(bucket, "tiny", src)
    assert again["id"] == res["id"] and not again["created"] and again["uploaded"] == 0


def test_delta_shares_components_and_storage_grows_by_the_delta(server: AnvilServer, client: AnvilClient,
                                                                bucket: str, tmp_path: Path) -> None:
    base_dir = _model(tmp_path / "base", seed=1)
    big = np.random.default_rng(5).standard_normal((256, 256)).astype(np.float32)  # 256 KiB shared file
    save_file({"big": big}, str(base_dir / "shared-big.safetensors"))
    base = client.push_model(bucket, "llm", base_dir, tag="base")
    before = _blob_bytes(server)
    ft = tmp_path / "ft"
    subprocess.run(["cp", "-r", str(base_dir), str(ft)], check=True)
    (ft / "config.json").write_text(json.dumps({"hidden": 32, "finetuned": True}))
    save_file({"adapter": np.ones((8, 8), dtype=np.float32)}, str(ft / "adapter.safetensors"))
    (ft / "tokenizer" / "vocab.txt").unlink()
    res = client.push_model(bucket, "llm", ft, base="base", tag="ft")
    m = client.artefact_describe(bucket, "llm", "ft")
    assert m["manifest"]["base"] == base["id"]
    assert sorted(c["path"] for c in m["manifest"]["components"]) == ["adapter.safetensors", "config.json"]
    assert m["manifest"]["removed"] == ["tokenizer/vocab.txt"]
    assert "tokenizer/vocab.txt" not in {f["path"] for f in m["files"]}
    assert res["uploaded"] == 2
    delta = (ft / "config.json").stat().st_size + (ft / "adapter.safetensors").stat().st_size
    assert _blob_bytes(server) - before == delta
    assert "adapter" in {t["name"] for t in client.list_tensors(bucket, "llm", "ft")}
    assert client.pull_artefact(bucket, "llm", "ft", tmp_path / "pulled")["files"] == 5
    # Ranged, parallel parts (the 256 KiB shared file in 64 KiB ranges) give the same bytes.
    client.pull_artefact(bucket, "llm", "ft", tmp_path / "ranged", part_size=64 * 1024)
    for p in ft.rglob("*"):
        if p.is_file():
            assert (tmp_path / "ranged" / p.relative_to(ft)).read_bytes() == p.read_bytes()
    assert not list((tmp_path / "ranged").rglob("*.anvil-partial"))


def _key_files(tmp_path: Path) -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, base64.b64encode(pub).decode()


def test_signatures_and_tags_that_require_them(client: AnvilClient, bucket: str, tmp_path: Path) -> None:
    key, pub = _key_files(tmp_path)
    other, other_pub = _key_files(tmp_path)
    kid = f"release-{bucket}"
    client.add_signing_key(kid, pub)
    src = _model(tmp_path / "m", seed=2)
    signed = client.push_model(bucket, "sig", src, signing_key=key, key_id=kid)
    v = client.verify_artefact(bucket, "sig", signed["id"])
    assert v["ok"] and v["signatures"] == [{"key_id": kid, "ok": True}]
    # A tag that requires the key: unsigned and wrongly signed pushes are refused, nothing written.
    client.tag_artefact(bucket, "sig", "prod", signed["id"], require_key=kid)
    unsigned_dir = _model(tmp_path / "u", seed=3)
    count = len(client.list_artefacts(bucket))
    with pytest.raises(AnvilAPIError) as e:
        client.push_model(bucket, "sig", unsigned_dir, tag="prod")
    assert e.value.code == "SignatureInvalid" and "requires a signature" in e.value.message
    with pytest.raises(AnvilAPIError) as e:
        client.push_model(bucket, "sig", unsigned_dir, tag="prod", signing_key=other, key_id=kid)
    assert e.value.code == "SignatureInvalid" and "does not verify" in e.value.message
    assert len(client.list_artefacts(bucket)) == count
    assert client.artefact_describe(bucket, "sig", "prod")["id"] == signed["id"]
    # An unsigned artefact pushed without the tag cannot be moved onto it either ...
    plain = client.push_model(bucket, "sig", unsigned_dir)
    with pytest.raises(AnvilAPIError) as e:
        client.tag_artefact(bucket, "sig", "prod", plain["id"])
    assert e.value.code == "SignatureInvalid"
    # ... until the same manifest is pushed again with a signature, which is added to it.
    again = client.push_model(bucket, "sig", unsigned_dir, signing_key=key, key_id=kid)
    assert again["id"] == plain["id"] and not again["created"]
    assert client.tag_artefact(bucket, "sig", "prod", plain["id"])["id"] == plain["id"]
    client.tag_artefact(bucket, "sig", "prod", signed["id"])
    ok = client.push_model(bucket, "sig", unsigned_dir, tag="prod", signing_key=key, key_id=kid)
    assert ok["tag"]["previous"] == signed["id"] and ok["id"] == plain["id"]
    assert "artefact.sign" in _journal_kinds(client)


def test_bad_input_is_refused_and_writes_nothing(server: AnvilServer, client: AnvilClient, bucket: str,
                                                 tmp_path: Path) -> None:
    head = client.verify_journal()
    seq0 = client.health()["journal"]["seq"]
    base = client._a(bucket, "bad")
    # A component whose bytes do not hash to the declared SHA-256.
    with pytest.raises(AnvilAPIError) as e:
        client._request("PUT", base + "/components/" + "0" * 64, content=b"not that")
    assert e.value.code == "BadDigest"
    # Truncated safetensors header, and offsets past the end of the file.
    trunc = struct.pack("<Q", 500) + b'{"a":'
    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    past = struct.pack("<Q", len(header)) + header + b"\0" * 8
    for body, words in ((trunc, "truncated safetensors header"), (past, "past the end")):
        sha = hashlib.sha256(body).hexdigest()
        client._request("PUT", base + f"/components/{sha}", content=body)
        m = mf.build_manifest("model", "bad", [{"path": "w.safetensors", "size": len(body), "sha256": sha}])
        with pytest.raises(AnvilAPIError) as e:
            client._json("POST", base, json={"manifest": m})
        assert e.value.code == "InvalidArgument" and words in e.value.message
    # Paths with `..` or absolute.
    good = b"{}"
    sha = hashlib.sha256(good).hexdigest()
    client._request("PUT", base + f"/components/{sha}", content=good)
    for path, words in (("../etc/passwd", "'..'"), ("/abs/x.json", "absolute")):
        m = mf.build_manifest("model", "bad", [{"path": path, "size": 2, "sha256": sha}])
        with pytest.raises(AnvilAPIError) as e:
            client._json("POST", base, json={"manifest": m})
        assert e.value.code == "InvalidArgument" and words in e.value.message
    # A declared size that is not the content's.
    m = mf.build_manifest("model", "bad", [{"path": "c.json", "size": 3, "sha256": sha}])
    with pytest.raises(AnvilAPIError) as e:
        client._json("POST", base, json={"manifest": m})
    assert e.value.code == "BadDigest"
    # A tag pointing to a missing id.
    with pytest.raises(AnvilAPIError) as e:
        client.tag_artefact(bucket, "bad", "latest", "ab" * 32)
    assert e.value.code == "NotFound" and "cannot point" in e.value.message
    assert client.list_artefacts(bucket) == []
    # The only journaled writes are the accepted component uploads; no refused push left a trace.
    after = client._json("GET", "/anvil/v1/admin/journal", params={"after": seq0, "limit": 1000})["events"]
    assert {e["kind"] for e in after} <= {"artefact.upload"} and head["ok"]


def test_a_component_counts_only_in_the_bucket_it_was_uploaded_to(server: AnvilServer, client: AnvilClient,
                                                                   bucket: str) -> None:
    """Blobs are shared and content-addressed: knowing a file's hash and size must not let another
    bucket (or tenant) claim it in a manifest and then pull it."""
    secret = b"another bucket's private weights"
    sha = hashlib.sha256(secret).hexdigest()
    client._request("PUT", client._a(bucket, "owner") + f"/components/{sha}", content=secret)
    other = f"{bucket}-x"
    client.create_bucket(other)
    assert client._json("POST", client._a(other, "thief") + "/components/missing",
                        json={"sha256s": [sha]})["missing"] == [sha]
    m = mf.build_manifest("model", "thief", [{"path": "w.bin", "size": len(secret), "sha256": sha}])
    with pytest.raises(AnvilAPIError) as e:
        client._json("POST", client._a(other, "thief"), json={"manifest": m})
    assert e.value.code == "InvalidArgument" and "not uploaded to this bucket" in e.value.message
    assert client.list_artefacts(other) == []
    # Uploading the bytes (proof of possession) makes the same manifest acceptable.
    client._request("PUT", client._a(other, "thief") + f"/components/{sha}", content=secret)
    assert client._json("POST", client._a(other, "thief"), json={"manifest": m})["id"]


def test_source_artefact_from_a_real_git_repository(client: AnvilClient, bucket: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README.md").write_text("hello\n")
    (repo / "src").mkdir()
    (repo / "src" / "app.py").write_text("print('v1')\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    first = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (repo / "src" / "app.py").write_text("print('v2')\n")
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    subprocess.run([*git, "tag", "-a", "v2", "-m", "release"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    res = client.push_source(bucket, "app", repo, refs=["main", "v2"], tag="snap")
    m = client.artefact_describe(bucket, "app", "snap")["manifest"]
    assert m["kind"] == "source" and m["refs"] == {"refs/heads/main": head, "refs/tags/v2": head}
    assert [c["path"].startswith("git/pack-") for c in m["components"]] == [True]
    assert client.git_resolve(bucket, "app", res["id"], "main") == head
    names = {e["name"]: e["type"] for e in client.git_tree(bucket, "app", "snap", head)}
    assert names == {"README.md": "blob", "src": "tree"}
    assert client.git_blob(bucket, "app", "snap", head, "src/app.py") == b"print('v2')\n"
    assert client.git_blob(bucket, "app", "snap", first, "src/app.py") == b"print('v1')\n"
    with pytest.raises(AnvilAPIError) as e:
        client.git_blob(bucket, "app", "snap", head, "src/missing.py")
    assert e.value.code == "NotFound"


def test_huggingface_hub_downloads_from_anvil(server: AnvilServer, client: AnvilClient, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    bucket = unique_bucket("hf")
    client.create_bucket(bucket)
    src = _model(tmp_path / "m", seed=4)
    res = client.push_model(bucket, "tiny", src, tag="main")
    token = client._http.auth.token()  # type: ignore[union-attr]
    endpoint = server.endpoint + "/anvil/v1/hf"
    snap = snapshot_download(f"{bucket}/tiny", revision="main", endpoint=endpoint, token=token,
                             cache_dir=str(tmp_path / "cache"))
    for p in src.rglob("*"):
        if p.is_file():
            assert (Path(snap) / p.relative_to(src)).read_bytes() == p.read_bytes()
    one = hf_hub_download(f"{bucket}/tiny", "config.json", revision=res["id"], endpoint=endpoint, token=token,
                          cache_dir=str(tmp_path / "cache2"))
    assert Path(one).read_bytes() == (src / "config.json").read_bytes()
    # Anonymous access: refused on a private bucket, allowed once the bucket is public.
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises((HfHubHTTPError, OSError)):
        hf_hub_download(f"{bucket}/tiny", "config.json", revision="main", endpoint=endpoint, token=False,
                        cache_dir=str(tmp_path / "cache3"))
    client.set_public_access(bucket, True)
    anon = hf_hub_download(f"{bucket}/tiny", "config.json", revision="main", endpoint=endpoint, token=False,
                           cache_dir=str(tmp_path / "cache4"))
    assert Path(anon).read_bytes() == (src / "config.json").read_bytes()
    assert client.hf_pull_verified(bucket, "tiny", "main") == 4


def test_scopes_on_bucket_and_name(server: AnvilServer, client: AnvilClient, tmp_path: Path) -> None:
    bucket = unique_bucket("sc")
    client.create_bucket(bucket)
    src = _model(tmp_path / "m", seed=6)
    client.push_model(bucket, "open", src, tag="v1")
    tenant = client.get_bucket(bucket)["tenant"]
    app = client.create_app(tenant, f"puller-{bucket}", scopes=[f"artefact:pull|bucket:{bucket}/open"])
    with AnvilClient(server.endpoint, client_id=app["client_id"], client_secret=app["client_secret"]) as puller:
        assert puller.artefact_describe(bucket, "open", "v1")["name"] == "open"
        with pytest.raises(AnvilAPIError) as e:
            puller.push_model(bucket, "open", src, tag="v2")
        assert e.value.code == "PermissionDenied"
        with pytest.raises(AnvilAPIError) as e:
            puller.verify_artefact(bucket, "open", "v1")
        assert e.value.code == "PermissionDenied"
        with pytest.raises(AnvilAPIError) as e:
            puller.artefact_describe(bucket, "other", "v1")
        assert e.value.code == "PermissionDenied"


def test_cli_push_sign_tag_pull_verify(server: AnvilServer, bucket: str, tmp_path: Path) -> None:
    src = _model(tmp_path / "m", seed=7)
    keyfile = tmp_path / "release.pem"
    server.cli("artefact", "key", "generate", str(keyfile))
    kid = f"cli-{bucket}"
    server.cli("artefact", "key", "add", kid, str(keyfile))
    assert kid in server.cli("artefact", "key", "list", "--json").stdout.decode()
    out = json.loads(server.cli("artefact", "push", "model", bucket, "cli", str(src), "--tag", "v1",
                                "--sign-key", str(keyfile), "--key-id", kid, "--meta", "license=mit", "--json").stdout)
    aid = out["id"]
    server.cli("artefact", "tag", bucket, "cli", "stable", aid, "--require-key", kid)
    assert json.loads(server.cli("artefact", "show", bucket, "cli", "stable", "--json").stdout)["manifest"][
        "metadata"] == {"license": "mit"}
    assert "embed.weight" in server.cli("artefact", "tensors", bucket, "cli", "v1").stdout.decode()
    assert aid in server.cli("artefact", "list", bucket, "--json").stdout.decode()
    assert "stable" in server.cli("artefact", "list", bucket).stdout.decode()
    assert "cli" in server.cli("artefact", "list", bucket, "cli", "--json").stdout.decode()
    assert json.loads(server.cli("artefact", "verify", bucket, "cli", "stable", "--json").stdout)["ok"]
    server.cli("artefact", "pull", bucket, "cli", "stable", str(tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    # An unsigned push to the tag that requires the key fails with a clear error.
    bad = server.cli("artefact", "push", "model", bucket, "cli", str(_model(tmp_path / "u", seed=8)),
                     "--tag", "stable", check=False)
    assert bad.returncode == 1 and b"SignatureInvalid" in bad.stderr
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "f.txt").write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "c"],
                   check=True)
    server.cli("artefact", "push", "source", bucket, "src", str(repo), "--ref", "main", "--tag", "snap")


def test_gguf_tensors_are_indexed_with_the_gguf_package(client: AnvilClient, bucket: str, tmp_path: Path) -> None:
    import gguf

    d = tmp_path / "g"
    d.mkdir()
    w = gguf.GGUFWriter(str(d / "model.gguf"), "llama")
    w.add_block_count(1)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    w.add_tensor("blk.0.attn_q.weight", a)
    w.add_tensor("output_norm.weight", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    client.push_model(bucket, "gguf", d, tag="v1")
    ts = {t["name"]: t for t in client.list_tensors(bucket, "gguf", "v1")}
    assert ts["blk.0.attn_q.weight"]["dtype"] == "F32" and ts["blk.0.attn_q.weight"]["shape"] == [2, 3]
    data, dtype, shape = client.get_tensor(bucket, "gguf", "v1", "blk.0.attn_q.weight")
    assert np.array_equal(np.frombuffer(data, dtype=np.float32).reshape(shape), a)
    # A truncated GGUF file is refused at push, with nothing recorded.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.gguf").write_bytes((d / "model.gguf").read_bytes()[:100])
    with pytest.raises(AnvilAPIError) as e:
        client.push_model(bucket, "gguf-bad", bad)
    assert e.value.code == "InvalidArgument" and "GGUF" in e.value.message
    assert [x["name"] for x in client.list_artefacts(bucket)] == ["gguf"]


def test_git_clone_over_smart_http_is_read_only(server: AnvilServer, client: AnvilClient, bucket: str,
                                               tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "a.txt").write_text("one\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    client.push_source(bucket, "clone-me", repo, refs=["main"], tag="snap")
    token = client._http.auth.token()  # type: ignore[union-attr]
    url = f"{server.endpoint}/anvil/v1/buckets/{bucket}/artefacts/clone-me/snap/git"
    auth = ["-c", f"http.extraHeader=Authorization: Bearer {token}"]
    out = tmp_path / "clone"
    cloned = subprocess.run(["git", *auth, "clone", "-q", url, str(out)], capture_output=True, text=True, timeout=60)
    assert cloned.returncode == 0, cloned.stderr
    assert (out / "a.txt").read_text() == "one\n"
    got = subprocess.run(["git", "-C", str(out), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert got == head
    # The packs are indexed on disk (derived, per artefact id), and the answer is streamed (chunked).
    aid = client.artefact_describe(bucket, "clone-me", "snap")["id"]
    store = server.storage_path / "derived" / "artefact-git" / aid
    assert (store / "complete").is_file()
    assert list(store.glob("pack/*.pack")) and list(store.glob("pack/*.idx"))
    import httpx

    r = httpx.get(url + "/info/refs?service=git-upload-pack", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked" and head.encode() in r.content
    # Pushing back through the same URL is refused: the endpoint is read-only.
    (out / "b.txt").write_text("two\n")
    subprocess.run(["git", "-C", str(out), "add", "."], check=True)
    subprocess.run(["git", "-C", str(out), "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "two"],
                   check=True)
    pushed = subprocess.run(["git", *auth, "-C", str(out), "push", "-q", "origin", "main"], capture_output=True,
                            timeout=60)
    assert pushed.returncode != 0
    assert client.git_resolve(bucket, "clone-me", "snap", "main") == head


def test_openapi_covers_every_artefact_route(server: AnvilServer) -> None:
    import httpx

    from anvil.api.artefacts import ROUTES

    doc = httpx.get(f"{server.endpoint}/anvil/v1/openapi.json").json()
    for route in ROUTES:
        path = route.path.replace(":path}", "}")
        if path.endswith("/git/{path}"):  # the smart HTTP endpoint: documented by its two git operations
            assert f"{path[:-len('{path}')]}info/refs" in doc["paths"]
            continue
        for method in route.methods - {"HEAD"}:
            assert method.lower() in doc["paths"].get(path, {}), (method, path)


def test_bucket_delete_refuses_while_artefacts_exist_and_drops_lone_uploads(server: AnvilServer,
                                                                            client: AnvilClient,
                                                                            tmp_path: Path) -> None:
    """Manifests are source records referencing their components: a bucket holding any is not deleted
    (native and S3 alike, BucketNotEmpty naming artefacts, nothing written). Components uploaded but
    named by no manifest go with the bucket, so a new bucket of the same name cannot claim them."""
    from tests.s3_helpers import s3_client

    s3 = s3_client(server)
    held = unique_bucket("art-held")
    client.create_bucket(held)
    client.push_model(held, "tiny", _model(tmp_path / "m"), tag="v1")
    before = _journal_kinds(client)
    for attempt in ("native", "s3"):
        if attempt == "native":
            with pytest.raises(AnvilAPIError) as e:
                client.delete_bucket(held)
            assert e.value.code == "BucketNotEmpty" and "artefacts" in e.value.message, e.value.message
        else:
            from botocore.exceptions import ClientError

            with pytest.raises(ClientError) as ce:
                s3.delete_bucket(Bucket=held)
            assert ce.value.response["Error"]["Code"] == "BucketNotEmpty"
            assert "artefacts" in ce.value.response["Error"]["Message"]
    assert _journal_kinds(client) == before  # refused: nothing written
    assert client.artefact_describe(held, "tiny", "v1")["id"]

    secret = b"uploaded, never pushed"
    sha = hashlib.sha256(secret).hexdigest()
    for via in ("native", "s3"):
        lone = unique_bucket(f"art-lone-{via}")
        client.create_bucket(lone)
        client._request("PUT", client._a(lone, "m") + f"/components/{sha}", content=secret)
        if via == "native":
            client.delete_bucket(lone)
        else:
            s3.delete_bucket(Bucket=lone)
        assert _journal_kinds(client)[-2:] == ["artefact.uploads_drop", "bucket.delete"]
        client.create_bucket(lone)  # the same name again: the old upload proves nothing now
        assert client._json("POST", client._a(lone, "m") + "/components/missing",
                            json={"sha256s": [sha]})["missing"] == [sha]
