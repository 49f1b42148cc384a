-- Query APIs publish their reads' latency four times a second rather than once, so that a
-- rebuild's adaptive pacing sees live reads slow down within a fraction of a second. The
-- column keeps its name, so that processes of the version before go on working beside
-- these while they are upgraded (a pacer of that version finds no windows on whole
-- seconds among the new ones, and paces on the live projection's lag alone meanwhile).
COMMENT ON COLUMN keel_query_windows.second IS
    'when the window of reads ended: windows are a quarter of a second long';
