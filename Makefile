# postkeep developer entry points.  `make run` for a live stack, `make test` for CI.
SHELL := /bin/bash
STACK := devstack/stack.sh
VENV := $(CURDIR)/.venv
RUN_DIR := $(CURDIR)/.stack
RUN_PORT ?= 10025
TEST_DIR := $(CURDIR)/.stack-test
TEST_PORT ?= 11025
PYTEST_ARGS ?=

.PHONY: install run stop test test-versitygw test-lower-bounds lint fuzz bench bench-policyd bench-retention bench-storage deb bench-pgha
.PHONY: bench-search bench-sealing bench-webhooks bench-cluster

install:
	$(STACK) install

run: install
	$(STACK) up $(RUN_DIR) $(RUN_PORT)
	set -a && . $(RUN_DIR)/env && set +a && $(VENV)/bin/python devstack/show-landing.py
	@echo
	@echo "The stack keeps running (settings: $(RUN_DIR)/env, source it to use psql/postkeep)."
	@echo "Stop it with: make stop"

stop:
	$(STACK) down $(RUN_DIR)

# The unit tests again with every runtime dependency at its lower bound
# (devstack/lower-bounds.sh, tests/lower-bounds.txt; a cached second venv, ~20 s).
# `make test` runs it first on a whole-suite run (no PYTEST_ARGS); LOWER_BOUNDS=1
# or 0 forces it on or off.
LOWER_BOUNDS ?= $(if $(strip $(PYTEST_ARGS)),0,1)
test-lower-bounds: install
	devstack/lower-bounds.sh

# Always tears the test stack down, and exits with pytest's status.  Runs that
# share a work tree (and so TEST_DIR and its ports) take turns through a lock.
test: install deb $(if $(filter 1,$(LOWER_BOUNDS)),test-lower-bounds)
	@mkdir -p $(TEST_DIR); exec 9>$(TEST_DIR)/.lock; \
	flock -n 9 || { echo "make test: waiting for another 'make test' on $(TEST_DIR)" >&2; flock 9; }; \
	rc=0; \
	$(STACK) up $(TEST_DIR) $(TEST_PORT) || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
		( set -a && . $(TEST_DIR)/env && set +a && cd $(CURDIR) && \
		  $(VENV)/bin/pytest $(PYTEST_ARGS) ) || rc=$$?; \
	else \
		echo "make test: the test stack did not start (exit $$rc)" >&2; \
	fi; \
	$(STACK) down $(TEST_DIR) || echo "make test: stack down failed" >&2; \
	if [ "$(VERSITYGW)" = 1 ]; then $(call vgw_run) fi; \
	exit $$rc

# versitygw (issue 19): a subset (byte-exact capture and restore, the storage
# probe, retention without lifecycle, Object Lock) again on a stack whose S3
# server is versitygw, in .stack-test-vgw on the same ports after the main run.
# `make test` runs it on a whole-suite run (no PYTEST_ARGS; VERSITYGW=1 or 0
# forces it); `make test-versitygw` runs it alone (about 30 s of tests).
# Retention: the sweep, erasure and hold tests (those installing lifecycle
# rules cannot pass: versitygw has none); dedup: malformed MIME restored;
# packs and sealed content (issue 19): every test, Object Lock ones included,
# the sealed spool drained with PostgreSQL stopped, and accept_after = 'journal'.
TEST_VGW_DIR := $(CURDIR)/.stack-test-vgw
VERSITYGW ?= $(if $(strip $(PYTEST_ARGS)),0,1)
VGW_SEALED := tests/test_packs_stack.py tests/test_sealing_stack.py \
	tests/test_sealed_singles_stack.py tests/test_sealing_parts_stack.py \
	tests/test_sealing_holds_stack.py tests/test_spool_sealed_stack.py \
	tests/test_journal_stack.py
VGW_TESTS ?= tests/test_capture_stack.py tests/test_storage_probe_stack.py \
	tests/test_retention_stack.py tests/test_dedup_stack.py $(VGW_SEALED)
VGW_SELECT := test_capture_stack or test_storage_probe_stack or (test_retention_stack and \
	(sweeps_content or erasure_deletes or hold_moves or held_org)) or (test_dedup_stack and malformed) \
	or packs_stack or sealing or sealed or journal
# $(call vgw_run): up, pytest, always down; sets rc if it was 0 and this fails.
define vgw_run
	vrc=0; \
	S3_SERVER=versitygw $(STACK) up $(TEST_VGW_DIR) $(TEST_PORT) || vrc=$$?; \
	if [ $$vrc -eq 0 ]; then \
		( set -a && . $(TEST_VGW_DIR)/env && set +a && cd $(CURDIR) && \
		  $(VENV)/bin/pytest -q $(VGW_TESTS) -k '$(VGW_SELECT)' ) || vrc=$$?; \
	else echo "make test: the versitygw stack did not start (exit $$vrc)" >&2; fi; \
	$(STACK) down $(TEST_VGW_DIR) || echo "make test: versitygw stack down failed" >&2; \
	[ $$rc -ne 0 ] || rc=$$vrc;
