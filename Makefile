# Two entry points: `make demo` (the embedded default job) and `make test`.
# Both create ./.venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned so a CPU-only machine does not pull a multi-GB CUDA build;
# override on GPU machines, e.g. `make TORCH_SPEC="torch==2.5.1" demo`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,mpi,video
NPROC ?= 2
# pytest workers for `make test` (pytest-xdist); each takes whole test modules, longest first (tests/conftest.py).
# Three were slower than two on the 2-core machine: 34 min 11 s for the tests of f691bb2, against 31 min 05 s
# with two for e5749a0, which had more to run (2026-12-03).
TEST_WORKERS ?= 2
DEMO_DIR ?= runs/demo
DEMO_VIDEO_DIR ?= runs/demo-video

.PHONY: venv demo demo-video demo-objectives demo-worlds test test-fast bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@echo "make: creating $(VENV) with torch and dpo_ds (first use only, a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@echo "make: compiling DeepSpeed's CPU ops once (communication, CPU Adam: about two minutes on a CPU-only machine)"
	$(PY) -c "from dpo_ds import engine; engine.build_cpu_ops()"
	touch $@

venv: $(VENV)/.installed

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/demo.py --output-dir $(DEMO_DIR) --nproc $(NPROC)

# The video world (tools/video_world.py): clips moving left or right, one direction preferred.
demo-video: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/demo_video.py --output-dir $(DEMO_VIDEO_DIR) --nproc $(NPROC)

# The demo plus every objective of tools/demo.py trained once per seed: the report's comparison table.
demo-objectives: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/demo.py --output-dir $(DEMO_DIR) --nproc $(NPROC) \
		--objectives all --seeds 0,1,2

# Worlds x objectives x seeds (tools/demo_worlds.py): the comparison above in the toy world with 100%, 75% and
# 60% of labels agreeing with its oracle and in the detail world with 90% (hours on 2 CPU cores: a benchmark).
DEMO_WORLDS_DIR ?= runs/worlds
demo-worlds: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/demo_worlds.py --output-dir $(DEMO_WORLDS_DIR) --nproc $(NPROC)

# One torch thread per pytest worker, as every training rank has (tests/conftest.py env()): two workers, each
# often beside a 2-rank job, on two cores.
test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -rs -m "not slow" tests

# The benchmark figures (tools/bench.py): one JSON line per figure, then a table; docs/BENCHMARKS.md.
bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/bench.py

clean:
	rm -rf $(VENV) runs
