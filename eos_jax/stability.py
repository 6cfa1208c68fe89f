"""The stability criterion of the Edge-of-Stability experiments (Section 6, Figure 9), on engine results.

Works on the per-lane dicts of ``results.json`` that :func:`eos_jax.train.train` writes
(``finite``, ``max_rel_loss_increase``, ``num_loss_increases_1pct_late``,
``max_normalized_sharpness``, ``learning_rate``), so any run of the engine can be judged
with it, in a notebook as well as by ``experiments.eos``.

A lane is *stable* when it stays finite and its training loss never rises by more than
1 % from one step to the next (``max_rel_loss_increase <= 0.01``), over EVERY step:
the statistics are kept inside the compiled scan (:func:`eos_jax.train.stats.update_loss_stats`),
so a logging interval cannot hide a period-2 oscillation. Gradient descent below the
classical bound ``lr < 2 / lambda_max`` decreases the loss monotonically; restrained
instabilities show as spikes and oscillations, and an initial blow-up that later settles
counts as unstable too. Spikes after the first 10 % of the steps are reported separately
(``num_loss_increases_1pct_late``), to tell an initial transient from persistent
oscillations (:func:`regime`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

STABLE_MAX_REL_INCREASE = 0.01  # the stability criterion (see the module docstring)
CRITERION = "stable = finite and the loss never rises by more than 1% from one step to the next (every step, not only logged ones)"


def is_stable(lane: dict[str, Any]) -> bool:
    """The stability criterion of the module docstring for one lane of results.json.

    Examples:
      >>> from eos_jax.stability import is_stable
      >>> is_stable({"finite": True, "max_rel_loss_increase": 0.004})
      True
      >>> is_stable({"finite": True, "max_rel_loss_increase": 0.25})  # a 25 % spike
      False
    """
    return bool(lane["finite"]) and lane["max_rel_loss_increase"] <= STABLE_MAX_REL_INCREASE


def stability_boundary(lanes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Largest stable and smallest unstable learning rate (criterion of the module docstring).

    Examples:
      >>> from eos_jax.stability import stability_boundary
      >>> lanes = [
      ...     {"learning_rate": 0.1, "finite": True, "max_rel_loss_increase": 0.0},
      ...     {"learning_rate": 0.2, "finite": True, "max_rel_loss_increase": 0.3},
      ...     {"learning_rate": 0.4, "finite": False, "max_rel_loss_increase": 0.0},
      ... ]
      >>> b = stability_boundary(lanes)
      >>> b["largest_stable_lr"], b["smallest_unstable_lr"], b["monotone"]
      (0.1, 0.2, True)
    """
    stable = sorted(l["learning_rate"] for l in lanes if is_stable(l))
    unstable = sorted(l["learning_rate"] for l in lanes if not is_stable(l))
    out = {
        "largest_stable_lr": stable[-1] if stable else None,
        "smallest_unstable_lr": unstable[0] if unstable else None,
        "criterion": CRITERION,
    }
    out["monotone"] = not (stable and unstable and unstable[0] < stable[-1])
    return out


EDGE_FRACTION = 0.9  # "at the edge": max lr*lambda_max reached 90 % of the threshold
# A collapse: the loss had left the constant predictor's (at some logged step more than COLLAPSE_LOSS_MARGIN,
# relative, below or above it), and over the last 10 % of the steps it is never more than COLLAPSE_LOSS_MARGIN
# below it again, on a flat landscape: the final lr*lambda_max is below COLLAPSE_FLAT_FRACTION of the threshold
# (or, without tracked sharpness, the loss moved by at most COLLAPSE_LOSS_MARGIN of the constant's over those steps).
COLLAPSE_LOSS_MARGIN = 0.005
COLLAPSE_FLAT_FRACTION = 0.1
REGIMES = ("stable", "restrained", "collapsed", "transient", "stalled", "spikes-off-edge", "divergent")
REGIME_CRITERION = (
    f"collapsed = not stable, the loss left the constant predictor's (by over {COLLAPSE_LOSS_MARGIN:.1%}) and "
    f"returned: over the last 10% of the steps never more than {COLLAPSE_LOSS_MARGIN:.1%} below it, with the final "
    f"lr*lambda_max under {COLLAPSE_FLAT_FRACTION:g}x the threshold (a flat, dead network); "
    "restrained = not stable, loss spikes after the first 10% of the steps, max lr*lambda_max >= "
    f"{EDGE_FRACTION:g}x the threshold and the loss below the constant predictor's"
)


