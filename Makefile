# Set-up and the everyday commands. Each target creates ./.venv and installs what
# it needs on first use (torch pinned to the CPU build these machines carry; see
# README for CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PROMPT ?= a handwritten digit seven
DIGITS_OUT ?= models/digits/checkpoint

.PHONY: install demo sheet test train-digits clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job: generate an image offline with the embedded default model (digits).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/diffstage generate prompt="'$(PROMPT)'"

# A labelled contact sheet of all ten digits.
sheet: install
	HF_HUB_OFFLINE=1 $(BIN)/diffstage sheet

# The tests also run the Triton kernels (interpreted on the CPU), read back MP4s, start the server (and its
# replicas on Ray Serve), build LoRA adapters, quantize and sweep through Hydra's launchers, so they install the
# triton, video, serve, lora, quant, sweep and ray extras.
$(VENV)/.installed-triton: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[test,triton,video,serve,lora,quant,sweep,ray]"
	touch $@

test: install $(VENV)/.installed-triton
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Retrain the embedded digits model from scratch (about 21 minutes on 2 CPU cores).
train-digits: install
	$(BIN)/python -m diffstage.models.digits.train $(DIGITS_OUT)

clean:
	rm -rf $(VENV) .cache outputs multirun
