-- Rebuilds are shared like live runs: the new generation's partitions are units of kind
-- 'rebuild' in `keel_units`, claimed by the running projector processes that run the
-- projection with the rebuild's code, and each batch proves its unit as a live batch does.
--
-- `generation` names the generation a rebuild unit fills; a coordinator (the process that
-- started or resumed the rebuild, `keel_rebuilds.coordinator`) resets the units (no holder,
-- `claims` counted up, so that a helper still holding state of an earlier claim applies
-- nothing) when it starts, takes them all (again counting `claims` up) to catch up the
-- last records and swap, and deletes them in the swap's transaction. Helpers work on a
-- rebuild only while its coordinator's heartbeat (a row of its own in
-- `keel_projector_processes`) is alive.
ALTER TABLE keel_units ADD COLUMN IF NOT EXISTS generation integer;
ALTER TABLE keel_rebuilds ADD COLUMN IF NOT EXISTS coordinator uuid;
-- The rebuilds a process helps fill, as `projection@code_version.gate_rules`: only a
-- rebuild of the same code is its to help, and only processes that help count in its share.
ALTER TABLE keel_projector_processes ADD COLUMN IF NOT EXISTS helps text[] NOT NULL DEFAULT '{}';
-- What the rebuild does with a record it cannot apply (park, stop, skip): its helpers do
-- the same, whatever their own `projector run` was started with.
ALTER TABLE keel_rebuilds ADD COLUMN IF NOT EXISTS on_error text;
