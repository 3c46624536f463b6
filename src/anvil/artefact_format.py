"""The artefact manifest format, shared by the server (anvil.artefacts) and the SDK (anvil.client).

Pure functions (no storage): the SDK uses them to build and sign a manifest before pushing,
the service to check what it receives, and the participant to validate what was restored.
The artefact id is the SHA-256 of the canonical manifest (sorted keys, no spaces, UTF-8), so
an id names exactly one manifest forever; signatures sign those same bytes and are stored
beside the manifest, not in it (adding a signature does not change the id).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import unicodedata
from pathlib import PurePosixPath
from typing import Any

from anvil.errors import AnvilError

FORMAT = "anvil.artefact"
SCHEMA_VERSION = 1
KINDS = ("model", "source")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Names a tag may not take: they are path segments of the artefact routes.
RESERVED_TAGS = frozenset({"components", "tags", "tensors", "verify", "git", "files"})
MAX_COMPONENTS = 10_000
MAX_PATH = 1024
# A safetensors header is JSON of at most 100 MB by the format's own rule.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def invalid(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", message)


def canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def artefact_id(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def check_name(name: Any, what: str = "artefact name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise invalid(f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-' (starting with a "
                      "letter or digit)")
    return name


def check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag) or tag in RESERVED_TAGS or HEX64.match(tag):
        raise invalid("a tag is 1-128 letters, digits, '.', '_' or '-', not 64 hex digits (those are ids) and not "
                      f"one of {sorted(RESERVED_TAGS)}")
    return tag


# Control characters (a newline in a file name forges lines in listings and logs) and ':' (a drive
# letter, `C:/x`, makes the path absolute on Windows; `name:stream` writes an NTFS alternate data
# stream): a pull writes component paths as local file names.
_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f:]")


def check_path(path: Any) -> str:
    """A component path: relative, POSIX, no `..`, no empty or `.` segments, no control characters or ':'."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\\" in path or _BAD_PATH_CHARS.search(path):
        raise invalid(f"component path {path!r} must be a non-empty relative POSIX path of at most {MAX_PATH} "
                      "characters, without control characters or ':'")
    if path.startswith("/"):
        raise invalid(f"component path {path!r} is absolute: paths must be relative to the artefact")
    parts = path.split("/")
    if ".." in parts:
        raise invalid(f"component path {path!r} contains '..'")
    if any(p in ("", ".") for p in parts):
        raise invalid(f"component path {path!r} has an empty or '.' segment")
    return path


def check_layout(paths: Any) -> None:
    """The file list a pull materialises must fit a file system: no path that is both a file and a
    directory (`a` and `a/b`: no pull can write both), and no two paths that differ only by case or
    Unicode normalisation (one file on macOS and Windows: a verified pull would leave one path holding
    the other's bytes)."""
    seen: dict[str, str] = {}
    for p in paths:
        folded = unicodedata.normalize("NFC", p).casefold()
        other = seen.setdefault(folded, p)
        if other != p:
            raise invalid(f"component paths {other!r} and {p!r} differ only by case or Unicode normalisation")
    for folded, p in seen.items():
        parts = folded.split("/")
        for i in range(1, len(parts)):
            parent = seen.get("/".join(parts[:i]))
            if parent is not None:
                raise invalid(f"component path {parent!r} is a file, so {p!r} cannot be under it")


def check_ref_name(name: Any) -> str:
    """A git ref name as git accepts it (`HEAD`, or `refs/...` by git-check-ref-format): a name git cannot
    hold made every `git clone` of the artefact fail with an internal error."""
    from dulwich.refs import check_ref_format

    if name == "HEAD":
        return name
    if not isinstance(name, str) or not name.startswith("refs/") or not check_ref_format(name.encode()):
        raise invalid(f"ref name {str(name)[:200]!r} is not a valid git ref name (HEAD or refs/...)")
    return name


def check_sha(value: Any, what: str = "sha256") -> str:
    if not isinstance(value, str) or not HEX64.match(value):
        raise invalid(f"{what} must be 64 lowercase hex digits")
    return value


