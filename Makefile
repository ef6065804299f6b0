# make demo   installs what is needed, then runs the demo (outputs/demo/)
# make test   installs what is needed (.venv, CPU torch unless a GPU is present), then runs the test suite
# make bench  runs the benchmarks on this machine
# make setup  installs only
PY := .venv/bin/python
STAMP := .venv/.gvf-setup-stamp

.PHONY: setup demo test bench clean

$(STAMP): setup.sh requirements.txt requirements-gpu.txt requirements-dev.txt
	./setup.sh --dev

setup: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/render_gaussians.py --example --out outputs/demo/turntable.mp4 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_render.py
	@if $(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
		$(PY) benchmarks/bench_models.py; else echo "bench_models.py skipped: paper-scale models need a GPU"; fi

clean:
	rm -rf .venv .pytest_cache
