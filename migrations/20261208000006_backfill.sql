-- Tables added to a running pipeline: which tables the pipeline captures (as `schema.table`, quoted
-- where PostgreSQL would need it), and the backfill of each table added after the initial snapshot.
ALTER TABLE philotes.pipelines ADD COLUMN IF NOT EXISTS tables text[];
CREATE TABLE IF NOT EXISTS philotes.backfills (
    pipeline_id    text NOT NULL,
    schema_name    text NOT NULL,
    table_name     text NOT NULL,
    -- Key of the last row copied (the text form of each key column); NULL before the first chunk.
    last_key       text[],
    rows_copied    bigint NOT NULL DEFAULT 0,
    done           boolean NOT NULL DEFAULT false,
    PRIMARY KEY (pipeline_id, schema_name, table_name)
);
