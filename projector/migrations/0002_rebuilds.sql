-- A blue/green rebuild in progress: the next generation of a projection, built beside the
-- live one from offset 0 with its own checkpoints (keel_checkpoints rows of its
-- generation), until it is swapped in. One row per projection; removed by the swap.
CREATE TABLE IF NOT EXISTS keel_rebuilds (
    projection        text PRIMARY KEY,
    generation        integer NOT NULL,
    code_version      integer NOT NULL,
    state             text NOT NULL DEFAULT 'building',
    error             text,
    events            bigint NOT NULL DEFAULT 0,
    records_done      bigint NOT NULL DEFAULT 0,
    records_total     bigint NOT NULL DEFAULT 0,
    events_per_second double precision,
    eta_seconds       double precision,
    owner             text NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