endef

test-versitygw: install
	@mkdir -p $(TEST_DIR); exec 9>$(TEST_DIR)/.lock; \
	flock -n 9 || { echo "make test-versitygw: waiting for another 'make test' on $(TEST_DIR)" >&2; flock 9; }; \
	rc=0; $(call vgw_run) exit $$rc

# The Debian package (packaging/build-deb.sh): rebuilt only when a file it is
# made of changed; tests/test_package.py installs it ($$POSTKEEP_DEB) and purges it.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
DEB := $(CURDIR)/postkeep_$(VERSION)_$(shell dpkg --print-architecture).deb
DEB_SOURCES := $(shell git ls-files pyproject.toml README.md LICENSE postkeep milter policyd \
	storage postfix-conf systemd packaging monitoring 2>/dev/null)
export POSTKEEP_DEB := $(DEB)
deb: $(DEB)
$(DEB): $(DEB_SOURCES)
	packaging/build-deb.sh $(CURDIR)

lint: install
	$(VENV)/bin/ruff check .
	@# postkeep/milter, postkeep/policyd and postkeep/storage are symlinks to the
	@# top-level folders, so mypy reads the package straight from the tree.
	$(VENV)/bin/mypy --config-file pyproject.toml -p postkeep

# Coverage-guided fuzzing (atheris) of every target in tests/fuzz/targets.py for
# FUZZ_SECONDS each, from the seeds and a corpus kept in .fuzz/<target>/.  A
# crash is written to .fuzz/crash-*: fix it, then add the input to
# tests/fuzz/crashes/<target>/ so that `make test` replays it for good.
FUZZ_SECONDS ?= 300
fuzz: install
	@rc=0; for t in dsn policy mime container; do \
		mkdir -p .fuzz/$$t; \
		echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
		( cd .fuzz && PYTHONPATH=$(CURDIR)/tests $(VENV)/bin/python -m fuzz.run $$t \
			-max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
			$$t $(CURDIR)/tests/fuzz/seeds/$$t ) || rc=1; \
	done; exit $$rc

bench: install
	@if [ -x bench/run.sh ]; then bench/run.sh; \
	elif [ -f bench/run.sh ]; then bash bench/run.sh; \
	else echo "bench/run.sh not present yet" >&2; exit 1; fi

# $(call on_private_stack,DIR,PORTBASE,COMMAND): bring a stack up in DIR, run
# COMMAND from /tmp with DIR/env sourced, always take the stack down again;
# COMMAND's exit status.  Benchmarks use their own stacks, never the dev, test
# or capture-bench ones.
define on_private_stack
	@rc=0; \
	$(STACK) up $(1) $(2) || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
		( set -a && . $(1)/env && set +a && cd /tmp && $(3) ) || rc=$$?; \
	fi; \
	$(STACK) down $(1) || echo "make $@: stack down failed" >&2; \
	exit $$rc
endef

# postkeep-policyd against postfwd2 over the policy protocol (bench/policyd_bench.py).
BENCH_POLICYD_DIR := $(CURDIR)/.stack-bench-policyd
BENCH_POLICYD_PORT ?= 13025
BENCH_POLICYD_ARGS ?=
bench-policyd: install
	$(call on_private_stack,$(BENCH_POLICYD_DIR),$(BENCH_POLICYD_PORT),\
	  $(VENV)/bin/python $(CURDIR)/bench/policyd_bench.py $(BENCH_POLICYD_ARGS))

# `postkeep retention run` over a few million generated rows (bench/retention_bench.py),
# on a stack made afresh each run.  BENCH_RETENTION_ARGS='--messages 1000000' etc.
BENCH_RETENTION_DIR := $(CURDIR)/.stack-bench-retention
BENCH_RETENTION_PORT ?= 21225
BENCH_RETENTION_ARGS ?=
bench-retention: install
	@# A fresh database every run: the data is generated, and an old schema
	@# (migrations renumbered while developing) would skew or refuse the run.
	@$(STACK) down $(BENCH_RETENTION_DIR) >/dev/null 2>&1; rm -rf $(BENCH_RETENTION_DIR)
	$(call on_private_stack,$(BENCH_RETENTION_DIR),$(BENCH_RETENTION_PORT),\
	  $(VENV)/bin/python $(CURDIR)/bench/retention_bench.py $(BENCH_RETENTION_ARGS))

