-- The gate's stream versions, one row per applied batch and partition instead of one row
-- per stream: `versions` holds the streams the batch moved (a JSON array of
-- [stream_type, id, version]), so a batch writes one row per partition however many
-- streams it touches. Every so often a partition's whole state is written as one
-- snapshot row (`snapshot`) and the rows before it are deleted. `next_offset` is the
-- partition's checkpoint after the row's batch: restoring folds the rows in that order.
-- Rows of keel_gate_streams (written by earlier versions) come before all of these.
CREATE TABLE IF NOT EXISTS keel_gate_versions (
    projection    text NOT NULL,
    generation    integer NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    next_offset   bigint NOT NULL,
    snapshot      boolean NOT NULL,
    versions      bytea NOT NULL,
    PRIMARY KEY (projection, generation, topic, partition, next_offset)
);
