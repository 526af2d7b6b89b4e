# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on this machine's disk; installing it first stops any dependency from
# pulling a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= all,test

.PHONY: env demo test bench clean system-deps

$(BIN)/.installed: setup.cfg
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	touch $@

env: $(BIN)/.installed

# Debian packages some tests and the data engine need (Tesseract OCR). Skipped when already there.
system-deps:
	@command -v tesseract >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null; \
	  else echo "tesseract-ocr missing: install it with your package manager"; fi; }

demo: env
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python examples/demo.py

test: env system-deps
	$(BIN)/python -m pytest -q

bench: env
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) outputs *.egg-info