def constant_loss(y: Any, loss: str = "bce", num_classes: int = 2) -> float:
    """The loss of the best constant predictor on labels ``y``: what a collapsed network scores.

    ``"bce"`` (one logit) and ``"ce"`` (softmax): the entropy of the label frequencies
    (``ln 2`` for two balanced classes); ``"mse"`` (Cohen et al.'s squared loss on one-hot
    targets, :func:`eos_jax.losses.mse`): its value at the outputs equal to the frequencies.
    Computed in float64 from the labels.

    Examples:
      >>> from eos_jax.stability import constant_loss
      >>> round(constant_loss([0, 1, 0, 1]), 6), round(constant_loss([0, 0, 0, 1]), 6)  # ln 2, H(1/4)
      (0.693147, 0.562335)
    """
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.bincount(y, minlength=num_classes).astype(np.float64) / y.size
    if loss in ("bce", "ce"):
        nz = p[p > 0]
        return float(-(nz * np.log(nz)).sum())
    if loss == "mse":  # mean_i 0.5 sum_c (p_c - [y_i = c])^2 = 0.5 (1 - sum_c p_c^2)
        return float(0.5 * (1.0 - (p * p).sum()))
    raise ValueError(f"loss={loss!r} is not allowed; choose from bce, ce, mse")


def is_collapsed(lane: dict[str, Any], threshold: float) -> bool:
    """Whether a finite lane collapsed to the constant predictor (see :data:`REGIME_CRITERION`).

    Needs ``constant_loss`` (:func:`constant_loss` of the training labels), ``min_loss`` /
    ``max_loss`` (over the logged steps) and ``tail_loss_min`` / ``tail_loss_max`` (the loss
    over the last 10 % of the steps, :func:`eos_jax.train.stats.lane_summary`) in the lane;
    without them nothing collapses. A network whose units have saturated or died computes a
    constant: its loss sits at (or above) the constant predictor's and its gradient and
    Hessian vanish, so the final ``lr * lambda_max`` is near zero. A network that never left
    the constant predictor's loss (a flat start that learns slowly) has not collapsed.

    Examples:
      >>> from eos_jax.stability import is_collapsed
      >>> dead = {"finite": True, "constant_loss": 0.692, "min_loss": 0.60, "max_loss": 0.75,
      ...         "tail_loss_min": 0.6912, "tail_loss_max": 0.6915, "final_normalized_sharpness": 0.003}
      >>> is_collapsed(dead, 2.0), is_collapsed(dict(dead, tail_loss_min=0.55), 2.0)
      (True, False)
      >>> is_collapsed(dict(dead, min_loss=0.6905, max_loss=0.6931), 2.0)  # never left the constant's loss
      False
    """
    c, lo, hi = lane.get("constant_loss"), lane.get("tail_loss_min"), lane.get("tail_loss_max")
    if not lane.get("finite") or c is None or lo is None or hi is None:
        return False
    mn, mx = lane.get("min_loss"), lane.get("max_loss")
    if mn is None or mx is None or (1.0 - COLLAPSE_LOSS_MARGIN) * c <= mn <= mx <= (1.0 + COLLAPSE_LOSS_MARGIN) * c:
        return False  # never left the constant predictor's loss: nothing to return from
    if lo < (1.0 - COLLAPSE_LOSS_MARGIN) * c:
        return False  # better than any constant: the network still computes something
    ns = lane.get("final_normalized_sharpness")
    if ns is not None:
        return ns < COLLAPSE_FLAT_FRACTION * threshold
    return hi - lo <= COLLAPSE_LOSS_MARGIN * c


