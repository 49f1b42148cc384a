# The two commands. Both install what is missing and are safe to run twice.
.PHONY: up test lint bench sim chaos token

## Bring the whole system up in the foreground (Ctrl-C stops it). INSTANCES=3 starts three
## command-api instances sharing the partitions (on 8080, 8090 and 8091).
INSTANCES ?= 1
up:
	INSTANCES="$(INSTANCES)" ./scripts/up.sh

## Run every test, against a real broker and a real PostgreSQL.
test:
	./scripts/test.sh

## The write path's deterministic simulation over many more seeds than `make test` runs
## (release build): SEEDS=100000 by default; FIRST=<seed> to start elsewhere.
SEEDS ?= 100000
sim:
	./scripts/sim.sh "$(SEEDS)" "$(FIRST)"

## The chaos suite against the real processes: FAULTS=50 faults of each kind (kills,
## pauses, PostgreSQL crashes, terminated sessions); about 25 minutes.
FAULTS ?= 50
chaos:
	./scripts/chaos.sh "$(FAULTS)"

## Formatting and lints, as CI checks them.
lint:
	./scripts/lint.sh

## Every benchmark beside its baselines (release build, then 25 to 50 minutes); writes
## BENCHMARKS.md and docs/bench/.
bench:
	./scripts/bench.sh

## A development token for `make up`'s APIs, on standard output:
##   TOKEN=$$(make -s token ROLE=commands:write SUB=alice)
## ROLE: commands:write, queries:read, audit:read, admin, all, or several with commas.
ROLE ?= all
SUB ?= dev
TTL ?= 3600
token:
	@./scripts/token.sh "$(ROLE)" "$(SUB)" "$(TTL)"
