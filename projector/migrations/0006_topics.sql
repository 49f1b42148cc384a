-- The topics the projector reads and their partition counts, recorded when it starts, so
-- the query API can refuse at once a consistency token for a topic or partition that this
-- deployment does not have (instead of waiting for it until the timeout).
CREATE TABLE IF NOT EXISTS keel_topics (
    topic       text PRIMARY KEY,
    partitions  integer NOT NULL CHECK (partitions > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
