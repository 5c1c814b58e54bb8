# Set-up is automatic: every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CRANIUM := /usr/share/doc/invesalius-examples/examples/Cranium.inv3

.PHONY: venv system-deps lint format test bench bench-bbdm bench-ct bench-retrieval bench-server bench-batch demo serve clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# Debian packages: the real head CT (invesalius-examples) and Orthanc with its DICOMweb plugin
# (the server's DICOMweb tests). Installed when apt-get can run as root; otherwise the tests
# that need them skip and say why.
APT_PACKAGES := invesalius-examples orthanc orthanc-dicomweb
system-deps:
	@if [ ! -f $(CRANIUM) ] || ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)) >/dev/null 2>&1 \
	      || echo "note: could not install $(APT_PACKAGES); the tests that need them will skip"; \
	  else echo "note: $(APT_PACKAGES) not installed (needs root apt-get); the tests that need them will skip"; fi; \
	fi

# Lint and format checks (ruff, configured in pyproject.toml); `make format` rewrites the code.
lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

test: $(STAMP) system-deps
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	$(PY) -m pytest -q --durations=25 tests

# Benchmarks print tables; they are not tests. `make bench`: whole-volume reconstruction with
# the shipped ct2mri preset (time by stage, quality by steps). BENCH_ARGS passes options, e.g.
# make bench BENCH_ARGS="--device cuda --repeats 5".
bench: $(STAMP)
	$(PY) -m bench.reconstruct $(BENCH_ARGS)

# The default-size denoiser alone (forward, FLOPs, sampling a volume, memory).
bench-bbdm: $(STAMP)
	$(PY) -m bench.bbdm $(BENCH_ARGS)

# Real head CT preparation: brain extraction and registration to the CT head template.
bench-ct: $(STAMP) system-deps
	$(PY) -m bench.ct_prepare $(BENCH_ARGS)

# The server under load and attack: concurrent reconstructions, /info/ latency, memory, a gzip
# bomb and an oversize upload (README, Security).
bench-server: $(STAMP) system-deps
	$(PY) -m bench.server $(BENCH_ARGS)

# BBDM training throughput, fp32 against bf16 (images per second; issue 19).
bench-train: $(STAMP)
	$(PY) -m bench.train_step $(BENCH_ARGS)

# batch's engines: series per hour, local against Ray with 1 and 2 workers (issue 21).
bench-batch: $(STAMP)
	$(PY) -m bench.batch $(BENCH_ARGS)

# The knowledge-base index at 10k/100k/1M entries (exact against HNSW).
bench-retrieval: $(STAMP)
	$(PY) -m bench.retrieval $(BENCH_ARGS)

# The demo: inputs from installable sources (Debian's real Cranium CT, one synthetic CT/T1 pair
# from nilearn's MNI152), each made x2 sparse and reconstructed with the shipped ct2mri preset.
DEMO := demo_output
demo: $(STAMP) system-deps
	$(PY) -m lib.data.demo_inputs $(DEMO)/inputs
	$(PY) main.py reconstruct $(DEMO)/inputs/pair_ct.nii.gz $(DEMO)/pair --preset ct2mri --simulate-sparsity 2
	$(PY) main.py score $(DEMO)/pair/mri.nii.gz $(DEMO)/inputs/pair_t1.nii.gz
	$(PY) main.py reconstruct $(DEMO)/inputs/cranium_ct.nii.gz $(DEMO)/cranium --preset ct2mri --simulate-sparsity 2
	@echo "demo outputs: $(DEMO)/pair and $(DEMO)/cranium (mri.nii.gz, uncertainty.nii.gz, provenance.json, preview.png)"

# The MONAI Label server on 127.0.0.1 with the shipped weights and the demo's two CT studies
# (README, "Server"). SERVE_PORT and SERVE_CONF (more --conf pairs, e.g. "--conf device cuda")
# change it.
SERVE_PORT ?= 8000
STUDIES := $(DEMO)/studies
serve: $(STAMP) system-deps
	$(PY) -m lib.data.demo_inputs $(DEMO)/inputs
	mkdir -p $(STUDIES)
	cp $(DEMO)/inputs/pair_ct.nii.gz $(DEMO)/inputs/cranium_ct.nii.gz $(STUDIES)/
	$(PY) -m monailabel.main start_server --app . --studies $(STUDIES) --host 127.0.0.1 --port $(SERVE_PORT) --conf preset ct2mri $(SERVE_CONF)

clean-venv:
	rm -rf $(VENV)
