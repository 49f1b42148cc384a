-- Who holds each unit of projection work (`run:<projection>`, `rebuild:<projection>`):
-- claimed under the work's advisory lock, and read FOR SHARE by every batch transaction,
-- which applies nothing unless its process still holds the work.
CREATE TABLE IF NOT EXISTS keel_holders (
    work        text PRIMARY KEY,
    holder      uuid NOT NULL,
    claims      bigint NOT NULL,
    claimed_at  timestamptz NOT NULL
);
