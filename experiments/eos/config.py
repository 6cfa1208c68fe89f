"""The configuration of one Edge-of-Stability run, its data and its training problem.

:class:`EosConfig` is the whole configuration of a run (it is what ``config.json``
holds); :func:`load_data` loads the training set (with a visible fallback when the
requested files are absent) and :func:`build_problem` builds the model, loss, optimizer
and threshold as an :class:`eos_jax.train.Problem`. Errors name the command-line flags
of ``python -m experiments.eos``: this is the experiment's layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax import data as edata
from eos_jax import hessian, losses, models, optim
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.cli import check_lane_batch
from eos_jax.eigen import STOPS
from eos_jax.errors import ConfigError

MODELS = ("cnn", "fc")
# Kernel initializations the experiment offers (eos_jax.models.layers.make_kernel_init):
# "normal" draws every kernel entry from N(0, init_std^2): the paper's Sec. 5.3 ("initialize the
# weights K ... according to a normal distribution (mean 0, variance 1)") and the authors' code
# (np.random.randn for every kernel, single_layer/PySun.py in sunyx523/surprising-instabilities);
# "pytorch" is PyTorch's nn.Conv2d / nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), what
# Cohen et al. (2021) use (U(-1/3, 1/3) for a one-channel 3x3 kernel).
INITS = ("normal", "pytorch")
AUTO_LANE_CAP = 16  # lanes per vmapped program when sized to memory (the width runs used before sizing)
LOSSES = ("ce", "mse")
POOLS = ("mean", "sum")
# Two classes with --loss ce: one logit + sigmoid binary cross-entropy (Eq. (7), (20)), or two
# logits from a linear layer with bias + softmax cross-entropy (Cohen et al. 2021, src/archs.py:
# every net ends in nn.Linear(features, num_classes) and src/utilities.py uses CrossEntropyLoss).
BINARY_HEADS = ("bce", "softmax")
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

# Figure 7's rates: the paper shows lr = 5 (3 layers: restrained instabilities; 1 layer: stable);
# 1 and 2 are the smaller rates of the existing preset (used by the fig7 and fig7-readings presets).
FIG7_PAPER_LRS = (1.0, 2.0, 5.0)


@dataclasses.dataclass(frozen=True)
class EosConfig:
    """One Edge-of-Stability run: a sweep over the product of the list fields.

    Attributes:
      model: ``"cnn"`` (the paper's single-channel 3x3 CNN, Eq. (20)-(21)) or ``"fc"``.
      layers: convolution layers (cnn) or hidden layers (fc).
      width: hidden units per layer (fc).
      pool: how the cnn pools its last feature map over the output positions:
        ``"mean"`` (default: the authors' ``AvgPooling`` in ``single_layer/PySun.py``,
        sunyx523/surprising-instabilities; ``--preset fig7-readings`` on the Fashion-MNIST
        0/1 fallback found no reading of pooling x inputs x loss under which the 1-layer net
        is stable and the 3-layer net restrained at lr 5, so the authors' code decides) or
        ``"sum"`` (the Riemann sum of Eq. (6)/(20)).
      binary: two classes with ``loss="ce"``: ``"bce"`` (one logit, sigmoid and binary
        cross-entropy, Eq. (20) and (7)) or ``"softmax"`` (the pooled feature feeds a
        linear layer with bias and two outputs, softmax cross-entropy: Cohen et al.'s
        ``nn.Linear(features, num_classes)`` head and ``CrossEntropyLoss``).
      init: kernel initialization (:data:`INITS`): ``"normal"`` (cnn default: ``N(0, init_std^2)``,
        the paper's Sec. 5.3 and the authors' ``np.random.randn`` kernels; ``--preset fig7-readings``
        measures it against the other reading) or ``"pytorch"`` (fc default, Cohen et al.'s
        PyTorch defaults: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``U(-1/3, 1/3)`` for a 3x3 kernel).
      init_std: standard deviation of ``init="normal"``.
      activation: ``"swish"`` (cnn default, beta below) or ``"tanh"`` (fc default), or ``"relu"``.
      beta: Swish parameter.
      conv_impl: convolution of the cnn (see :func:`eos_jax.models.get`); ``"auto"``
        (direct, shifted-slice sums for 1-channel 3x3 layers: the paper's arithmetic).
        ``"fft"`` is faster on a CPU but rounds differently.
      lr: learning rates (list: a sweep).
      k: perturbation factors of Section 4.1 (k=1: plain GD). cnn default ``(1, 3)``: every
        seed runs plain GD beside its last-bit perturbation, so the run reports RelL1(k=1, k=3)
        (Sections 4-6: restrained instabilities amplify floating-point error); fc default ``(1,)``.
      seed: initialization seeds. cnn default 0-4: a regime is a count over seeds, not one
        seed's picture; fc default ``(0,)``.
      weight_decay: L2 coefficients alpha of Eq. (7).
      momentum: heavy-ball momentum (0: gradient descent); several values are a lane axis
        (``--momentum 0 0.5 0.9``: the optimizer reads each lane's value, ``hp.momentum``, and
        each lane is judged against its own threshold ``2 + 2 * momentum``). One value is a
        constant of the program, as it always was (the same bits as before the axis existed).
      batch_size: ``None`` for full-batch gradient descent (the paper), else SGD.
      steps: optimizer steps (200 for the cnn: the 3-layer net's regimes over seeds 0-4 at lr 5
        are the same after 200 and 300 steps).
      dataset: the dataset chain; the first one found is used (``--dataset`` gives one).
      num_examples: use the first n training examples (``None``: all).
      num_examples_exact: True when ``num_examples`` was asked for explicitly
        (``--num-examples``): a dataset with fewer examples is an error. False (the
        default): use up to ``num_examples``, all of a smaller dataset, with a warning;
        metadata.json and the summary say how many were used.
      loss: ``"ce"`` (binary cross-entropy with one logit for 2 classes, else softmax)
        or ``"mse"`` (Cohen et al.'s squared loss on one-hot targets).
      standardize: standardize pixels with the training set's per-channel statistics.
      sharpness_alternate: sample the sharpness one step later every other time (steps 0,
        21, 40, 61, ...), so the high phase of a period-2 orbit is seen (see
        :class:`eos_jax.train.EngineConfig`).
      sharpness_stop: what the warm-started solver's tolerance 1e-3 bounds (see
        :class:`eos_jax.train.EngineConfig`): ``"eigenvalue"``, the estimated relative error of
        each sharpness estimate; ``"residual"``, its relative residual, stricter than the estimate
        needs and the rule of runs made before the option (their configs leave it out, so
        ``--sharpness-stop residual`` resumes them). ``None`` (default): ``"eigenvalue"`` with
        Lanczos, ``"residual"`` with power iteration (which has no Ritz gap); :attr:`stop_rule`.
      sharpness_twin_start: a k != 1 lane starts each sharpness estimate from its k = 1 twin's new
        eigenvector (:class:`eos_jax.train.EngineConfig`; estimates to the same tolerance, other bits,
        fewer products while a perturbation has not grown). ``None`` (default): on when lanes run one
        at a time (``lane_batch=1``) and the run has k != 1 lanes; :attr:`twin_start`. Runs made
        before the option leave it out of their config, so ``--no-sharpness-twin-start`` resumes them.
      sharpness_every, sharpness_iters, sharpness_method, checkpoint_every, chunk_steps,
      log_every, max_lanes, lane_batch: see :class:`eos_jax.train.EngineConfig` (``max_lanes=None``: sized to
        memory, at most ``AUTO_LANE_CAP``). ``lane_batch`` defaults to 1 for the cnn (one lane at a time
        inside the group's program): the warm-started sharpness solver then stops for each lane when
        that lane has converged, instead of every lane waiting for the slowest
        (``docs/performance.md``); ``"auto"`` for fc.
      loss_goal, acc_goal: Cohen et al.'s stopping rule (``src/gd.py`` of
        locuslab/edge-of-stability): a lane stops (is frozen, its step recorded as
        ``stop_step``) once its training loss falls below ``loss_goal`` or its training
        accuracy exceeds ``acc_goal``; the sweep ends when every lane has stopped, or at ``steps``.
      dtype: working float dtype of parameters and data.
      track, trace_probes, density_probes, density_steps: the Hessian's trace and eigenvalue
        density measured at every sharpness step (see :class:`eos_jax.train.EngineConfig`);
        ``()`` (default): neither, and the four fields are left out of ``config.json`` (so the
        configs and their hashes stay those of runs made before them).
    """

    model: str = "cnn"
    layers: int = 3
    width: int = 200
    activation: str = "swish"
    beta: float = 1.0
    conv_impl: str = "auto"
    pool: str = "mean"
    binary: str = "bce"
    init: str = "normal"
    init_std: float = 1.0
    lr: tuple[float, ...] = (5.0,)
    k: tuple[int, ...] = (1, 3)
    seed: tuple[int, ...] = (0, 1, 2, 3, 4)
    weight_decay: tuple[float, ...] = (0.0,)
    momentum: tuple[float, ...] = (0.0,)
    batch_size: int | None = None
    steps: int = 200
    dataset: tuple[str, ...] = DEFAULT_DATASETS["cnn"]
    num_examples: int | None = 2000
    num_examples_exact: bool = False
    loss: str = "ce"
    standardize: bool = False
    sharpness_every: int | None = 20
    sharpness_iters: int = 20
    sharpness_alternate: bool = True
    sharpness_method: str = "lanczos"
    sharpness_stop: str | None = None
    sharpness_twin_start: bool | None = None
    checkpoint_every: int | None = 100
    chunk_steps: int = 50
    log_every: int = 1
    max_lanes: int | None = None
    lane_batch: int | str | None = 1
    loss_goal: float | None = None
    acc_goal: float | None = None
    dtype: str = "float32"
    track: tuple[str, ...] = ()
    trace_probes: int = 8
    density_probes: int = 1
    density_steps: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.momentum, tuple):  # a number (configs written before the axis)
            object.__setattr__(
                self, "momentum", tuple(self.momentum) if isinstance(self.momentum, list) else (self.momentum,)
            )

    def to_dict(self) -> dict[str, Any]:
        d = eio.to_jsonable(dataclasses.asdict(self))
        if len(self.momentum) == 1:  # one value is a number, as before the axis (same config hash)
            d["momentum"] = self.momentum[0]
        if not self.track:  # untracked: the config (and its hash) of runs made before tracking
            for name in ("track", "trace_probes", "density_probes", "density_steps"):
                d.pop(name)
        d["sharpness_stop"] = self.stop_rule
        if self.stop_rule == "residual":  # the stop rule of runs made before the option: their config
            d.pop("sharpness_stop")
        d["sharpness_twin_start"] = self.twin_start
        if not self.twin_start:  # likewise: every lane from its own eigenvector, as before the option
            d.pop("sharpness_twin_start")
        return d

    @property
    def twin_start(self) -> bool:
        """Whether k != 1 lanes start their sharpness estimates from their twin's: the field, or its default when None."""
        if self.sharpness_twin_start is not None:
            return self.sharpness_twin_start
        return self.lane_batch == 1 and any(k != 1 for k in self.k) and bool(self.sharpness_every)

    @property
    def stop_rule(self) -> str:
        """The sharpness solver's stop rule: ``sharpness_stop``, or the method's default when it is None."""
        if self.sharpness_stop is not None:
            return self.sharpness_stop
        return "eigenvalue" if self.sharpness_method == "lanczos" else "residual"

    def hyper_axes(self) -> dict[str, list[float]]:
        """The named lane axes besides lr, k, seed and weight decay: momentum when it has several values."""
        return {"momentum": list(self.momentum)} if len(self.momentum) > 1 else {}

    def lanes(self) -> list:
        """The run's lanes (:func:`eos_jax.train.make_lanes`: learning rate slowest, then momentum, k, seed, wd)."""
        return tr.make_lanes(list(self.lr), list(self.k), list(self.seed), list(self.weight_decay), **self.hyper_axes())

    def validate(self) -> None:
        """Raises ConfigError naming the first bad value and what is allowed."""
        if self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is not allowed; choose from {', '.join(MODELS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r} is not allowed; choose from {', '.join(LOSSES)}")
        if self.pool not in POOLS:
            raise ConfigError(f"--pool {self.pool!r} is not allowed; choose from {', '.join(POOLS)}")
        if self.binary not in BINARY_HEADS:
            raise ConfigError(f"--binary {self.binary!r} is not allowed; choose from {', '.join(BINARY_HEADS)}")
        if self.init not in INITS:
            raise ConfigError(f"--init {self.init!r} is not allowed; choose from {', '.join(INITS)}")
        if isinstance(self.init_std, bool) or not (
            isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std) and self.init_std > 0
        ):
            raise ConfigError(f"--init-std {self.init_std!r} is not allowed; expected a finite float > 0")
        if self.init_std != 1.0 and (self.init != "normal" or self.model != "cnn"):
            raise ConfigError(
                f"--init-std {self.init_std!r} is not allowed with --model {self.model} --init {self.init}; "
                "it sets the cnn's --init normal"
            )
        if self.activation not in ("swish", "tanh", "relu"):
            raise ConfigError(f"--activation {self.activation!r} is not allowed; choose from swish, tanh, relu")
        if self.conv_impl not in ("auto", "lax", "shifted", "fft"):
            raise ConfigError(f"--conv-impl {self.conv_impl!r} is not allowed; choose from auto, lax, shifted, fft")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype {self.dtype!r} is not allowed; choose from float32, float64")
        for name in (
            "layers",
            "width",
            "steps",
            "sharpness_iters",
            "chunk_steps",
            "log_every",
            "trace_probes",
            "density_probes",
            "density_steps",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is not allowed; expected an integer >= 1")
        for name in ("batch_size", "num_examples", "sharpness_every", "checkpoint_every", "max_lanes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is not allowed; expected an integer >= 1")
        check_lane_batch(self.lane_batch)
        check_sharpness_stop(self.stop_rule, self.sharpness_method)
        if self.sharpness_twin_start and self.lane_batch != 1:
            raise ConfigError(
                "--sharpness-twin-start needs --lane-batch 1 (one lane after another); got --lane-batch "
                f"{'all' if self.lane_batch is None else self.lane_batch}"
            )
        if self.loss_goal is not None and not (math.isfinite(self.loss_goal) and self.loss_goal > 0):
            raise ConfigError(f"--loss-goal {self.loss_goal!r} is not allowed; expected a finite float > 0")
        if self.acc_goal is not None and not (math.isfinite(self.acc_goal) and 0 <= self.acc_goal < 1):
            raise ConfigError(f"--acc-goal {self.acc_goal!r} is not allowed; expected a float in [0, 1)")
        if not isinstance(self.num_examples_exact, bool):
            raise ConfigError(f"num_examples_exact {self.num_examples_exact!r} is not allowed; expected True or False")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta {self.beta!r} is not allowed; expected a finite float > 0")
        if not self.momentum:
            raise ConfigError("--momentum: empty; give at least one value in [0, 1)")
        for m in self.momentum:
            if isinstance(m, bool) or not (isinstance(m, (int, float)) and math.isfinite(m) and 0 <= m < 1):
                raise ConfigError(f"--momentum {m!r} is not allowed; expected a float in [0, 1)")
        if not self.dataset:
            raise ConfigError(f"--dataset: empty; choose from {', '.join(edata.NAMES)}")
        for d in self.dataset:
            if d not in edata.NAMES:
                raise ConfigError(f"--dataset {d!r} is not allowed; choose from {', '.join(edata.NAMES)}")
        for t in self.track:
            if t not in tr.config.TRACKED:
                raise ConfigError(f"--track {t!r} is not allowed; choose from {', '.join(tr.config.TRACKED)}")
        if "trace" in self.track and self.trace_probes < 2:
            raise ConfigError(f"--trace-probes {self.trace_probes} is not allowed; expected an integer >= 2")
        if self.track and not self.sharpness_every:
            raise ConfigError(
                f"--track {','.join(self.track)} needs --sharpness-every >= 1 (it is measured at those steps)"
            )
        self.lanes()
        self.engine_config().validate()

    def engine_config(self):
        return tr.EngineConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            chunk_steps=self.chunk_steps,
            log_every=self.log_every,
            sharpness_every=self.sharpness_every,
            sharpness_iters=self.sharpness_iters,
            sharpness_alternate=self.sharpness_alternate,
            sharpness_method=self.sharpness_method,
            sharpness_stop=self.stop_rule,
            sharpness_twin_start=self.twin_start,
            checkpoint_every=self.checkpoint_every,
            max_lanes=self.max_lanes,
            lane_batch=self.lane_batch,
            # Lanes run learning rate slowest (eos_jax.train.make_lanes): automatic groups of whole
            # learning-rate blocks keep every k != 1 lane with its k = 1 twin (RelL1 is measured in-program).
            lane_multiple=len(self.k) * len(self.seed) * len(self.weight_decay) if len(self.k) > 1 else 1,
            loss_goal=self.loss_goal,
            acc_goal=self.acc_goal,
            auto_lane_cap=AUTO_LANE_CAP,
            track=tuple(self.track),
            trace_probes=self.trace_probes,
            density_probes=self.density_probes,
            density_steps=self.density_steps,
        )

    def short_hash(self) -> str:
        """First 8 hex digits of the SHA-256 of the canonical JSON of the config."""
        text = json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def check_sharpness_stop(stop: str, method: str) -> None:
    """Refuses a ``--sharpness-stop`` that is unknown or that ``--sharpness-method`` cannot use (one line)."""
    if stop not in STOPS:
        raise ConfigError(f"--sharpness-stop {stop!r} is not allowed; choose from {', '.join(STOPS)}")
    if stop == "eigenvalue" and method != "lanczos":
        raise ConfigError(
            f"--sharpness-stop eigenvalue is not allowed with --sharpness-method {method}; it needs lanczos "
            "(its error estimate uses the Ritz values), or pass --sharpness-stop residual"
        )


def default_config(model: str = "cnn", **overrides: Any) -> EosConfig:
    """The defaults of ``model`` (cnn: Figure 7; fc: Figure 8's fc-tanh), with overrides."""
    if model not in MODELS:
        raise ConfigError(f"--model {model!r} is not allowed; choose from {', '.join(MODELS)}")
    base: dict[str, Any] = {"model": model}
    if model == "fc":
        base.update(
            layers=2,
            activation="tanh",
            init="pytorch",
            lr=(2.0 / 150.0,),
            k=(1,),
            seed=(0,),
            # Dense layers vectorize well over lanes (their matmuls batch); the CNN's one lane at a time
            # is for its warm-started sharpness solver (see lane_batch above).
            lane_batch="auto",
            dataset=DEFAULT_DATASETS["fc"],
            num_examples=5000,
            standardize=True,
        )
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
    stream = stream if stream is not None else sys.stderr
    ds, skipped = edata.load_first_available(list(cfg.dataset), "train", data_dir=data_dir)
    if skipped:
        tried = ", ".join(n for n, _ in skipped)
        msg = f"WARNING: dataset {tried} not found; falling back to {ds.name} (recorded in metadata.json)"
        print(msg, file=stream, flush=True)
    unused = edata.unused_in_data_dir(data_dir, ds, cfg.dataset)
    if unused:
        parts = "; ".join(f"{u['holds']} in {u['path']}: {u['why']}" for u in unused)
        print(
            f"WARNING: --data-dir {data_dir} holds dataset files that are not used: {parts} "
            f"(recorded in metadata.json)",
            file=stream,
            flush=True,
        )
    x, y = np.asarray(ds.x), np.asarray(ds.y)
    available = int(x.shape[0])
    if cfg.num_examples is not None:
        if cfg.num_examples > available:
            if cfg.num_examples_exact:
                raise ConfigError(
                    f"--num-examples {cfg.num_examples} exceeds the {available} training examples of "
                    f"{ds.name}; pass at most {available} (or --all-examples)"
                )
            print(
                f"WARNING: {ds.name} has {available} training examples, fewer than the default "
                f"--num-examples {cfg.num_examples}; using all {available} (recorded in metadata.json)",
                file=stream,
                flush=True,
            )
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


def loss_kind(cfg: EosConfig, num_classes: int) -> str:
    """The training loss of ``cfg`` on ``num_classes`` classes: ``"bce"`` (one logit), ``"ce"`` (softmax) or ``"mse"``."""
    if cfg.loss == "mse":
        return "mse"
    return "bce" if num_classes == 2 and cfg.binary == "bce" else "ce"


def build_problem(cfg: EosConfig, data: dict[str, Any]):
    """Model, loss, optimizer and threshold of ``cfg`` as an :class:`eos_jax.train.Problem`.

    Returns:
      ``(problem, model_info)``.
    """
    num_classes = int(data["num_classes"])
    binary_ce = loss_kind(cfg, num_classes) == "bce"
    num_outputs = 1 if binary_ce else num_classes
    if cfg.model == "cnn":
        in_ch = int(data["x"].shape[-1])
        model = models.get(
            "cnn",
            layers=cfg.layers,
            activation=cfg.activation,
            beta=cfg.beta,
            num_outputs=num_outputs,
            head="sum" if num_outputs == 1 else "linear",
            in_channels=in_ch,
            dtype=cfg.dtype,
            conv_impl=cfg.conv_impl,
            pool=cfg.pool,
            init=cfg.init,
            init_std=cfg.init_std,
        )
    else:
        model = models.get(
            "fc",
            width=cfg.width,
            depth=cfg.layers,
            activation=cfg.activation,
            beta=cfg.beta,
            num_outputs=num_outputs,
            init=cfg.init,
            dtype=cfg.dtype,
        )
    if model.has_batch_stats:  # pragma: no cover - cnn and fc have none
        raise ConfigError(f"model {model.name!r} has batch statistics; the EoS engine trains parameters only")
    input_shape = tuple(int(s) for s in data["x"].shape[1:])

    def init_params(key: jax.Array):
        return model.init(key, input_shape)["params"]

    def accuracy_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["x"], train=True)
        pred = (logits[:, 0] > 0).astype(batch["y"].dtype) if num_outputs == 1 else jnp.argmax(logits, axis=-1)
        return jnp.mean((pred == batch["y"]).astype(logits.dtype))

    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["x"], train=True)
        if binary_ce:
            return losses.binary_cross_entropy(logits, batch["y"])
        if cfg.loss == "ce":
            return losses.cross_entropy(logits, batch["y"])
        return losses.mse(logits, batch["y"], num_classes)

    swept = len(cfg.momentum) > 1
    momentum = cfg.momentum[0]

    def make_optimizer(hp: tr.HParams):
        mu = hp.momentum if swept else momentum  # one value: a constant of the program, as before the axis
        return optim.sgd(hp.learning_rate, k=hp.k, weight_decay=hp.weight_decay, momentum=mu)

    def heavy_ball_threshold(beta: float) -> float:
        return hessian.stability_threshold("heavy_ball", beta=beta) if beta > 0 else hessian.stability_threshold("gd")

    def lane_threshold(lane: tr.Lane) -> float:  # 2 + 2 beta, per lane
        return heavy_ball_threshold(dict(lane.hyper)["momentum"])

    threshold = lane_threshold if swept else heavy_ball_threshold(momentum)

    problem = tr.Problem(
        init_params=init_params,
        loss_fn=loss_fn,
        make_optimizer=make_optimizer,
        data={"x": jnp.asarray(data["x"]), "y": jnp.asarray(data["y"])},
        threshold=threshold,
        l2_weight_decay=True,  # optim.sgd adds wd * theta to the gradient: L2 of Eq. (7)
        accuracy_fn=accuracy_fn if cfg.acc_goal is not None else None,
        name=f"{cfg.model}{cfg.layers}",
    )
    return problem, dict(model.info)
