-- agent-runner's tables, in the schema DATABASE_SCHEMA names (the migration runs with search_path set to it).

-- One row per lock that serializes a family of steps across replicas: 'admission' (slots, the queue, terminal
-- states) and 'events' (event ids commit in order, so a reader following the table never skips one).
CREATE TABLE locks (name text PRIMARY KEY);
INSERT INTO locks VALUES ('admission'), ('events');

-- MAX_CONCURRENT_RUNS slots: a slot is held while its token is set and its lease (expires_at, the database's
-- clock) has not passed. A replica takes only the first MAX_CONCURRENT_RUNS.
CREATE TABLE slots (
    slot integer PRIMARY KEY,
    token text,
    expires_at timestamptz
);
INSERT INTO slots (slot) SELECT generate_series(0, 63);  -- MAX_CONCURRENT_RUNS is at most 64

-- Every run: its record (the client-facing JSON plus the trace context), who holds it while unfinished, its
-- place in the queue while it waits, and its place among the finished ones once terminal.
CREATE SEQUENCE run_seq;
CREATE SEQUENCE queue_seq;
CREATE SEQUENCE finish_seq;
CREATE SEQUENCE fencing_tokens;
CREATE TABLE runs (
    run_id text PRIMARY KEY,
    seq bigint NOT NULL DEFAULT nextval('run_seq'),
    record bytea NOT NULL,
    holder text,                 -- the slot token (or orphan claim) it is held under while unfinished
    claimed_until timestamptz,   -- an orphan claim lives until then
    queue_rank bigint,           -- while it waits: smaller goes first (an interrupting run's is negative)
    finished_seq bigint,         -- once terminal: its order among the finished runs (retention drops the oldest)
    size bigint NOT NULL DEFAULT 0,      -- its record's bytes plus overhead, counted once terminal
    log_bytes bigint NOT NULL DEFAULT 0  -- the bytes of its kept log lines
);
CREATE INDEX runs_by_seq ON runs (seq);
CREATE INDEX runs_waiting ON runs (queue_rank) WHERE queue_rank IS NOT NULL;
CREATE INDEX runs_finished ON runs (finished_seq) WHERE finished_seq IS NOT NULL;
CREATE INDEX runs_held ON runs (holder) WHERE holder IS NOT NULL AND finished_seq IS NULL;

-- The finished runs' count and bytes, kept with each terminal state so retention needs no scan.
CREATE TABLE totals (name text PRIMARY KEY, finished_count bigint NOT NULL, finished_bytes bigint NOT NULL);
INSERT INTO totals VALUES ('finished', 0, 0);

-- A cancel asked of a run (by_run: the run that interrupts it), read by whichever replica holds it.
CREATE TABLE cancels (run_id text PRIMARY KEY, by_run text, asked_at timestamptz NOT NULL DEFAULT now());

-- The lines a run's agent logged, the newest kept (bounded per run), dropped with the run.
CREATE TABLE run_logs (id bigserial PRIMARY KEY, run_id text NOT NULL, line bytea NOT NULL);
CREATE INDEX run_logs_by_run ON run_logs (run_id, id);

-- Run events for every replica's streams: ids from a sequence, committed in order (locks 'events'); bounded
-- per run and in all, dropped with the run.
CREATE SEQUENCE event_ids;
CREATE TABLE events (
    id bigint PRIMARY KEY,
    run_id text NOT NULL,
    kind text NOT NULL,
    state text NOT NULL,
    data bytea NOT NULL
);
CREATE INDEX events_by_run ON events (run_id, id);
CREATE INDEX events_of_runs ON events (id) WHERE kind = 'run';

-- Idempotency-Keys of POST /agents/run.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    fingerprint text NOT NULL,
    run_id text NOT NULL,
    state text NOT NULL,          -- 'pending' or 'accepted'
    claimed_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Webhook deliveries owed, written with the terminal state; a claim leases one to a replica until due_at.
CREATE TABLE webhooks (
    run_id text PRIMARY KEY,
    url text NOT NULL,
    body bytea NOT NULL,
    attempt integer NOT NULL DEFAULT 0,
    lease text,
    due_at timestamptz NOT NULL
);
CREATE INDEX webhooks_due ON webhooks (due_at);