def check_manifest(m: Any) -> dict[str, Any]:
    """Structural checks of a manifest as received; returns it unchanged (its bytes define the id)."""
    if not isinstance(m, dict):
        raise invalid("the manifest must be a JSON object")
    allowed = {"format", "schema", "kind", "name", "components", "base", "removed", "metadata", "refs"}
    extra = set(m) - allowed
    if extra:
        raise invalid(f"unknown manifest fields: {sorted(extra)}")
    # `type(...) is int`: JSON `true` equals 1 in Python, and would pass as schema 1 under another id.
    if m.get("format") != FORMAT or type(m.get("schema")) is not int or m.get("schema") != SCHEMA_VERSION:
        raise invalid(f"manifest format must be {FORMAT!r} with schema {SCHEMA_VERSION}")
    if m.get("kind") not in KINDS:
        raise invalid(f"manifest kind must be one of {list(KINDS)}")
    check_name(m.get("name"))
    comps = m.get("components")
    if not isinstance(comps, list) or len(comps) > MAX_COMPONENTS:
        raise invalid(f"components must be a list of at most {MAX_COMPONENTS} entries")
    seen: set[str] = set()
    for c in comps:
        if not isinstance(c, dict) or set(c) != {"path", "size", "sha256"}:
            raise invalid("each component is {path, size, sha256}")
        check_path(c["path"])
        check_sha(c["sha256"], f"component {c['path']!r} sha256")
        if not isinstance(c["size"], int) or isinstance(c["size"], bool) or c["size"] < 0:
            raise invalid(f"component {c['path']!r} size must be a non-negative integer")
        if c["path"] in seen:
            raise invalid(f"component path {c['path']!r} appears twice")
        seen.add(c["path"])
    base = m.get("base")
    if base is not None:
        check_sha(base, "base")
    removed = m.get("removed", [])
    if not isinstance(removed, list):
        raise invalid("removed must be a list of paths")
    for p in removed:
        check_path(p)
    if removed and base is None:
        raise invalid("removed paths need a base artefact")
    if not isinstance(m.get("metadata", {}), dict):
        raise invalid("metadata must be a JSON object")
    refs = m.get("refs", {})
    if not isinstance(refs, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                             and re.fullmatch(r"[0-9a-f]{40}", v) for k, v in refs.items()):
        raise invalid("refs must map ref names to 40-hex commit ids")
    for k in refs:
        check_ref_name(k)
    if m["kind"] == "source" and not refs:
        raise invalid("a source artefact records at least one ref")
    return m


def build_manifest(kind: str, name: str, components: list[dict[str, Any]], *, base: str | None = None,
                   removed: list[str] | None = None, metadata: dict[str, Any] | None = None,
                   refs: dict[str, str] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"format": FORMAT, "schema": SCHEMA_VERSION, "kind": kind, "name": name,
                         "components": sorted(components, key=lambda c: c["path"]),
                         "metadata": metadata or {}}
    if base is not None:
        m["base"] = base
        m["removed"] = sorted(removed or [])
    if refs:
        m["refs"] = dict(sorted(refs.items()))
    return m


# -- signatures -------------------------------------------------------------------------------


def sign(manifest: dict[str, Any], private_key: Any, key_id: str) -> dict[str, str]:
    """An Ed25519 signature of the canonical manifest (`private_key`: cryptography's Ed25519PrivateKey)."""
    return {"key_id": key_id, "signature": base64.b64encode(private_key.sign(canonical(manifest))).decode()}


