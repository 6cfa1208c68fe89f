"""Helpers shared by the PDE analyses: the checkerboard input and the float64 requirement.

The paper's Section 5 experiments use "a 256 x 256 checkerboard pattern filled with 1
and -1" (Figure 4, Table 2). We read it as the pixel-level pattern ``(-1)**(i + j)``
(squares of one pixel): its DFT is a single spike of height ``n**2`` at the Nyquist
frequency ``(n/2, n/2)`` and zero elsewhere, so ``max |I_hat|^2 = n**4`` and
``min |I_hat|^2 = 0``. Larger squares are available through ``square``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from eos_jax.errors import ConfigError


def checkerboard(size: int = 256, *, square: int = 1, dtype: Any = np.float64) -> np.ndarray:
    """A ``size x size`` checkerboard of +1 / -1 with ``square x square`` blocks.

    Args:
      size: image side length (pixels), >= 1.
      square: side of one constant block, >= 1 (1: the pixel pattern ``(-1)**(i+j)``).
      dtype: NumPy dtype of the result.

    Returns:
      A NumPy array of shape ``(size, size)``; entry ``(0, 0)`` is +1.

    Examples:
      The pixel pattern's DFT is one spike of height ``n**2`` at the Nyquist frequency:

      >>> import numpy as np
      >>> from eos_jax.pde.common import checkerboard
      >>> checkerboard(4).astype(int).tolist()
      [[1, -1, 1, -1], [-1, 1, -1, 1], [1, -1, 1, -1], [-1, 1, -1, 1]]
      >>> spec = np.abs(np.fft.fft2(checkerboard(8)))
      >>> float(spec[4, 4]), float(spec.sum())
      (64.0, 64.0)
      >>> checkerboard(4, square=2)[:, 0].tolist()
      [1.0, 1.0, -1.0, -1.0]
    """
    if int(size) != size or size < 1:
        raise ConfigError(f"checkerboard size={size!r}; expected an integer >= 1")
    if int(square) != square or square < 1:
        raise ConfigError(f"checkerboard square={square!r}; expected an integer >= 1")
    idx = np.arange(size) // square
    parity = (idx[:, None] + idx[None, :]) % 2
    return np.where(parity == 0, 1.0, -1.0).astype(dtype)


def require_x64(what: str) -> None:
    """Raises a ConfigError unless JAX's x64 mode is on; never switches it on (the caller's setting).

    The linearized PDE's bounds and spectra are float64 computations (a relative residual of 1e-10
    and alpha bounds of order 1e7 are out of float32's reach); under JAX's default float32 a
    float64 array would silently be float32.

    Args:
      what: the function that needs float64, named in the message.

    Examples:
      >>> import jax
      >>> from eos_jax.pde.common import require_x64
      >>> with jax.enable_x64(True):
      ...     require_x64("my_bound")
      >>> with jax.enable_x64(False):
      ...     require_x64("my_bound")
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: my_bound computes in float64 and needs JAX's x64 mode, which is off;
        enable it before calling (jax.config.update('jax_enable_x64', True), or eos_jax.runtime.configure())
    """
    if not jax.config.jax_enable_x64:
        raise ConfigError(
            f"{what} computes in float64 and needs JAX's x64 mode, which is off; enable it before calling "
            "(jax.config.update('jax_enable_x64', True), or eos_jax.runtime.configure())"
        )
