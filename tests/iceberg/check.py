"""Reads a Philotes Iceberg changelog table back and compares its current state with the source.

Prints one JSON object: the changelog's row count, the (_lsn, _seq) pairs seen more than once, the
columns and identifier fields, whether the state computed with pyiceberg (and, with --duckdb, the
state DuckDB's iceberg_scan computes with the query documented in the README) equals the rows of
--source-query, and the first differences. Exit code 0 whatever the result: the Rust test decides.
"""

import argparse
import datetime
import decimal
import json
import sys
import uuid

import psycopg2
from pyiceberg.catalog.sql import SqlCatalog

# The README's DuckDB query, for any table: `{key}` is its key columns, `{filled}` one line per
# other column (see `filled`).
STATE_SQL = """
WITH RECURSIVE log AS (SELECT * FROM iceberg_scan('{metadata}')),
last_truncate AS (
  SELECT _lsn, _seq FROM log WHERE _op = 'truncate' ORDER BY _lsn DESC, _seq DESC LIMIT 1
),
live AS (
  SELECT *, row({key}) AS _k FROM log
  WHERE _op <> 'truncate'
    AND NOT EXISTS (SELECT 1 FROM last_truncate t
                    WHERE log._lsn < t._lsn OR (log._lsn = t._lsn AND log._seq <= t._seq))
),
-- A key-changing update: the delete of the old key (even _seq), then the row at _seq + 1.
moves AS (
  SELECT n.*, coalesce(o._k <> n._k, false) AS _moved
  FROM live n LEFT JOIN live o
    ON n._op = 'update' AND o._op = 'delete' AND o._seq % 2 = 0
   AND o._lsn = n._lsn AND o._seq = n._seq - 1
),
-- A segment: a key's rows from an insert, or from the update that moved the row there, on.
segs AS (
  SELECT *, count(*) FILTER (WHERE _op = 'insert' OR _moved)
              OVER (PARTITION BY _k ORDER BY _lsn, _seq) AS _segno
  FROM moves
),
links AS (
  SELECT n._k, n._segno, o._k AS _from_k, o._segno AS _from_segno
  FROM segs n JOIN segs o ON o._lsn = n._lsn AND o._seq = n._seq - 1
  WHERE n._moved
),
-- Each segment's first one: a moved row's segment continues the one its old key's delete ended.
lineage (_k, _segno, _root_k, _root_segno) AS (
  SELECT DISTINCT _k, _segno, _k, _segno FROM segs s
  WHERE NOT EXISTS (SELECT 1 FROM links l WHERE l._k = s._k AND l._segno = s._segno)
  UNION ALL
  SELECT l._k, l._segno, r._root_k, r._root_segno
  FROM lineage r JOIN links l ON l._from_k = r._k AND l._from_segno = r._segno
),
rooted AS (SELECT * FROM segs JOIN lineage USING (_k, _segno)),
-- A value left out (named in _unchanged) is the row's last one written before.
filled AS (
  SELECT * REPLACE (
    {filled}
  ) FROM rooted
  WINDOW w AS (PARTITION BY _root_k, _root_segno ORDER BY _lsn, _seq
               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
),
latest AS (
  SELECT *, row_number() OVER (PARTITION BY _k ORDER BY _lsn DESC, _seq DESC) AS rn FROM filled
)
SELECT * EXCLUDE (rn, _k, _moved, _segno, _root_k, _root_segno,
                  _op, _lsn, _seq, _commit_time, _unchanged)
FROM latest WHERE rn = 1 AND _op IN ('insert', 'update')
"""

FILLED = ("(last_value(CASE WHEN _op = 'delete' OR list_contains(_unchanged, '{name}') THEN NULL"
          " ELSE {{'v': {col}}} END IGNORE NULLS) OVER w).v AS {col}")

META = ("_op", "_lsn", "_seq", "_commit_time", "_unchanged")


def ident(name):
    return '"' + name.replace('"', '""') + '"'


def filled(columns):
    """The `filled` lines of STATE_SQL for these (non-key) columns (a no-op line for none)."""
    if not columns:
        return "_op AS _op"
    return ",\n    ".join(FILLED.format(name=c.replace("'", "''"), col=ident(c)) for c in columns)


def norm(v):
    if isinstance(v, memoryview):
        v = bytes(v)
    if isinstance(v, bytes) and len(v) == 16:
        return str(uuid.UUID(bytes=v))
    if isinstance(v, bytes):
        return "\\x" + v.hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(datetime.timezone.utc)
        return v.isoformat()
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    return v


