# Set-up and the two everyday commands. Each target creates ./.venv and installs
# what it needs on first use (torch pinned to the CPU build these machines carry;
# see README for CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEMO_CKPT := .cache/tiny-flux
PROMPT ?= a red fox in the snow

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job: generate an image offline. Until the embedded `digits` model
# lands, it uses a tiny random-weight FLUX checkpoint built locally (the image is noise).
demo: install
	$(BIN)/python -m diffstage.models.flux.tiny $(DEMO_CKPT) >/dev/null
	HF_HUB_OFFLINE=1 $(BIN)/diffstage generate model=flux model_path=$(DEMO_CKPT) prompt="'$(PROMPT)'" seed=0 \
		sampling.num_inference_steps=4 sampling.height=64 sampling.width=64 sampling.max_sequence_length=32

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache outputs multirun
