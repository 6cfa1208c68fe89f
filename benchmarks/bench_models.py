"""Step times of every model, and the single-channel convolution implementations compared.

Run (2-core CPU: about 3-6 minutes; ``--quick``: under a minute)::

    python benchmarks/bench_models.py [--quick] [--repeats 3]

Prints, measured in this one run:

* the time of one jitted gradient-descent step (forward, backward, update) of the
  3-layer single-channel 3x3 CNN of the paper's Sec. 6.2 on a full batch of 12,000
  28x28 images for each convolution implementation, and the ratios lax / shifted
  and lax / fft;
* the one-layer 32x32-kernel CNN on one 256x256 image in float64 (Sec. 5.3): step
  time and compile time per implementation (why ``auto`` picks the FFT there);
* step times of fc, vgg16, vgg16_bn and resnet56 (batch 128, 32x32x3), and for
  resnet56 the forward-only time, so that the backward share is visible;
* for resnet56 and vgg16_bn, the convolution-library candidates side by side (calls
  interleaved, fastest of the repeats): the step with XLA:CPU's Eigen convolutions (what
  ``eos_jax.runtime.configure`` sets, :data:`eos_jax.runtime.EIGEN_CONV_FLAG`) against XLA's
  default YNNPACK convolutions (per-program ``compiler_options``), their ratio, and how many
  elements of the updated weights differ between the two;
* with ``--torch`` (PyTorch installed): the same ResNet-56 (option A) in PyTorch, one SGD step
  with momentum 0.9, Nesterov and weight decay 5e-4 (the authors' ``main6.py``), NCHW as a
  PyTorch user writes it, beside eos-jax's ResNet-56 step with the same optimizer (optax), and
  eos-jax's step over PyTorch's, measured in this run.

``--variants [NAMES]`` prints only a table of ResNet-56 SGD-Nesterov step candidates (batch 128;
``--repeats`` rounds, every candidate and PyTorch called once per round, interleaved): each one's
median step time and range, PyTorch's time over its time (the median of the per-round ratios, and
their range), and whether its parameters after one step are bitwise the library's (``default``).
The candidates (:func:`resnet56_candidates`): the library's model as configured (``default``), the
same with donated buffers (``donated``), XLA:CPU options (YNNPACK convolutions, the
concurrency-optimized scheduler, 512-bit vectors), and the formulations of
``benchmarks/resnet56_variants.py``: a bit-identical rewrite (``mirror``), NCHW/OIHW end to end,
the option-A shortcut through ``lax.slice``/``lax.pad``, one-pass batch statistics, kept
convolution cotangents, per-block rematerialization, the kernel gradient as nine per-tap
products; and ``convs_only`` (no batch norm, no ReLU), the time of the convolutions alone::

    python benchmarks/bench_models.py --variants              # all, ~6 minutes on a 2-core CPU
    python benchmarks/bench_models.py --variants default,nchw --repeats 7
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax import losses, metrics, models, runtime

# The authors' main6.py optimizer, as PyTorch's SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4).
NESTEROV = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds of ``repeats`` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def make_gd_step(model: models.Model, loss_name: str, lr: float = 0.01):
    """Jitted full-batch GD step ``(variables, x, y) -> (variables, loss)``."""
    num_outputs = model.info["num_outputs"]

    def loss_fn(params, state, x, y):
        logits, new_state = model.apply({"params": params, **state}, x, train=True)
        if loss_name == "bce":
            loss = losses.binary_cross_entropy(logits, y)
        else:
            loss = losses.cross_entropy(logits, y) if num_outputs > 1 else losses.binary_cross_entropy(logits, y)
        return loss, new_state

    @jax.jit
    def step(variables, x, y):
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        params = jax.tree_util.tree_map(lambda p, g: p - jnp.asarray(lr, p.dtype) * g, params, grads)
        return {"params": params, **new_state}, loss

    return step


def time_candidates(compiled: dict, args: tuple, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each compiled program, the calls interleaved (candidates see the same machine)."""
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def bench_conv_libraries(name: str, step, variables, x, y, repeats: int) -> None:
    """One model's step with Eigen convolutions (the configured default) against YNNPACK's (XLA's default)."""
    lowered = step.lower(variables, x, y)
    compiled = {
        "eigen": lowered.compile(compiler_options=runtime.EIGEN_CONV_COMPILER_OPTIONS),
        "ynn": lowered.compile(compiler_options=runtime.YNN_CONV_COMPILER_OPTIONS),
    }
    outs = {k: jax.tree_util.tree_leaves(fn(variables, x, y)[0]["params"]) for k, fn in compiled.items()}
    differ = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(outs["eigen"], outs["ynn"]))
    total = sum(int(np.asarray(a).size) for a in outs["eigen"])
    t = time_candidates(compiled, (variables, x, y), repeats)
    print(
        f"{name:9s} convolutions: Eigen (configured) step {t['eigen']:.3f} s, YNNPACK (XLA's default) "
        f"{t['ynn']:.3f} s: ratio YNNPACK / Eigen = {t['ynn'] / t['eigen']:.2f}   "
        f"(updated weights differ in {differ} of {total} elements)",
        flush=True,
    )


