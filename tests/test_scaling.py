"""Scaling laws: the fit recovers a known law, the closed-form optimum matches a numeric search,
and a tiny ladder runs end to end."""

import json
import math
import os

import numpy as np
import pytest

from experiments import scaling as scaling_experiment
from experiments.configs import scaling as scaling_config
from jaxlm import scaling

CHINCHILLA = scaling.LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # the paper's fit


def _ladder_points():
  """A 6 x 6 grid over two decades of N and of D, as a real ladder would measure."""
  N, D = np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(1e9, 1e11, 6))
  return N.ravel(), D.ravel()


def test_the_fit_recovers_a_known_law_from_noisy_points():
  N, D = _ladder_points()
  # 0.5% multiplicative noise: the run-to-run spread of final losses at a fixed seed budget.
  L = CHINCHILLA.predict(N, D) * np.exp(np.random.default_rng(0).normal(0, 0.005, N.shape))
  law = scaling.fit_loss_law(N, D, L)
  # Exponents within 0.05 and E within 5%: noise of this size moves them about that much
  # (A and B trade off against the exponents, so they are checked through the predictions).
  assert abs(law.alpha - CHINCHILLA.alpha) < 0.05, law
  assert abs(law.beta - CHINCHILLA.beta) < 0.05, law
  assert abs(law.E - CHINCHILLA.E) < 0.05 * CHINCHILLA.E, law
  np.testing.assert_allclose(law.predict(N, D), CHINCHILLA.predict(N, D), rtol=0.01)


def test_the_fit_is_exact_without_noise():
  N, D = _ladder_points()
  law = scaling.fit_loss_law(N, D, CHINCHILLA.predict(N, D))
  for name in ('E', 'A', 'B', 'alpha', 'beta'):
    assert getattr(law, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-4), name


@pytest.mark.parametrize('flops', [1e18, 5.76e23])  # 5.76e23: Chinchilla's own budget
def test_compute_optimal_matches_a_grid_search_along_the_iso_flop_curve(flops):
  N_opt, D_opt = scaling.compute_optimal(CHINCHILLA, flops)
  N_grid = np.geomspace(1e5, 1e13, 400_001)  # steps of 0.005% in N
  best = N_grid[np.argmin(CHINCHILLA.predict(N_grid, flops / (6 * N_grid)))]
  assert N_opt == pytest.approx(best, rel=1e-4)
  assert 6 * N_opt * D_opt == pytest.approx(flops)


def test_compute_optimal_is_vectorised_over_budgets():
  budgets = np.array([1e18, 1e20, 1e22])
  N_opt, D_opt = scaling.compute_optimal(CHINCHILLA, budgets)
  for budget, n, d in zip(budgets, N_opt, D_opt):
    assert (n, d) == pytest.approx(scaling.compute_optimal(CHINCHILLA, budget))
  # N_opt grows as C^(beta / (alpha + beta)).
  np.testing.assert_allclose(np.diff(np.log(N_opt)) / np.diff(np.log(budgets)),
                             CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta))


def test_the_plot_writes_a_png(tmp_path):
  N, D = _ladder_points()
  runs = [dict(N=n, D=d, L=l) for n, d, l in zip(N, D, CHINCHILLA.predict(N, D))]
  path = tmp_path / 'iso_flops.png'
  scaling.plot_iso_flops(CHINCHILLA, runs, str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert path.stat().st_size > 10_000


def _tiny_ladder():
  c = scaling_config.get_config()
  c.ladder.update(d_models=(16, 32), steps=(4, 8))
  c.data.update(num_train_docs=400, num_validation_docs=40)
  c.tokenizer.update(vocab_size=320, train_docs=400)
  c.train.batch_size = 8
  c.eval.update(batches=1, batch_size=8)
  c.log_every = 4
  c.mesh.num_devices = 1
  return c


def test_a_tiny_ladder_trains_fits_and_reports(tmp_path):
  config, workdir = _tiny_ladder(), str(tmp_path)
  report = scaling_experiment.main(config, workdir)
  with open(tmp_path / 'scaling.json') as f:
    assert json.load(f) == report
  assert [r['name'] for r in report['runs']] == ['d16_4', 'd16_8', 'd32_4', 'd32_8']
  for run in report['runs']:
    assert math.isfinite(run['L']) and run['wall_seconds'] > 0
    assert run['D'] == run['steps'] * 8 * 64
  assert report['runs'][0]['N'] < report['runs'][2]['N']
  assert (tmp_path / 'iso_flops.png').stat().st_size > 0
  assert os.path.exists(tmp_path / 'tokenizer.model')
  assert not os.path.exists(tmp_path / 'runs' / 'd16_4' / 'tokenizer.model')
  optimum = report['compute_optimal']
  assert 6 * optimum['N'] * optimum['D'] == pytest.approx(config.budget_flops)

  # A rerun reuses every finished run instead of training it again.
  (tmp_path / 'scaling.json').unlink()
  assert scaling_experiment.main(config, workdir)['runs'] == report['runs']


def test_a_width_that_does_not_split_into_heads_fails_before_training(tmp_path):
  config = _tiny_ladder()
  config.ladder.d_models = (24,)
  with pytest.raises(ValueError, match='config.ladder.d_models: 24 is not a multiple of '
                                       r'config.model.head_dim \(16\)'):
    scaling_experiment.main(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_a_diverged_run_is_named_rather_than_fitted():
  N, D = _ladder_points()
  L = CHINCHILLA.predict(N, D)
  L[3] = np.nan
  with pytest.raises(ValueError, match='every loss must be finite'):
    scaling.fit_loss_law(N, D, L)
