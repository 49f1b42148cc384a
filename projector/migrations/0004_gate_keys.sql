-- What the gate knows of a partition's fences, since it checks signatures: the key that
-- signed the owner's fence (NULL under a legacy fence), whether a fence with rules has
-- counted on the partition (legacy fences no longer do), and the latest time a fence that
-- counted recorded (RFC 3339, for retired keys).
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS owner_key_id text;
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS ruled boolean NOT NULL DEFAULT false;
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS latest_fence_at text;
