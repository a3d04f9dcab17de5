-- Resync in place: the spec.resync token whose rebuild was started, and whether the snapshot in
-- progress replaces the sink tables' rows (a resync) instead of adding to them (a first snapshot).
ALTER TABLE philotes.pipelines ADD COLUMN IF NOT EXISTS resync_token text;
ALTER TABLE philotes.pipelines ADD COLUMN IF NOT EXISTS snapshot_replaces boolean NOT NULL DEFAULT false;