def public_key_bytes(raw: str) -> bytes:
    """A public key as given by a caller: base64 of the 32 raw bytes, or a PEM block."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(raw, str):
        raise invalid("public_key must be a string")
    text = raw.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not Ed25519")
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise invalid("public_key must be an Ed25519 public key (PEM, or base64 of its 32 raw bytes)") from None
    if len(data) != 32:
        raise invalid("an Ed25519 public key is 32 bytes")
    return data


def verify_signature(manifest_bytes: bytes, signature: dict[str, Any], public_key: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        sig = base64.b64decode(signature.get("signature", ""), validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, manifest_bytes)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def check_signatures(sigs: Any) -> list[dict[str, str]]:
    if sigs is None:
        return []
    if not isinstance(sigs, list) or len(sigs) > 16:
        raise invalid("signatures must be a list of at most 16 {key_id, signature}")
    out = []
    for s in sigs:
        if not isinstance(s, dict) or set(s) != {"key_id", "signature"} or not isinstance(s["signature"], str):
            raise invalid("each signature is {key_id, signature}")
        if not isinstance(s["key_id"], str) or not KEY_ID_RE.match(s["key_id"]):
            raise invalid("a key id is 1-64 letters, digits, '.', '_' or '-'")
        out.append({"key_id": s["key_id"], "signature": s["signature"]})
    return out


# -- safetensors ------------------------------------------------------------------------------


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def is_indexed(path: str) -> bool:
    """Files whose tensors are indexed at push: safetensors (parsed here) and GGUF (the `gguf` package)."""
    return is_safetensors(path) or is_gguf(path)


def index_gguf(file_path: str, file_size: int, path: str) -> list[dict[str, Any]]:
    """The tensor index of a GGUF file, read by llama.cpp's maintained `gguf` package. Shapes are given
    outermost first (numpy order; GGUF stores them innermost first)."""
    import gguf

    try:
        reader = gguf.GGUFReader(file_path, "r")
        tensors = [{"name": t.name, "dtype": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)],
                    "file": path, "offset": int(t.data_offset), "length": int(t.n_bytes)} for t in reader.tensors]
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
        raise invalid(f"{path}: not a readable GGUF file ({e})") from None
    for t in tensors:
        if t["offset"] + t["length"] > file_size:
            raise invalid(f"{path}: tensor {t['name']!r} claims bytes past the end of the file")
    return sorted(tensors, key=lambda t: t["name"])


def safetensors_header_length(prefix: bytes, file_size: int, path: str) -> int:
    """The header's length from the first 8 bytes, checked against the file's size."""
    if file_size < 8 or len(prefix) < 8:
        raise invalid(f"{path}: truncated safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_SAFETENSORS_HEADER:
        raise invalid(f"{path}: safetensors header length {n} exceeds {MAX_SAFETENSORS_HEADER} bytes")
    if 8 + n > file_size:
        raise invalid(f"{path}: truncated safetensors header ({n} bytes declared, {file_size - 8} present)")
    return n


def parse_safetensors_header(header: bytes, file_size: int, path: str) -> list[dict[str, Any]]:
    """The tensor index of one safetensors file from its JSON header: name, dtype, shape, and the
    absolute byte offset and length of its data in the file. Offsets past the end are refused."""
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: `[[[...` nested past the stack
        raise invalid(f"{path}: the safetensors header is not valid JSON") from None
    if not isinstance(doc, dict):
        raise invalid(f"{path}: the safetensors header must be a JSON object")
    data_start = 8 + len(header)
    data_len = file_size - data_start
    out = []

    def natural(x: Any) -> bool:  # JSON true/false are Python ints: not a dimension or an offset
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    for name, info in doc.items():
        if name == "__metadata__":
            continue
        if (not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES
                or not isinstance(info.get("shape"), list)
                or not all(natural(d) for d in info["shape"])
                or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2
                or not all(natural(o) for o in info["data_offsets"])):
            raise invalid(f"{path}: tensor {name!r} has a malformed header entry")
        begin, end = info["data_offsets"]
        if end < begin or end > data_len:
            raise invalid(f"{path}: tensor {name!r} claims bytes {begin}-{end}, past the end of the file's "
                          f"{data_len} data bytes")
        count = 1
        for d in info["shape"]:
            count *= d
        if count * SAFETENSORS_DTYPES[info["dtype"]] != end - begin:
            raise invalid(f"{path}: tensor {name!r}: {end - begin} bytes for shape {info['shape']} of "
                          f"{info['dtype']}")
        out.append({"name": name, "dtype": info["dtype"], "shape": info["shape"], "file": path,
                    "offset": data_start + begin, "length": end - begin})
    # The format's own rule (safetensors checks it on load): in offset order the tensors tile the data
    # exactly. Overlapping tensors give two names to the same bytes, and a hole or trailing bytes are
    # room for a payload no index shows (a polyglot file).
    pos = 0
    for t in sorted(out, key=lambda t: (t["offset"], t["length"])):
        if t["offset"] - data_start != pos:
            raise invalid(f"{path}: tensor {t['name']!r} starts at data byte {t['offset'] - data_start}, not "
                          f"{pos}: tensors overlap or leave a gap")
        pos += t["length"]
    if pos != data_len:
        raise invalid(f"{path}: the tensors cover {pos} of the file's {data_len} data bytes")
    return sorted(out, key=lambda t: t["name"])


def index_file(read: Any, file_size: int, path: str) -> list[dict[str, Any]]:
    """Index a safetensors file given `read(offset, length) -> bytes`."""
    n = safetensors_header_length(read(0, 8), file_size, path)
    return parse_safetensors_header(read(8, n), file_size, path)


def posix(path: str) -> str:
    return str(PurePosixPath(path))
