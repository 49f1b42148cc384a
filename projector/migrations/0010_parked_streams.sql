-- Per-stream quarantine. A record that cannot be decoded or applied parks its stream: the
-- stream's later records are kept here in order, unapplied, while every other stream of
-- the partition flows on, and the checkpoint moves past them (the gate takes them as
-- every reader does). An operator retries a parked stream once the code is fixed (its
-- records are applied in order, once) or discards its records with a reason.

-- The dead letters a stream holds back carry the stream, and what became of them.
ALTER TABLE keel_dead_letters
    ADD COLUMN IF NOT EXISTS stream_type text,
    ADD COLUMN IF NOT EXISTS stream_id   text,
    -- 'stopped' (the projection stopped on it), 'skipped', 'parked' (held back with its
    -- stream), 'retried' (applied by a retry), 'discarded'.
    ADD COLUMN IF NOT EXISTS status      text,
    ADD COLUMN IF NOT EXISTS resolved_at timestamptz,
    ADD COLUMN IF NOT EXISTS resolved_by text,
    ADD COLUMN IF NOT EXISTS resolution  text,
    -- Whether the partition gate took the record (false for one that could not be read
    -- as a record at all): a retry applies only records the gate took.
    ADD COLUMN IF NOT EXISTS gate_admitted boolean NOT NULL DEFAULT true;

UPDATE keel_dead_letters SET status = CASE WHEN skipped THEN 'skipped' ELSE 'stopped' END
WHERE status IS NULL;

CREATE INDEX IF NOT EXISTS keel_dead_letters_parked
    ON keel_dead_letters (projection, generation, topic, partition, stream_type, stream_id, "offset")
    WHERE status = 'parked';

-- The streams a generation holds back: one row per parked stream, written in the batch
-- transaction that parks it, deleted by the retry that applies all its records or by the
-- discard. `first_offset` is the oldest record still held back: a consistency token
-- naming that offset or a later one of the partition covers a record the view lacks.
CREATE TABLE IF NOT EXISTS keel_parked_streams (
    projection    text NOT NULL,
    generation    integer NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    stream_type   text NOT NULL,
    stream_id     text NOT NULL,
    first_offset  bigint NOT NULL,
    last_offset   bigint NOT NULL,
    records       integer NOT NULL,
    error         text NOT NULL,
    parked_at     timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation, stream_type, stream_id)
);

CREATE INDEX IF NOT EXISTS keel_parked_streams_partition
    ON keel_parked_streams (projection, generation, topic, partition);

-- What an operator asked of a parked stream. The process holding the stream's unit
-- carries it out in a batch transaction that proves its hold, so a retry applies the
-- records once whichever process holds the unit, and whatever restarts in between.
CREATE TABLE IF NOT EXISTS keel_stream_requests (
    id            bigserial PRIMARY KEY,
    projection    text NOT NULL,
    generation    integer NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    stream_type   text NOT NULL,
    stream_id     text NOT NULL,
    action        text NOT NULL CHECK (action IN ('retry', 'discard')),
    reason        text,
    actor         text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    done_at       timestamptz,
    -- Records applied or discarded so far (a long stream is settled in several
    -- transactions).
    settled       integer NOT NULL DEFAULT 0,
    -- What came of it: how many records were applied or discarded, or why it failed.
    outcome       text,
    ok            boolean
);

CREATE INDEX IF NOT EXISTS keel_stream_requests_pending
    ON keel_stream_requests (projection, generation, topic, partition) WHERE done_at IS NULL;
