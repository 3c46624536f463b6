"""Pages of a bucket's listings rendered by the record store: one statement, one string per page.

Why: a listing rendered in Python holds the GIL for every row (fetch, tuple, formatting), and the
event loop that serves GETs waits for the GIL behind it; a page of 1,000 keys was ~4-5 ms of Python.
SQLite runs a statement with the GIL released (apsw drops it around each step), and PostgreSQL runs
it in its own process, so a page rendered by SQL (`||` concatenation and an ordered string
aggregate) leaves the event loop free, and Python touches a page, not a row. A delimiter page does
its skip-scan in the same statement (a recursive CTE that seeks past each common prefix with one
indexed lookup, as `objects.service._walk` does in Python).

Pages: the latest versions (`latest_page`: the native API's JSON objects, or ListObjects(V2)'s
<Contents>) and every version (`versions_page`: ListObjectVersions' <Version>/<DeleteMarker>).

Both engines run the same statements; what differs (JSON quoting, date formatting, string search,
the control-character test, the ordered aggregate) is a fragment of `_Dialect`. The caller keeps the
Python path for what SQL does not render (URL-encoded keys, a delimiter ending in U+10FFFF, keys with
XML control characters). The output is what the Python renderers give, byte for byte where the
tests compare it (`tests/test_listing_sql.py`, on both engines).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import apsw

# The control characters `api.s3.xmlutil.text` writes as character references (NUL cannot be in a
# key); a page with one goes the Python way. A range class: the GLOB of a 30-character list cost
# ~0.55 us per listed key in SQLite's pattern matcher (10 % of a page's server CPU), ranges ~0.2 us.
CONTROL_CLASS = "[\x01-\x08\x0b-\x1f\x7f]"


@dataclass(frozen=True, eq=False)  # two instances, compared and hashed by identity (cache keys)
class _Dialect:
    """Each fragment is a format string over SQL expressions `{0}` (and `{1}`)."""

    name: str
    json_text: str  # a JSON string of TEXT {0}, `null` when NULL
    json_number: str  # a JSON number of REAL {0}
    seconds: str  # "YYYY-MM-DDTHH:MM:SS." of REAL seconds {0}, truncated to the second (UTC)
    millis: str  # the three digits of int({0} * 1000) % 1000
    find: str  # 1-based position of {1} in {0}, 0 when absent
    control: str  # 1 when {0} holds a CONTROL_CLASS character, else 0
    agg: str  # {0} concatenated with separator {1} in the order {2}, NULL over no rows


_SQLITE = _Dialect(
    "sqlite",
    json_text="json_quote({0})",
    json_number="json_quote({0})",
    seconds="strftime('%Y-%m-%dT%H:%M:%S.', CAST({0} AS INTEGER), 'unixepoch')",
    millis="substr('00' || (CAST({0} * 1000 AS INTEGER) % 1000), -3)",
    find="instr({0}, {1})",
    control="({0} GLOB '*" + CONTROL_CLASS + "*')",
    # The rows come from a subquery or CTE already in that order: no sort (an ORDER BY inside the
    # aggregate sorts its input again).
    agg="group_concat({0}, {1})",
)
_POSTGRES = _Dialect(
    "postgresql",
    json_text="coalesce(CAST(to_json({0}) AS TEXT), 'null')",
    json_number="CAST(to_json({0}) AS TEXT)",
    seconds="to_char(to_timestamp(floor({0})) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.')",
    millis="lpad(CAST(CAST(floor({0} * 1000) AS BIGINT) % 1000 AS TEXT), 3, '0')",
    find="strpos({0}, {1})",
    control="CASE WHEN {0} ~ '" + CONTROL_CLASS + "' THEN 1 ELSE 0 END",
    agg="string_agg({0}, {1} ORDER BY {2})",
)


def dialect(conn: Any) -> _Dialect | None:
    """The engine of a record-store connection (None: render in Python)."""
    if isinstance(conn, apsw.Connection):
        return _SQLITE
    if type(conn).__module__ == "anvil.storage.pg":  # PgReader; the module is not imported for it
        return _POSTGRES
    return None


def supported(conn: Any) -> bool:
    return dialect(conn) is not None


# Statements are written with :name parameters (several are used more than once) and run with `?`,
# which both engines' connections take (storage.pg translates them).
_PARAM = re.compile(r"'(?:[^']|'')*'|:(\w+)")


@functools.lru_cache(maxsize=256)
def _positional(sql: str) -> tuple[str, tuple[str, ...]]:
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return m.group(0)  # a string literal (dates hold ':')
        names.append(m.group(1))
        return "?"

    return _PARAM.sub(sub, sql), tuple(names)


def _run(conn: Any, sql: str, params: dict[str, Any]) -> Any:
    text, names = _positional(sql)
    return conn.execute(text, [params[n] for n in names]).fetchone()


# XML element text as `api.s3.xmlutil.text` writes it when no control character is present
# (xml.sax.saxutils.escape: &, <, > only); a page with a control character goes the Python way.
_XML_ESC = "replace(replace(replace({0}, '&', '&amp;'), '<', '&lt;'), '>', '&gt;')"


def _json_object(d: _Dialect) -> str:
    """One object of the native API's listing (`ObjectVersion.to_dict` of a latest, non-deleted version)."""
    j = d.json_text.format
    return (
        f"""'{{"bucket":' || {j('v.bucket')} || ',"key":' || {j('v.key')}"""
        f""" || ',"version_id":' || {j('v.version_id')} || ',"is_latest":true,"delete_marker":false,"size":'"""
        f""" || v.size || ',"etag":' || {j('v.etag')} || ',"sha256":' || {j('v.sha256')}"""
        f""" || ',"content_type":' || {j('v.content_type')} || ',"metadata":' || v.metadata"""
        f""" || ',"last_modified":' || {d.json_number.format('v.created')} || ',"parts_count":'"""
        f""" || CASE WHEN {d.find.format('v.etag', "'-'")} > 0 THEN CAST(json_array_length(v.chunks) AS TEXT)"""
        """ ELSE 'null' END || '}'"""
    )