def make_forward(model: models.Model):
    """Jitted forward pass in training mode (logits only)."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=True)[0])


def bench_single_channel(n: int, repeats: int) -> None:
    """3-layer 1-channel 3x3 CNN on n 28x28 images: GD step per conv implementation."""
    key = jax.random.key(0)
    x = jax.random.uniform(jax.random.fold_in(key, 1), (n * 784,), jnp.float32).reshape(n, 28, 28, 1)
    y = jax.random.bernoulli(jax.random.fold_in(key, 2), 0.5, (n,)).astype(jnp.int32)
    steps = {}
    for impl in ("lax", "shifted", "fft"):
        model = models.get("cnn", layers=3, kernel_size=3, conv_impl=impl)
        variables = model.init(key, (28, 28, 1))
        first, t = _time(make_gd_step(model, "bce"), variables, x, y, repeats=repeats)
        steps[impl] = t
        print(f"cnn3 1ch 3x3  n={n:6d} {impl:8s} step {t:8.3f} s   (compile+first {first:6.2f} s)", flush=True)
    print(
        f"ratio lax/shifted = {steps['lax'] / steps['shifted']:.2f}   "
        f"lax/fft = {steps['lax'] / steps['fft']:.2f}   shifted/fft = {steps['shifted'] / steps['fft']:.2f}",
        flush=True,
    )


def bench_pde_kernel(size: int, ksize: int, repeats: int) -> None:
    """One-layer cnn, ksize^2 kernel on one size^2 image, float64 (Sec. 5.3 setting)."""
    key = jax.random.key(0)
    x = jnp.where((jnp.arange(size)[:, None] + jnp.arange(size)[None, :]) % 2 == 0, 1.0, -1.0)
    x = x.astype(jnp.float64)[None, :, :, None]
    y = jnp.ones((1,), jnp.int32)
    # "shifted" is left out: ksize^2 slices take minutes to compile (16x16 on 64x64, float64:
    # 211 s compile, 369 ms/step against 1.5 ms for the FFT, measured on the shared 2-core CPU).
    for impl in ("lax", "fft"):
        model = models.get("cnn", kernel_size=ksize, init="normal", conv_impl=impl, dtype="float64")
        variables = model.init(key, (size, size, 1))
        first, t = _time(make_gd_step(model, "bce"), variables, x, y, repeats=repeats)
        print(
            f"cnn1 {ksize}x{ksize} on {size}x{size} f64 {impl:8s} step {t * 1e3:9.2f} ms   "
            f"(compile+first {first:6.2f} s)",
            flush=True,
        )


def cifar_batch(batch: int):
    """``(key, x, y)``: the benchmarks' random 32x32x3 batch and 10-class labels (the same bits in every use)."""
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch * 3072,), jnp.float32).reshape(batch, 32, 32, 3)
    y = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, 10, jnp.int32)
    return key, x, y


def bench_models(batch: int, repeats: int, names: list[str]) -> dict[str, float]:
    """GD step of each named model on a batch of 32x32x3 inputs (resnet56 also forward only); returns the step times."""
    key, x, y = cifar_batch(batch)
    steps: dict[str, float] = {}
    for name in names:
        model = models.get(name)
        t0 = time.perf_counter()
        variables = jax.jit(lambda k, m=model: m.init(k, (32, 32, 3)))(key)
        jax.block_until_ready(variables)
        t_init = time.perf_counter() - t0
        first, t = _time(make_gd_step(model, "ce"), variables, x, y, repeats=repeats)
        line = f"{name:9s} batch {batch:4d} step {t:8.3f} s   (compile+first {first:6.2f} s, jit init {t_init:6.2f} s)"
        if name == "resnet56":
            _, t_fwd = _time(make_forward(model), variables, x, repeats=repeats)
            line += f"   forward {t_fwd:.3f} s -> backward+update {t - t_fwd:.3f} s"
        print(line, flush=True)
        steps[name] = t
        if name in ("resnet56", "vgg16_bn"):
            bench_conv_libraries(name, make_gd_step(model, "ce"), variables, x, y, repeats)
    return steps