# Sealed content (issue 19, bench/sealing_bench.py): erasure of one address among a
# million sealed messages (keys destroyed, no S3 write) and restore p50/p99 of one
# sealed message, on a stack made afresh each run.  BENCH_SEALING_ARGS='--messages 200000'.
BENCH_SEALING_DIR := $(CURDIR)/.stack-bench-sealing
BENCH_SEALING_PORT ?= 21425
BENCH_SEALING_ARGS ?=
bench-sealing: install
	@$(STACK) down $(BENCH_SEALING_DIR) >/dev/null 2>&1; rm -rf $(BENCH_SEALING_DIR)
	$(call on_private_stack,$(BENCH_SEALING_DIR),$(BENCH_SEALING_PORT),\
	  $(VENV)/bin/python $(CURDIR)/bench/sealing_bench.py --config "$$POSTKEEP_CONFIG" $(BENCH_SEALING_ARGS))

# `messages search` query shapes as organisations' dashboard roles over generated
# rows (bench/search_bench.py), on a stack made afresh each run.
# BENCH_SEARCH_ARGS='--messages 200000 --recipients 400000' to run smaller.
BENCH_SEARCH_DIR := $(CURDIR)/.stack-bench-search
BENCH_SEARCH_PORT ?= 16025
BENCH_SEARCH_ARGS ?=
bench-search: install
	@$(STACK) down $(BENCH_SEARCH_DIR) >/dev/null 2>&1; rm -rf $(BENCH_SEARCH_DIR)
	$(call on_private_stack,$(BENCH_SEARCH_DIR),$(BENCH_SEARCH_PORT),\
	  $(VENV)/bin/python $(CURDIR)/bench/search_bench.py \
	    --explain $(CURDIR)/bench/search-explain.txt $(BENCH_SEARCH_ARGS))

# Bytes stored per byte received (split parts, dictionaries) and what they cost
# the capture path (bench/storage_bench.py).
BENCH_STORAGE_DIR := $(CURDIR)/.stack-bench-storage
BENCH_STORAGE_PORT ?= 14025
BENCH_STORAGE_ARGS ?=
bench-storage: install
	$(call on_private_stack,$(BENCH_STORAGE_DIR),$(BENCH_STORAGE_PORT),\
	  $(VENV)/bin/python $(CURDIR)/bench/storage_bench.py --config "$$POSTKEEP_CONFIG" \
	    --smtp "$$POSTKEEP_SMTP_HOST:$$POSTKEEP_SMTP_PORT" $(BENCH_STORAGE_ARGS))

# Webhook events (issue 18, bench/webhook_lag.py): the outcome path's reports/s
# with and without a webhook endpoint (paired, alternated), then the lag from a
# DSN's arrival over LMTP to the receiver's 2xx at 80 % of that throughput.
# BENCH_WEBHOOKS_ARGS='--n 500 --reps 2 --lag-seconds 10' to run shorter.
BENCH_WEBHOOKS_DIR := $(CURDIR)/.stack-bench-webhooks
BENCH_WEBHOOKS_PORT ?= 24025
BENCH_WEBHOOKS_ARGS ?=
bench-webhooks: install
	$(call on_private_stack,$(BENCH_WEBHOOKS_DIR),$(BENCH_WEBHOOKS_PORT),\
	  timeout 1200 $(VENV)/bin/python $(CURDIR)/bench/webhook_lag.py $(BENCH_WEBHOOKS_ARGS))

# Seconds of spooling or tempfail per PostgreSQL failover (issue 20): a stack
# (BENCH_PGHA_PORT..+12) on devstack/pgha.sh (+50..+55), the primary killed -9
# and a switchover, each a few times under load (bench/pgha_bench.py; its own
# stacks, made afresh and taken down).  BENCH_PGHA_ARGS='--runs 5'.
BENCH_PGHA_PORT ?= 22025
BENCH_PGHA_ARGS ?=
bench-pgha: install
	cd /tmp && $(VENV)/bin/python $(CURDIR)/bench/pgha_bench.py --port $(BENCH_PGHA_PORT) \
	  --dir $(CURDIR)/.stack-bench-pgha $(BENCH_PGHA_ARGS)

# Two Postfix hosts on one PostgreSQL and a distributed MinIO (issue 20):
# throughput with one host and with two (paired, alternated), and seconds of
# spooling or tempfail per MinIO node failure (bench/cluster_bench.py), on its
# own cluster stack (devstack/stack.sh cluster-up, BENCH_CLUSTER_PORT..+43),
# made afresh and taken down.  BENCH_CLUSTER_ARGS='--pairs 5 --seconds 20'.
BENCH_CLUSTER_PORT ?= 22125
BENCH_CLUSTER_ARGS ?=
.PHONY: bench-cluster
bench-cluster: install
	cd /tmp && $(VENV)/bin/python $(CURDIR)/bench/cluster_bench.py --port $(BENCH_CLUSTER_PORT) \
	  --dir $(CURDIR)/.stack-bench-cluster $(BENCH_CLUSTER_ARGS)