def _last_modified(d: _Dialect, col: str) -> str:
    """LastModified as xmlutil.iso_time writes it (seconds truncated, then the milliseconds of int(ts * 1000))."""
    return f"{d.seconds.format(col)} || {d.millis.format(col)} || 'Z'"


def _xml_contents(d: _Dialect) -> str:
    """One <Contents> of ListObjects(V2); :who is the <Owner> element or ''."""
    return (
        "'<Contents><Key>' || " + _XML_ESC.format("v.key") + " || '</Key><LastModified>' || "
        + _last_modified(d, "v.created")
        + """ || '</LastModified><ETag>"' || v.etag || '"</ETag><Size>' || v.size"""
        " || '</Size><StorageClass>STANDARD</StorageClass>' || :who || '</Contents>'"
    )


def _xml_version(d: _Dialect) -> str:
    """One <Version> or <DeleteMarker> of ListObjectVersions, from the columns of the `r` rows below."""
    return (
        "CASE WHEN r.dm = 1 THEN '<DeleteMarker>' ELSE '<Version>' END || '<Key>' || "
        + _XML_ESC.format("r.key") + " || '</Key><VersionId>' || " + _XML_ESC.format("r.version_id")
        + " || '</VersionId><IsLatest>' || CASE WHEN r.latest = 1 THEN 'true' ELSE 'false' END"
        " || '</IsLatest><LastModified>' || " + _last_modified(d, "r.created") + " || '</LastModified>' || "
        "CASE WHEN r.dm = 1 THEN :who || '</DeleteMarker>' ELSE '<ETag>\"' || r.etag || '\"</ETag><Size>' || r.size"
        " || '</Size><StorageClass>STANDARD</StorageClass>' || :who || '</Version>' END"
    )


_XML_PREFIX = "'<CommonPrefixes><Prefix>' || " + _XML_ESC.format("{0}") + " || '</Prefix></CommonPrefixes>'"

_NOT_RESERVED = "NOT (v.key >= :rlo AND v.key < :rhi)"
_LATEST = "v.bucket = :b AND v.is_latest = 1 AND v.delete_marker = 0 AND " + _NOT_RESERVED
_ANY = "v.bucket = :b AND " + _NOT_RESERVED


@dataclass
class Page:
    objects: str  # the rendered objects (or versions), comma-joined (JSON) or concatenated (XML), in order
    prefixes: str  # the rendered common prefixes, likewise
    count: int  # entries on the page: objects + common prefixes
    truncated: bool
    last: str | None  # the last entry's key, or common prefix
    last_is_prefix: bool
    control: bool  # a key on the page has a control character (XML: the caller renders it itself)
    last_version: str | None = None  # versions_page: the last entry's version id (None: a prefix)


