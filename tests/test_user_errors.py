"""A user's mistake ends every binary within seconds with one line, `error: ...`, that names the
field, file or value, and exit status 2; never a traceback.

Each case is a real process running the binary as `python -m` would. They all fail before anything
trains, so the selected cases run two at a time in one module fixture, forked by `tests.zygote`
from a process that has imported the libraries once, and each test checks its own result.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments import pipeline
from experiments.configs import pipeline as pipeline_config
from jaxlm import configs
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60  # seconds; a case fails before training, in a few
WORKDIR_BINARIES = ('pretrain', 'sft', 'reward_model', 'rl', 'dpo', 'pipeline', 'scaling')


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  binary: str
  args: tuple[str, ...]
  culprit: str = ''  # a regex the error line must match

  def argv(self, paths: dict[str, str]) -> list[str]:
    args = [a.format(**paths) for a in self.args]
    if self.binary in WORKDIR_BINARIES and not any(a.startswith('--workdir') for a in args):
      args.append(f'--workdir={paths["tmp"]}/runs/{self.name}')
    return ['-m', f'experiments.{self.binary}', *args]


def case(name, binary, culprit, *args):
  return pytest.param(Case(name, binary, args, culprit), id=name)


# {base}: a jaxlm workdir (config.json, tokenizer and an empty checkpoint step);
# {no_checkpoint}: one without checkpoints; {garbage_tokenizer}, {empty_tokenizer}: with a broken
# tokenizer.model; {empty_dir}: an empty directory; {missing}: a path that does not exist. See
# `paths` below.
JSONL = '--config.data.source=jsonl'
CASES = [
    # Flags and config files, shared by every binary through jaxlm.cli.
    case('unknown_field', 'pretrain', r'--config\.no_such_field\b.*no_such_field',
         '--config.no_such_field=1'),
    case('unknown_section', 'pretrain', r'optimizer', '--config.optimizer.lr=1'),
    case('field_typo', 'pretrain', r'stepz', '--config.train.stepz=3'),
    case('value_of_wrong_type', 'pretrain', r'train\.steps.*abc', '--config.train.steps=abc'),
    case('unknown_flag', 'pretrain', r'no_such_flag', '--no_such_flag=1'),
    case('missing_config_file', 'pretrain', r'missing\.py', '--config=missing.py'),
    case('config_syntax_error', 'pretrain', r'syntax_error\.py:2', '--config={syntax_error}'),
    case('config_get_config_raises', 'pretrain', r'raises\.py:4.*no ladder', '--config={raises}'),
    # Values configs.validate checks.
    case('char_tokenizer_vocab_100', 'pretrain', r'config\.tokenizer\.vocab_size.*100',
         '--config.tokenizer.type=char', '--config.tokenizer.vocab_size=100'),
    case('bad_remat', 'pretrain', r'config\.model\.remat.*bogus', '--config.model.remat=bogus'),
    case('bad_data_source', 'pretrain', r'config\.data\.source.*nope',
         '--config.data.source=nope'),
    case('zero_steps', 'pretrain', r'config\.train\.steps must be positive',
         '--config.train.steps=0'),
    case('negative_batch_size', 'pretrain', r'config\.train\.batch_size must be positive.*-1',
         '--config.train.batch_size=-1'),
    case('batch_not_divisible_by_grad_accum', 'pretrain', r'batch_size \(32\).*grad_accum_steps',
         '--config.train.grad_accum_steps=5'),
    case('min_lr_ratio_above_1', 'pretrain', r'config\.train\.min_lr_ratio.*1\.5',
         '--config.train.min_lr_ratio=1.5'),
    case('heads_not_multiple_of_kv_heads', 'pretrain', r'num_heads \(4\).*num_kv_heads \(3\)',
         '--config.model.num_kv_heads=3'),
    case('seq_len_over_max_seq_len', 'pretrain', r'seq_len \(4096\).*max_seq_len',
         '--config.data.seq_len=4096'),
    # conftest.py gives every process 8 CPU devices.
    case('mesh_axis_not_dividing_devices', 'pretrain', r'config\.mesh.*8 devices',
         '--config.mesh.tensor=3'),
    case('batch_not_divisible_by_mesh', 'pretrain',
         r'config\.train\.batch_size \(12\).*data x fsdp', '--config.train.batch_size=12'),
    # Data and tokenizer files.
    case('text_glob_matches_nothing', 'pretrain', r'config\.data\.text_glob.*nothing_here',
         '--config.data.source=text', '--config.data.text_glob={missing}/nothing_here/*.txt'),
    case('parquet_glob_matches_nothing', 'pretrain', r'config\.data\.files.*nothing_here',
         '--config.data.source=parquet', '--config.data.files={missing}/nothing_here/*.parquet'),
    case('parquet_column_missing', 'pretrain', r"no_body\.parquet has no column 'body'.*'text'",
         '--config.data.source=parquet', '--config.data.files={no_body}',
         '--config.data.text_field=body'),
    case('jsonl_files_unset', 'pretrain', r'config\.data\.files must be set',
         '--config.data.source=jsonl'),
    case('mixture_weight_not_positive', 'pretrain',
         r'config\.data\.mixture\[1\]\.weight must be a positive number, got 0',
         "--config.data.mixture=({{'source': 'world', 'weight': 1}}, {{'source': 'world', "
         "'weight': 0}})"),  # braces doubled: case arguments are format strings
    case('tfds_dataset_not_prepared', 'pretrain', r'no_such_dataset',
         '--config.data.source=tfds', '--config.data.tfds_name=no_such_dataset'),
    case('tokenizer_path_missing', 'pretrain', r'config\.tokenizer\.path.*missing/tokenizer',
         '--config.tokenizer.path={missing}/tokenizer.model'),
    # Post-training: where a stage starts from, and its data.
    case('sft_without_init_workdir', 'sft', r'config\.init_workdir'),
    case('sft_init_workdir_missing', 'sft', r'no such directory: .*/missing',
         '--config.init_workdir={missing}'),
    case('sft_init_workdir_not_a_workdir', 'sft', r'config\.json in .*/empty_dir',
         '--config.init_workdir={empty_dir}'),
    case('sft_init_workdir_without_checkpoint', 'sft', r'init_workdir=.*/no_checkpoint has no',
         '--config.init_workdir={no_checkpoint}'),
    case('sft_garbage_tokenizer', 'sft', r'garbage_tokenizer/tokenizer\.model',
         '--config.init_workdir={garbage_tokenizer}'),
    case('sft_empty_tokenizer', 'sft', r'empty_tokenizer/tokenizer\.model',
         '--config.init_workdir={empty_tokenizer}'),
    case('sft_jsonl_invalid_json', 'sft', r'bad_json\.jsonl:3', JSONL,
         '--config.init_workdir={base}', '--config.data.jsonl_train={bad_json}'),
    case('sft_unknown_share_out_of_range', 'sft',
         r'config\.data\.unknown_share must be in \[0, 1\)', '--config.init_workdir={base}',
         '--config.data.unknown_share=-0.1'),
    case('sft_jsonl_record_missing_fields', 'sft', r'missing_fields\.jsonl:1.*response',
         JSONL, '--config.init_workdir={base}', '--config.data.jsonl_train={missing_fields}'),
    case('reward_model_jsonl_missing_chosen', 'reward_model',
         r'missing_fields\.jsonl:1.*chosen', JSONL, '--config.init_workdir={base}',
         '--config.data.jsonl_train={missing_fields}'),
    case('reward_model_score_file_missing', 'reward_model', r'missing/score\.jsonl',
         '--score={missing}/score.jsonl'),
    case('rl_init_workdir_missing', 'rl', r'no such directory: .*/missing',
         '--config.init_workdir={missing}'),
    case('rl_reward_model_without_workdir', 'rl', r'config\.reward_workdir',
         '--config.init_workdir={base}', '--config.reward=model'),
    case('rl_temperature_not_1', 'rl', r'config\.rollout\.temperature',
         '--config.init_workdir={base}', '--config.rollout.temperature=0.7'),
    case('rl_grpo_one_sample', 'rl', r'config\.rollout\.samples_per_prompt',
         '--config.init_workdir={base}', '--config.rollout.samples_per_prompt=1'),
    case('rl_rows_not_divisible_by_minibatches', 'rl', r'\(128\).*config\.minibatches \(3\)',
         '--config.init_workdir={base}', '--config.minibatches=3'),
    case('rl_unknown_share_out_of_range', 'rl', r'config\.data\.unknown_share must be in \[0, 1\)',
         '--config.init_workdir={base}', '--config.data.unknown_share=1.5'),
    case('rl_unknown_people_for_jsonl', 'rl', r'extra_unknown_people.*source is .jsonl.',
         '--config.init_workdir={base}', '--config.data.source=jsonl',
         '--config.data.jsonl_train={missing_fields}', '--config.data.extra_unknown_people=10'),
    case('reward_model_negative_unknown_people', 'reward_model',
         r'config\.data\.extra_unknown_people must be >= 0', '--config.init_workdir={base}',
         '--config.data.extra_unknown_people=-1'),
    case('dpo_unknown_share_out_of_range', 'dpo',
         r'config\.data\.unknown_share must be in \[0, 1\)', '--config.init_workdir={base}',
         '--config.data.unknown_share=1.5'),
    case('dpo_grad_accum', 'dpo', r'config\.train\.grad_accum_steps must be 1',
         '--config.init_workdir={base}', '--config.train.grad_accum_steps=2'),
    case('dpo_init_workdir_not_a_workdir', 'dpo', r'config\.json in .*/empty_dir',
         '--config.init_workdir={empty_dir}'),
    case('dpo_jsonl_file_missing', 'dpo', r'missing/train\.jsonl', JSONL,
         '--config.init_workdir={base}', '--config.data.jsonl_train={missing}/train.jsonl'),
    # Binaries that read a finished workdir.
    case('generate_missing_workdir', 'generate', r'no such directory: .*/missing',
         '--workdir={missing}'),
    case('generate_empty_workdir', 'generate', r'config\.json in .*/empty_dir',
         '--workdir={empty_dir}'),
    case('generate_no_checkpoint', 'generate', r'no_checkpoint/checkpoints',
         '--workdir={no_checkpoint}'),
    case('generate_negative_max_tokens', 'generate', r'--max_tokens=-1', '--workdir={base}',
         '--max_tokens=-1'),
    case('export_hf_missing_workdir', 'export_hf', r'no such directory: .*/missing',
         '--workdir={missing}', '--out={tmp}/exported'),
    case('export_hf_without_out', 'export_hf', r'--out', '--workdir={base}'),
    # The other binaries.
    case('scaling_zero_budget', 'scaling', r'config\.budget_flops must be positive',
         '--config.budget_flops=0'),
    case('tokenize_data_without_out', 'tokenize_data', r'--out'),
    case('tokenize_data_of_a_mixture', 'tokenize_data', r'config\.data\.mixture: tokenize one',
         '--out={missing}/tokens',
         "--config.data.mixture=({{'source': 'world', 'weight': 1}},)"),
    case('training_on_unfinished_tokens', 'pretrain', r'tokenized\.json.*tokenize_data',
         '--config.data.source=tokens', '--config.data.token_dir={empty_dir}'),
    case('benchmark_bad_override', 'benchmark', r'stepz', '--config.train.stepz=1'),
    case('benchmark_zero_steps', 'benchmark', r'--steps=0', '--steps=0'),
    case('benchmark_bad_compare', 'benchmark', r"scan_layerz=false' is not an override",
         '--compare=model.scan_layerz=false'),
    case('benchmark_bad_generate', 'benchmark', r'--generate=128,48: expected ROWS',
         '--generate=128,48'),
    case('benchmark_hf_load_without_dir', 'benchmark_hf_load', r'--dir'),
    case('pipeline_bad_override', 'pipeline', r'stepz', '--config.sft.train.stepz=1'),
    # Checked before pretraining starts, not when the stage does.
    case('pipeline_stage_zero_steps', 'pipeline',
         r'config\.sft: config\.train\.steps must be positive', '--config.sft.train.steps=0'),
    case('pipeline_stage_bad_temperature', 'pipeline',
         r'config\.grpo: config\.rollout\.temperature must be 1',
         '--config.grpo.rollout.temperature=0.5'),
]

HELP = [  # binary, the flags its --help must list
    ('pretrain', ('--config', '--workdir')), ('sft', ('--config', '--workdir')),
    ('reward_model', ('--config', '--workdir', '--score')), ('rl', ('--config', '--workdir')),
    ('dpo', ('--config', '--workdir')), ('pipeline', ('--config', '--workdir')),
    ('scaling', ('--config', '--workdir')), ('benchmark', ('--config', '--steps', '--compare', '--generate')),
    ('generate', ('--workdir', '--prompt')), ('export_hf', ('--workdir', '--out')),
    ('benchmark_hf_load', ('--config', '--dir')), ('benchmark_checkpoint', ('--config', '--dir')),
    ('tokenize_data', ('--config', '--out', '--num_workers')),
    ('evaluate', ('--workdir', '--tasks', '--include_path')),
    ('chat', ('--workdir', '--temperature', '--max_tokens')),
    ('serve', ('--workdir', '--port', '--max_batch', '--max_queue')),
]
HELP_CASES = [pytest.param(Case(f'help_{binary}', binary, ('--help',)), expected, id=binary)
              for binary, expected in HELP]


@pytest.fixture(scope='module')
def paths(tmp_path_factory, tokenizer):
  tmp = tmp_path_factory.mktemp('user_errors')
  no_checkpoint = tmp / 'no_checkpoint'
  configs.save(tiny_config.config(), str(no_checkpoint))
  shutil.copy(tokenizer.path, no_checkpoint / 'tokenizer.model')
  base = tmp / 'base'
  shutil.copytree(no_checkpoint, base)
  # An empty step, so that a stage starts from it: no case gets as far as reading it.
  (base / 'checkpoints' / '1').mkdir(parents=True)
  for name, content in (('garbage_tokenizer', b'not a SentencePiece model\n' * 10),
                        ('empty_tokenizer', b'')):
    shutil.copytree(base, tmp / name)
    (tmp / name / 'tokenizer.model').write_bytes(content)
  (tmp / 'empty_dir').mkdir()
  (tmp / 'syntax_error.py').write_text('def get_config():\n  return {\n')
  (tmp / 'raises.py').write_text('"""A config that fails."""\n\ndef get_config():\n'
                                 '  raise KeyError("no ladder")\n')
  (tmp / 'bad_json.jsonl').write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a",\n')
  (tmp / 'missing_fields.jsonl').write_text('{"prompt": "a"}\n')
  pq.write_table(pa.table({'text': ['a document']}), tmp / 'no_body.parquet')
  named = {'base', 'no_checkpoint', 'garbage_tokenizer', 'empty_tokenizer', 'empty_dir'}
  return {'tmp': str(tmp), 'missing': str(tmp / 'missing'),
          **{name: str(tmp / name) for name in named},
          **{name: str(tmp / f'{name}.py') for name in ('syntax_error', 'raises')},
          **{name: str(tmp / f'{name}.jsonl') for name in ('bad_json', 'missing_fields')},
          'no_body': str(tmp / 'no_body.parquet')}


@dataclasses.dataclass
class Result:
  returncode: int | None  # None: timed out
  stdout: str
  stderr: str
  seconds: float


@pytest.fixture(scope='module')
def results(request, paths, tmp_path_factory) -> dict[str, Result]:
  """Every selected case of this module, run two at a time (the machine's cores)."""
  selected = list(dict.fromkeys(item.callspec.params['case'] for item in request.session.items
                                if item.module is sys.modules[__name__]
                                and hasattr(item, 'callspec')))
  outputs = tmp_path_factory.mktemp('outputs')
  jobs = [{'argv': c.argv(paths), 'stdout': str(outputs / f'{c.name}.out'),
           'stderr': str(outputs / f'{c.name}.err')} for c in selected]
  done = subprocess.run([sys.executable, '-m', 'tests.zygote', '--parallel=2',
                         f'--timeout={TIMEOUT}'], input=json.dumps(jobs), cwd=ROOT,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  read = lambda path: pathlib.Path(path).read_text(errors='replace')
  return {c.name: Result(ran['returncode'], read(job['stdout']), read(job['stderr']),
                         ran['seconds'])
          for c, job, ran in zip(selected, jobs, json.loads(done.stdout))}


def _describe(c: Case, result: Result, paths) -> str:
  return (f'{" ".join(c.argv(paths))}\nexit {result.returncode} after {result.seconds:.1f}s'
          f'\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}')


@pytest.mark.parametrize('case', CASES)
def test_user_error_is_one_line_naming_the_culprit(case, results, paths):
  result = results[case.name]
  described = _describe(case, result, paths)
  assert result.returncode == 2, described
  assert 'Traceback' not in result.stdout + result.stderr, described
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), described
  assert re.search(case.culprit, lines[0]), f'{case.culprit!r} not in the error\n{described}'


@pytest.mark.parametrize('case, expected', HELP_CASES)
def test_help_lists_the_flags(case, expected, results, paths):
  result = results[case.name]
  described = _describe(case, result, paths)
  assert result.returncode == 0 and 'Traceback' not in result.stdout + result.stderr, described
  for flag in expected:
    assert re.search(f'^  {flag}[:=]', result.stdout, re.MULTILINE), f'{flag}\n{described}'


def test_the_pipeline_config_passes_the_checks_made_before_pretraining(tmp_path):
  pipeline.validate(pipeline_config.get_config(), str(tmp_path))
