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
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax import losses, models, runtime


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


def bench_resnet56_nesterov(batch: int, repeats: int) -> float:
    """eos-jax's ResNet-56 step with PyTorch's update (SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4)."""
    model = models.get("resnet56")
    key, x, y = cifar_batch(batch)
    variables = jax.jit(lambda k: model.init(k, (32, 32, 3)))(key)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))

    def loss_fn(params, state):
        logits, new_state = model.apply({"params": params, **state}, x, train=True)
        return losses.cross_entropy(logits, y), new_state

    @jax.jit
    def step(variables, opt_state):
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, params)
        return {"params": optax.apply_updates(params, updates), **new_state}, opt_state

    _, t = _time(step, variables, tx.init(variables["params"]), repeats=repeats)
    print(f"resnet56  batch {batch:4d} step {t:8.3f} s   (SGD Nesterov + wd, as PyTorch's below)", flush=True)
    return t


def bench_torch_resnet56(batch: int, repeats: int) -> float | None:
    """PyTorch's ResNet-56 (option A, He et al.) SGD step at ``batch``; None when torch is missing."""
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError:
        print("torch     not installed: no PyTorch reference (pip install torch)", flush=True)
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

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        fwd = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            fwd.append(time.perf_counter() - t0)
    t, tf = statistics.median(times), statistics.median(fwd)
    print(
        f"torch     batch {batch:4d} step {t:8.3f} s   (PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"SGD Nesterov + wd)   forward {tf:.3f} s -> backward+update {t - tf:.3f} s",
        flush=True,
    )
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="fc,vgg16,vgg16_bn,resnet56")
    parser.add_argument("--torch", action="store_true", help="PyTorch's ResNet-56 step beside eos-jax's")
    args = parser.parse_args(argv)
    runtime.configure()
    print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}", flush=True)
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
