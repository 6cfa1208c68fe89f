"""Cost of the Hessian trace and eigenvalue density (eos_jax.hessian), beside PyTorch doing the same work.

Networks: the main job's 3-layer single-channel 3x3 Swish CNN (``python -m experiments.eos --layers
3``: ``experiments.eos.build_problem`` on its data, the first available of its dataset chain) and
Cohen et al.'s fc-tanh 784-200-200-10 (cross-entropy; ``bench_hessian``'s net and init) on random
28x28 inputs. Both float32. For each, measured in this run (the fastest of ``--repeats`` calls after
a warm-up, which compiles; all calls of a network interleaved, so that they share the machine's load):

* ``gradient``: one full-batch gradient, in JAX and in PyTorch (the unit of the ratios);
* ``trace``: ``hessian.trace`` with ``--probes`` Rademacher probes (one HVP each), in gradients,
  as it defaults (all probes vmapped), one probe at a time (``probe_chunk=1``), and with
  ``linearize=True``;
* ``density``: ``hessian.density`` with 1 probe and ``--steps`` Lanczos steps (full
  reorthogonalization), in gradients, with and without ``linearize``;
* PyTorch as PyHessian (Yao et al. 2020, amirgholami/PyHessian) computes them: one gradient
  with ``create_graph=True``, then one double backward ``torch.autograd.grad(g, params, v)`` per
  product; Hutchinson with Rademacher vectors; Lanczos with full reorthogonalization from a
  normalized Gaussian vector and ``eigh`` of the tridiagonal. Each PyTorch call's time in its own
  gradients and over the JAX call's time (above 1: JAX is faster).

A check line per network compares one JAX and one PyTorch HVP on the same vector (the same
function is differentiated). Run::

    python benchmarks/bench_spectrum.py            # 2-core CPU: about 1-2 minutes
    python benchmarks/bench_spectrum.py --quick    # tiny sizes: seconds (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_hessian import init_mlp
from bench_hessian import loss_fn as mlp_loss

from eos_jax import hessian as hs
from eos_jax import runtime


def race(calls: dict, repeats: int) -> dict[str, float]:
    """Fastest wall time of each ``calls[name]()`` (blocking), in seconds, the calls interleaved.

    One warm-up call each (it compiles), then ``repeats`` rounds that call every one once: on a
    shared machine the load changes over a run, and interleaving gives every call the same chances.
    """
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------------------------
# The two networks, in JAX (as the package builds them) and in PyTorch (the same functions).


def main_job_cnn(n: int | None):
    """The main job's problem: ``(loss_fn, params, batch, torch_loss, torch_params, order, what)``.

    ``order(tree)`` lists a params-like pytree's arrays as the PyTorch parameters are listed.
    """
    from experiments import eos

    cfg = eos.default_config("cnn", layers=3, lr=(5.0,))
    data, info = eos.load_data(cfg, stream=open(os.devnull, "w"))
    if n is not None:
        data = dict(data, x=data["x"][:n], y=data["y"][:n])
    problem, _ = eos.build_problem(cfg, data)
    params = problem.init_params(jax.random.key(0))
    batch = jax.device_put(problem.data)
    x = torch.from_numpy(np.array(batch["x"])).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    y = torch.from_numpy(np.array(batch["y"])).to(torch.float32)
    tparams = [
        torch.from_numpy(np.asarray(params[f"conv{i}"]["kernel"])[:, :, 0, 0].copy())[None, None].requires_grad_()
        for i in range(cfg.layers)
    ]

    def torch_loss(ps):
        h = x
        for k in ps:  # valid cross-correlation, no bias, Swish(1)
            h = torch.nn.functional.conv2d(h, k)
            h = h * torch.sigmoid(h)
        logit = h.mean(dim=(1, 2, 3))
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, y)

    def order(tree):
        return [tree[f"conv{i}"]["kernel"] for i in range(cfg.layers)]

    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    what = f"main-job cnn 3 layers ({n_params} params) on {info['name']} x {x.shape[0]}"
    return problem.loss_fn, params, batch, torch_loss, tparams, order, what


def fc_tanh(n: int, sizes: tuple[int, ...]):
    """fc-tanh on random inputs: ``(loss_fn, params, batch, torch_loss, torch_params, order, what)``."""
    key = jax.random.key(0)
    params = init_mlp(key, sizes)
    x = jax.random.uniform(jax.random.fold_in(key, 100), (n, sizes[0]), jnp.float32)
    y = jax.random.randint(jax.random.fold_in(key, 101), (n,), 0, sizes[-1], jnp.int32)
    tx, ty = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    tparams = [
        torch.from_numpy(np.asarray(a).copy()).requires_grad_() for layer in params for a in (layer["w"], layer["b"])
    ]

    def torch_loss(ps):
        h = tx
        for i in range(0, len(ps) - 2, 2):
            h = torch.tanh(h @ ps[i] + ps[i + 1])
        return torch.nn.functional.cross_entropy(h @ ps[-2] + ps[-1], ty)

    def order(tree):
        return [a for layer in tree for a in (layer["w"], layer["b"])]

    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    what = f"fc-tanh {'-'.join(map(str, sizes))} ({n_params} params) x {n}"
    return mlp_loss, params, (x, y), torch_loss, tparams, order, what


# ------------------------------------------------------------------------------------------------
# PyHessian's trace and density in PyTorch.


def torch_grad(torch_loss, ps):
    return torch.autograd.grad(torch_loss(ps), ps)


def torch_hvp_fn(torch_loss, ps):
    """PyHessian's products: the gradient graph once, then ``v -> H v`` by double backward."""
    grads = torch.autograd.grad(torch_loss(ps), ps, create_graph=True)
    shapes = [p.shape for p in ps]
    sizes = [p.numel() for p in ps]

    def hvp(flat_v):
        vs = [c.view(s) for c, s in zip(torch.split(flat_v, sizes), shapes)]
        hv = torch.autograd.grad(grads, ps, grad_outputs=vs, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    return hvp, sum(sizes)


def torch_trace(torch_loss, ps, num_probes: int, gen: torch.Generator) -> float:
    """Hutchinson with Rademacher probes (PyHessian ``hessian.trace``)."""
    hvp, n = torch_hvp_fn(torch_loss, ps)
    samples = []
    for _ in range(num_probes):
        z = torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1
        samples.append(float(torch.dot(z, hvp(z))))
    return float(np.mean(samples))


def torch_density(torch_loss, ps, num_steps: int, gen: torch.Generator):
    """Lanczos with full reorthogonalization from a unit Gaussian vector (PyHessian ``hessian.density``)."""
    hvp, n = torch_hvp_fn(torch_loss, ps)
    q = torch.zeros((num_steps, n))
    v = torch.randn(n, generator=gen)
    q[0] = v / torch.linalg.norm(v)
    alpha, beta = torch.zeros(num_steps), torch.zeros(num_steps - 1)
    for j in range(num_steps):
        w = hvp(q[j])
        alpha[j] = torch.dot(w, q[j])
        w = w - q[: j + 1].T @ (q[: j + 1] @ w)  # full reorthogonalization (includes alpha and beta terms)
        if j + 1 < num_steps:
            beta[j] = torch.linalg.norm(w)
            q[j + 1] = w / beta[j]
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(t)
    return nodes, vecs[0] ** 2


# ------------------------------------------------------------------------------------------------


def bench(name: str, built, args) -> None:
    loss, params, batch, torch_loss, tparams, order, what = built
    print(f"{name}: {what}", flush=True)
    reps = args.repeats
    key = jax.random.key(1)

    # Check: the same function on both sides (one HVP on the same vector).
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / 10, params)
    hv = jax.jit(lambda p, b, t: hs.hvp(loss, p, b, t))(params, batch, v)
    flat_j = np.concatenate([np.asarray(a).reshape(-1) for a in order(hv)])
    thvp, n = torch_hvp_fn(torch_loss, tparams)
    flat_t = thvp(torch.full((n,), 0.1)).detach().numpy()
    rel = np.linalg.norm(flat_j - flat_t) / np.linalg.norm(flat_t)
    print(f"  check: JAX and PyTorch HVP on the same vector, relative difference {rel:.1e}", flush=True)

    p_, s_ = args.probes, args.steps
    gen = torch.Generator().manual_seed(0)
    block = jax.block_until_ready
    grad = jax.jit(jax.grad(loss))
    traces = {
        label: jax.jit(lambda p, b, k, o=opts: hs.trace(loss, p, b, k, num_probes=p_, **o))
        for label, opts in (("default", {}), ("probe_chunk=1", {"probe_chunk": 1}), ("linearize", {"linearize": True}))
    }
    densities = {
        label: jax.jit(lambda p, b, k, o=opts: hs.density(loss, p, b, k, num_probes=1, num_steps=s_, **o))
        for label, opts in (("default", {}), ("linearize", {"linearize": True}))
    }
    calls = {
        "grad": lambda: block(grad(params, batch)),
        "torch grad": lambda: torch_grad(torch_loss, tparams),
        "torch trace": lambda: torch_trace(torch_loss, tparams, p_, gen),
        "torch density": lambda: torch_density(torch_loss, tparams, s_, gen),
    }
    calls.update({f"trace {k}": (lambda f=f: block(f(params, batch, key))) for k, f in traces.items()})
    calls.update({f"density {k}": (lambda f=f: block(f(params, batch, key))) for k, f in densities.items()})
    t = race(calls, reps)
    t_grad, tt_grad = t["grad"], t["torch grad"]
    print(f"  gradient: JAX {t_grad * 1e3:.2f} ms, PyTorch {tt_grad * 1e3:.2f} ms", flush=True)
    tt = t["torch trace"]
    for label, f in traces.items():
        r, tj = f(params, batch, key), t[f"trace {label}"]
        print(
            f"  trace {p_} probes ({int(r.num_hvps)} HVPs) {label:13s}: JAX {tj * 1e3:9.2f} ms = {tj / t_grad:6.2f}"
            f" gradients (estimate {float(r.estimate):.4g} +- {float(r.stderr):.2g});  PyTorch {tt * 1e3:9.2f} ms ="
            f" {tt / tt_grad:6.2f} of its gradients;  PyTorch / JAX = {tt / tj:5.2f}",
            flush=True,
        )
    tt = t["torch density"]
    t_nodes, _ = torch_density(torch_loss, tparams, s_, gen)
    for label, f in densities.items():
        r, tj = f(params, batch, key), t[f"density {label}"]
        print(
            f"  density 1 probe x {s_} steps ({int(r.num_hvps)} HVPs) {label:9s}: JAX {tj * 1e3:9.2f} ms ="
            f" {tj / t_grad:6.2f} gradients (top Ritz {float(r.top_eigenvalues[0]):.5g});  PyTorch {tt * 1e3:9.2f} ms"
            f" = {tt / tt_grad:6.2f} of its gradients (top Ritz {float(t_nodes[-1]):.5g});  PyTorch / JAX = {tt / tj:5.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--cnn-n", type=int, default=None, help="images of the main job's data (default: all)")
    ap.add_argument("--fc-n", type=int, default=5000, help="examples of the fc net (default 5000, CIFAR-5k's size)")
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    args = ap.parse_args()
    sizes = (784, 200, 200, 10)
    if args.quick:
        args.cnn_n, args.fc_n, args.probes, args.steps, args.repeats = 64, 64, 4, 6, 2
        sizes = (784, 16, 16, 10)
    runtime.configure(x64=False)
    load = os.getloadavg()
    print(
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} cpus, load {load[0]:.2f}",
        flush=True,
    )
    bench("cnn", main_job_cnn(args.cnn_n), args)
    bench("fc", fc_tanh(args.fc_n, sizes), args)
    load = os.getloadavg()
    print(f"load after {load[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
