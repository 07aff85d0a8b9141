# streamrec: `make run` (embedded demo) and `make test` (real services + whole suite)
# both create or reuse the virtualenv; pip's cache keeps torch from downloading twice.
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help run test lint fmt services services-stop venv clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

run: $(STAMP) ## train + serve on the embedded default (no Kafka or Redis needed)
	$(BIN)/streamrec run $(ARGS)

test: $(STAMP) services ## start Kafka and Redis on loopback, then run the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy, as CI runs them
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy deploy/local/redis_cluster.py deploy/local/redis_sentinel.py  # apart: deploy/local/kafka would shadow the kafka package

fmt: $(STAMP) ## format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

services: ## install (first time) and start Kafka + Redis on loopback
	bash deploy/local/services.sh start

services-stop: ## stop the local services
	bash deploy/local/services.sh stop

venv: $(STAMP) ## create or update the virtualenv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

clean: ## remove the virtualenv and local data (not the service caches)
	rm -rf $(VENV) streamrec-data .pytest_cache .mypy_cache .ruff_cache
