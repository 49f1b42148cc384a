-- Where a process manager (order fulfilment) starts acting on each partition of the topics
-- it reads: the partition's end when the process first ran there. It reads the whole log
-- through the gate like a projection, and acts only on records from here on, so orders
-- placed before it existed are never reserved after the fact. Written once per partition.
CREATE TABLE IF NOT EXISTS keel_process_starts (
    process text NOT NULL,
    topic text NOT NULL,
    partition int NOT NULL,
    start_offset bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (process, topic, partition)
);
