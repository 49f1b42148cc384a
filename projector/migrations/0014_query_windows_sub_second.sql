-- Query APIs publish their reads' latency four times a second rather than once, so that a
-- rebuild's adaptive pacing sees live reads slow down within a fraction of a second. A
-- row is one window of an instance's reads, named by the moment it ended.
ALTER TABLE keel_query_windows RENAME COLUMN second TO ended;
