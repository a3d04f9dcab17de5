-- The encoded size of each buffered event, so that reads of the buffer are capped in bytes. Events
-- buffered before this column existed count as 0.
ALTER TABLE philotes.events ADD COLUMN IF NOT EXISTS size integer NOT NULL DEFAULT 0;
