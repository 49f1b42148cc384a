-- Fences claim their partition (fence rules 3). A checkpoint keeps the highest rules of a
-- fence that counted on its partition (fences of lower rules no longer count there) in
-- place of whether a signed fence had (rules 2, the only signed rules before). The old
-- column goes, so a projector of the older build still running fails its next batch
-- loudly instead of applying this log under rules it does not know. Each generation keeps
-- the version of the gate's rules it was built under: one built under older rules (1:
-- before this column) is rebuilt from the log, never resumed.
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS fence_rules integer NOT NULL DEFAULT 0;
UPDATE keel_checkpoints SET fence_rules = 2 WHERE ruled AND fence_rules = 0;
ALTER TABLE keel_checkpoints DROP COLUMN ruled;
ALTER TABLE keel_projections ADD COLUMN IF NOT EXISTS gate_rules integer NOT NULL DEFAULT 1;
ALTER TABLE keel_rebuilds ADD COLUMN IF NOT EXISTS gate_rules integer NOT NULL DEFAULT 1;
