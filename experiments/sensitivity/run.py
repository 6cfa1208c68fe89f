"""One floating-point sensitivity run (Section 4, Table 1): every k and batch-order seed of one
configuration as lanes of the training engine, then Table 1, RelL1 to k=1 (Figure 3, left), the
Appendix B determinism table and the footnote-5 fluctuations from that run's numbers.

The authors' setup (``instability/main6.py`` of sunyx523/surprising-instabilities) decides what
the paper leaves open: SGD with momentum 0.9 and Nesterov, lr 0.1 divided by 10 every 40 epochs,
weight decay 5e-4 (coupled, added to the gradient), batch 128, 200 epochs, CIFAR-10 normalized
with mean (0.507, 0.487, 0.441) and std (0.267, 0.256, 0.276), random crop (padding 4) and
horizontal flip, k = 1, 3, 5, 7, 9, 11 trained from one initialization (``copy.deepcopy``) on
the same batches. ``main6.py`` seeds initialization and batch order with one ``--r`` (default 7);
the paper's text fixes the initialization across a table and varies the batch order, which is
what ``--init-seed`` (fixed) and ``--seeds`` (batch order) do here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from eos_jax import data as edata
from eos_jax import distributed, losses, models, optim, runtime
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.checkpoint import CheckpointStore
from eos_jax.cli import check_lane_batch
from eos_jax.data.transforms import augment_cifar
from eos_jax.errors import ConfigError, RunDirError
from eos_jax.metrics import layer_groups, tree_digest
from eos_jax.train.state import param_dtype
from experiments.eos.rundir import _utc_stamp, checked_out
from experiments.sensitivity.determinism import determinism_table, power_of_two_pairs, write_determinism
from experiments.sensitivity.measures import batch_selection_fluctuation, float_fluctuation
from experiments.sensitivity.tables import FINAL_EPOCHS, comparison_markdown, table1, write_table1

MODELS = ("resnet56_authors", "resnet56", "vgg16_bn", "vgg_small_bn")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
SCHEDULES = ("step", "constant")
DATASETS = ("cifar10", "fashion_mnist", "fashion_mnist01_bundled")
# main6.py's Normalize for CIFAR-10; other datasets: per-channel mean/std of their training set.
CIFAR_MEAN = (0.507, 0.487, 0.441)
CIFAR_STD = (0.267, 0.256, 0.276)
# vgg_small_bn: three VGG stages of 8, 16, 32 channels with PyTorch batch norm (a CPU-sized network).
VGG_SMALL_CFG = (8, "M", 16, "M", 32, "M")
EVAL_CHUNK = 1000  # test examples per evaluation chunk (memory)


@dataclasses.dataclass(frozen=True)
class SensitivityConfig:
    """One Table 1 run: the lanes are ``ks x seeds`` from one initialization (``init_seed``).

    Attributes:
      model: ``resnet56_authors`` (option-B shortcuts, He fan-out init: the authors'),
        ``resnet56`` (option A), ``vgg16_bn``, ``vgg_small_bn`` (CPU-sized).
      activation: ``relu`` or ``swish`` (Table 6); ``beta``: Swish's (the authors' 5 for ResNet).
      dataset: ``cifar10`` (the paper), ``fashion_mnist`` or ``fashion_mnist01_bundled``.
      num_train, num_test: first n examples of each split (None: all).
      optimizer: ``sgd``, ``momentum`` (0.9), ``nesterov`` (0.9, the authors'), ``adam`` (Table 7).
      lr: base learning rate; ``schedule``: ``step`` (lr / 10 every ``decay_epochs``, main6.py's)
        or ``constant``.
      epochs, batch_size, weight_decay: as named (coupled weight decay, PyTorch's).
      dtype: ``float32`` or ``float64`` (Table 8).
      augment: random crop (padding 4) and flip of every training batch.
      ks: the k of (PERTURBED SGD); seeds: batch-order seeds; init_seed: the initialization.
      max_lanes: lanes per vmapped program (all k of a seed must share one).
      lane_batch: inside that program, the training step runs this many lanes at a time
        (:func:`eos_jax.train.step.lane_map`; None: all at once; ``"auto"``, the default: all at once
        unless, on one CPU device, their temporaries exceed 2 GiB per call, see
        :func:`eos_jax.train.sizing.choose_lane_batch`). It changes the bits (each lane's
        convolutions are compiled for one lane instead of as one grouped convolution), not what
        is compared: every lane of a group still sees the same batches. The ``cpu`` preset uses
        1, which is faster there (``docs/performance.md``).
      checkpoint_epochs: checkpoint every this many epochs.
    """

    model: str = "resnet56_authors"
    activation: str = "relu"
    beta: float = 5.0
    dataset: str = "cifar10"
    num_train: int | None = None
    num_test: int | None = None
    optimizer: str = "nesterov"
    lr: float = 0.1
    schedule: str = "step"
    decay_epochs: int = 40
    epochs: int = 200
    batch_size: int = 128
    weight_decay: float = 5e-4
    dtype: str = "float32"
    augment: bool = True
    ks: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    seeds: tuple[int, ...] = (0, 1, 2)
    init_seed: int = 7
    max_lanes: int | None = None
    lane_batch: int | str | None = "auto"
    checkpoint_epochs: int = 1

    def validate(self) -> None:
        """Raises ConfigError naming the flag and the allowed values."""
        for name, allowed in (
            ("model", MODELS),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("dataset", DATASETS),
            ("activation", ("relu", "swish")),
            ("dtype", ("float32", "float64")),
        ):
            if getattr(self, name) not in allowed:
                flag = name.replace("_", "-")
                raise ConfigError(f"--{flag} {getattr(self, name)!r} is not allowed; choose from {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "decay_epochs", "checkpoint_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is not allowed; expected an integer >= 1")
        for name in ("num_train", "num_test", "max_lanes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is not allowed; expected an integer >= 1")
        check_lane_batch(self.lane_batch)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr!r} is not allowed; expected a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay {self.weight_decay!r} is not allowed; expected a finite number >= 0")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta {self.beta!r} is not allowed; expected a finite number > 0")
        if not self.ks or 1 not in self.ks:
            raise ConfigError(
                f"--k {' '.join(map(str, self.ks))}: k = 1 (the reference every k is compared to) is required"
            )
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"--k {k!r} is not allowed; expected integers >= 1")
        if len(set(self.ks)) != len(self.ks) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--k and --seeds take distinct values")
        for s in (*self.seeds, self.init_seed):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 2**31 - 1:
                raise ConfigError(f"seed {s!r} is not allowed; expected an integer in [0, 2**31 - 1]")
        if self.max_lanes is not None and self.max_lanes < len(self.ks):
            raise ConfigError(
                f"--max-lanes {self.max_lanes} is less than the {len(self.ks)} k of a seed: every k must train in "
                "the k=1 lane's program (the same batches, compared like with like)"
            )

    def to_dict(self) -> dict[str, Any]:
        return eio.to_jsonable(dataclasses.asdict(self))

    def short_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- data


def _split(name: str, split: str, n: int | None, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    ds = edata.load(name, split, data_dir=data_dir)
    x, y = np.asarray(ds.x), np.asarray(ds.y)
    if n is not None:
        if n > x.shape[0]:
            raise ConfigError(
                f"--num-{split} {n} exceeds the {x.shape[0]} {split} examples of {name}; pass at most {x.shape[0]}"
            )
        x, y = x[:n], y[:n]
    return x, y, {**ds.info, "num_examples_used": int(x.shape[0])}


def load_data(cfg: SensitivityConfig, data_dir: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Training and test sets of ``cfg``, normalized per channel (CIFAR-10: main6.py's constants).

    Returns:
      ``({"train": {"x", "y"}, "test": {"x", "y"}, "num_classes", "pad_value"}, info)``.
    """
    xtr, ytr, itr = _split(cfg.dataset, "train", cfg.num_train, data_dir)
    xte, yte, ite = _split(cfg.dataset, "test", cfg.num_test, data_dir)
    if cfg.dataset == "cifar10":
        mean, std = np.asarray(CIFAR_MEAN, np.float32), np.asarray(CIFAR_STD, np.float32)
        how = "main6.py's Normalize (mean 0.507, 0.487, 0.441; std 0.267, 0.256, 0.276)"
    else:
        mean, std = edata.channel_stats(xtr, per="channel")
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        how = "per-channel mean and std of the training images used"
    dt = np.dtype(cfg.dtype)
    norm = lambda x: ((x - mean) / std).astype(dt)  # noqa: E731
    num_classes = int(edata.load(cfg.dataset, "test", data_dir=data_dir).num_classes)
    data = {
        "train": {"x": norm(xtr), "y": ytr.astype(np.int32)},
        "test": {"x": norm(xte), "y": yte.astype(np.int32)},
        "num_classes": num_classes,
        # torchvision pads the [0, 1] image with 0 before Normalize: -mean/std after it.
        "pad_value": ((0.0 - mean) / std).astype(dt),
    }
    info = {"train": itr, "test": ite, "normalization": how, "num_classes": num_classes}
    return data, info


# ----------------------------------------------------------------------------- the problem


def build_model(cfg: SensitivityConfig, num_classes: int) -> models.Model:
    """The network of ``cfg`` (a :class:`eos_jax.models.Model` with batch statistics)."""
    kw: dict[str, Any] = {"num_outputs": num_classes, "activation": cfg.activation, "dtype": cfg.dtype}
    if cfg.activation == "swish":
        kw["beta"] = cfg.beta
    if cfg.model == "vgg_small_bn":
        model = models.get("vgg16_bn", **kw)
        module = model.module.clone(cfg=VGG_SMALL_CFG)
        info = {**model.info, "name": "vgg_small_bn", "cfg": list(VGG_SMALL_CFG)}
        return dataclasses.replace(model, name="vgg_small_bn", module=module, info=info)
    return models.get(cfg.model, **kw)


def lr_schedule(cfg: SensitivityConfig, steps_per_epoch: int):
    """``(base lr, count) -> lr_t``: main6.py's ``lr = lr / 10`` at epochs 40, 80, ... (or constant)."""
    every = cfg.decay_epochs * steps_per_epoch

    def schedule(lr: jax.Array, count: jax.Array) -> jax.Array:
        if cfg.schedule == "constant":
            return lr
        drops = (count // every).astype(lr.dtype)
        return lr / jnp.power(jnp.asarray(10.0, lr.dtype), drops)

    return schedule


def make_optimizer_fn(cfg: SensitivityConfig, steps_per_epoch: int):
    """``HParams -> optimizer`` with the lane's traced lr, k and weight decay."""
    schedule = lr_schedule(cfg, steps_per_epoch)

    def make(hp: tr.HParams):
        lr = lambda count: schedule(hp.learning_rate, count)  # noqa: E731
        if cfg.optimizer == "adam":
            return optim.adam(lr, k=hp.k, weight_decay=hp.weight_decay)
        momentum = 0.0 if cfg.optimizer == "sgd" else 0.9
        return optim.sgd(
            lr, k=hp.k, momentum=momentum, nesterov=cfg.optimizer == "nesterov", weight_decay=hp.weight_decay
        )

    return make


def _chunks(n: int) -> int:
    """The largest divisor of ``n`` that is at most :data:`EVAL_CHUNK`."""
    return max(d for d in range(1, min(n, EVAL_CHUNK) + 1) if n % d == 0)


def build_problem(cfg: SensitivityConfig, data: dict[str, Any]) -> tuple[tr.Problem, models.Model]:
    """The engine problem: train-mode cross-entropy, eval-mode test loss and accuracy, augmentation."""
    model = build_model(cfg, data["num_classes"])
    if not model.has_batch_stats:  # pragma: no cover - every model of MODELS has batch norm
        raise ConfigError(f"model {cfg.model!r} has no batch statistics")
    input_shape = tuple(int(s) for s in data["train"]["x"].shape[1:])
    n_train = int(data["train"]["x"].shape[0])
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training examples")

    def init_params(key):
        return model.init(key, input_shape)["params"]

    def init_model_state(key):
        return model.init(key, input_shape)["batch_stats"]

    def loss_fn(params, batch, model_state):
        logits, new = model.apply({"params": params, "batch_stats": model_state}, batch["x"], train=True)
        return losses.cross_entropy(logits, batch["y"]), new["batch_stats"]

    n_test = int(data["test"]["x"].shape[0])
    c = _chunks(n_test)
    test = {k: jnp.asarray(v).reshape(n_test // c, c, *v.shape[1:]) for k, v in data["test"].items()}

    def eval_fn(params, model_state, test_data):
        def one(chunk):
            logits, _ = model.apply({"params": params, "batch_stats": model_state}, chunk["x"], train=False)
            nll = losses.cross_entropy(logits, chunk["y"]) * jnp.asarray(c, logits.dtype)
            correct = jnp.sum((jnp.argmax(logits, axis=1).astype(jnp.int32) == chunk["y"]).astype(jnp.int32))
            return nll, correct

        nll, correct = jax.lax.map(one, test_data)
        return {
            "test_loss": jnp.sum(nll) / jnp.asarray(n_test, nll.dtype),
            "test_accuracy": jnp.asarray(100.0, nll.dtype) * jnp.sum(correct).astype(nll.dtype) / n_test,
        }

    pad = jnp.asarray(data["pad_value"])

    def augment(batch, key):
        return {**batch, "x": augment_cifar(key, batch["x"], pad_value=pad)}

    problem = tr.Problem(
        init_params=init_params,
        loss_fn=loss_fn,
        make_optimizer=make_optimizer_fn(cfg, steps_per_epoch),
        data={k: jnp.asarray(v) for k, v in data["train"].items()},
        threshold=2.0,
        l2_weight_decay=True,
        name=cfg.model,
        init_model_state=init_model_state,
        eval_fn=eval_fn,
        eval_data=test,
        augment=augment if cfg.augment else None,
        rel_l1_level=1,
    )
    return problem, model


def engine_config(cfg: SensitivityConfig, n_train: int) -> tr.EngineConfig:
    spe = n_train // cfg.batch_size
    return tr.EngineConfig(
        steps=cfg.epochs * spe,
        batch_size=cfg.batch_size,
        chunk_steps=min(spe, 50),
        log_every=spe,  # one metrics line per lane and epoch (the loss statistics still see every step)
        sharpness_every=None,
        checkpoint_every=cfg.checkpoint_epochs * spe,
        max_lanes=cfg.max_lanes,
        lane_batch=cfg.lane_batch,
        lane_multiple=len(cfg.ks),  # every k of a seed in its k=1 lane's program
        eval_every=spe,
    )


def make_lanes(cfg: SensitivityConfig) -> list[tr.Lane]:
    """Seeds vary slowest, so the k of one seed stay together (one lane group when they fit)."""
    return [
        tr.Lane(cfg.lr, k=k, seed=s, weight_decay=cfg.weight_decay, init_seed=cfg.init_seed)
        for s in cfg.seeds
        for k in cfg.ks
    ]


# ----------------------------------------------------------------------------- outputs


def per_epoch(lines: list[dict[str, Any]], spe: int, lanes: list[tr.Lane]) -> dict[str, np.ndarray]:
    """``(lanes, epochs + 1)`` test accuracy and loss, RelL1 to k=1 (network) and per layer, from the metrics lines."""
    n_ep = max(l["step"] for l in lines) // spe
    acc = np.full((len(lanes), n_ep + 1), np.nan)
    tloss = np.full_like(acc, np.nan)
    rel = np.full_like(acc, np.nan)
    layers: dict[int, dict[int, list[float]]] = {}
    for l in lines:
        if l["step"] % spe:
            continue
        e = l["step"] // spe
        if "eval" in l:
            acc[l["lane"], e] = l["eval"]["test_accuracy"]
            tloss[l["lane"], e] = l["eval"]["test_loss"]
        if "rel_l1_to_k1" in l:
            rel[l["lane"], e] = l["rel_l1_to_k1"]
        if "aux" in l and "rel_l1_layers" in l["aux"]:
            layers.setdefault(l["lane"], {})[e] = l["aux"]["rel_l1_layers"]
    n_layers = max((len(v) for d in layers.values() for v in d.values()), default=0)
    lay = np.full((len(lanes), n_ep + 1, n_layers), np.nan)
    for i, d in layers.items():
        for e, v in d.items():
            lay[i, e] = v
    return {"test_accuracy": acc, "test_loss": tloss, "rel_l1": rel, "rel_l1_layers": lay}


def fluctuations(
    problem: tr.Problem, cfg: SensitivityConfig, params: Any, model_state: Any, num_batches: int = 10
) -> dict[str, Any]:
    """Footnote 5 at the final k=1 parameters of the first seed: one batch's gradient vs the mean of
    ``num_batches`` batches, beside the floating-point error of the k = 3 update vs the k = 1 update
    computed by the optimizer from the same state and gradient."""
    data = problem.data
    n = int(data["y"].shape[0])
    b = cfg.batch_size
    m = min(num_batches + 1, n // b)
    if m < 2:
        return {"skipped": f"fewer than 2 batches of {b} in {n} examples"}
    perm = np.random.RandomState(cfg.init_seed).permutation(n)

    @jax.jit  # data, parameters and statistics are arguments: closed over, XLA would fold them in as constants
    def grad(data, params, model_state, idx):
        batch = {k: v[idx] for k, v in data.items()}
        return jax.grad(lambda p: problem.loss_fn(p, batch, model_state)[0])(params)

    grads = [grad(data, params, model_state, jnp.asarray(perm[i * b : (i + 1) * b])) for i in range(m)]
    batch = batch_selection_fluctuation(grads[:-1], grads[-1])

    @jax.jit  # one program for both k (k is traced, as in the engine)
    def update(hp, g, params):
        opt = problem.make_optimizer(hp)
        return opt.update(g, opt.init(params), params)[0]

    dt = param_dtype(params)
    hps = {
        k: tr.HParams(jnp.asarray(cfg.lr, dt), jnp.int32(k), jnp.asarray(cfg.weight_decay, dt), jnp.int32(0))
        for k in (1, 3)
    }
    updates = {k: update(hp, grads[-1], params) for k, hp in hps.items()}
    fl = float_fluctuation(updates[1], updates[3])
    return {
        "at": "final parameters of the k=1 lane of the first seed",
        "batch_selection": dataclasses.asdict(batch) | {"num_batches": m - 1, "batch_size": b},
        "floating_point_k3_vs_k1": dataclasses.asdict(fl),
        "ratio_batch_to_float": batch.mean_rel / fl.mean_rel if fl.mean_rel > 0 else None,
    }


def plot_rel_l1(series: dict[str, np.ndarray], lanes: list[tr.Lane], names: list[str], path: Path, title: str) -> None:
    """Figure 3 (left): RelL1 to k=1 per epoch for every k of the first seed, network and per layer."""
    fig = Figure(figsize=(11, 4))
    a0, a1 = fig.subplots(1, 2)
    seed0 = lanes[0].seed
    epochs = np.arange(series["rel_l1"].shape[1])
    for i, l in enumerate(lanes):
        if l.seed != seed0 or l.k == 1:
            continue
        a0.plot(epochs, series["rel_l1"][i], label=f"k={l.k}")
    a0.set(xlabel="epoch", ylabel="RelL1(k=1, k)", title="whole network", yscale="symlog", ylim=(0, 2))
    a0.set_yscale("symlog", linthresh=1e-7)
    a0.legend(fontsize=7)
    k3 = next((i for i, l in enumerate(lanes) if l.seed == seed0 and l.k != 1), None)
    if k3 is not None and series["rel_l1_layers"].shape[2]:
        for j, name in enumerate(names):
            a1.plot(epochs, series["rel_l1_layers"][k3, :, j], lw=0.8, label=name if j < 12 else None)
        a1.set_yscale("symlog", linthresh=1e-7)
        a1.set(xlabel="epoch", title=f"per layer, k={lanes[k3].k}")
        a1.legend(fontsize=5, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    eio.save_figure(fig, path, dpi=110, bbox_inches=None)  # laid out already: no second render


def run(
    cfg: SensitivityConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runs_root: str | Path = "runs/sensitivity",
    runtime_metadata: dict[str, Any] | None = None,
    final_epochs: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Trains every (seed, k) lane of ``cfg`` and writes the tables, series and plot.

    Writes, besides the engine's ``metrics.jsonl`` (test accuracy and loss per epoch in ``eval``,
    per-layer RelL1 in ``aux``), ``checkpoints/`` and ``results.json``: ``metadata.json``,
    ``table1.md`` / ``table1.csv`` (population STD, the authors'; the sample STD too in
    ``sensitivity.json``), ``rel_l1.json`` and ``rel_l1.png`` (Figure 3, left),
    ``determinism.md`` (Tables 4-5: the k vs 2k / 4k pairs in this run, bitwise), ``comparison.md``
    (footnote 5) and ``sensitivity.json`` with everything the tables hold.

    With several processes (:mod:`eos_jax.distributed`, joined by the CLI) the lanes shard over
    every process's devices; every process computes the tables from the gathered final states,
    and process 0 writes every file but the checkpoints (each process writes its own shards).
    """
    cfg.validate()
    config = cfg.to_dict()
    primary = distributed.is_primary()  # with several processes, process 0 writes every file but the checkpoints
    run_dir = checked_out(out, runs_root, config, cfg.short_hash(), resume)
    distributed.barrier("experiments.sensitivity.checked")  # every process checked the directory first
    data, data_info = load_data(cfg, data_dir)
    problem, model = build_problem(cfg, data)
    n_train = int(data["train"]["x"].shape[0])
    spe = n_train // cfg.batch_size
    if primary:
        run_dir = eio.open_run_dir(run_dir, config, resume=resume)
    distributed.barrier("experiments.sensitivity.opened")
    run_dir = Path(run_dir)
    lanes = make_lanes(cfg)
    ecfg = engine_config(cfg, n_train)
    if resume:
        tr.check_resume(problem, lanes, ecfg, run_dir, dtype=jnp.dtype(cfg.dtype))
    meta = _run_metadata(run_dir, resume, runtime_metadata, data_info, model, spe)
    if primary:
        eio.atomic_write_json(run_dir / "metadata.json", meta)
    results = tr.train(problem, lanes, ecfg, run_dir, resume=resume, quiet=quiet, dtype=jnp.dtype(cfg.dtype))
    lines = tr.read_metrics(run_dir / "metrics.jsonl")
    series = per_epoch(lines, spe, lanes)
    template = jax.eval_shape(problem.init_params, jax.random.key(0))
    names = list(layer_groups(template, 1))
    meta["model"]["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(template)))
    if primary:
        eio.atomic_write_json(run_dir / "metadata.json", meta)

    # Table 1: seeds x k final test accuracy (mean of the last epochs, the authors' mean_variance.py).
    last = default_final_epochs(cfg.epochs) if final_epochs is None else min(final_epochs, cfg.epochs)
    idx = {(l.seed, l.k): i for i, l in enumerate(lanes)}
    acc = np.array([[np.mean(series["test_accuracy"][idx[(s, k)], -last:]) for k in cfg.ks] for s in cfg.seeds])
    summary: dict[str, Any] = {"final_epochs_averaged": last, "steps_per_epoch": spe}
    t, summary["table1"] = _table1_summary(acc, cfg, run_dir, primary)

    # Figure 3 (left): RelL1 to k=1 per epoch, network and per layer.
    title = f"{cfg.model} {cfg.optimizer} lr {cfg.lr:g} on {cfg.dataset} ({n_train} images, {cfg.epochs} epochs)"
    if primary:
        _write_rel_l1(series, lanes, names, run_dir, title)

    # Appendix B (Tables 4-5): k vs 2k / 4k in this run, bitwise, from the final states' digests and arrays.
    # Every process restores (a collective) and holds every lane's final state on the host.
    states = _final_states(run_dir, problem, lanes, ecfg, cfg)
    final = _checked_final_params(states, results, run_dir)
    rows = determinism_table(*_determinism_pairs(cfg, idx, final, series["test_accuracy"]))
    if primary:
        write_determinism(rows, run_dir / "determinism.md")
    summary["determinism"] = [dataclasses.asdict(r) for r in rows]

    # Footnote 5: batch selection vs floating point, at the final k=1 parameters of the first seed.
    i0 = idx[(cfg.seeds[0], 1)]
    summary["fluctuation"] = _fluctuation_summary(problem, cfg, final[i0], states[i0].model_state, t, run_dir, primary)
    summary["k1_vs_k3"] = _k1_vs_k3(rows)
    sens = {"config": config, "summary": summary, "per_epoch_test_accuracy": series["test_accuracy"].tolist()}
    if not primary:
        return run_dir, sens
    eio.atomic_write_json(run_dir / "sensitivity.json", eio.to_jsonable(sens))
    if not quiet:
        print(format_summary(summary, title, run_dir, cfg), flush=True)
    return run_dir, sens


def _run_metadata(
    run_dir: Path,
    resume: bool,
    runtime_metadata: dict[str, Any] | None,
    data_info: dict[str, Any],
    model: models.Model,
    spe: int,
) -> dict[str, Any]:
    """``metadata.json`` before training: runtime, dataset, model and command; on a resume, the first
    start's time and how often the run was resumed (as ``experiments.eos``)."""
    meta = {
        "runtime": runtime_metadata or runtime.metadata(),
        "dataset": data_info,
        "model": {**model.info, "num_params": None},
        "steps_per_epoch": spe,
        "command": sys.argv,
        "started_utc": _utc_stamp(),
    }
    if resume and (run_dir / "metadata.json").exists():
        prev = eio.read_json(run_dir / "metadata.json")
        meta["started_utc"] = prev.get("started_utc", meta["started_utc"])
        meta["resumed"] = prev.get("resumed", 0) + 1
    return meta


def _table1_summary(
    acc: np.ndarray, cfg: SensitivityConfig, run_dir: Path, primary: bool
) -> tuple[Any, dict[str, Any]]:
    """Table 1 of the seeds x k accuracies ``acc`` and its ``sensitivity.json`` entry; the primary
    process writes ``table1.md`` / ``table1.csv``. Returns ``(None, skipped entry)`` when an accuracy
    is not finite."""
    if not np.all(np.isfinite(acc)):
        return None, {"skipped": "a lane ended with a non-finite test accuracy", "acc": acc.tolist()}
    t = table1(acc, seeds=list(cfg.seeds), ks=list(cfg.ks), ddof=0)
    t1 = table1(acc, seeds=list(cfg.seeds), ks=list(cfg.ks), ddof=1) if min(acc.shape) >= 2 else None
    if primary:
        write_table1(t, run_dir)
    return t, {
        "acc": acc.tolist(),
        "std_over_k": t.std_over_k.tolist(),
        "std_over_seeds": t.std_over_seeds.tolist(),
        "mean_std_over_k": float(t.mean_std_over_k),
        "mean_std_over_seeds": float(t.mean_std_over_seeds),
        "std": "population (ddof=0, the authors' np.std)",
        "sample_std_over_k": t1.std_over_k.tolist() if t1 is not None else None,
        "sample_std_over_seeds": t1.std_over_seeds.tolist() if t1 is not None else None,
    }


def _write_rel_l1(
    series: dict[str, np.ndarray], lanes: list[tr.Lane], names: list[str], run_dir: Path, title: str
) -> None:
    """Writes ``rel_l1.json`` (RelL1 to k=1 per epoch of every k != 1 lane, network and per layer)
    and its plot ``rel_l1.png``."""
    rel = {
        "layers": names,
        "lanes": [
            {
                **l.asdict(),
                "rel_l1": series["rel_l1"][i].tolist(),
                "rel_l1_layers": series["rel_l1_layers"][i].tolist(),
            }
            for i, l in enumerate(lanes)
            if l.k != 1
        ],
    }
    eio.atomic_write_json(run_dir / "rel_l1.json", eio.to_jsonable(rel))
    plot_rel_l1(series, lanes, names, run_dir / "rel_l1.png", title)


def _checked_final_params(states: dict[int, Any], results: dict[str, Any], run_dir: Path) -> dict[int, Any]:
    """Every lane's final parameters from the restored ``states``; raises RunDirError unless each
    lane's digest is the one ``train()`` reported."""
    final = {i: st.params for i, st in states.items()}
    for rec in results["lanes"]:  # the restored final states are those train() reported
        if tree_digest(final[rec["lane"]]) != rec["params_digest"]:
            raise RunDirError(f"{run_dir}: the last checkpoint of lane {rec['lane']} is not its final state")
    return final


def _determinism_pairs(
    cfg: SensitivityConfig, idx: dict[tuple[int, int], int], final: dict[int, Any], test_accuracy: np.ndarray
) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, float]]:
    """The arguments of :func:`determinism_table`: per seed the k vs 2k / 4k pairs of ``cfg.ks``
    (and k=1 vs k=3 when 3 is among them), each run's final parameters and last test accuracy."""
    runs, pairs, accs = {}, [], {}
    for s in cfg.seeds:
        for a, b in power_of_two_pairs(list(cfg.ks)):
            la, lb = f"seed {s} k={a}", f"seed {s} k={b}"
            runs[la], runs[lb] = final[idx[(s, a)]], final[idx[(s, b)]]
            accs[la], accs[lb] = (
                float(test_accuracy[idx[(s, a)], -1]),
                float(test_accuracy[idx[(s, b)], -1]),
            )
            pairs.append((la, lb))
        if 3 in cfg.ks:
            la, lb = f"seed {s} k=1", f"seed {s} k=3"
            runs[la], runs[lb] = final[idx[(s, 1)]], final[idx[(s, 3)]]
            accs[la], accs[lb] = (
                float(test_accuracy[idx[(s, 1)], -1]),
                float(test_accuracy[idx[(s, 3)], -1]),
            )
            pairs.append((la, lb))
    return runs, pairs, accs


def _fluctuation_summary(
    problem: tr.Problem,
    cfg: SensitivityConfig,
    params: Any,
    model_state: Any,
    t: Any,
    run_dir: Path,
    primary: bool,
) -> dict[str, Any]:
    """Footnote 5's measures at the host ``params`` and ``model_state`` (see :func:`fluctuations`);
    the primary process writes ``comparison.md`` when Table 1 ``t`` exists and nothing was skipped."""
    fl = fluctuations(problem, cfg, jax.tree_util.tree_map(jnp.asarray, params), model_state)
    if t is not None and "skipped" not in fl and primary:
        md = comparison_markdown(t, fl["floating_point_k3_vs_k1"]["mean_rel"], fl["batch_selection"]["mean_rel"])
        eio.atomic_write_text(run_dir / "comparison.md", md)
    return fl


def _k1_vs_k3(rows: list[Any]) -> list[dict[str, Any]]:
    """The k=1 vs k=3 rows of the determinism table: per seed, bitwise equality and both accuracies."""
    k1_vs_3 = [r for r in rows if r.a.endswith("k=1") and r.b.endswith("k=3")]
    return [
        {
            "seeds": r.a.split(" k=")[0],
            "bitwise_equal": r.equal,
            "accuracy_k1": r.accuracy_a,
            "accuracy_k3": r.accuracy_b,
        }
        for r in k1_vs_3
    ]


def default_final_epochs(epochs: int) -> int:
    """Epochs Table 1 averages by default: the authors' share (the last 10 of 200), at least 1, at most 10."""
    return max(1, min(FINAL_EPOCHS, epochs // 20))


def _final_states(run_dir: Path, problem: tr.Problem, lanes, ecfg, cfg):
    """The final TrainState of every lane, from the run's last checkpoints (lane order), as NumPy.

    The lanes are grouped as the run recorded (``checkpoints/lane_groups.json``: nothing is
    measured again); with several processes every process restores its shards and gathers all
    lanes (:func:`eos_jax.distributed.to_host`, a collective).
    """
    ecfg = tr.loop.resumed_grouping(ecfg, run_dir, jax.device_count())
    plan = tr.core.build_plan(problem, lanes, ecfg, dtype=jnp.dtype(cfg.dtype))
    out: dict[int, Any] = {}
    for g, idx in enumerate(plan.groups):
        store = CheckpointStore(run_dir / "checkpoints" / f"group_{g:03d}", max_to_keep=ecfg.checkpoint_keep)
        try:
            step, state = store.restore_latest(plan.template(g))
        finally:
            store.close()
        if step != ecfg.steps:
            raise RunDirError(f"{run_dir}: group {g}'s last checkpoint is step {step}, not {ecfg.steps}")
        host = distributed.to_host(state)
        for li, i in enumerate(idx):
            out[i] = jax.tree_util.tree_map(lambda a, li=li: np.asarray(a[li]), host)
    return out


def format_summary(summary: dict[str, Any], title: str, run_dir: Path, cfg: SensitivityConfig) -> str:
    """The printed result: Table 1's averages and the k=1 vs k=3 finding, from this run's numbers."""
    rows = [f"{title}  ->  {run_dir}"]
    t = summary["table1"]
    if "skipped" in t:
        rows.append(f"  Table 1 skipped: {t['skipped']}")
    else:
        rows.append(
            f"  final test accuracy (mean of the last {summary['final_epochs_averaged']} epochs): "
            f"mean STD over k {t['mean_std_over_k']:.3f} %, mean STD over seeds {t['mean_std_over_seeds']:.3f} % "
            "(population STD)"
        )
    for r in summary["k1_vs_k3"]:
        same = "bitwise equal" if r["bitwise_equal"] else "different weights"
        rows.append(
            f"  {r['seeds']}: k=1 {r['accuracy_k1']:.2f} %, k=3 {r['accuracy_k3']:.2f} % ({same}; "
            f"{'different' if r['accuracy_k1'] != r['accuracy_k3'] else 'equal'} final test accuracy)"
        )
    fl = summary.get("fluctuation", {})
    if "batch_selection" in fl:
        rows.append(
            f"  gradient fluctuation: batch selection {fl['batch_selection']['mean_rel']:.3g}, "
            f"floating point (k=3 vs k=1 update) {fl['floating_point_k3_vs_k1']['mean_rel']:.3g}"
        )
    return "\n".join(rows)