def make_nesterov_step(apply_fn, x, y, donate: bool = False):
    """Jitted ``(variables, opt_state) -> (variables, opt_state)``: cross-entropy of ``apply_fn(variables, x)``
    on ``y``, then PyTorch's update as the authors' ``main6.py`` sets it (SGD lr 0.1, momentum 0.9, Nesterov,
    weight decay 5e-4, optax). ``donate`` lets XLA write the new state over the old (as PyTorch updates in place)."""

    def loss_fn(params, state):
        logits, new_state = apply_fn({"params": params, **state}, x)
        return losses.cross_entropy(logits, y), new_state

    def step(variables, opt_state):
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = NESTEROV.update(grads, opt_state, params)
        return {"params": optax.apply_updates(params, updates), **new_state}, opt_state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def bench_resnet56_nesterov(batch: int, repeats: int) -> float:
    """eos-jax's ResNet-56 step with PyTorch's update (SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4)."""
    model = models.get("resnet56")
    key, x, y = cifar_batch(batch)
    variables = jax.jit(lambda k: model.init(k, (32, 32, 3)))(key)
    step = make_nesterov_step(lambda v, x_: model.apply(v, x_, train=True), x, y)
    _, t = _time(step, variables, NESTEROV.init(variables["params"]), repeats=repeats)
    print(f"resnet56  batch {batch:4d} step {t:8.3f} s   (SGD Nesterov + wd, as PyTorch's below)", flush=True)
    return t


def make_torch_resnet56(batch: int):
    """PyTorch's ResNet-56 (option A, He et al.) SGD step on a random batch: ``(step, forward, torch)``, or None
    when torch is missing. NCHW as a PyTorch user writes it; SGD as the authors' ``main6.py``."""
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError:
        return None

    class Block(nn.Module):
        def __init__(self, cin: int, planes: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.pad = (planes - cin) // 2 if (stride != 1 or cin != planes) else None

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return F.relu(out + sc)

    class ResNet56(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for stage, planes in enumerate((16, 32, 64)):
                for b in range(9):
                    blocks.append(Block(cin, planes, 2 if stage > 0 and b == 0 else 1))
                    cin = planes
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn1(self.conv1(x))))
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = ResNet56()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    def forward():
        with torch.no_grad():
            net(x)

    return step, forward, torch


def bench_torch_resnet56(batch: int, repeats: int) -> float | None:
    """PyTorch's ResNet-56 (option A, He et al.) SGD step at ``batch``; None when torch is missing."""
    made = make_torch_resnet56(batch)
    if made is None:
        print("torch     not installed: no PyTorch reference (pip install torch)", flush=True)
        return None
    step, forward, torch = made
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    fwd = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        fwd.append(time.perf_counter() - t0)
    t, tf = statistics.median(times), statistics.median(fwd)
    print(
        f"torch     batch {batch:4d} step {t:8.3f} s   (PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"SGD Nesterov + wd)   forward {tf:.3f} s -> backward+update {t - tf:.3f} s",
        flush=True,
    )
    return t


def resnet56_candidates() -> dict[str, tuple]:
    """``name -> (source, extra XLA compiler options or None, donate)`` for ``--variants``: ``source`` is a dict of
    ``models.get("resnet56", ...)`` options (the library's model) or a ``resnet56_variants.Variant`` (a formulation
    written out in ``benchmarks/resnet56_variants.py``; ``convs_only`` is a bound, not a candidate)."""
    from resnet56_variants import Variant

    return {
        "default": ({}, None, False),
        "mirror": (Variant(), None, False),
        "donated": ({}, None, True),
        "nchw": (Variant(layout="NCHW"), None, False),
        "shortcut_lax": (Variant(shortcut="lax"), None, False),
        "bn_one_pass": ({"bn_stats": "one_pass"}, None, False),
        "keep_dy": (Variant(keep_dy=True), None, False),
        "remat_dots": (Variant(remat=True), None, False),
        "wgrad_taps": (Variant(wgrad="taps"), None, False),
        "ynn_conv": ({}, runtime.YNN_CONV_COMPILER_OPTIONS, False),
        "sched_concurrency": ({}, {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}, False),
        "vector_width_512": ({}, {"xla_cpu_prefer_vector_width": 512}, False),
        "convs_only": (Variant(convs_only=True), None, False),
    }


