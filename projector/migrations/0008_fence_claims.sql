-- Fences claim their partition (fence rules 3). A checkpoint keeps the highest rules of a
-- fence that counted on its partition (fences of lower rules no longer count there), and
-- each generation the version of the gate's rules it was built under: a generation built
-- under older rules (1: before this column, when the gate checked no signatures or no
-- claims) is rebuilt from the log, never resumed.
ALTER TABLE keel_checkpoints ADD COLUMN IF NOT EXISTS fence_rules integer NOT NULL DEFAULT 0;
ALTER TABLE keel_projections ADD COLUMN IF NOT EXISTS gate_rules integer NOT NULL DEFAULT 1;
ALTER TABLE keel_rebuilds ADD COLUMN IF NOT EXISTS gate_rules integer NOT NULL DEFAULT 1;
