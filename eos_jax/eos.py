"""The Edge-of-Stability experiments of Section 6 (Figures 7, 8 and 9) on the training engine.

:class:`EosConfig` is the whole configuration of a run (it is what ``config.json``
holds); :func:`run` loads the data (with a visible fallback when the requested files
are absent), builds the model, loss and optimizer, trains every lane of the sweep
with :func:`eos_jax.train.train`, and writes ``metadata.json``, the plot ``eos.png``
and a printed summary. :data:`PRESETS` and :func:`run_preset` reproduce the paper's
figures as several runs in one directory, each printing what it found.

Stability criterion (Figure 9, and the "stable" column printed by every preset): a
lane is *stable* when it stays finite and its training loss never rises by more than
1 % from one logged step to the next (``max_rel_loss_increase <= 0.01``). Gradient
descent below the classical bound ``lr < 2 / lambda_max`` decreases the loss
monotonically; restrained instabilities show as spikes and oscillations, and an
initial blow-up that later settles counts as unstable too. Spikes after the first
10 % of the steps are reported separately (``num_loss_increases_1pct_late``), to tell
an initial transient from persistent oscillations.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax import io as eio
from eos_jax.errors import ConfigError, RunDirError

MODELS = ("cnn", "fc")
LOSSES = ("ce", "mse")
# Fallback chains when --dataset is not given: the paper's data first, then real data
# that is on this machine, then the Fashion-MNIST 0/1 subset shipped with the package (so
# the main job runs on a fresh machine, on 2000 real 28x28 images), scikit-learn's digits
# last (only if the package data is missing). Never silently: a warning names what was used.
# fc (Figure 8, CIFAR-5k, 10 classes): the bundled subset comes before digits01 too: both
# are binary stand-ins, but it is real 28x28 data, 2000 examples against 288 8x8 ones.
DEFAULT_DATASETS = {
    "cnn": ("mnist01", "fashion_mnist01", "fashion_mnist01_bundled", "digits01"),
    "fc": ("cifar10_5k", "fashion_mnist", "mnist", "fashion_mnist01_bundled", "digits01"),
}
STABLE_MAX_REL_INCREASE = 0.01  # the stability criterion (module docstring)
CRITERION = "stable = finite and the loss never rises by more than 1% between consecutive logged steps"


@dataclasses.dataclass(frozen=True)
class EosConfig:
    """One Edge-of-Stability run: a sweep over the product of the list fields.

    Attributes:
      model: ``"cnn"`` (the paper's single-channel 3x3 CNN, Eq. (20)-(21)) or ``"fc"``.
      layers: convolution layers (cnn) or hidden layers (fc).
      width: hidden units per layer (fc).
      activation: ``"swish"`` (cnn default, beta below) or ``"tanh"`` (fc default), or ``"relu"``.
      beta: Swish parameter.
      conv_impl: convolution of the cnn (see :func:`eos_jax.models.get`); ``"auto"``
        (direct, shifted-slice sums for 1-channel 3x3 layers: the paper's arithmetic).
        ``"fft"`` measured 1.4x (gradient) and 2x (Hessian-vector product) faster on the
        2-core CPU (2000 28x28 images) but rounds differently.
      lr: learning rates (list: a sweep).
      k: perturbation factors of Section 4.1 (k=1: plain GD).
      seed: initialization seeds.
      weight_decay: L2 coefficients alpha of Eq. (7).
      momentum: heavy-ball momentum (0: gradient descent).
      batch_size: ``None`` for full-batch gradient descent (the paper), else SGD.
      steps: optimizer steps.
      dataset: the dataset chain; the first one found is used (``--dataset`` gives one).
      num_examples: use the first n training examples (``None``: all).
      num_examples_exact: True when ``num_examples`` was asked for explicitly
        (``--num-examples``): a dataset with fewer examples is an error. False (the
        default): use up to ``num_examples``, all of a smaller dataset, with a warning;
        metadata.json and the summary say how many were used.
      loss: ``"ce"`` (binary cross-entropy with one logit for 2 classes, else softmax)
        or ``"mse"`` (Cohen et al.'s squared loss on one-hot targets).
      standardize: standardize pixels with the training set's per-channel statistics.
      sharpness_every, sharpness_iters, sharpness_method, checkpoint_every, chunk_steps,
      log_every, max_lanes: see :class:`eos_jax.train.EngineConfig`.
      dtype: working float dtype of parameters and data.
    """

    model: str = "cnn"
    layers: int = 3
    width: int = 200
    activation: str = "swish"
    beta: float = 1.0
    conv_impl: str = "auto"
    lr: tuple[float, ...] = (5.0,)
    k: tuple[int, ...] = (1,)
    seed: tuple[int, ...] = (0,)
    weight_decay: tuple[float, ...] = (0.0,)
    momentum: float = 0.0
    batch_size: int | None = None
    steps: int = 300
    dataset: tuple[str, ...] = DEFAULT_DATASETS["cnn"]
    num_examples: int | None = 2000
    num_examples_exact: bool = False
    loss: str = "ce"
    standardize: bool = False
    sharpness_every: int | None = 20
    sharpness_iters: int = 20
    sharpness_method: str = "lanczos"
    checkpoint_every: int | None = 100
    chunk_steps: int = 50
    log_every: int = 1
    max_lanes: int = 16
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return eio.to_jsonable(dataclasses.asdict(self))

    def validate(self) -> None:
        """Raises ConfigError naming the first bad value and what is allowed."""
        if self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is not allowed; choose from {', '.join(MODELS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r} is not allowed; choose from {', '.join(LOSSES)}")
        if self.activation not in ("swish", "tanh", "relu"):
            raise ConfigError(f"--activation {self.activation!r} is not allowed; choose from swish, tanh, relu")
        if self.conv_impl not in ("auto", "lax", "shifted", "fft"):
            raise ConfigError(f"--conv-impl {self.conv_impl!r} is not allowed; choose from auto, lax, shifted, fft")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype {self.dtype!r} is not allowed; choose from float32, float64")
        for name in ("layers", "width", "steps", "sharpness_iters", "chunk_steps", "log_every", "max_lanes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is not allowed; expected an integer >= 1")
        for name in ("batch_size", "num_examples", "sharpness_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is not allowed; expected an integer >= 1")
        if not isinstance(self.num_examples_exact, bool):
            raise ConfigError(f"num_examples_exact {self.num_examples_exact!r} is not allowed; expected True or False")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta {self.beta!r} is not allowed; expected a finite float > 0")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"--momentum {self.momentum!r} is not allowed; expected a float in [0, 1)")
        from eos_jax import data as edata

        if not self.dataset:
            raise ConfigError(f"--dataset: empty; choose from {', '.join(edata.NAMES)}")
        for d in self.dataset:
            if d not in edata.NAMES:
                raise ConfigError(f"--dataset {d!r} is not allowed; choose from {', '.join(edata.NAMES)}")
        from eos_jax.train import make_lanes

        make_lanes(list(self.lr), list(self.k), list(self.seed), list(self.weight_decay))
        self.engine_config().validate()

    def engine_config(self):
        from eos_jax.train import EngineConfig

        return EngineConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            chunk_steps=self.chunk_steps,
            log_every=self.log_every,
            sharpness_every=self.sharpness_every,
            sharpness_iters=self.sharpness_iters,
            sharpness_method=self.sharpness_method,
            checkpoint_every=self.checkpoint_every,
            max_lanes=self.max_lanes,
        )

    def short_hash(self) -> str:
        """First 8 hex digits of the SHA-256 of the canonical JSON of the config."""
        text = json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_config(model: str = "cnn", **overrides: Any) -> EosConfig:
    """The defaults of ``model`` (cnn: Figure 7; fc: Figure 8's fc-tanh), with overrides."""
    if model not in MODELS:
        raise ConfigError(f"--model {model!r} is not allowed; choose from {', '.join(MODELS)}")
    base: dict[str, Any] = {"model": model}
    if model == "fc":
        base.update(layers=2, activation="tanh", lr=(2.0 / 150.0,), dataset=DEFAULT_DATASETS["fc"],
                    num_examples=5000, standardize=True)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(EosConfig)})
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    base.update(overrides)
    return EosConfig(**base)


# ----------------------------------------------------------------------------- building a run


def load_data(cfg: EosConfig, data_dir: str | None = None, *, stream: Any = None) -> tuple[Any, dict[str, Any]]:
    """The training set of ``cfg`` (first available of ``cfg.dataset``), warning about fallbacks.

    Prints one warning line (to ``stream``, default stderr) for each of: a fallback past
    the first requested dataset; fewer examples than the default ``num_examples`` (all are
    used); dataset files in ``data_dir`` that were not used, and why.

    Returns:
      ``(data, info)`` with ``info`` for metadata.json: the dataset used, what was
      skipped and why, what ``data_dir`` held that was not used, the number of examples
      requested, available and used, and the preprocessing.

    Raises:
      ConfigError: an explicit ``num_examples`` (``num_examples_exact``) larger than the dataset.
      DataError: no dataset of the chain is available, or a file is malformed.
    """
    from eos_jax import data as edata

    stream = stream if stream is not None else sys.stderr
    ds, skipped = edata.load_first_available(list(cfg.dataset), "train", data_dir=data_dir)
    if skipped:
        tried = ", ".join(n for n, _ in skipped)
        msg = f"WARNING: dataset {tried} not found; falling back to {ds.name} (recorded in metadata.json)"
        print(msg, file=stream, flush=True)
    unused = edata.unused_in_data_dir(data_dir, ds, cfg.dataset)
    if unused:
        parts = "; ".join(f"{u['holds']} in {u['path']}: {u['why']}" for u in unused)
        print(f"WARNING: --data-dir {data_dir} holds dataset files that are not used: {parts} "
              f"(recorded in metadata.json)", file=stream, flush=True)
    x, y = np.asarray(ds.x), np.asarray(ds.y)
    available = int(x.shape[0])
    if cfg.num_examples is not None:
        if cfg.num_examples > available:
            if cfg.num_examples_exact:
                raise ConfigError(f"--num-examples {cfg.num_examples} exceeds the {available} training examples of "
                                  f"{ds.name}; pass at most {available} (or --all-examples)")
            print(f"WARNING: {ds.name} has {available} training examples, fewer than the default "
                  f"--num-examples {cfg.num_examples}; using all {available} (recorded in metadata.json)",
                  file=stream, flush=True)
        x, y = x[: cfg.num_examples], y[: cfg.num_examples]
    if cfg.standardize:
        (x,) = edata.standardize(x, per="channel")
    x = x.astype(np.dtype(cfg.dtype))
    info = {
        **ds.info,
        "requested": list(cfg.dataset),
        "fallback_from": [{"name": n, "reason": r} for n, r in skipped],
        "unused_in_data_dir": unused,
        "num_examples_requested": cfg.num_examples,
        "num_examples_exact": cfg.num_examples_exact,
        "num_examples_available": available,
        "num_examples_used": int(x.shape[0]),
        "standardized": cfg.standardize,
    }
    return {"x": x, "y": y.astype(np.int32), "num_classes": ds.num_classes, "name": ds.name}, info


def build_problem(cfg: EosConfig, data: dict[str, Any]):
    """Model, loss, optimizer and threshold of ``cfg`` as an :class:`eos_jax.train.Problem`.

    Returns:
      ``(problem, model_info)``.
    """
    from eos_jax import hessian, losses, models, optim
    from eos_jax import train as tr

    num_classes = int(data["num_classes"])
    binary_ce = cfg.loss == "ce" and num_classes == 2
    num_outputs = 1 if binary_ce else num_classes
    if cfg.model == "cnn":
        in_ch = int(data["x"].shape[-1])
        model = models.get(
            "cnn", layers=cfg.layers, activation=cfg.activation, beta=cfg.beta, num_outputs=num_outputs,
            head="sum" if num_outputs == 1 else "linear", in_channels=in_ch, dtype=cfg.dtype,
            conv_impl=cfg.conv_impl,
        )
    else:
        model = models.get(
            "fc", width=cfg.width, depth=cfg.layers, activation=cfg.activation, beta=cfg.beta,
            num_outputs=num_outputs, dtype=cfg.dtype,
        )
    if model.has_batch_stats:  # pragma: no cover - cnn and fc have none
        raise ConfigError(f"model {model.name!r} has batch statistics; the EoS engine trains parameters only")
    input_shape = tuple(int(s) for s in data["x"].shape[1:])

    def init_params(key: jax.Array):
        return model.init(key, input_shape)["params"]

    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["x"], train=True)
        if binary_ce:
            return losses.binary_cross_entropy(logits, batch["y"])
        if cfg.loss == "ce":
            return losses.cross_entropy(logits, batch["y"])
        return losses.mse(logits, batch["y"], num_classes)

    momentum = cfg.momentum

    def make_optimizer(hp: tr.HParams):
        return optim.sgd(hp.learning_rate, k=hp.k, weight_decay=hp.weight_decay, momentum=momentum)

    if momentum > 0:
        threshold = hessian.stability_threshold("heavy_ball", beta=momentum)
    else:
        threshold = hessian.stability_threshold("gd")
    problem = tr.Problem(
        init_params=init_params,
        loss_fn=loss_fn,
        make_optimizer=make_optimizer,
        data={"x": jnp.asarray(data["x"]), "y": jnp.asarray(data["y"])},
        threshold=threshold,
        l2_weight_decay=True,  # optim.sgd adds wd * theta to the gradient: L2 of Eq. (7)
        name=f"{cfg.model}{cfg.layers}",
    )
    return problem, dict(model.info)


def is_stable(lane: dict[str, Any]) -> bool:
    """The stability criterion of the module docstring for one lane of results.json."""
    return bool(lane["finite"]) and lane["max_rel_loss_increase"] <= STABLE_MAX_REL_INCREASE


# ----------------------------------------------------------------------------- run directories


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def find_run(runs_root: str | Path, config: dict[str, Any]) -> Path:
    """The latest run directory under ``runs_root`` whose config.json equals ``config``.

    Raises:
      RunDirError: there is none (``--resume`` with nothing to resume).
    """
    root = Path(runs_root)
    cfg = eio.to_jsonable(config)
    found = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            f = d / "config.json"
            if f.is_file():
                try:
                    if eio.read_json(f) == cfg:
                        found.append(d)
                except (OSError, json.JSONDecodeError):
                    continue
    if not found:
        raise RunDirError(f"--resume: no run under {root} has this config; start it without --resume or pass --out")
    return found[-1]


def resolve_out(out: str | Path | None, runs_root: str | Path, config: dict[str, Any], tag: str, resume: bool) -> Path:
    """``--out`` as given; else the latest matching run (resume) or ``runs_root/<UTC>-<tag>``."""
    if out is not None:
        return Path(out)
    if resume:
        return find_run(runs_root, config)
    return Path(runs_root) / f"{_utc_stamp()}-{tag}"


# ----------------------------------------------------------------------------- one run


def run(
    cfg: EosConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runs_root: str | Path = "runs/eos",
    runtime_metadata: dict[str, Any] | None = None,
    stream: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """Trains the sweep of ``cfg`` into a run directory and prints a summary.

    Args:
      cfg: the configuration (validated here).
      out: run directory (default ``runs_root/<UTC timestamp>-<config hash>``; with
        ``resume``, the latest run under ``runs_root`` with this config).
      resume: continue an interrupted run.
      quiet: no progress bar and no summary.
      data_dir: searched first for dataset files.
      runs_root: where default run directories go.
      runtime_metadata: :func:`eos_jax.runtime.configure`'s result (else :func:`eos_jax.runtime.metadata`).
      stream: where warnings and the summary are printed (stderr / stdout by default).

    Returns:
      ``(run_dir, results)``.

    Raises:
      ConfigError, DataError, RunDirError: bad input, before anything is written.
      eos_jax.train.TrainingInterrupted: SIGINT/SIGTERM, after a checkpoint.
    """
    from eos_jax import plotting, runtime
    from eos_jax import train as tr

    cfg.validate()
    config = cfg.to_dict()
    run_dir = resolve_out(out, runs_root, config, cfg.short_hash(), resume)
    if resume and not (run_dir / "config.json").exists():
        raise RunDirError(f"--resume: nothing to resume in {run_dir} (no config.json)")
    if not resume and (run_dir / "config.json").exists():
        eio.open_run_dir(run_dir, config, resume=False)  # raises the right one-line error
    data, data_info = load_data(cfg, data_dir, stream=sys.stderr)
    problem, model_info = build_problem(cfg, data)
    if resume:
        old = eio.read_json(run_dir / "metadata.json") if (run_dir / "metadata.json").exists() else {}
        old_name = old.get("dataset", {}).get("name")
        if old_name is not None and old_name != data_info["name"]:
            raise RunDirError(f"--resume: {run_dir} was trained on {old_name} but {data_info['name']} would be used now")
    run_dir = eio.open_run_dir(run_dir, config, resume=resume)
    meta = {
        "runtime": runtime_metadata or runtime.metadata(),
        "dataset": data_info,
        "model": model_info,
        "threshold": problem.threshold,
        "stability_criterion": CRITERION,
        "command": sys.argv,
    }
    if resume and (run_dir / "metadata.json").exists():
        prev = eio.read_json(run_dir / "metadata.json")
        meta["resumed"] = prev.get("resumed", 0) + 1
        meta["started_utc"] = prev.get("started_utc")
    else:
        meta["started_utc"] = _utc_stamp()
    eio.atomic_write_json(run_dir / "metadata.json", meta)
    lanes = tr.make_lanes(list(cfg.lr), list(cfg.k), list(cfg.seed), list(cfg.weight_decay))
    results = tr.train(
        problem, lanes, cfg.engine_config(), run_dir, resume=resume, quiet=quiet,
        dtype=jnp.dtype(cfg.dtype),
    )
    results["stable"] = {str(l["lane"]): is_stable(l) for l in results["lanes"]}
    for l in results["lanes"]:
        l["stable"] = is_stable(l)
    results["dataset"] = data_info["name"]
    eio.atomic_write_json(run_dir / "results.json", results)
    lines = tr._read_metrics(run_dir / "metrics.jsonl")
    title = (f"{cfg.model} {cfg.layers} layers on {data_info['name']} ({data_info['num_examples_used']} examples, "
             f"{cfg.steps} steps)")
    plotting.plot_run(lines, run_dir / "eos.png", threshold=problem.threshold, title=title)
    if not quiet:
        print(format_summary(results, title, run_dir), file=stream or sys.stdout, flush=True)
    return run_dir, results


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(results: dict[str, Any], title: str, run_dir: Path) -> str:
    """A table of lanes: lr, k, seed, wd, final loss, max lr*lambda, stable."""
    thr = results["summary"]["threshold"]
    rows = [
        f"{title}  ->  {run_dir}",
        f"  {'lr':>9} {'k':>3} {'seed':>4} {'wd':>8} {'final loss':>11} {'max lr*lam':>10} {'>thr at':>7} "
        f"{'spikes':>6} {'late':>5} {'RelL1 vs k=1':>12} {'params sha256':>13}  stable",
    ]
    for l in results["lanes"]:
        status = "yes" if l.get("stable") else ("DIVERGED@%d" % l["first_nonfinite_step"] if not l["finite"] else "no")
        rows.append(
            f"  {l['learning_rate']:>9.4g} {l['k']:>3} {l['seed']:>4} {l['weight_decay']:>8.2g} "
            f"{_fmt(l['final_loss']):>11} {_fmt(l.get('max_normalized_sharpness')):>10} "
            f"{_fmt(l.get('first_step_above_threshold'), 'd') if l.get('first_step_above_threshold') is not None else '-':>7} "
            f"{l['num_loss_increases_1pct']:>6} {l['num_loss_increases_1pct_late']:>5} "
            f"{_fmt(l.get('rel_l1_to_k1'), '.3g'):>12} {l['params_digest'][:12]:>13}  {status}"
        )
    rows.append(f"  threshold lr*lambda_max = {thr:g}; spikes = loss rises > 1% (late: after the first 10% of steps)")
    rows.append(f"  {CRITERION}")
    if any("rel_l1_to_k1" in l for l in results["lanes"]):
        rows.append("  RelL1 vs k=1: the paper's relative L1 distance of the final parameters to the k=1 lane of the same "
                    "lr, seed and weight decay (0 = bitwise equal)")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """A figure of the paper: named variants (each an EosConfig) and what to report."""

    name: str
    description: str
    variants: tuple[tuple[str, EosConfig], ...]
    report: str  # "stability" (per lane) or "boundary" (largest stable / smallest unstable lr)


def _preset_variants(name: str, overrides: dict[str, Any]) -> Preset:
    """Builds a preset with ``overrides`` (explicitly given flags) applied to every variant."""
    ov = dict(overrides)
    if "model" in ov or "layers" in ov:
        raise ConfigError(f"--preset {name} fixes the model and its layers; drop --model/--layers")
    if name == "fig7":
        base = dict(lr=(1.0, 2.0, 5.0), steps=300)
        base.update(ov)
        variants = tuple((f"layers{n}", default_config("cnn", **{**base, "layers": n})) for n in (1, 3))
        return Preset("fig7", "Figure 7: 1- vs 3-layer single-channel Swish CNN, full-batch GD, no weight decay "
                      "(paper: all rates stable for 1 layer; restrained instabilities at lr=5 for 3 layers)",
                      variants, "stability")
    if name == "fig8":
        # lr = 2/150 puts the classical bound at lambda_max = 150: progressive sharpening
        # needs thousands of steps to get there (300 steps only reach lambda ~ 11 on the
        # Fashion-MNIST fallback), so this preset runs longer and tracks less often.
        base = dict(lr=(2.0 / 150.0,), steps=2000, sharpness_every=50, checkpoint_every=500)
        base.update(ov)
        variants = tuple((f"depth{n}", default_config("fc", **{**base, "layers": n})) for n in (2, 4))
        return Preset("fig8", "Figure 8: fc-tanh width 200, 2 vs 4 hidden layers, lr 2/150, full-batch GD, no weight "
                      "decay, CIFAR-5k (or the fallback, see metadata.json) (paper: 2 layers stable, 4 layers spikes "
                      "and sharpness above 2/lr)", variants, "stability")
    if name == "fig9":
        # A geometric grid wide enough to cross 2 / lambda_max at initialization (about 0.008
        # for 2 layers on the Fashion-MNIST fallback) and the paper's rates of order 1.
        base = dict(lr=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), weight_decay=(5e-4,), steps=300)
        base.update(ov)
        variants = tuple((f"layers{n}", default_config("cnn", **{**base, "layers": n})) for n in (1, 2))
        return Preset("fig9", "Figure 9: weight decay 5e-4, 1- vs 2-layer Swish CNN, learning-rate sweep "
                      "(paper: the stable boundary is more stringent with 2 layers)", variants, "boundary")
    raise ConfigError(f"--preset {name!r} is not allowed; choose from {', '.join(PRESETS)}")


PRESETS = ("fig7", "fig8", "fig9")


def stability_boundary(lanes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Largest stable and smallest unstable learning rate (criterion of the module docstring)."""
    stable = sorted(l["learning_rate"] for l in lanes if is_stable(l))
    unstable = sorted(l["learning_rate"] for l in lanes if not is_stable(l))
    out = {
        "largest_stable_lr": stable[-1] if stable else None,
        "smallest_unstable_lr": unstable[0] if unstable else None,
        "criterion": CRITERION,
    }
    out["monotone"] = not (stable and unstable and unstable[0] < stable[-1])
    return out


def run_preset(
    name: str,
    *,
    overrides: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runs_root: str | Path = "runs/eos",
    runtime_metadata: dict[str, Any] | None = None,
    stream: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """Runs every variant of a preset into ``out/<variant>`` and prints what it found.

    Writes ``out/config.json`` (the preset and its variants), each variant's run
    directory, ``out/preset.json`` (findings) and ``out/preset.png`` (variants side by side).

    Returns:
      ``(out, findings)``.
    """
    from eos_jax import plotting
    from eos_jax import train as tr

    stream = stream or sys.stdout
    preset = _preset_variants(name, overrides or {})
    for _, c in preset.variants:
        c.validate()
    config = {"preset": name, "variants": {v: c.to_dict() for v, c in preset.variants}}
    tag = f"{name}-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    root = resolve_out(out, runs_root, config, tag, resume)
    if resume and not (root / "config.json").exists():
        raise RunDirError(f"--resume: nothing to resume in {root} (no config.json)")
    if not resume and (root / "config.json").exists():
        eio.open_run_dir(root, config, resume=False)
    # Check every variant's data (and an explicit --num-examples) before writing anything;
    # the warnings are printed once, by each variant's run.
    for _, c in preset.variants:
        load_data(c, data_dir, stream=io.StringIO())
    root = eio.open_run_dir(root, config, resume=resume)
    if not quiet:
        print(preset.description, file=stream, flush=True)
    findings: dict[str, Any] = {"preset": name, "description": preset.description, "variants": {}}
    plots = []
    threshold = 2.0
    for vname, c in preset.variants:
        vdir = root / vname
        vresume = resume and (vdir / "config.json").exists()
        _, res = run(c, out=vdir, resume=vresume, quiet=quiet, data_dir=data_dir,
                     runtime_metadata=runtime_metadata, stream=stream)
        threshold = res["summary"]["threshold"]
        meta = eio.read_json(vdir / "metadata.json")
        entry = {
            "dataset": meta["dataset"]["name"],
            "lanes": [
                {k: l.get(k) for k in ("learning_rate", "weight_decay", "finite", "first_nonfinite_step", "final_loss",
                                       "max_normalized_sharpness", "first_step_above_threshold",
                                       "num_loss_increases_1pct", "num_loss_increases_1pct_late",
                                       "max_rel_loss_increase", "max_rel_loss_increase_late", "stable", "params_digest")}
                for l in res["lanes"]
            ],
        }
        if preset.report == "boundary":
            entry["boundary"] = stability_boundary(res["lanes"])
        findings["variants"][vname] = entry
        plots.append((vname, tr._read_metrics(vdir / "metrics.jsonl")))
    findings["text"] = format_findings(preset, findings, threshold)
    eio.atomic_write_json(root / "preset.json", findings)
    plotting.plot_variants(plots, root / "preset.png", threshold=threshold, title=preset.description.split(" (")[0])
    print(findings["text"], file=stream, flush=True)
    return root, findings


def format_findings(preset: Preset, findings: dict[str, Any], threshold: float) -> str:
    """What a preset found, in a few lines."""
    rows = [f"{preset.name} findings (threshold lr*lambda_max = {threshold:g}; {CRITERION}):"]
    for vname, entry in findings["variants"].items():
        parts = []
        for l in entry["lanes"]:
            tag = "stable" if l["stable"] else ("diverged@%d" % l["first_nonfinite_step"] if not l["finite"] else
                                                f"unstable ({l['num_loss_increases_1pct']} spikes, "
                                                f"{l['num_loss_increases_1pct_late']} late)")
            parts.append(f"lr={l['learning_rate']:.4g}: {tag}, max lr*lam={_fmt(l['max_normalized_sharpness'], '.3g')}")
        rows.append(f"  {vname} [{entry['dataset']}]: " + "; ".join(parts))
        if "boundary" in entry:
            b = entry["boundary"]
            rows.append(f"    largest stable lr = {_fmt(b['largest_stable_lr'])}, smallest unstable lr = "
                        f"{_fmt(b['smallest_unstable_lr'])}" + ("" if b["monotone"] else " (not monotone in lr)"))
    return "\n".join(rows)
