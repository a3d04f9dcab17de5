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

STATE_SQL = """
WITH log AS (SELECT * FROM iceberg_scan('{metadata}')),
last_truncate AS (
  SELECT _lsn, _seq FROM log WHERE _op = 'truncate' ORDER BY _lsn DESC, _seq DESC LIMIT 1
),
live AS (
  SELECT * FROM log
  WHERE NOT EXISTS (SELECT 1 FROM last_truncate t
                    WHERE log._lsn < t._lsn OR (log._lsn = t._lsn AND log._seq <= t._seq))
),
latest AS (
  SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY _lsn DESC, _seq DESC) AS rn
  FROM live WHERE _op <> 'truncate'
)
SELECT * EXCLUDE (rn, _op, _lsn, _seq, _commit_time) FROM latest
WHERE rn = 1 AND _op IN ('insert', 'update')
"""

META = ("_op", "_lsn", "_seq", "_commit_time")


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
    state = {}
    for r in sorted(rows, key=lambda r: (r["_lsn"], r["_seq"])):
        if r["_op"] == "truncate":
            state.clear()
        elif r["_op"] == "delete":
            state.pop(tuple(r[k] for k in key), None)
        else:
            state[tuple(r[k] for k in key)] = {c: v for c, v in r.items() if c not in META}
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
        q = STATE_SQL.format(metadata=metadata, key=", ".join(key))
        cur = con.execute(q)
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
