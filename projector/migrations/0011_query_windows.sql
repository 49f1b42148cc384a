-- What each query API measured of its own reads, one row per second in which it served
-- any: how many, and their 50th and 99th percentile latency. A rebuild's adaptive pacing
-- reads it to back off while live queries slow down (the way PostgreSQL's vacuum cost
-- delay protects foreground work). Each query API deletes its rows older than two minutes.
-- A query API on a hot standby cannot write here (its reads do not share the primary's
-- CPU and disks with a rebuild either).
CREATE TABLE IF NOT EXISTS keel_query_windows (
    instance   text NOT NULL,
    second     timestamptz NOT NULL,
    requests   integer NOT NULL,
    p50_ms     real NOT NULL,
    p99_ms     real NOT NULL,
    PRIMARY KEY (instance, second)
);
