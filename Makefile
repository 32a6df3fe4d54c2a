# knnlm_fairseq — kNN-LM on stock fairseq CLIs.  `make install`, `make test`, `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
FAISS ?= faiss-cpu
SHARED ?= ../shared

# The embedded default: WikiText-2 and a small CPU checkpoint trained on it (../shared when present).
WT2_DIR ?= $(SHARED)/data/wikitext-2
# the WikiText author's own host (the original S3 bucket answers 403 since 2024); md5 as torchtext pins it
WT2_URLS ?= $(or $(WT2_URL),https://wikitext.smerity.com/wikitext-2-v1.zip)
WT2_MD5 ?= 542ccefacc6c27f945fb54453812b3cd
CKPT ?= $(SHARED)/models/wt2-small/checkpoint.pt
CKPT_DICT ?= $(dir $(CKPT))dict.txt
WT2_BIN ?= data-bin/wikitext-2
DEMO_OUT ?= results/demo
DEMO_DSTORE ?= dstore/wikitext-2-train
DEMO_ARGS ?=

# make wikitext2: the reproduction report on this CPU (about 45 minutes on 2 cores)
WT2_OUT ?= results/wikitext2
WT2_WORK ?= dstore/wikitext2
WT2_EXTRA ?=  # e.g. --reuse: keep the datastore and index already in WT2_WORK
WT2_ARGS ?= --factory IVF1024,PQ32 --train-size 200000 --probe 32 --k 1024 --lmbda 0.25 --knn-temp 10 \
	--temps 1,3,10,30 --dump-tokens-per-sample 512 --dump-context-window 128 \
	--eval-tokens-per-sample 512 --eval-context-window 256 --max-tokens 8192 --device=--cpu

# make domain: the paper's Table 4 on CPU — the WikiText-2 LM on held-out books, datastore from other books
# (any folder of .txt documents: make domain BOOKS_DIR=path; held-out documents drawn by fraction unless named)
BOOKS_DEFAULT := $(SHARED)/data/gutenberg-books
BOOKS_DIR ?= $(BOOKS_DEFAULT)
DOMAIN_OUT ?= results/domain
DOMAIN_WORK ?= dstore/domain
ifeq ($(BOOKS_DIR),$(BOOKS_DEFAULT))
DOMAIN_ARGS ?= --valid-docs chesterton-thursday --test-docs chesterton-brown
else
DOMAIN_ARGS ?= --valid-frac 0.1 --test-frac 0.1
endif
DOMAIN_HELDOUT ?= 25000  # tokens of valid and of test evaluated (first whole paragraphs); 0 = whole books
DOMAIN_EXTRA ?=  # e.g. --reuse: keep the prepared text, datastores and retrieval logs in DOMAIN_WORK

# make keytypes: the paper's Table 5 (which representation makes the best key) on a fixed WikiText-2 subset:
# 8 datastores over the first 5% of train articles, a valid prefix of 15k tokens (measured 53 min on 2 busy cores)
KEYTYPES_OUT ?= results/keytypes
KEYTYPES_WORK ?= dstore/keytypes
KEYTYPES_ARGS ?= --train-articles 0.05 --valid-tokens 15000 --factory IVF1024,PQ32 --train-size 50000 --probe 32 \
	--k 1024 --lmbda 0.25 --knn-temp 10 --temps 1,3,10,30,100,300 --lmbdas 0,0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9 \
	--dump-tokens-per-sample 512 --dump-context-window 128 \
	--eval-tokens-per-sample 512 --eval-context-window 256 --max-tokens 8192 --device=--cpu
KEYTYPES_EXTRA ?=  # e.g. --reuse: keep the subset and every key type already finished in KEYTYPES_WORK

.PHONY: install browser test test-unit demo bench analysis lint clean wikitext2 wikitext103 wikitext103-check wikitext103-data wikitext103-model \
	wikitext103-run scaling domain keytypes cache wikitext2-extras

install: browser
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install "$(FAISS)" -e ".[test,lint]"
	# fairseq 0.12.3 reads np.compat.long, gone in numpy 2: a .pth adds back that one alias, for stock fairseq runs
	# without --user-dir too (knnlm_fairseq/plugin/numpy_compat.py)
	$(BIN)/python -m knnlm_fairseq.plugin.numpy_compat
	$(BIN)/python -c "import fairseq, faiss, numpy, torch, knnlm_fairseq; assert numpy.compat.long is int; print('fairseq', fairseq.__version__, 'torch', torch.__version__, 'faiss', faiss.__version__)"

# Debian's chromium + chromedriver for the viewer's browser test (tests/test_inspect_html.py); a no-op when present.
# No recommends (upower, udev, printers): a headless page needs only the browser, its driver and one font.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver fonts-dejavu-core > /dev/null; \
	fi
	@/usr/bin/chromium --version 2> /dev/null  # its launcher script trips on some /dev/shm mounts, harmlessly
	@/usr/bin/chromedriver --version

test:
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-unit:
	$(BIN)/python -m pytest -q tests -m "not slow"

lint:
	$(BIN)/ruff check knnlm_fairseq scripts tests

# ---- data: ../shared's copy, or the public mirror ----------------------------------------------
data/wikitext-2/wiki.train.tokens:
	$(BIN)/python scripts/fetch.py data/wikitext-2-v1.zip $(WT2_URLS) --md5 "$(strip $(WT2_MD5))" \
		--checksum-var WT2_MD5 --urls-var WT2_URLS --manifest data/wikitext-2/download.json
	cd data && unzip -oq wikitext-2-v1.zip
	test -f $@

ifeq ($(wildcard $(WT2_DIR)/wiki.train.tokens),)
WT2_DIR := data/wikitext-2
WT2_DEPS := data/wikitext-2/wiki.train.tokens
endif

ifeq ($(wildcard $(CKPT)),)
WT2_TRAIN := 1
endif
ifneq ($(filter 1,$(TRAIN) $(WT2_TRAIN)),)
# TRAIN=1, or no shipped checkpoint: train the small model from config/ (about 1.6 h on 2 CPU cores).
CKPT := checkpoints/wt2-small/checkpoint_best.pt
CKPT_DICT := $(WT2_BIN)/dict.txt
$(CKPT): $(WT2_BIN)/.done
	$(BIN)/fairseq-hydra-train --config-dir config --config-name wt2_small \
		task.data=$(abspath $(WT2_BIN)) checkpoint.save_dir=$(abspath $(dir $(CKPT))) \
		common.user_dir=$(abspath knnlm_fairseq)
endif

$(WT2_BIN)/.done: $(WT2_DEPS)
	rm -rf $(WT2_BIN)
	$(BIN)/fairseq-preprocess --only-source $(if $(wildcard $(CKPT_DICT)),--srcdict $(CKPT_DICT)) \
		--trainpref $(WT2_DIR)/wiki.train.tokens --validpref $(WT2_DIR)/wiki.valid.tokens \
		--testpref $(WT2_DIR)/wiki.test.tokens --destdir $(WT2_BIN) --workers 2
	touch $@

demo: $(WT2_BIN)/.done $(CKPT)
	$(BIN)/python scripts/demo.py --data-bin $(WT2_BIN) --checkpoint $(CKPT) \
		--dstore-dir $(DEMO_DSTORE) --out $(DEMO_OUT) $(DEMO_ARGS)

# make bench: base LM and kNN-LM configurations timed side by side on valid and test (BENCH_TOKENS=20000 for a quick
# look); reuses make wikitext2's datastore and index when they exist, dumps them otherwise
BENCH_OUT ?= results/bench
BENCH_WORK ?= dstore/bench
BENCH_TOKENS ?= 0
BENCH_ARGS ?= --temps 1,3,10,30
bench: $(WT2_BIN)/.done $(CKPT)
	$(BIN)/python scripts/bench.py --data-bin $(WT2_BIN) --checkpoint $(CKPT) --dstore $(WT2_WORK)/dstore \
		--out $(BENCH_OUT) --work $(BENCH_WORK) --tokens $(BENCH_TOKENS) $(BENCH_ARGS)

# make analysis: the paper's "rare patterns" claim on WikiText-2 valid, from make wikitext2's retrieval log
ANALYSIS_OUT ?= results/analysis
ANALYSIS_WORK ?= dstore/analysis
analysis: $(WT2_BIN)/.done $(CKPT)
	$(BIN)/python scripts/analysis.py --data-bin $(WT2_BIN) --checkpoint $(CKPT) --dstore $(WT2_WORK)/dstore \
		--log $(WT2_WORK)/retrieval-valid --out $(ANALYSIS_OUT) --work $(ANALYSIS_WORK)

wikitext2: $(WT2_BIN)/.done $(CKPT)
	$(BIN)/python scripts/reproduce.py --title "kNN-LM on WikiText-2 (this CPU)" --data-bin $(WT2_BIN) \
		--checkpoint $(CKPT) --out $(WT2_OUT) --work $(WT2_WORK) $(WT2_ARGS) $(WT2_EXTRA)

keytypes: $(WT2_BIN)/.done $(CKPT)
	$(BIN)/python scripts/keytypes.py --raw-dir $(WT2_DIR) --checkpoint $(CKPT) --dict $(CKPT_DICT) \
		--out $(KEYTYPES_OUT) --work $(KEYTYPES_WORK) $(KEYTYPES_ARGS) $(KEYTYPES_EXTRA)

domain: $(WT2_BIN)/.done $(CKPT)
	$(BIN)/python scripts/domain.py --books-dir $(BOOKS_DIR) --checkpoint $(CKPT) --dict $(CKPT_DICT) \
		--wiki-dstore $(WT2_WORK)/dstore --wiki-data-bin $(WT2_BIN) --out $(DOMAIN_OUT) --work $(DOMAIN_WORK) \
		--heldout-tokens $(DOMAIN_HELDOUT) $(DOMAIN_ARGS) $(DOMAIN_EXTRA)

# make scaling: retrieval vs training (the paper's Table 3 and Figure 2, shape only) on WikiText-2. Needs
# `make wikitext2`'s datastore, index and retrieval logs in WT2_WORK (reused, not rebuilt). Trains the 10% model
# (config/wt2_small_10pct.yaml, <= 25 min), dumps its datastore over 100% of train, slices the others, evaluates
# a fixed 15% prefix of valid/test (whole articles): about 60-75 minutes on 2 idle cores.
SCALING_OUT ?= results/scaling
SCALING_WORK ?= dstore/scaling
SCALING_EXTRA ?= --reuse  # keep what an earlier run left in SCALING_WORK; empty it to redo everything
SCALING_ARGS ?= --fractions 10,25,50 --eval-fraction 0.15 --figure-splits valid,test --factory IVF1024,PQ32 \
	--train-size 200000 --probe 32 --k 1024 --temps 1,3,10,30 --dump-tokens-per-sample 512 \
	--dump-context-window 128 --eval-tokens-per-sample 512 --eval-context-window 256 --max-tokens 8192 \
	--device=--cpu

scaling: $(WT2_BIN)/.done $(CKPT)
	test -f $(WT2_WORK)/dstore/index.faiss -a -f $(WT2_WORK)/retrieval-test/meta.json || $(MAKE) wikitext2
	$(BIN)/python scripts/scaling.py --raw $(WT2_DIR) --data-bin $(WT2_BIN) --checkpoint $(CKPT) \
		--dict $(CKPT_DICT) --full-dstore $(WT2_WORK)/dstore --full-logs $(WT2_WORK) \
		--out $(SCALING_OUT) --work $(SCALING_WORK) $(SCALING_ARGS) $(SCALING_EXTRA)

# make cache: base, +cache, +kNN, +kNN+cache (the paper's Table 1 with Grave et al.'s continuous cache) on valid
# and test. Reuses `make wikitext2`'s retrieval logs; two base passes record the cache (~10 min on 2 cores).
CACHE_OUT ?= results/cache
CACHE_WORK ?= dstore/cache
CACHE_EXTRA ?=  # e.g. --reuse: keep the cache logs already in CACHE_WORK

cache: $(WT2_BIN)/.done $(CKPT)
	test -f $(WT2_WORK)/retrieval-test/meta.json || $(MAKE) wikitext2
	$(BIN)/python scripts/cache_report.py --data-bin $(WT2_BIN) --checkpoint $(CKPT) --knn-work $(WT2_WORK) \
		--out $(CACHE_OUT) --work $(CACHE_WORK) $(CACHE_EXTRA)

# everything of the paper beyond Table 1's kNN-LM rows, regenerated here (see README for the time budget)
wikitext2-extras: cache domain scaling keytypes

# ---- make wikitext103: the paper end to end, for a GPU machine with internet -------------------
# docs/wikitext103.md: sources, checksums, the preflight (make wikitext103-check), resuming, what it costs.
# Each source is a space-separated list of URLs tried in order; every download is verified or recorded.
# WikiText-103: the WikiText author's own host first, then the original S3 bucket (403 Forbidden since 2024,
# kept last in case it returns: the md5 below is the one published for its file, so no other bytes pass).
WT103_URLS ?= $(or $(WT103_URL),https://wikitext.smerity.com/wikitext-103-v1.zip \
	https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip)
# md5 of wikitext-103-v1.zip as torchtext and other loaders pin it
WT103_MD5 ?= 9ddaacaf6af0710eda8c456decff7832
# fairseq's published Baevski & Auli model; no checksum is published for it, so an empty WT103_CKPT_SHA256
# records the tarball's sha256 in $(WT103_CKPT_DIR)/download.json (and the report); set it to pin a download
WT103_CKPT_URLS ?= $(or $(WT103_CKPT_URL),https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2)
WT103_CKPT_SHA256 ?=
WT103_DATA ?= data/wikitext-103
WT103_BIN ?= data-bin/wikitext-103
WT103_CKPT_DIR ?= checkpoints/wikitext-103
WT103_OUT ?= results/wikitext103
WT103_WORK ?= dstore/wikitext103
# what the preflight asks for (the capacity plan): disk where WT103_WORK is (211 GB of fp16 keys + index + logs),
# disk for data, data-bin and checkpoint where they sit on another filesystem, RAM, one GPU; 0 = not checked
WT103_NEED_GB ?= 250
WT103_NEED_DATA_GB ?= 5
WT103_NEED_RAM_GB ?= 32
WT103_NEED_GPU_GB ?= 32
# 0: skip the CUDA and faiss-gpu checks (with WT103_DEVICE=--cpu and no --gpu in WT103_ARGS: the CPU takes days)
WT103_REQUIRE_GPU ?= 1
WT103_PAPER ?= config/paper_wt103.json
WT103_DEVICE ?= --fp16
WT103_ARGS ?= --factory IVF4096,PQ64 --train-size 1000000 --probe 32 --k 1024 --lmbda 0.25 --knn-temp 1 \
	--temps 1,3,10,30 --dump-tokens-per-sample 3072 --dump-context-window 1536 \
	--eval-tokens-per-sample 3072 --eval-context-window 2560 --max-tokens 3072 \
	--eval-extra=--softmax-batch=1024 --index-extra=--gpu

# the preflight first (its own make, so nothing starts before it passes, -j or not), then the run
wikitext103:
	$(MAKE) --no-print-directory wikitext103-check
	$(MAKE) --no-print-directory wikitext103-run

wikitext103-check:
	$(BIN)/python scripts/wt103_preflight.py \
		--source WT103_URLS $(WT103_DATA)/wiki.train.tokens $(WT103_URLS) \
		$(if $(WT103_DICT_ARG),--source WT103_CKPT_URLS $(WT103_CKPT_DIR)/dict.txt $(WT103_CKPT_URLS)) \
		--disk $(WT103_WORK) $(WT103_NEED_GB) WT103_NEED_GB --disk $(WT103_DATA) $(WT103_NEED_DATA_GB) WT103_NEED_DATA_GB \
		--disk $(WT103_BIN) $(WT103_NEED_DATA_GB) WT103_NEED_DATA_GB \
		--disk $(WT103_CKPT_DIR) $(WT103_NEED_DATA_GB) WT103_NEED_DATA_GB \
		--ram-gb $(WT103_NEED_RAM_GB) --gpu-gb $(WT103_NEED_GPU_GB) $(if $(filter 0,$(WT103_REQUIRE_GPU)),--no-gpu)

wikitext103-data: $(WT103_DATA)/wiki.train.tokens

# the zip is kept beside the text: a re-run verifies it instead of downloading it again
$(WT103_DATA)/wiki.train.tokens:
	$(BIN)/python scripts/fetch.py $(dir $(WT103_DATA))wikitext-103-v1.zip $(WT103_URLS) --md5 "$(strip $(WT103_MD5))" \
		--checksum-var WT103_MD5 --urls-var WT103_URLS --manifest $(WT103_DATA)/download.json
	cd $(dir $(WT103_DATA)) && unzip -oq wikitext-103-v1.zip
	test -f $@

ifeq ($(TRAIN),1)
WT103_CKPT := $(WT103_CKPT_DIR)/checkpoint_best.pt
WT103_DICT_ARG :=
$(WT103_CKPT): $(WT103_BIN)/.done
	$(BIN)/fairseq-hydra-train --config-dir config --config-name wt103 task.data=$(abspath $(WT103_BIN)) \
		checkpoint.save_dir=$(abspath $(WT103_CKPT_DIR)) common.user_dir=$(abspath knnlm_fairseq)
else
# the published Baevski & Auli model (fairseq's adaptive_lm_wiki103.v2): model.pt + dict.txt
WT103_CKPT := $(WT103_CKPT_DIR)/model.pt
WT103_DICT_ARG := --srcdict $(WT103_CKPT_DIR)/dict.txt
$(WT103_CKPT_DIR)/dict.txt:
	$(BIN)/python scripts/fetch.py $(WT103_CKPT_DIR)/model.tar.bz2 $(WT103_CKPT_URLS) \
		--sha256 "$(strip $(WT103_CKPT_SHA256))" --checksum-var WT103_CKPT_SHA256 --urls-var WT103_CKPT_URLS \
		--manifest $(WT103_CKPT_DIR)/download.json
	tar -xjf $(WT103_CKPT_DIR)/model.tar.bz2 -C $(WT103_CKPT_DIR) --strip-components=1
	rm $(WT103_CKPT_DIR)/model.tar.bz2
	test -f $(WT103_CKPT) && test -f $@
$(WT103_CKPT): $(WT103_CKPT_DIR)/dict.txt
endif
wikitext103-model: $(WT103_CKPT)

$(WT103_BIN)/.done: $(WT103_DATA)/wiki.train.tokens $(if $(WT103_DICT_ARG),$(WT103_CKPT_DIR)/dict.txt)
	rm -rf $(WT103_BIN)
	$(BIN)/fairseq-preprocess --only-source $(WT103_DICT_ARG) \
		--trainpref $(WT103_DATA)/wiki.train.tokens --validpref $(WT103_DATA)/wiki.valid.tokens \
		--testpref $(WT103_DATA)/wiki.test.tokens --destdir $(WT103_BIN) --workers 8
	touch $@

# the run itself, without the preflight (make wikitext103 runs both); the report records both downloads
wikitext103-run: $(WT103_BIN)/.done $(WT103_CKPT)
	$(BIN)/python scripts/reproduce.py --title "kNN-LM on WikiText-103 (the paper's Table 1)" \
		--data-bin $(WT103_BIN) --checkpoint $(WT103_CKPT) --out $(WT103_OUT) --work $(WT103_WORK) \
		--device=$(WT103_DEVICE) $(if $(WT103_PAPER),--paper $(WT103_PAPER)) \
		$(foreach f,$(wildcard $(WT103_DATA)/download.json $(WT103_CKPT_DIR)/download.json),--download $(f)) \
		$(WT103_ARGS)

clean:
	rm -rf $(DEMO_OUT) $(DEMO_DSTORE)
