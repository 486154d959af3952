"""The global arrays of the multi-host scenario (importable without touching jax flags)."""

import numpy as np


def expected():
    rng = np.random.default_rng(42)
    return {"w": rng.standard_normal((64, 32)).astype(np.float32),
            "v": rng.standard_normal((48,)).astype(np.float32),
            "b": np.arange(16, dtype=np.int32)}