def _variant_runs(batch: int, names: list[str]) -> tuple[dict, dict]:
    """Per candidate: a zero-argument call running one step (blocking), and the digest of the parameters after
    one step from the same start (``metrics.tree_digest``)."""
    from resnet56_variants import make_apply

    model = models.get("resnet56")
    key, x, y = cifar_batch(batch)
    variables = jax.jit(lambda k: model.init(k, (32, 32, 3)))(key)
    opt_state = NESTEROV.init(variables["params"])
    candidates = resnet56_candidates()
    runs, digests = {}, {}
    for name in names:
        source, options, donate = candidates[name]
        if isinstance(source, dict):
            apply_fn = functools.partial(models.get("resnet56", **source).apply, train=True)
        else:
            apply_fn = make_apply(source)
        step = make_nesterov_step(apply_fn, x, y, donate=donate)
        if options is not None:
            step = step.lower(variables, opt_state).compile(
                compiler_options={**runtime.EIGEN_CONV_COMPILER_OPTIONS, **options}
            )
        state = [jax.tree_util.tree_map(jnp.copy, (variables, opt_state))] if donate else None
        out = jax.block_until_ready(step(*state[0]) if donate else step(variables, opt_state))
        digests[name] = metrics.tree_digest(out[0]["params"])
        if donate:
            state[0] = out

            def run(step=step, state=state):
                state[0] = jax.block_until_ready(step(*state[0]))
        else:

            def run(step=step):
                jax.block_until_ready(step(variables, opt_state))

        runs[name] = run
    return runs, digests


def bench_resnet56_variants(batch: int, rounds: int, names: list[str]) -> dict[str, list[float]]:
    """ResNet-56 SGD-Nesterov step of each candidate beside PyTorch's, calls interleaved round by round.

    Prints per candidate: median step time (fastest-slowest of the rounds), the median over rounds of
    PyTorch's time / the candidate's time in the same round (and its range), and whether the parameters
    after one step are bitwise those of ``default`` (the library's ``resnet56`` as configured). The order
    of the calls rotates by one place per round.
    """
    runs, digests = _variant_runs(batch, names)
    made = make_torch_resnet56(batch)
    if made is not None:
        runs["torch"] = made[0]
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds):
        # Each round starts one place further down the list, so no candidate always follows PyTorch's call.
        for name in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    ref = digests.get("default")
    print(f"resnet56 candidates, batch {batch}, {rounds} rounds (seconds; PyTorch / candidate per round)", flush=True)
    for name, ts in times.items():
        line = f"  {name:18s} step {statistics.median(ts):6.3f} s ({min(ts):.3f}-{max(ts):.3f})"
        if "torch" in times and name != "torch":
            ratios = [a / b for a, b in zip(times["torch"], ts)]
            line += f"   PyTorch/this {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        if name in digests and ref is not None:
            line += "   bits: " + ("same as default" if digests[name] == ref else "DIFFER from default")
        print(line, flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="fc,vgg16,vgg16_bn,resnet56")
    parser.add_argument("--torch", action="store_true", help="PyTorch's ResNet-56 step beside eos-jax's")
    parser.add_argument(
        "--variants",
        nargs="?",
        const="all",
        help="only the ResNet-56 candidates table (comma-separated names, default all: see resnet56_candidates)",
    )
    args = parser.parse_args(argv)
    runtime.configure()
    print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}", flush=True)
    if args.variants:
        names = list(resnet56_candidates()) if args.variants == "all" else args.variants.split(",")
        bench_resnet56_variants(16 if args.quick else 128, max(args.repeats, 1), names)
        return
    names = [n for n in args.models.split(",") if n]
    batch = 16 if args.quick else 128
    bench_single_channel(1200 if args.quick else 12000, args.repeats)
    bench_pde_kernel(64 if args.quick else 256, 16 if args.quick else 32, args.repeats)
    bench_models(batch, args.repeats, names)
    if args.torch:
        # eos-jax's resnet56 step with PyTorch's optimizer, beside PyTorch's (medians of the repeats).
        ours = bench_resnet56_nesterov(batch, args.repeats)
        theirs = bench_torch_resnet56(batch, args.repeats)
        if theirs is not None:
            print(f"ratio resnet56 eos-jax / PyTorch = {ours / theirs:.2f}", flush=True)


if __name__ == "__main__":
    main()
