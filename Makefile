# clipstyle: make test (set up and run the tests), make lint (ruff), make demo (set up and
# stylize an example image with the real weights, fetched once).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A torch build known to work; override for another, e.g. the CPU-only wheels (README, Quick start):
#   make install TORCH="torch==2.14.1 torchvision==0.29.1 --index-url <PyTorch's CPU wheel index>"
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_IMAGE ?= examples/images/astronaut.jpg
DEMO_PROMPT ?= starry night by Vincent van Gogh
DEMO_ARGS ?=

.PHONY: install test lint format demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,web,ray,video]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# ruff: lint rules and formatting, configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: install
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

# On a machine without a GPU the demo uses the draft preset (100 steps, 256 px) and writes a
# snapshot every 3 steps (out/<name>.stepNNNN.png, the latest named on the progress line), so
# there is a first picture to open within about a minute.
# DEMO_ARGS goes to clipstyle run, e.g. local weight files without network:
#   make demo DEMO_ARGS='--clip-weights ViT-B-32.pt --vgg-weights vgg19-dcbb9e9d.pth'
# The weights hint follows a failure, not an interruption (exit code 130).
demo: install
	@mkdir -p out
	$(VENV)/bin/clipstyle run -p "$(DEMO_PROMPT)" "$(DEMO_IMAGE)" -o out/ --report out/demo.jsonl \
		$$($(PY) -c "import torch; print('' if torch.cuda.is_available() or torch.backends.mps.is_available() else '--preset draft --save-every 3')") \
		$(DEMO_ARGS) \
		|| { rc=$$?; [ $$rc -eq 130 ] || echo "make demo: with local weight files, run make demo DEMO_ARGS='--clip-weights ViT-B-32.pt --vgg-weights vgg19-dcbb9e9d.pth'" >&2; exit $$rc; }

bench: install
	$(VENV)/bin/clipstyle bench --size 256 --crops 16 --device cpu

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
