-- Generations a swap replaced whose tables are still to be dropped: recorded in the swap's
-- own transaction and deleted with the tables, so a rebuild that crashed between the swap
-- and the drop leaves a row here, which the next start of the projector (or of a rebuild)
-- finishes. A generation kept with --keep-old has no row.
CREATE TABLE IF NOT EXISTS keel_discards (
    projection  text NOT NULL,
    generation  integer NOT NULL,
    swapped_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation)
);
