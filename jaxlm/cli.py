"""The command line every training binary shares: `--config` (with `--config.a.b=v` overrides)
and `--workdir`."""

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxlm import metrics


def run(train_and_evaluate, default_config: str) -> None:
  """Defines the flags and runs `train_and_evaluate(config, workdir)` as an absl app.

  Flags are defined here, when a binary runs, not at import: other programs (the pipeline,
  tests) import several binaries at once.
  """
  config = config_flags.DEFINE_config_file('config', default_config, 'Path to a config file.')
  workdir = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                                required=True)

  def main(argv):
    del argv
    metrics.configure_logging()
    train_and_evaluate(config.value, workdir.value)

  app.run(main)
