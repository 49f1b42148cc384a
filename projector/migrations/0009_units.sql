-- Projector processes share each projection by partition. The unit of work is
-- (projection, topic, partition); `kind` tells a live run's units from a rebuild's.
--
-- A process says it is alive by moving its `expires_at` forward (its heartbeat). A unit is
-- free when it has no holder or its holder's heartbeat expired; a process claims a free
-- unit with a conditional UPDATE that skips a row a batch transaction holds FOR SHARE
-- (every batch proves its units that way), and counts `claims` up: a batch proves its
-- units still name its process and the claim its state was loaded under.
CREATE TABLE IF NOT EXISTS keel_projector_processes (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    projections   text[] NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS keel_units (
    kind          text NOT NULL,
    projection    text NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    holder        uuid,
    claims        bigint NOT NULL DEFAULT 0,
    claimed_at    timestamptz,
    PRIMARY KEY (kind, projection, topic, partition)
);

CREATE INDEX IF NOT EXISTS keel_units_holder ON keel_units (holder);

-- Events applied per partition: batches of one projection run concurrently on several
-- processes, so they count where each writes anyway (its checkpoint), not in the
-- projection's one row, which would make them wait for each other.
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS events bigint NOT NULL DEFAULT 0;

-- Where each partition ends, as the projectors last measured it: what `GET
-- /v1/projections` (which does not ask the broker) shows the lag with. A table of its own:
-- `keel_units` rows are read FOR SHARE by every batch, and must not be written that often.
CREATE TABLE IF NOT EXISTS keel_partition_ends (
    topic         text NOT NULL,
    partition     integer NOT NULL,
    end_offset    bigint NOT NULL,
    measured_at   timestamptz NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- The log time of the last record a checkpoint applied: a partition behind its end is
-- behind by the time since then (its lag in seconds).
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS last_record_at timestamptz;
