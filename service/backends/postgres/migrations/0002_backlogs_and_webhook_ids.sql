-- A run's event backlog says whether it still starts with the run's first event (the replay's `gap`), and each
-- webhook delivery owed keeps its webhook-id, the same on every attempt whichever replica makes it.
ALTER TABLE runs ADD COLUMN events_trimmed boolean NOT NULL DEFAULT false;
ALTER TABLE webhooks ADD COLUMN message_id text;
