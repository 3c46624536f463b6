"""XML out (hand-built, escaped) and XML in (expat, DTDs and entities refused, size-capped)."""

from __future__ import annotations

import functools
import pyexpat
import re
import time
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_XML_BODY = 2 * 1024 * 1024


# Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class XMLRejected(ValueError):
    pass


def xml_safe(text: str) -> str:
    """`text` with the characters XML 1.0 cannot represent replaced by U+FFFD (an error document
    echoes request paths and values, which may hold NUL or other control characters)."""
    return _NOT_XML_CHAR.sub("\ufffd", text)


# Control characters in text (object keys may hold any but NUL): written as character references, as
# S3 writes them. A raw CR would come back as LF (XML end-of-line normalisation; AWS "Object key naming
# guidelines" asks for &#13;), and the C0 controls other than TAB and LF are not XML 1.0 characters at
# all. Clients that must parse such keys strictly ask for encoding-type=url.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def _char_ref(m: re.Match[str]) -> str:
    return f"&#x{ord(m.group()):X};"


# Anything `text` changes; most keys have none of it, and one search is cheaper than the escapes.
_SPECIAL = re.compile("[&<>\x00-\x08\x0b-\x1f\x7f]")


def text(value: str) -> str:
    """Element text: XML-escaped, control characters as character references."""
    if not _SPECIAL.search(value):
        return value
    out = escape(value)
    return _CONTROL.sub(_char_ref, out) if _CONTROL.search(out) else out


def element(name: str, value: object) -> str:
    body = ("true" if value else "false") if isinstance(value, bool) else text(str(value))
    return f"<{name}>{body}</{name}>"


def xml_document(root: str, inner: str, *, namespace: bool = True) -> bytes:
    ns = f' xmlns="{S3_NS}"' if namespace else ""
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{root}{ns}>{inner}</{root}>'.encode()


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    t = time.gmtime(second)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."


def iso_time(ts: float) -> str:
    # Per listed object: the date and time to the second are formatted once per second (objects
    # written together share it), the milliseconds every time.
    return f"{_iso_second(int(ts))}{int(ts * 1000) % 1000:03d}Z"


def parse(body: bytes) -> ET.Element:
    """Parse a small request document; namespaces are stripped from tags."""
    if len(body) > MAX_XML_BODY:
        raise XMLRejected("the XML body is too large")
    if not body.strip():
        raise XMLRejected("the XML body is empty")
    lowered = body.lower()
    # No S3 request needs a DTD: refusing them outright rules out entity expansion and external entities.
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise XMLRejected("DTDs and entities are not accepted")
    # The byte check above misses a DTD in another encoding (UTF-16 with a BOM): the parser itself
    # also refuses any DTD or entity declaration, and reads every document as UTF-8, as S3 does.
    # (expat directly: ElementTree's C parser offers no hook for declarations.)
    builder = ET.TreeBuilder()
    parser = pyexpat.ParserCreate("utf-8", namespace_separator="}")
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.UnparsedEntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_dtd
    parser.buffer_text = True
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(body, True)
        root = builder.close()
    except XMLRejected:
        raise
    except (pyexpat.ExpatError, ValueError, LookupError):
        raise XMLRejected("the XML body is not well-formed") from None
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def _refuse_dtd(*_args: object) -> None:
    raise XMLRejected("DTDs and entities are not accepted")


def child_text(el: ET.Element, name: str) -> str | None:
    c = el.find(name)
    return None if c is None else (c.text or "")
