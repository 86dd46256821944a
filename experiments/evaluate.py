r"""Evaluates a workdir's newest checkpoint with EleutherAI's lm-evaluation-harness
(`pip install -e '.[eval]'`).

  python -m experiments.evaluate --workdir=runs/pipeline/sft --tasks=jaxlm_world \
      --apply_chat_template --output=results.json
  python -m experiments.evaluate --workdir=runs/tiny --tasks=lambada_openai --limit=100
  python -m experiments.evaluate --workdir=runs/pipeline/sft --export_world_task=tasks/world

Tasks are the harness's (downloaded through its usual path) or YAML files under
--include_path. `jaxlm_world`, the built-in world's held-out questions scored as the pipeline
scores them, is written for the workdir's world whenever it is asked for;
--export_world_task only writes it, for other harness runs.
"""

import json
import os
import tempfile

from absl import flags

from jaxlm import cli
from jaxlm import configs
from jaxlm import metrics
from jaxlm.errors import UserError


def main(argv):
  del argv
  metrics.configure_logging()
  try:
    import lm_eval  # pylint: disable=g-import-not-at-top
    from lm_eval import tasks as lm_eval_tasks  # pylint: disable=g-import-not-at-top
    from lm_eval import utils as lm_eval_utils  # pylint: disable=g-import-not-at-top
    from jaxlm import evaluation  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"the evaluation needs lm-evaluation-harness: pip install -e '.[eval]' "
                    f'({e})') from e
  world_seed = configs.load(_WORKDIR.value).data.get('world_seed', 0)
  if _EXPORT.value:
    print(evaluation.export_world_task(_EXPORT.value, world_seed))
    return
  tasks = [t for t in _TASKS.value or [] if t]
  if not tasks:
    raise UserError('--tasks: name at least one task, e.g. --tasks=jaxlm_world')
  if evaluation.WORLD_TASK in tasks and not _CHAT.value:
    raise UserError(f'--tasks={evaluation.WORLD_TASK} asks questions of a chat model: add '
                    '--apply_chat_template')
  if _INCLUDE.value and not os.path.isdir(_INCLUDE.value):
    raise UserError(f'--include_path={_INCLUDE.value}: no such directory')
  with tempfile.TemporaryDirectory() as world_dir:
    include = [world_dir] + ([_INCLUDE.value] if _INCLUDE.value else [])  # later ones override
    if evaluation.WORLD_TASK in tasks:
      evaluation.export_world_task(world_dir, world_seed)
    task_manager = lm_eval_tasks.TaskManager(include_path=include)
    unknown = [t for t in tasks if not task_manager.match_tasks([t])]
    if unknown:
      raise UserError(f'--tasks: no harness task or local task file named {unknown[0]!r} '
                      '(`lm_eval ls tasks` lists them; --include_path adds local YAML files)')
    model = evaluation.JaxlmLM(_WORKDIR.value, batch_size=_BATCH_SIZE.value or None)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=task_manager, limit=_LIMIT.value,
        apply_chat_template=_CHAT.value, log_samples=False)
  print(lm_eval_utils.make_table(results))
  if results.get('groups'):
    print(lm_eval_utils.make_table(results, 'groups'))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2, default=lm_eval_utils.handle_non_serializable)
    print(f'(also in {_OUTPUT.value})')


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'The jaxlm workdir to evaluate.',
                                 required=True)
  _TASKS = flags.DEFINE_list('tasks', [], 'Harness task names, comma-separated.')
  _INCLUDE = flags.DEFINE_string('include_path', '', 'A directory of local task YAML files.')
  _LIMIT = flags.DEFINE_integer('limit', None, 'Documents per task (all by default).',
                                lower_bound=1)
  _BATCH_SIZE = flags.DEFINE_integer(
      'batch_size', 0, "Rows per compiled batch; 0: the workdir's eval.batch_size_generation "
      '(else 32).', lower_bound=0)
  _CHAT = flags.DEFINE_bool('apply_chat_template', False,
                            'Render prompts in the chat template the model was trained with.')
  _OUTPUT = flags.DEFINE_string('output', '', 'Write the results JSON here.')
  _EXPORT = flags.DEFINE_string(
      'export_world_task', '', 'Only write the task jaxlm_world (YAML, questions, metric) for '
      "the workdir's world into this directory.")
  cli.start(main)
