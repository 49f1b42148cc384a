# The two commands. Both install what is missing and are safe to run twice.
.PHONY: up test lint bench

## Bring the whole system up in the foreground (Ctrl-C stops it).
up:
	./scripts/up.sh

## Run every test, against a real broker and a real PostgreSQL.
test:
	./scripts/test.sh

## Formatting and lints, as CI checks them.
lint:
	./scripts/lint.sh

## Every benchmark beside its baselines (release build, then about 4 minutes); writes
## BENCHMARKS.md and docs/bench/.
bench:
	./scripts/bench.sh
