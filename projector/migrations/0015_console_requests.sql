-- Asking twice for the same rebuild rebuilds once: at most one waiting request per
-- projection and the generation it replaces. Recording a request while one waits returns
-- the waiting one. Requests an older build recorded twice are closed first, keeping the
-- one a process has taken (else the oldest); the table is locked against writers until
-- the index exists, so that a process of the older build cannot record another between
-- the two.
LOCK TABLE keel_rebuild_requests IN SHARE ROW EXCLUSIVE MODE;

UPDATE keel_rebuild_requests r
SET done_at = now(), ok = true,
    outcome = 'the same rebuild was already requested (request ' || f.id || ')'
FROM (SELECT DISTINCT ON (projection, generation) projection, generation, id
      FROM keel_rebuild_requests WHERE done_at IS NULL
      ORDER BY projection, generation, taken_by IS NULL, id) f
WHERE r.done_at IS NULL AND r.projection = f.projection
  AND r.generation IS NOT DISTINCT FROM f.generation AND r.id <> f.id;

CREATE UNIQUE INDEX IF NOT EXISTS keel_rebuild_requests_one_waiting
    ON keel_rebuild_requests (projection, generation) WHERE done_at IS NULL;

-- Verifications of one stream against the log, asked for through the query API (which does
-- not read Kafka): any running `projector run` process takes the oldest waiting one (or one
-- whose taker's heartbeat expired), reads the stream's partition through the gate as
-- `projector verify --stream` does, and records the report.
CREATE TABLE IF NOT EXISTS keel_verify_requests (
    id            bigserial PRIMARY KEY,
    stream_type   text NOT NULL,
    stream_id     text NOT NULL,
    actor         text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    taken_by      uuid,
    taken_at      timestamptz,
    done_at       timestamptz,
    ok            boolean,
    outcome       text,
    report        jsonb
);

CREATE INDEX IF NOT EXISTS keel_verify_requests_waiting
    ON keel_verify_requests (id) WHERE done_at IS NULL;
