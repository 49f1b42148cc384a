-- Keel's projector bookkeeping. Views live in their own tables, one set per generation
-- (`<view>_g<N>`), behind a stable view name (`<view>`) that queries read.

CREATE TABLE IF NOT EXISTS keel_projections (
    name          text PRIMARY KEY,
    generation    integer NOT NULL,
    code_version  integer NOT NULL,
    state         text NOT NULL DEFAULT 'running',
    error         text,
    events        bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The truth of how far a projection has read: advanced in the same transaction as the
-- rows of each batch. Also holds the partition gate's state at that point.
CREATE TABLE IF NOT EXISTS keel_checkpoints (
    projection    text NOT NULL,
    generation    integer NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    next_offset   bigint NOT NULL,
    owner_instance text,
    owner_epoch   bigint,
    highest_epoch bigint NOT NULL DEFAULT 0,
    accepted      bigint NOT NULL DEFAULT 0,
    rejected      bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation, topic, partition)
);

-- Stream versions as the partition gate sees them at the checkpoint.
CREATE TABLE IF NOT EXISTS keel_gate_streams (
    projection    text NOT NULL,
    generation    integer NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    stream_type   text NOT NULL,
    stream_id     text NOT NULL,
    version       bigint NOT NULL,
    PRIMARY KEY (projection, generation, topic, partition, stream_type, stream_id)
);

-- Records that could not be decoded or applied: never dropped silently.
CREATE TABLE IF NOT EXISTS keel_dead_letters (
    id            bigserial PRIMARY KEY,
    projection    text NOT NULL,
    generation    integer NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    "offset"      bigint NOT NULL,
    error         text NOT NULL,
    key           bytea,
    payload       bytea NOT NULL,
    skipped       boolean NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (projection, generation, topic, partition, "offset")
);
