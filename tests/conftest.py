"""Test session setup: 8 CPU devices, so mesh tests run on a real multi-device mesh."""

import atexit
import os
import shutil
import tempfile

# Must be set before jax initialises its backend (these imports do not import jax).
#
# The tests compile hundreds of small programs and run each for a few steps. Without LLVM's
# optimisations and with XLA:CPU's older (non-MLIR) fusion emitters the pipeline test compiles in
# 38% of the time (81 -> 31 s) and the suite takes 13 minutes instead of 24; the programs (the
# HLO) are the ones users run, only the machine code differs. Flags in XLA_FLAGS come later and win.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = (f'{FAST_COMPILE} {os.environ.get("XLA_FLAGS", "")}'
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# xdist workers start threads before they import this file, too late for `share_one_arena`;
# glibc reads this when a process starts, so every worker has one arena, as the binaries do.
os.environ.setdefault('MALLOC_ARENA_MAX', '1')
# One compilation cache for the session, its xdist workers and subprocesses included: the
# tests build the same small programs again and again. Fresh each session, so nothing compiled
# before is trusted.
if 'PYTEST_XDIST_WORKER' not in os.environ:  # workers inherit the controller's
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxlm-tests-xla-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

from jaxlm import host_memory  # pylint: disable=wrong-import-position

host_memory.share_one_arena()  # as the binaries do, before jax is imported

import pytest  # pylint: disable=wrong-import-position

from jaxlm import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from jaxlm.data import world as world_lib  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def tokenizer(tmp_path_factory):
  """A BPE tokenizer (vocabulary 512) trained on the synthetic world's text."""
  path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model'
  return tokenizer_lib.Tokenizer.train(world_lib.World().documents('train', 500), str(path),
                                       vocab_size=512, model_type='bpe')


@pytest.fixture(scope='session')
def sft_workdir(tmp_path_factory):
  """A tiny SFT workdir (8 pretraining steps, then 4 of SFT), shared by the stages' tests."""
  from experiments import pretrain  # pylint: disable=g-import-not-at-top
  from experiments import sft  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  base, sft_dir = (str(tmp_path_factory.mktemp(name)) for name in ('base', 'sft'))
  pretrain.train_and_evaluate(tiny_config.config(steps=8), base)
  sft.train_and_evaluate(tiny_config.sft_config(base, steps=4), sft_dir)
  return sft_dir
