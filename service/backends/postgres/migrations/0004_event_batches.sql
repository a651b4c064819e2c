-- The last batch each events writer (one per replica process) committed, and the newest event id it wrote: a batch
-- sent again after its commit's reply was lost finds itself here and is not stored twice.
CREATE TABLE event_batches (
    writer text PRIMARY KEY,
    batch bigint NOT NULL,
    newest bigint NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
