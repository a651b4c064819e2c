-- The highest event id a trim of the table events removed: a reader that has not read up to it has missed
-- events (its streams end, and resume from their Last-Event-ID with a gap frame).
CREATE TABLE events_trimmed (through bigint NOT NULL);
INSERT INTO events_trimmed VALUES (0);
