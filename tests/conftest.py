"""Test-wide JAX settings: float64 available, strict dtype promotion, rank promotion raises.

Library code names every dtype, so strict promotion catches silent float32 -> float64
upcasts (and the reverse) and implicit broadcasting of mismatched ranks.
"""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
