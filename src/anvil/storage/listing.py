"""A page of a bucket's latest versions rendered inside SQLite: one statement, one string per page.

Why: a listing rendered in Python holds the GIL for every row (fetch, tuple, formatting), and the
event loop that serves GETs waits for the GIL behind it; a page of 1,000 keys was ~4-5 ms of Python.
SQLite runs a statement with the GIL released (apsw drops it around each step), so a page rendered
by SQL (`||` concatenation and `group_concat`) leaves the event loop free, and Python touches a page,
not a row. A delimiter page does its skip-scan in the same statement (a recursive CTE that seeks past
each common prefix with one indexed lookup, as `objects.service._walk` does in Python).

SQLite only (`json_quote`, `group_concat`, `strftime`, `instr`): the caller keeps the Python path for
PostgreSQL (`supported` is False there) and for what SQL does not render (URL-encoded keys, a delimiter
ending in U+10FFFF). The output is what the Python renderers give, byte for byte where the tests compare
it (`tests/test_listing_sql.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apsw

# XML element text as `api.s3.xmlutil.text` writes it when no control character is present
# (xml.sax.saxutils.escape: &, <, > only); a page with a control character goes the Python way.
_XML_ESC = "replace(replace(replace({0}, '&', '&amp;'), '<', '&lt;'), '>', '&gt;')"
# The control characters xmlutil writes as character references (NUL cannot be in a key).
CONTROL_GLOB = "*[" + "".join(chr(c) for c in [*range(1, 9), *range(0x0B, 0x20), 0x7F]) + "]*"

# One object of the native API's listing (`ObjectVersion.to_dict` of a latest, non-deleted version).
_JSON_OBJECT = (
    """'{"bucket":' || json_quote(v.bucket) || ',"key":' || json_quote(v.key)"""
    """ || ',"version_id":' || json_quote(v.version_id) || ',"is_latest":true,"delete_marker":false,"size":'"""
    """ || v.size || ',"etag":' || json_quote(v.etag) || ',"sha256":' || json_quote(v.sha256)"""
    """ || ',"content_type":' || json_quote(v.content_type) || ',"metadata":' || v.metadata"""
    """ || ',"last_modified":' || json_quote(v.created) || ',"parts_count":'"""
    """ || CASE WHEN instr(v.etag, '-') > 0 THEN json_array_length(v.chunks) ELSE 'null' END || '}'"""
)
# One <Contents> of ListObjects(V2): LastModified as xmlutil.iso_time (seconds truncated, then the
# milliseconds of int(ts * 1000)); :who is the <Owner> element or ''.
_XML_OBJECT = (
    "'<Contents><Key>' || " + _XML_ESC.format("v.key") + " || '</Key><LastModified>'"
    " || strftime('%Y-%m-%dT%H:%M:%S.', CAST(v.created AS INTEGER), 'unixepoch')"
    " || substr('00' || (CAST(v.created * 1000 AS INTEGER) % 1000), -3)"
    """ || 'Z</LastModified><ETag>"' || v.etag || '"</ETag><Size>' || v.size"""
    " || '</Size><StorageClass>STANDARD</StorageClass>' || :who || '</Contents>'"
)
_JSON_PREFIX = "json_quote({0})"
_XML_PREFIX = "'<CommonPrefixes><Prefix>' || " + _XML_ESC.format("{0}") + " || '</Prefix></CommonPrefixes>'"

_LATEST = "v.bucket = :b AND v.is_latest = 1 AND v.delete_marker = 0 AND NOT (v.key >= :rlo AND v.key < :rhi)"


@dataclass
class Page:
    objects: str  # the rendered objects, comma-joined (JSON) or concatenated (XML), in key order
    prefixes: str  # the rendered common prefixes, likewise
    count: int  # entries on the page: objects + common prefixes
    truncated: bool
    last: str | None  # the last entry's key, or common prefix
    last_is_prefix: bool
    control: bool  # a key on the page has a control character (XML: the caller renders it itself)


def supported(conn: Any) -> bool:
    return isinstance(conn, apsw.Connection)


def latest_page(
    conn: Any, bucket: str, *, prefix: str, delimiter: str, delimiter_next: str, after: str, inclusive: bool,
    upper: str | None, limit: int, reserved: tuple[str, str], xml: bool, who: str = "",
) -> Page:
    """Up to `limit` entries of the latest versions of `bucket` after `after` (`inclusive`: from it),
    below `upper`, reserved keys skipped, keys past `prefix` rolled up at `delimiter`. `delimiter_next`
    is the delimiter's successor (`_prefix_upper(delimiter)`, same length): the walk seeks to
    `key[:pos] + delimiter_next` after the common prefix `key[:pos] + delimiter`."""
    params: dict[str, Any] = {"b": bucket, "after": after, "limit": limit, "rlo": reserved[0], "rhi": reserved[1],
                              "ctl": CONTROL_GLOB}
    if xml:
        params["who"] = who
    obj, pre = (_XML_OBJECT, _XML_PREFIX) if xml else (_JSON_OBJECT, _JSON_PREFIX)
    sep = "''" if xml else "','"
    bound = " AND v.key < :upper" if upper is not None else ""
    if upper is not None:
        params["upper"] = upper
    op = ">=" if inclusive else ">"
    if not delimiter:
        sql = (f"SELECT count(*), max(key), coalesce(group_concat(frag, {sep}), ''), "
               "coalesce(max(key GLOB :ctl), 0) FROM ("
               f"SELECT v.key AS key, {obj} AS frag FROM versions v WHERE {_LATEST} AND v.key {op} :after{bound} "
               "ORDER BY v.key LIMIT :limit)")
        count, last, objects, control = conn.execute(sql, params).fetchone()
        truncated = False
        if count == limit:
            probe = {k: params[k] for k in ("b", "rlo", "rhi")} | {"last": last}
            if upper is not None:
                probe["upper"] = upper
            truncated = conn.execute(
                f"SELECT 1 FROM versions v WHERE {_LATEST} AND v.key > :last{bound} ORDER BY v.key LIMIT 1",
                probe).fetchone() is not None
        return Page(objects, "", count, truncated, last, False, bool(control))
    params |= {"plen": len(prefix), "d": delimiter, "dlen": len(delimiter), "dnext": delimiter_next}
    pos = "instr(substr(w.k, :plen + 1), :d)"  # where the delimiter starts past the prefix (0: none)
    step = f"SELECT v.key FROM versions v WHERE {_LATEST}{bound} AND v.key {{0}} ORDER BY v.key LIMIT 1"
    # After a common prefix, seek to its successor; after an object, to the next key (k || NUL is the
    # smallest string above k, and no key holds a NUL).
    nxt = (f"CASE WHEN {pos} > 0 THEN substr(w.k, 1, :plen + {pos} - 1) || :dnext ELSE w.k || char(0) END")
    sql = (
        "WITH RECURSIVE walk(n, k) AS ("
        f"SELECT 1, ({step.format(op + ' :after')}) "
        f"UNION ALL SELECT w.n + 1, ({step.format('>= ' + nxt)}) FROM walk w WHERE w.k IS NOT NULL AND w.n <= :limit"
        "), e AS ("
        f"SELECT w.n AS n, w.k AS k, CASE WHEN {pos} > 0 THEN substr(w.k, 1, :plen + {pos} + :dlen - 1) END AS cp "
        "FROM walk w WHERE w.k IS NOT NULL"
        ") SELECT count(*), "
        f"coalesce(group_concat(CASE WHEN e.n <= :limit AND e.cp IS NULL THEN {obj} END, {sep}), ''), "
        "coalesce(group_concat(CASE WHEN e.n <= :limit AND e.cp IS NOT NULL THEN "
        f"{pre.format('e.cp')} END, {sep}), ''), "
        "max(CASE WHEN e.n <= :limit THEN coalesce(e.cp, e.k) END), max(CASE WHEN e.n <= :limit THEN e.cp END), "
        "coalesce(max(CASE WHEN e.n <= :limit THEN e.k GLOB :ctl END), 0) "
        "FROM e LEFT JOIN versions v ON e.cp IS NULL AND v.bucket = :b AND v.key = e.k AND v.is_latest = 1"
    )
    total, objects, prefixes, last, last_cp, control = conn.execute(sql, params).fetchone()
    return Page(objects, prefixes, min(total, limit), total > limit, last, last is not None and last == last_cp,
                bool(control))
