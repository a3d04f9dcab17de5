-- Ownership fencing: a process takes a pipeline by raising its epoch; every buffer write, processed
-- mark and dead letter of an owner whose epoch was superseded fails in the same transaction.
ALTER TABLE philotes.pipelines ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE philotes.pipelines ADD COLUMN IF NOT EXISTS owner text;