def _walk(d: _Dialect, cond: str, bound: str, first: str) -> str:
    """The skip-scan: a recursive CTE `walk(n, k)` of up to :limit + 1 entries' keys, from `first` (a
    scalar subquery); after a key holding the delimiter past the prefix (a common prefix) it seeks to
    `key[:pos] + successor of the delimiter`, past every key under it, else to the next key."""
    pos = d.find.format("substr(w.k, :plen + 1)", ":d")  # where the delimiter starts past the prefix
    step = f"SELECT v.key FROM versions v WHERE {cond}{bound} AND v.key {{0}} ORDER BY v.key LIMIT 1"
    nxt = (f"CASE WHEN {pos} > 0 THEN ({step.format('>= substr(w.k, 1, :plen + ' + pos + ' - 1) || :dnext')}) "
           f"ELSE ({step.format('> w.k')}) END")
    return (
        f"walk(n, k) AS (SELECT 1, ({first}) "
        f"UNION ALL SELECT w.n + 1, {nxt} FROM walk w WHERE w.k IS NOT NULL AND w.n <= :limit), "
        f"e AS (SELECT w.n AS n, w.k AS k, CASE WHEN {pos} > 0 THEN substr(w.k, 1, :plen + {pos} + :dlen - 1) END"
        " AS cp FROM walk w WHERE w.k IS NOT NULL)"
    )


@functools.lru_cache(maxsize=64)
def _latest_sql(d: _Dialect, xml: bool, delimited: bool, bounded: bool, op: str) -> str:
    obj = _xml_contents(d) if xml else _json_object(d)
    sep = "''" if xml else "','"
    bound = " AND v.key < :upper" if bounded else ""
    if not delimited:
        return (f"SELECT count(*), max(page.key), coalesce({d.agg.format('page.frag', sep, 'page.key')}, ''), "
                "coalesce(max(page.ctl), 0) FROM ("
                f"SELECT v.key AS key, {obj} AS frag, {d.control.format('v.key')} AS ctl FROM versions v "
                f"WHERE {_LATEST} AND v.key {op} :after{bound} ORDER BY v.key LIMIT :limit) page")
    first = f"SELECT v.key FROM versions v WHERE {_LATEST}{bound} AND v.key {op} :after ORDER BY v.key LIMIT 1"
    pre = _XML_PREFIX.format("e.cp") if xml else d.json_text.format("e.cp")
    return (
        "WITH RECURSIVE " + _walk(d, _LATEST, bound, first) + " SELECT count(*), "
        "coalesce(" + d.agg.format(f"CASE WHEN e.n <= :limit AND e.cp IS NULL THEN {obj} END", sep, "e.n") + ", ''), "
        "coalesce(" + d.agg.format(f"CASE WHEN e.n <= :limit AND e.cp IS NOT NULL THEN {pre} END", sep, "e.n")
        + ", ''), "
        "max(CASE WHEN e.n <= :limit THEN coalesce(e.cp, e.k) END), max(CASE WHEN e.n <= :limit THEN e.cp END), "
        f"coalesce(max(CASE WHEN e.n <= :limit THEN {d.control.format('e.k')} END), 0) "
        "FROM e LEFT JOIN versions v ON e.cp IS NULL AND v.bucket = :b AND v.key = e.k AND v.is_latest = 1 "
        "AND v.delete_marker = 0"  # as the walk's keys are: S3's columns then come from `versions_listed`
    )


@functools.lru_cache(maxsize=64)
def _probe_sql(bounded: bool) -> str:
    bound = " AND v.key < :upper" if bounded else ""
    return f"SELECT 1 FROM versions v WHERE {_LATEST} AND v.key > :last{bound} ORDER BY v.key LIMIT 1"


def latest_page(
    conn: Any, bucket: str, *, prefix: str, delimiter: str, delimiter_next: str, after: str, inclusive: bool,
    upper: str | None, limit: int, reserved: tuple[str, str], xml: bool, who: str = "",
) -> Page:
    """Up to `limit` entries of the latest versions of `bucket` after `after` (`inclusive`: from it),
    below `upper`, reserved keys skipped, keys past `prefix` rolled up at `delimiter`. `delimiter_next`
    is the delimiter's successor (`_prefix_upper(delimiter)`, same length): the walk seeks to
    `key[:pos] + delimiter_next` after the common prefix `key[:pos] + delimiter`."""
    d = dialect(conn)
    assert d is not None
    params: dict[str, Any] = {"b": bucket, "after": after, "limit": limit, "rlo": reserved[0], "rhi": reserved[1],
                              "who": who, "upper": upper}
    sql = _latest_sql(d, xml, bool(delimiter), upper is not None, ">=" if inclusive else ">")
    if not delimiter:
        count, last, objects, control = _run(conn, sql, params)
        truncated = False
        if count == limit:
            truncated = _run(conn, _probe_sql(upper is not None), params | {"last": last}) is not None
        return Page(objects, "", count, truncated, last, False, bool(control))
    params |= {"plen": len(prefix), "d": delimiter, "dlen": len(delimiter), "dnext": delimiter_next}
    total, objects, prefixes, last, last_cp, control = _run(conn, sql, params)
    return Page(objects, prefixes, min(total, limit), total > limit, last, last is not None and last == last_cp,
                bool(control))