def regime(lane: dict[str, Any], threshold: float) -> str:
    """The regime of one lane, from its every-step loss statistics and tracked sharpness.

    * ``divergent``: the loss or parameters became non-finite.
    * ``stable``: the stability criterion (the loss never rises by more than 1 % in a step).
    * ``collapsed``: an instability killed the network (:func:`is_collapsed`: the loss left
      the constant predictor's and came back; over the last 10 % of the steps it is no
      better than the constant predictor's and the landscape is flat): it did not show a
      restrained instability, it died.
    * ``restrained``: loss spikes after the first 10 % of the steps while the normalized
      sharpness reached the edge (max ``lr * lambda_max >= 0.9 * threshold``) and the loss
      stayed below the constant predictor's: the restrained instabilities of Section 6.
    * ``stalled``: late spikes at the edge, but the loss no better than the constant
      predictor's over the last 10 % of the steps (not flat, so not collapsed).
    * ``transient``: spikes only in the first 10 % of the steps, then a monotone descent.
    * ``spikes-off-edge``: late spikes, but the tracked sharpness (sampled every
      ``sharpness_every`` steps, so it can miss a short excursion) stayed below the edge,
      or was not tracked.

    The loss criteria need ``constant_loss`` in the lane (the experiments add it from the
    labels, :func:`constant_loss`); without it no lane is ``collapsed`` or ``stalled``.

    Examples:
      >>> from eos_jax.stability import regime
      >>> lane = {"finite": True, "max_rel_loss_increase": 0.2,
      ...         "num_loss_increases_1pct_late": 7, "max_normalized_sharpness": 1.98}
      >>> regime(lane, threshold=2.0)
      'restrained'
      >>> regime(dict(lane, num_loss_increases_1pct_late=0), threshold=2.0)
      'transient'
      >>> regime(dict(lane, constant_loss=0.692, min_loss=0.61, max_loss=0.74, tail_loss_min=0.6921,
      ...             tail_loss_max=0.6922, final_normalized_sharpness=0.02), threshold=2.0)
      'collapsed'
    """
    if not lane["finite"]:
        return "divergent"
    if is_stable(lane):
        return "stable"
    if is_collapsed(lane, threshold):
        return "collapsed"
    if not lane["num_loss_increases_1pct_late"]:
        return "transient"
    ns = lane.get("max_normalized_sharpness")
    if ns is not None and ns >= EDGE_FRACTION * threshold:
        c, lo = lane.get("constant_loss"), lane.get("tail_loss_min")
        if c is not None and lo is not None and lo >= (1.0 - COLLAPSE_LOSS_MARGIN) * c:
            return "stalled"
        return "restrained"
    return "spikes-off-edge"


def regime_counts(regimes: Sequence[str]) -> dict[str, int]:
    """How many lanes fell in each regime, in :data:`REGIMES` order (regimes seen only).

    Examples:
      >>> from eos_jax.stability import regime_counts
      >>> regime_counts(["restrained", "stable", "restrained", "collapsed"])
      {'stable': 1, 'restrained': 2, 'collapsed': 1}
    """
    return {r: sum(1 for x in regimes if x == r) for r in REGIMES if r in regimes}


def format_counts(counts: dict[str, int], total: int) -> str:
    """``"restrained in 3/5, collapsed in 1/5, stable in 1/5"`` (largest count first).

    Examples:
      >>> from eos_jax.stability import format_counts
      >>> format_counts({"stable": 1, "restrained": 3, "collapsed": 1}, 5)
      'restrained in 3/5, stable in 1/5, collapsed in 1/5'
    """
    order = sorted(counts, key=lambda r: (-counts[r], REGIMES.index(r)))
    return ", ".join(f"{r} in {counts[r]}/{total}" for r in order)


AMPLIFIED_FACTOR = 10.0
# "Amplified to a macroscopic difference": RelL1 to the k = 1 twin of at least this, over 1,600 times float32's
# unit roundoff 2^-24 (a last-bit difference in every weight is a RelL1 of about 6e-8).
AMPLIFIED_REL_L1 = 1e-4


def perturbation_verdict(rel: Any) -> dict[str, Any]:
    """Whether a run amplified or attenuated the last-bit perturbation, from its RelL1 series to k = 1.

    ``rel``: RelL1 of the perturbed (k = 3) lane's weights to its k = 1 twin's, one value per
    step. The run *amplifies* when the largest RelL1 over the last tenth of the steps exceeds
    :data:`AMPLIFIED_FACTOR` times the first nonzero RelL1 (the size of the perturbation when
    it first reached the weights); else it *attenuates* (a RelL1 that stays 0: the lanes never
    differed). Returns the verdict, the first nonzero value and its step, the end value and
    the growth ``end / first``.

    Examples:
      >>> from eos_jax.stability import perturbation_verdict
      >>> v = perturbation_verdict([0, 1e-8, 1e-7, 1e-5, 1e-3, 1e-2, 0.1, 0.5, 1.0, 1.2])
      >>> v["verdict"], v["first_nonzero_step"], round(v["growth"])
      ('amplified', 1, 120000000)
      >>> perturbation_verdict([0.0] * 10)["verdict"]
      'attenuated'
    """
    rel = np.asarray(rel, np.float64)
    nz = np.flatnonzero(rel > 0)
    tail = rel[int(len(rel) * 0.9) :] if len(rel) >= 10 else rel[-1:]
    end = float(np.max(tail)) if len(tail) else 0.0
    if nz.size == 0:
        return {"verdict": "attenuated", "first_nonzero": None, "first_nonzero_step": None, "end": end, "growth": 0.0}
    first = float(rel[nz[0]])
    growth = end / first
    return {
        "verdict": "amplified" if growth > AMPLIFIED_FACTOR else "attenuated",
        "first_nonzero": first,
        "first_nonzero_step": int(nz[0]),
        "end": end,
        "growth": growth,
    }
