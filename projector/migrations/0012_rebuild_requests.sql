-- Rebuilds asked for through PostgreSQL, so that tools other than the command line (an
-- admin route, a script) can start one: a running `projector run` process that runs the
-- projection takes the oldest waiting request, rebuilds, and records the outcome. A
-- request whose taker died (its heartbeat expired) is taken again, and the rebuild
-- resumes from the new generation's checkpoints.
CREATE TABLE IF NOT EXISTS keel_rebuild_requests (
    id            bigserial PRIMARY KEY,
    projection    text NOT NULL,
    keep_old      boolean NOT NULL DEFAULT false,
    -- The live generation when it was asked for: a request taken after another rebuild
    -- already replaced that generation is done without rebuilding again.
    generation    integer,
    actor         text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    taken_by      uuid,
    taken_at      timestamptz,
    done_at       timestamptz,
    ok            boolean,
    outcome       text
);

CREATE INDEX IF NOT EXISTS keel_rebuild_requests_waiting
    ON keel_rebuild_requests (projection, id) WHERE done_at IS NULL;
