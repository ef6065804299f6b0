# make demo   installs what is needed, then runs the demo (outputs/demo/)
# make test   installs what is needed (.venv, CPU torch unless a GPU is present), then runs the test suite
#             (all but the minute-long end-to-end runs; make test-slow runs those, CI runs both)
# make pack   trains a pack from nothing with configs/small (one GPU, about 25 minutes; rerun to continue)
# make bench  runs the benchmarks on this machine
# make setup  installs only
PY := .venv/bin/python
STAMP := .venv/.gvf-setup-stamp

.PHONY: setup demo test test-slow pack bench clean

$(STAMP): setup.sh pyproject.toml requirements.txt requirements-gpu.txt requirements-dev.txt
	./setup.sh --dev

setup: $(STAMP)

demo: $(STAMP)
	$(PY) inference_dpm_latent.py --pack assets/pack --input assets/examples --canonical assets/examples \
		--out outputs/demo --overwrite
	@echo "outputs: outputs/demo/<input>/ (viewer.html: open it in a browser; ply/, animation.npz, orbit.mp4,"
	@echo "         compare.mp4, grid.png, summary.json;"
	@echo "         obj_00213, whose canonical is the mesh assets/examples/obj_00213.glb, also animated.glb)"

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

pack: $(STAMP)
	scripts/train_pack.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_render.py
	@if $(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
		$(PY) benchmarks/bench_attention.py && $(PY) benchmarks/bench_models.py && \
		$(PY) benchmarks/bench_inference.py --compile && \
		$(PY) benchmarks/bench_trainers.py && \
		$(PY) benchmarks/bench_trellis.py --voxels 10000 20000 40000 --autocast fp16; else echo "paper-scale benchmarks skipped: they need a GPU"; fi

clean:
	rm -rf .venv .pytest_cache
