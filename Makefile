# rtml: real-time ML on Kafka streams with Apache Beam.
# `make demo` and `make test` are all a fresh clone needs: both create .venv,
# install the pinned project into it, and start the local services they use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
RUN_DIR ?= $(HOME)/.cache/rtml/run
DEMO_DIR ?= $(RUN_DIR)/demo
PYTEST_ARGS ?=
# TensorFlow's C++ start-up chatter hides the progress lines.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test train kafka-up kafka-down clean bench

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing the pinned project into $(VENV) (first run downloads ~1.5 GB)"
	$(PY) -m pip install --progress-bar on --upgrade pip setuptools wheel
	$(PY) -m pip install --progress-bar on -e '.[test,report,bench]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(PY) -m runners.demo --work_dir $(DEMO_DIR)

train: install
	$(PY) -m pipelines.train --input 'data/taxi_trips.csv' --output_dir $(RUN_DIR)/train

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

kafka-up: install
	$(PY) -m runners.kafka up

kafka-down: install
	$(PY) -m runners.kafka down

bench: install
	$(PY) benchmarks/train_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
