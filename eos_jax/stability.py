"""The stability criterion of the Edge-of-Stability experiments (Section 6, Figure 9), on engine results.

Works on the per-lane dicts of ``results.json`` that :func:`eos_jax.train.train` writes
(``finite``, ``max_rel_loss_increase``, ``num_loss_increases_1pct_late``,
``max_normalized_sharpness``, ``learning_rate``), so any run of the engine can be judged
with it, in a notebook as well as by ``experiments.eos``.

A lane is *stable* when it stays finite and its training loss never rises by more than
1 % from one step to the next (``max_rel_loss_increase <= 0.01``), over EVERY step:
the statistics are kept inside the compiled scan (:func:`eos_jax.train.update_loss_stats`),
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

STABLE_MAX_REL_INCREASE = 0.01  # the stability criterion (see the module docstring)
CRITERION = "stable = finite and the loss never rises by more than 1% from one step to the next (every step, not only logged ones)"


def is_stable(lane: dict[str, Any]) -> bool:
    """The stability criterion of the module docstring for one lane of results.json.

    Example:
      >>> from eos_jax.stability import is_stable
      >>> is_stable({"finite": True, "max_rel_loss_increase": 0.004})
      True
      >>> is_stable({"finite": True, "max_rel_loss_increase": 0.25})  # a 25 % spike
      False
    """
    return bool(lane["finite"]) and lane["max_rel_loss_increase"] <= STABLE_MAX_REL_INCREASE


def stability_boundary(lanes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Largest stable and smallest unstable learning rate (criterion of the module docstring).

    Example:
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


def regime(lane: dict[str, Any], threshold: float) -> str:
    """The regime of one lane, from its every-step loss statistics and tracked sharpness.

    * ``divergent``: the loss or parameters became non-finite.
    * ``stable``: the stability criterion (the loss never rises by more than 1 % in a step).
    * ``restrained``: loss spikes after the first 10 % of the steps while the normalized
      sharpness reached the edge (max ``lr * lambda_max >= 0.9 * threshold``): the
      restrained instabilities of Section 6.
    * ``transient``: spikes only in the first 10 % of the steps, then a monotone descent.
    * ``spikes-off-edge``: late spikes, but the tracked sharpness (sampled every
      ``sharpness_every`` steps, so it can miss a short excursion) stayed below the edge,
      or was not tracked.

    Example:
      >>> from eos_jax.stability import regime
      >>> lane = {"finite": True, "max_rel_loss_increase": 0.2,
      ...         "num_loss_increases_1pct_late": 7, "max_normalized_sharpness": 1.98}
      >>> regime(lane, threshold=2.0)
      'restrained'
      >>> regime(dict(lane, num_loss_increases_1pct_late=0), threshold=2.0)
      'transient'
    """
    if not lane["finite"]:
        return "divergent"
    if is_stable(lane):
        return "stable"
    if not lane["num_loss_increases_1pct_late"]:
        return "transient"
    ns = lane.get("max_normalized_sharpness")
    if ns is not None and ns >= EDGE_FRACTION * threshold:
        return "restrained"
    return "spikes-off-edge"
