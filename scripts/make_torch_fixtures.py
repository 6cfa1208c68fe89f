"""Writes tests/fixtures/torch_optim.npz: PyTorch's own SGD and Adam results, for the
``rounding="torch"`` tests of eos_jax.optim (tests/test_optim_torch.py).

PyTorch is not a dependency of eos-jax; run this with any Python that has torch (CPU)::

    /path/to/torch-python scripts/make_torch_fixtures.py

For every run of ``tests/torch_fixture_inputs.RUNS`` it takes the same 50x40 float32
parameters and 30 gradients (rebuilt exactly by tests/torch_fixture_inputs.py) and stores
PyTorch's parameters after the last step (and, for Adam, after step 1). k = 1 uses
``torch.optim.SGD`` / ``torch.optim.Adam`` (``foreach=False``) themselves; k > 1 uses the
authors' perturbed step (sunyx523/surprising-instabilities, instability/PDE_nesterov.py:
``lr = lr * k`` in Python, ``d_p = d_p / k``, ``p.add_(d_p, alpha=-lr)``) written as the
same single-tensor loop, which is first checked to equal torch.optim's bits at k = 1.
It also counts, per Adam run, the elements where PyTorch's ``Tensor.sqrt`` differs from
the correctly rounded square root (NumPy's) on the run's ``exp_avg_sq``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch_fixture_inputs as fx  # noqa: E402


def sgd_run(p0, grads, k, form, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """PDE_nesterov's loop (dampening 0); form "paper" scales d by k and lr by 1/k."""
    p = torch.tensor(p0)
    buf, after1 = None, None
    lr_k = lr * k if form == "reference" else lr / k  # Python double, as the authors' code
    for t, g in enumerate(grads):
        d = torch.tensor(g)
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                buf = torch.clone(d).detach()
            else:
                buf.mul_(momentum).add_(d, alpha=1)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        d = d / k if form == "reference" else d * k
        p.add_(d, alpha=-lr_k)
        if t == 0:
            after1 = p.clone()
    return after1.numpy(), p.numpy(), 0


def adam_run(p0, grads, k, form, lr, betas, eps, weight_decay=0.0):
    """torch.optim.adam._single_tensor_adam (non-capturable, non-amsgrad), lr -> lr*k, m -> m/k."""
    beta1, beta2 = betas
    p = torch.tensor(p0)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step_t = torch.tensor(0.0)
    after1, sqrt_off = None, 0
    lr_k = lr * k if form == "reference" else lr / k
    for t, g in enumerate(grads):
        grad = torch.tensor(g)
        step_t += 1
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr_k / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        root = v.sqrt()
        vn = v.numpy()
        sqrt_off += int(np.sum(root.numpy().view(np.uint32) != np.sqrt(vn).view(np.uint32)))
        denom = (root / bias_correction2_sqrt).add_(eps)
        num = m / k if form == "reference" else m * k
        p.addcdiv_(num, denom, value=-step_size)
        if t == 0:
            after1 = p.clone()
    return after1.numpy(), p.numpy(), sqrt_off


def torch_optim_run(kind, p0, grads, hp):
    """torch.optim itself (foreach=False), k = 1."""
    p = torch.nn.Parameter(torch.tensor(p0))
    if kind == "sgd":
        opt = torch.optim.SGD([p], foreach=False, **hp)
    else:
        opt = torch.optim.Adam([p], foreach=False, **hp)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy().copy()


def main() -> None:
    torch.set_num_threads(1)
    p0, grads = fx.inputs()
    out = {"inputs_sha256": np.array(fx.digest(p0, grads)), "torch_version": np.array(torch.__version__)}
    runner = {"sgd": sgd_run, "adam": adam_run}
    for case, k, form in fx.RUNS:
        kind, hp = fx.CASES[case]
        after1, final, sqrt_off = runner[kind](p0, grads, k, form, **hp)
        if k == 1:
            ref = torch_optim_run(kind, p0, grads, hp)
            if not np.array_equal(ref.view(np.uint32), final.view(np.uint32)):
                raise SystemExit(f"{case}: the loop written here is not torch.optim's bits at k=1")
        name = f"{case}_k{k}_{form}"
        if kind == "adam":  # step 1 has a single sqrt: where Adam's first mismatches come from
            out[f"{name}_step1"] = after1
        out[f"{name}_final"] = final
        out[f"{name}_sqrt_off"] = np.array(sqrt_off)
        print(f"{name}: sqrt not correctly rounded at {sqrt_off} element-steps")
    path = os.path.join(ROOT, "tests", "fixtures", "torch_optim.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
