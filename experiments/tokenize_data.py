r"""Tokenizes a pretraining config's documents once, into ArrayRecord shards that pretraining
reads with data.source='tokens' (see jaxlm.data.tokenized for the layout).

  python -m experiments.tokenize_data --config=experiments/configs/tiny.py --out=/tmp/tokens \
      --num_workers=8
  python -m experiments.pretrain --config=experiments/configs/tiny.py --workdir=/tmp/tiny \
      --config.data.source=tokens --config.data.token_dir=/tmp/tokens

The tokenizer is made as pretraining would make it (trained into --out, or the configured one,
copied there). Rerunning resumes: finished shards are kept. On several hosts sharing --out, run
one command per host with --host_index and --num_hosts; host 0 makes the tokenizer and writes
the manifest once every host's shards exist.
"""

import multiprocessing
import os
import time

from absl import flags

from jaxlm import cli
from jaxlm import lm
from jaxlm import metrics
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pipeline
from jaxlm.data import tokenized
from jaxlm.errors import UserError

_TOKENIZER_READY = 'tokenizer.ready'  # host 0 writes it once the tokenizer is in --out
_POLL_SECONDS = 5

# A worker process's documents and tokenizer, opened once by `_open`.
_worker = {}


def _open(data_config, data_dir: str, tokenizer_path: str) -> None:
  _worker['sources'] = dict(zip(tokenized.SPLITS, pipeline.text_sources(data_config, data_dir)))
  _worker['tokenizer'] = tokenizer_lib.load(tokenizer_path)


def _write(task):
  """Tokenizes documents [start, stop) of a split into a shard."""
  path, split, start, stop = task
  documents, tokenizer = _worker['sources'][split], _worker['tokenizer']
  counts = tokenized.write_shard(
      path, (pipeline.document_ids(tokenizer, documents[i]) for i in range(start, stop)))
  return path, counts


def _tokenizer_name(config, out: str, train_docs, host_index: int) -> str:
  """The tokenizer pretraining would use, kept in `out`: its path relative to `out`."""
  ready = os.path.join(out, _TOKENIZER_READY)
  if host_index == 0:
    tokenizer = (lm.start_from_hf(config, out) if config.init_hf
                 else lm.tokenizer_for(config, out, train_docs))
    if not os.path.exists(tokenizer_lib.workdir_path(out)):  # a configured one, from elsewhere
      tokenizer.save(out)
    tokenized.write_json(ready, os.path.basename(tokenizer_lib.workdir_path(out)))
  while not os.path.exists(ready):
    time.sleep(_POLL_SECONDS)
  return os.path.basename(tokenizer_lib.workdir_path(out))


def tokenize(config, out: str, num_workers: int, shard_docs: int, host_index: int = 0,
             num_hosts: int = 1) -> None:
  if config.data.source == 'tokens':
    raise UserError("config.data.source='tokens' is already tokenized; give the config of the "
                    'documents to tokenize')
  if config.data.mixture:
    raise UserError('config.data.mixture: tokenize one source at a time (a mixture is drawn '
                    'from its sources while training)')
  if not 0 <= host_index < num_hosts:
    raise UserError(f'--host_index={host_index} must be in [0, --num_hosts={num_hosts})')
  os.makedirs(out, exist_ok=True)
  data_dir = config.data.data_dir or os.path.join(out, 'tfds')
  sources = dict(zip(tokenized.SPLITS, pipeline.text_sources(config.data, data_dir)))
  tokenizer_name = _tokenizer_name(config, out, sources['train'], host_index)
  paths, tasks = {}, []
  for split, documents in sources.items():
    paths[split] = tokenized.shard_paths(out, split, len(documents), shard_docs)
    tasks += [(path, split, i * shard_docs, min((i + 1) * shard_docs, len(documents)))
              for i, path in enumerate(paths[split])]
  mine = [t for i, t in enumerate(tasks) if i % num_hosts == host_index]
  todo = [t for t in mine if not os.path.exists(t[0])]
  metrics.log(f'{len(tasks)} shards of {shard_docs} documents; this host writes {len(todo)} '
              f'({len(mine) - len(todo)} already done) with {num_workers} workers.')
  began, tokens = time.perf_counter(), 0
  if todo:
    context = multiprocessing.get_context('spawn')  # JAX is not fork-safe
    with context.Pool(num_workers, _open,
                      (config.data, data_dir, os.path.join(out, tokenizer_name))) as pool:
      for done, (path, counts) in enumerate(pool.imap_unordered(_write, todo), 1):
        tokens += counts['tokens']
        rate = tokens / (time.perf_counter() - began)
        metrics.log(f'{done}/{len(todo)} shards: {os.path.relpath(path, out)} '
                    f'({counts["tokens"]:,} tokens); {tokens:,} tokens at {rate:,.0f} tokens/s')
  seconds = time.perf_counter() - began
  metrics.log(f'wrote {tokens:,} tokens in {seconds:.1f} s: {tokens / seconds:,.0f} tokens/s, '
              f'{tokens / seconds / num_workers:,.0f} tokens/s per worker.')
  if host_index == 0:
    _write_manifest(out, tokenizer_name, shard_docs, paths)


def _write_manifest(out: str, tokenizer_name: str, shard_docs: int, paths: dict) -> None:
  """Once every host's shards exist: the tokenizer, shards and counts, for `token_sources`."""
  while not all(os.path.exists(p) for split_paths in paths.values() for p in split_paths):
    metrics.log('waiting for the other hosts\' shards')
    time.sleep(_POLL_SECONDS)
  splits = {}
  for split, split_paths in paths.items():
    counts = [tokenized.shard_counts(p) for p in split_paths]
    splits[split] = {'documents': sum(c['documents'] for c in counts),
                     'tokens': sum(c['tokens'] for c in counts),
                     'shards': [os.path.basename(p) for p in split_paths]}
  tokenizer = tokenizer_lib.load(os.path.join(out, tokenizer_name))
  tokenized.write_json(os.path.join(out, tokenized.MANIFEST), {
      'tokenizer': tokenizer_name, 'vocab_size': tokenizer.vocab_size, 'shard_docs': shard_docs,
      'splits': splits})
  metrics.log(f'{os.path.join(out, tokenized.MANIFEST)}: ' + ', '.join(
      f'{split} {s["documents"]:,} documents, {s["tokens"]:,} tokens'
      for split, s in splits.items()))


def main(argv):
  del argv
  metrics.configure_logging()
  tokenize(cli.config_value(_CONFIG), _OUT.value, _NUM_WORKERS.value, _SHARD_DOCS.value,
           _HOST_INDEX.value, _NUM_HOSTS.value)


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _CONFIG = cli.define_config('experiments/configs/tiny.py')
  _OUT = flags.DEFINE_string('out', None, 'Directory for the tokenizer, shards and manifest.',
                             required=True)
  _NUM_WORKERS = flags.DEFINE_integer('num_workers', os.cpu_count(),
                                      'Tokenizing processes on this host.', lower_bound=1)
  _SHARD_DOCS = flags.DEFINE_integer('shard_docs', 10_000, 'Documents per shard.',
                                     lower_bound=1)
  _HOST_INDEX = flags.DEFINE_integer('host_index', 0, 'This host, from 0; it writes the shards '
                                     'i with i % num_hosts == host_index.', lower_bound=0)
  _NUM_HOSTS = flags.DEFINE_integer('num_hosts', 1, 'Hosts sharing --out.', lower_bound=1)
  cli.start(main)
