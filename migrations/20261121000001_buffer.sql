-- Philotes buffer: one row per pipeline, its relations, its buffered events and its dead letters.
-- Positions are (lsn, ord): lsn is the source commit LSN of the transaction, ord the change's index in it.

CREATE TABLE IF NOT EXISTS philotes.pipelines (
    pipeline_id          text PRIMARY KEY,
    name                 text NOT NULL,
    slot_name            text,
    publication_name     text,
    slot_created         boolean NOT NULL DEFAULT false,
    publication_created  boolean NOT NULL DEFAULT false,
    -- End LSN of the last source transaction wholly in the buffer; acknowledged to the source.
    durable_lsn          bigint NOT NULL DEFAULT 0,
    -- Last event delivered to the sink.
    processed_lsn        bigint NOT NULL DEFAULT 0,
    processed_ord        integer NOT NULL DEFAULT -1,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS philotes.relations (
    pipeline_id  text NOT NULL,
    rel_ver      bigint NOT NULL,
    schema_name  text NOT NULL,
    table_name   text NOT NULL,
    columns      text[] NOT NULL,
    types        text[] NOT NULL,
    key_columns  boolean[] NOT NULL,
    PRIMARY KEY (pipeline_id, rel_ver)
);

CREATE TABLE IF NOT EXISTS philotes.events (
    pipeline_id  text NOT NULL,
    lsn          bigint NOT NULL,
    ord          integer NOT NULL,
    commit_time  bigint NOT NULL,            -- microseconds since 2000-01-01, as PostgreSQL sends it
    rel_ver      bigint NOT NULL,
    op           "char" NOT NULL,            -- I insert, U update, D delete, T truncate
    old_key      text[],                     -- key values before the change (U with a key change, D)
    vals         text[],                     -- new values (I, U); text output of each column
    unchanged    smallint[],                 -- columns whose TOASTed value did not change (U)
    buffered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline_id, lsn, ord)
);

CREATE TABLE IF NOT EXISTS philotes.dead_letters (
    pipeline_id  text NOT NULL,
    lsn          bigint NOT NULL,
    ord          integer NOT NULL,
    rel_ver      bigint NOT NULL,
    table_name   text NOT NULL,
    op           "char" NOT NULL,
    old_key      text[],
    vals         text[],
    unchanged    smallint[],
    error        text NOT NULL,
    attempts     integer NOT NULL,
    dead_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline_id, lsn, ord)
);