def state_from_changelog(rows, key):
    """The pyiceberg way, as the README shows it."""
    state, moved = {}, {}
    for r in sorted(rows, key=lambda r: (r["_lsn"], r["_seq"])):
        k = tuple(r[c] for c in key)
        if r["_op"] == "truncate":
            state.clear()
        elif r["_op"] == "delete":
            old = state.pop(k, None)
            if r["_seq"] % 2 == 0 and old is not None:
                # A key change: the row goes on at _seq + 1 under its new key.
                moved[(r["_lsn"], r["_seq"] + 1)] = old
        else:
            prev = moved.pop((r["_lsn"], r["_seq"]), None) or state.get(k, {})
            row = {c: v for c, v in r.items() if c not in META}
            for c in r.get("_unchanged") or []:
                row[c] = prev.get(c)
            state[k] = row
    return list(state.values())


def canon(rows, columns):
    return sorted(json.dumps([norm(r.get(c)) for c in columns], default=str) for r in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog-uri", required=True)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--source-dsn", required=True)
    ap.add_argument("--source-query", required=True)
    ap.add_argument("--s3", help="endpoint,access key id,secret access key")
    ap.add_argument("--duckdb", action="store_true")
    a = ap.parse_args()

    props = {"uri": a.catalog_uri, "warehouse": a.warehouse}
    if a.s3:
        endpoint, key_id, secret = a.s3.split(",")
        props.update({"s3.endpoint": endpoint, "s3.access-key-id": key_id,
                      "s3.secret-access-key": secret, "s3.region": "us-east-1",
                      "s3.path-style-access": "true"})
    catalog = SqlCatalog("philotes", **props)
    table = catalog.load_table(a.table)
    schema = table.schema()
    key = [schema.find_field(i).name for i in sorted(schema.identifier_field_ids)]
    log = table.scan().to_arrow().to_pylist()
    seen, dups = set(), []
    for r in log:
        k = (r["_lsn"], r["_seq"])
        if k in seen:
            dups.append(k)
        seen.add(k)

    src = psycopg2.connect(a.source_dsn)
    cur = src.cursor()
    cur.execute(a.source_query)
    columns = [d[0] for d in cur.description]
    source = [dict(zip(columns, row)) for row in cur.fetchall()]
    src.close()

    want = canon(source, columns)
    have = canon(state_from_changelog(log, key), columns)
    out = {
        "changelog_rows": len(log),
        "duplicate_lsn_seq": dups[:10],
        "duplicates": len(dups),
        "columns": [f.name for f in schema.fields],
        "identifier": key,
        "ops": sorted({r["_op"] for r in log}),
        "unchanged_rows": sum(1 for r in log if r.get("_unchanged")),
        "source_rows": len(want),
        "state_rows": len(have),
        "equal": want == have,
        "first_difference": next(([w, h] for w, h in zip(want, have) if w != h), None),
        "snapshot_summary": dict(table.current_snapshot().summary.additional_properties)
        if table.current_snapshot() else {},
        "snapshots": len(table.snapshots()),
    }
    if a.duckdb:
        import duckdb
        con = duckdb.connect()
        load_extensions(con, s3=bool(a.s3))
        if a.s3:
            host = endpoint.removeprefix("http://")
            con.execute(
                f"CREATE SECRET lake (TYPE s3, KEY_ID {sql_str(key_id)}, SECRET {sql_str(secret)}, "
                f"REGION 'us-east-1', ENDPOINT {sql_str(host)}, URL_STYLE 'path', USE_SSL false)"
            )
        metadata = table.metadata_location.removeprefix("file://")
        others = [f.name for f in schema.fields if f.name not in META and f.name not in key]
        q = STATE_SQL.format(metadata=metadata, key=", ".join(ident(k) for k in key),
                             filled=filled(others))
        try:
            cur = con.execute(q)
        except duckdb.Error as e:
            out["duckdb_error"] = str(e)
        else:
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
            out["duckdb_equal"] = canon(rows, columns) == want
            out["duckdb_rows"] = len(rows)
    print(json.dumps(out, default=str))


def sql_str(s):
    """A SQL string literal (DDL such as CREATE SECRET takes no parameters)."""
    return "'" + s.replace("'", "''") + "'"


def load_extensions(con, s3=False):
    """Loads the avro and iceberg extensions (and httpfs for s3://) the duckdb-ext-* packages ship
    (no download)."""
    import pathlib
    import duckdb
    import duckdb_ext
    base = pathlib.Path(list(duckdb_ext.__path__)[0]) / "extensions" / f"v{duckdb.__version__}"
    for name in (("httpfs",) if s3 else ()) + ("avro", "iceberg"):
        found = sorted(base.rglob(f"{name}.duckdb_extension"))
        if not found:
            raise SystemExit(f"the {name} extension is not in {base}")
        con.execute(f"LOAD '{found[0]}'")


if __name__ == "__main__":
    sys.exit(main())
