"""Compute-optimal scaling (Hoffmann et al. 2022, "Chinchilla", approach 3).

Fit L(N, D) = E + A / N^alpha + B / D^beta to the final losses of a ladder of runs (N parameters,
D training tokens), then split a FLOP budget C = 6 N D between N and D where the fitted law is
lowest.
"""

import dataclasses
import itertools

import numpy as np
from scipy import optimize
from scipy import special

# The paper's Huber threshold on log-loss residuals: a few outlying runs (a diverged or badly
# tuned one) pull the fit far less than under squared error.
HUBER_DELTA = 1e-3


@dataclasses.dataclass(frozen=True)
class LossLaw:
  E: float  # the irreducible loss: what infinitely large models on infinite data reach
  A: float
  B: float
  alpha: float  # how fast the loss falls with parameters
  beta: float  # how fast the loss falls with tokens

  def predict(self, N, D):
    N, D = np.asarray(N, float), np.asarray(D, float)
    return self.E + self.A / N**self.alpha + self.B / D**self.beta


def _log_loss(thetas_Kx5, log_N, log_D):
  """log L for each of K parameter vectors (a, b, e, alpha, beta) at every point, [K, points],
  and the three log-terms, [K, points, 3].

  In log space the law is a log-sum-exp of three terms, with A = e^a, B = e^b and E = e^e, which
  keeps A, B and E positive and the terms' scales comparable for the optimiser.
  """
  a, b, e, alpha, beta = (thetas_Kx5[:, i, None] for i in range(5))
  terms_KxPx3 = np.stack(np.broadcast_arrays(a - alpha * log_N, b - beta * log_D, e), axis=-1)
  return special.logsumexp(terms_KxPx3, axis=-1), terms_KxPx3


def _huber(residuals, delta=HUBER_DELTA):
  small = np.abs(residuals) <= delta
  return np.where(small, 0.5 * residuals**2, delta * (np.abs(residuals) - 0.5 * delta))


def fit_loss_law(N, D, L) -> LossLaw:
  """Fits the law to measured (parameters, tokens, loss) points.

  As in the paper: the Huber loss of log-loss residuals is scored on a grid of starting points,
  and the best few are refined with a robust least-squares solver (the objective has many local
  minima when the points are few). Exponents are kept non-negative.
  """
  log_N, log_D, log_L = (np.log(np.asarray(x, float)) for x in (N, D, L))
  if not (log_N.shape == log_D.shape == log_L.shape and log_N.ndim == 1):
    raise ValueError(f'N, D and L must be 1-D and of one length, got shapes {log_N.shape}, '
                     f'{log_D.shape} and {log_L.shape}')
  if not np.all(np.isfinite(log_L)):
    raise ValueError(f'every loss must be finite and positive (did a run diverge?), got {L}')
  # The paper's grid of (a, b, e, alpha, beta) starting points.
  grid_Kx5 = np.array(list(itertools.product(
      np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
      np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))), float)
  predicted_KxP, _ = _log_loss(grid_Kx5, log_N, log_D)
  scores = _huber(predicted_KxP - log_L).sum(axis=1)
  starts = grid_Kx5[np.argsort(scores)[:16]]

  def residuals(theta):
    log_l, _ = _log_loss(theta[None], log_N, log_D)
    return log_l[0] - log_L

  def jacobian(theta):
    log_l, terms = _log_loss(theta[None], log_N, log_D)
    weights = np.exp(terms[0] - log_l[0][:, None])  # softmax: d logsumexp / d term
    return np.stack([weights[:, 0], weights[:, 1], weights[:, 2],
                     -weights[:, 0] * log_N, -weights[:, 1] * log_D], axis=1)

  lower = [-np.inf, -np.inf, -np.inf, 0.0, 0.0]
  fits = [optimize.least_squares(residuals, start, jac=jacobian, bounds=(lower, np.inf),
                                 loss='huber', f_scale=HUBER_DELTA, method='trf',
                                 x_scale='jac', xtol=1e-12, ftol=1e-12, gtol=1e-12)
          for start in starts]
  a, b, e, alpha, beta = min(fits, key=lambda f: f.cost).x
  return LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
                 alpha=float(alpha), beta=float(beta))


def compute_optimal(law: LossLaw, flops):
  """(N_opt, D_opt) minimising the law under C = 6 N D, for a budget or an array of them.

  Setting dL/dN = 0 along D = C / (6 N) gives N_opt = G (C/6)^(beta / (alpha + beta)) with
  G = (alpha A / (beta B))^(1 / (alpha + beta)).
  """
  flops = np.asarray(flops, float)
  G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
  N_opt = G * (flops / 6) ** (law.beta / (law.alpha + law.beta))
  return N_opt, flops / (6 * N_opt)


def plot_iso_flops(law: LossLaw, runs, path: str) -> None:
  """Writes a PNG of the fitted loss against N along each run's iso-FLOP curve (D = C / 6N),
  with the measured runs as points on their curves and each curve's optimum as a star.

  `runs`: mappings with 'N', 'D' and 'L' (measured loss); a run's budget is C = 6 N D.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display on a server or TPU VM
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  N, D, L = (np.array([run[k] for run in runs], float) for k in ('N', 'D', 'L'))
  run_budgets = np.array([float(f'{c:.3g}') for c in 6 * N * D])  # equal budgets share a curve
  budgets = np.unique(run_budgets)
  N_opt, D_opt = compute_optimal(law, budgets)
  L_opt = law.predict(N_opt, D_opt)
  # Wide enough to show each curve's minimum even when it lies outside the measured sizes.
  N_grid = np.geomspace(min(N.min(), N_opt.min()) / 3, max(N.max(), N_opt.max()) * 3, 200)
  figure, axes = plt.subplots(figsize=(8, 5.5))
  for budget, n_opt, l_opt, color in zip(budgets, N_opt, L_opt,
                                         plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))):
    axes.plot(N_grid, law.predict(N_grid, budget / (6 * N_grid)), color=color,
              label=f'C = {budget:.3g}')
    axes.plot(n_opt, l_opt, '*', color=color, markersize=14, markeredgecolor='black')
    on_curve = run_budgets == budget
    axes.scatter(N[on_curve], L[on_curve], color=color, edgecolors='black', zorder=3)
  axes.set(xscale='log', xlabel='non-embedding parameters N', ylabel='loss')
  axes.set_title(f'iso-FLOP curves of L = {law.E:.3g} + {law.A:.3g} / N^{law.alpha:.3g} + '
                 f'{law.B:.3g} / D^{law.beta:.3g}\n(points: measured runs; stars: optima)',
                 fontsize='medium')
  # The far ends of the curves (tiny N, tiny D) shoot up; keep the measured region in view.
  low, high = min(L.min(), L_opt.min()), L.max()
  axes.set_ylim(low - 0.1 * (high - low), high + 0.4 * (high - low))
  axes.legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
