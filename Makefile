# feedrate — every entry point. The venv bootstraps itself on first use (stamp files skip it later).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-runtime
DEV_STAMP := $(VENV)/.stamp-dev
PIP_QUIET := -q --disable-pip-version-check

# LOCAL_S3=1: send this make's s3:// and cos:// traffic to the `make s3-up` endpoint on 127.0.0.1, with
# the rig's placeholder keys (your own keys, session token and profile are not passed on). Without it
# .s3-local/ changes nothing: a leftover endpoint never captures traffic meant for a real bucket.
# (s3-up, s3-down and help have no traffic to point: LOCAL_S3 does not apply to them.)
LOCAL_S3 ?=
ifeq ($(LOCAL_S3),1)
ifneq ($(filter-out s3-up s3-down help,$(MAKECMDGOALS)),)
ifeq ($(wildcard .s3-local/env.mk),)
$(error LOCAL_S3=1: no local S3 endpoint is running (.s3-local/env.mk is missing); start one: make s3-up)
endif
include .s3-local/env.mk
$(info using the local S3 endpoint $(LOCAL_S3_ENDPOINT) with placeholder credentials (LOCAL_S3=1))
endif
else ifneq ($(LOCAL_S3),)
$(error LOCAL_S3=$(LOCAL_S3): accepted values are 1 (use the make s3-up endpoint) or empty)
endif

LOADER ?= torchvision
EPOCHS ?= 1
WORKERS ?= 2
DEVICE ?= auto
FORMAT ?= jpg
SOURCE ?= auto
ifeq ($(FORMAT),jpg)
DEST ?= data/shards
else
DEST ?= data/shards-$(FORMAT)
endif
DATA ?= data/shards
ARGS ?=
NET ?=

export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1

.PHONY: help venv dev shards train-cifar test test-faults test-slow test-gpu lint format s3-up s3-down bench compare clean

help:
	@echo "make train-cifar [LOADER=torchvision|wds|dali|tensor] [DATA=URL] [EPOCHS=1] [WORKERS=N] [DEVICE=auto]"
	@echo "make test          the CPU test suite (lint first in CI)"
	@echo "make shards [DEST=URL] [FORMAT=jpg|png|raw] [SOURCE=auto|synthetic|PATH]"
	@echo "make s3-up [NET=preset] / s3-down   a local S3 endpoint (moto) on 127.0.0.1, optionally shaped;"
	@echo "                    then add LOCAL_S3=1 to a make command to send its s3:// and cos:// there"
	@echo "make bench / compare [NET=same-region|cross-region|home|all]   loader benchmarks, training comparisons"
	@echo "make lint / format"

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV) (first run takes a few minutes)"
	@$(PY) -m pip install $(PIP_QUIET) -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	@$(PY) -m pip install $(PIP_QUIET) -r requirements-dev.txt 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $@

venv: $(STAMP)
dev: $(DEV_STAMP)

shards: $(STAMP)
	$(PY) -m shardgen --dest "$(DEST)" --format $(FORMAT) --source "$(SOURCE)" $(ARGS)

# Local default data: built once (and on first use) when DATA is the default local path.
data/shards/manifest.json: | $(STAMP)
	$(PY) -m shardgen --dest data/shards --format jpg --source "$(SOURCE)"

# NPROC > 1: that many processes on this machine through torchrun (DDP; gloo on the CPU, nccl on GPUs).
NPROC ?= 1
train-cifar: $(STAMP) $(if $(filter data/shards,$(DATA)),data/shards/manifest.json)
	$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC),$(PY)) train.py --loader $(LOADER) --data "$(DATA)" --epochs $(EPOCHS) --workers $(WORKERS) --device $(DEVICE) $(ARGS)

test: $(DEV_STAMP)
	$(PY) -m pytest -m "not gpu and not slow" $(ARGS)

# Fault injection across the data path (also part of `make test`); prints the faults table.
test-faults: $(DEV_STAMP)
	$(PY) -m pytest tests/test_faults.py -q -s $(ARGS)

test-slow: $(DEV_STAMP)
	$(PY) -m pytest -m "slow and not gpu" $(ARGS)

test-gpu: $(DEV_STAMP)
	$(PY) -m pytest -m gpu $(ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

s3-up: $(DEV_STAMP)
	$(PY) -m rig up $(if $(NET),--net $(NET))

s3-down: $(DEV_STAMP)
	$(PY) -m rig down

bench: $(DEV_STAMP)
	$(PY) -m bench $(if $(NET),--net $(NET)) $(ARGS)

LOADERS ?= torchvision,wds,dali,tensor
EMULATE ?= auto
compare: $(DEV_STAMP) $(if $(filter data/shards,$(DATA)),data/shards/manifest.json)
	$(PY) -m bench.compare --loaders $(LOADERS) --data "$(DATA)" --epochs $(EPOCHS) --workers $(WORKERS) --device $(DEVICE) --emulate $(EMULATE) $(if $(NET),--net $(NET)) $(ARGS)

clean:
	rm -rf results .pytest_cache .ruff_cache