@functools.lru_cache(maxsize=64)
def _versions_sql(d: _Dialect, delimited: bool, bounded: bool, op: str, tie: bool) -> str:
    bound = " AND v.key < :upper" if bounded else ""
    cols = ("v.key AS key, v.version_id AS version_id, v.seq AS seq, v.is_latest AS latest, "
            "v.delete_marker AS dm, v.etag AS etag, v.size AS size, v.created AS created")
    if not delimited:
        start = "v.key >= :after AND (v.key > :after OR v.seq < :tseq)" if tie else f"v.key {op} :after"
        page = (f"page AS (SELECT NULL AS cp, {cols} FROM versions v WHERE {_ANY} AND {start}{bound} "
                "ORDER BY v.key, v.seq DESC LIMIT :limit + 1)")
        head = "WITH "
    else:
        if tie:  # the marker's key while it has versions after the marker's, else the next key
            first = (f"coalesce((SELECT v.key FROM versions v WHERE {_ANY} AND v.key = :after AND v.seq < :tseq "
                     f"LIMIT 1), (SELECT v.key FROM versions v WHERE {_ANY}{bound} AND v.key > :after "
                     "ORDER BY v.key LIMIT 1))")
            skip = " AND NOT (v.key = :after AND v.seq >= :tseq)"
        else:
            first = f"SELECT v.key FROM versions v WHERE {_ANY}{bound} AND v.key {op} :after ORDER BY v.key LIMIT 1"
            skip = ""
        # Every entry of the walk is a common prefix or a key with at least one version to list, so
        # :limit + 1 entries give at least :limit + 1 rows when there are that many.
        page = (f"page AS (SELECT e.n AS n, e.cp AS cp, {cols} FROM e LEFT JOIN versions v ON e.cp IS NULL "
                f"AND v.bucket = :b AND v.key = e.k{skip} ORDER BY e.n, v.seq DESC LIMIT :limit + 1)")
        head = "WITH RECURSIVE " + _walk(d, _ANY, bound, first) + ", "
    order = "page.key, page.seq DESC" if not delimited else "page.n, page.seq DESC"
    rows = f"r AS (SELECT page.*, row_number() OVER (ORDER BY {order}) AS i FROM page)"
    return (
        head + page + ", " + rows + " SELECT count(*), "
        "coalesce(" + d.agg.format(f"CASE WHEN r.i <= :limit AND r.cp IS NULL THEN {_xml_version(d)} END", "''", "r.i")
        + ", ''), "
        "coalesce(" + d.agg.format(
            f"CASE WHEN r.i <= :limit AND r.cp IS NOT NULL THEN {_XML_PREFIX.format('r.cp')} END", "''", "r.i")
        + ", ''), "
        "max(CASE WHEN r.i = :limit THEN coalesce(r.cp, r.key) END), "
        "max(CASE WHEN r.i = :limit AND r.cp IS NULL THEN r.version_id END), "
        f"coalesce(max(CASE WHEN r.i <= :limit THEN {d.control.format('coalesce(r.cp, r.key)')} END), 0) FROM r"
    )


def versions_page(
    conn: Any, bucket: str, *, prefix: str, delimiter: str, delimiter_next: str, after: str, inclusive: bool,
    tie: int | None, upper: str | None, limit: int, reserved: tuple[str, str], who: str,
) -> Page:
    """Up to `limit` entries of every version of `bucket` in (key, newest first) order, as
    ListObjectVersions' XML: after `after` (`inclusive`: from it; `tie`: the versions of `after` older
    than seq `tie`, then later keys), below `upper`, reserved keys skipped, rolled up at `delimiter`
    as `latest_page` does. `last`/`last_version` are the next key and version-id markers."""
    d = dialect(conn)
    assert d is not None
    params: dict[str, Any] = {"b": bucket, "after": after, "limit": limit, "rlo": reserved[0], "rhi": reserved[1],
                              "who": who, "upper": upper, "tseq": tie}
    if delimiter:
        params |= {"plen": len(prefix), "d": delimiter, "dlen": len(delimiter), "dnext": delimiter_next}
    sql = _versions_sql(d, bool(delimiter), upper is not None, ">=" if inclusive else ">", tie is not None)
    total, objects, prefixes, last, last_version, control = _run(conn, sql, params)
    truncated = total > limit
    return Page(objects, prefixes, min(total, limit), truncated, last if truncated else None,
                truncated and last_version is None, bool(control), last_version if truncated else None)
