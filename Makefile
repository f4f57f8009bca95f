# rtml: real-time ML on Kafka streams with Apache Beam.
# `make demo` and `make test` are all a fresh clone needs: both create .venv,
# install the pinned project into it, and start the local services they use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
RUN_DIR ?= $(HOME)/.cache/rtml/run
DEMO_DIR ?= $(RUN_DIR)/demo
# The problem `make demo` runs: taxi, houses, exasens, or a problem file
# of your own (then also DATA=your.csv).
PROBLEM ?= taxi
DATA ?=
PYTEST_ARGS ?=
# TensorFlow's C++ start-up chatter hides the progress lines.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-unit train replay prism kafka-up kafka-down flink-up flink-down \
        flink-status flink-check bench dataflow-dry-run dataflow-image \
        dataflow-template dataflow-run clean

BEAM_VERSION := $(shell sed -n "s/^BEAM_VERSION = '\(.*\)'/\1/p" setup.py)
GCP_PROJECT ?=
GCP_REGION ?= us-central1
GCS_BUCKET ?=
KAFKA ?= 10.0.0.2:9092
IMAGE ?= $(GCP_REGION)-docker.pkg.dev/$(GCP_PROJECT)/rtml/rtml:$(BEAM_VERSION)
TEMPLATE ?= gs://$(GCS_BUCKET)/templates/rtml-serve.json

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing the pinned project into $(VENV) (first run downloads ~1.5 GB)"
	$(PY) -m pip install --progress-bar on --upgrade pip setuptools wheel
	$(PY) -m pip install --progress-bar on -e '.[test,report,bench]'
	@rm -f $(VENV)/.installed-* && touch $@

# Prism (Beam's Go runner, the embedded streaming default) is built once from
# Beam's Go module at the pinned version and cached under ~/.cache/rtml.
prism: install
	$(PY) -m runners.prism

demo: install prism
	$(PY) -m tools.demo --problem $(PROBLEM) $(if $(DATA),--input $(DATA)) --work_dir $(DEMO_DIR)

train: install
	$(PY) -m pipelines.train --problem $(PROBLEM) \
	  $(if $(DATA),--input $(DATA)) --output_dir $(RUN_DIR)/train/$(PROBLEM)

# Two pytest processes (pytest-xdist; TEST_WORKERS=1 for one), a file per
# process at a time, so a file's module fixtures (trained models) are built
# once; each process starts its own broker. --durations: the slowest tests,
# so the suite's time stays visible.
TEST_WORKERS ?= 2
test: install prism
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=40 $(PYTEST_ARGS)

# The fast tier: no broker, no runner service, no model training (seconds).
test-unit: install
	$(PY) -m pytest tests -m 'not integration' $(PYTEST_ARGS)

RATE ?= 200
replay: install
	$(PY) -m tools.replay --input data/taxi_trips.csv \
	  --rate $(RATE) --order event_time

kafka-up: install
	$(PY) -m runners.kafka up

kafka-down: install
	$(PY) -m runners.kafka down

TASKMANAGERS ?= 1
flink-up: install
	$(PY) -m runners.flink up --taskmanagers $(TASKMANAGERS)
flink-down: install
	$(PY) -m runners.flink down
flink-status: install
	$(PY) -m runners.flink status
flink-check: install
	$(PY) -m runners.flink check

bench: install prism
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/kafka_io_bench.py
	$(PY) benchmarks/serve_bench.py
	$(PY) benchmarks/runners_bench.py
	$(PY) benchmarks/strategies_bench.py
	$(PY) benchmarks/kafkaml_bench.py --serve_args=--end_bundle_when_caught_up

# Dataflow: the job graph offline (no credentials), then the flex template.
dataflow-dry-run: install
	$(PY) -m pipelines.analytics --runner dataflow \
	  --project $(or $(GCP_PROJECT),rtml-dry-run) --region $(GCP_REGION) \
	  --temp_location gs://$(or $(GCS_BUCKET),rtml-dry-run)/tmp \
	  --job_name rtml-analytics --dry_run
dataflow-image:
	gcloud builds submit . --config runners/dataflow/cloudbuild.yaml \
	  --substitutions _IMAGE=$(IMAGE),_BEAM_VERSION=$(BEAM_VERSION) \
	  --project $(GCP_PROJECT)
dataflow-template: dataflow-image
	gcloud dataflow flex-template build $(TEMPLATE) --image $(IMAGE) \
	  --sdk-language PYTHON --metadata-file runners/dataflow/metadata.json \
	  --project $(GCP_PROJECT)
dataflow-run:
	gcloud dataflow flex-template run "rtml-serve-$$(date +%Y%m%d-%H%M%S)" \
	  --template-file-gcs-location $(TEMPLATE) --region $(GCP_REGION) \
	  --project $(GCP_PROJECT) --staging-location gs://$(GCS_BUCKET)/staging \
	  --temp-location gs://$(GCS_BUCKET)/tmp \
	  --parameters bootstrap_servers=$(KAFKA),model_dir=gs://$(GCS_BUCKET)/rtml/model \
	  --parameters sdk_container_image=$(IMAGE)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
