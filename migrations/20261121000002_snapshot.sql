-- Initial snapshot state: false while a pipeline's first copy of its tables is not complete. Pipelines
-- that existed before this column was added had no snapshot to do.
ALTER TABLE philotes.pipelines ADD COLUMN IF NOT EXISTS snapshot_done boolean NOT NULL DEFAULT true;
