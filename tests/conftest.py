"""Shared fixtures and helpers for the shardckpt tests.

Everything here is tiny (``ModelConfig()`` defaults, ~0.1M parameters) and runs on the CPU
with threads only: no test in this directory starts Ray.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

# The package is importable from the repo root even when not pip-installed.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from shardckpt import LMModel, ModelConfig  # noqa: E402
from shardckpt.lm.models import lm_loss  # noqa: E402

# Credentials for the loopback S3 server, set before anything starts Ray so that writer and
# reader actors see them too (the endpoint travels in each URI: ?endpoint_url=...).
for _k, _v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)

BATCH, SEQ = 2, 16
LR = 1e-3


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 for the whole session, with bucket "ckpts"."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    from tests.scenarios.s3server import MotoServer
    with MotoServer(str(tmp_path_factory.mktemp("moto"))) as server:
        server.create_bucket("ckpts")
        yield server


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig()


@pytest.fixture
def dropout_config() -> ModelConfig:
    return ModelConfig(dropout=0.1)


@pytest.fixture
def model(tiny_config) -> LMModel:
    return LMModel(tiny_config, rngs=nnx.Rngs(0))


@pytest.fixture
def optimizer(model) -> nnx.Optimizer:
    return make_optimizer(model)


def make_optimizer(model, tx=None) -> nnx.Optimizer:
    return nnx.Optimizer(model, tx if tx is not None else optax.adamw(LR), wrt=nnx.Param)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
# Only the forward/backward pass is compiled (once per model structure). The optimizer
# update runs eagerly: a compiled update would be recompiled for every new optax
# transformation object (its functions are static jit arguments), and the guide's examples
# build a fresh ``optax.adamw(...)`` each time. Eager ops are cached by shape, so a new
# optimizer costs nothing, and the step is still deterministic (bit-exact resume holds).
_loss_and_grad = nnx.jit(nnx.value_and_grad(lm_loss))


def batch_for(step: int, seed: int, vocab_size: int) -> jax.Array:
    """The batch of absolute training step ``step``: a pure function of (seed, step), so an
    interrupted and resumed run sees exactly the batches of an uninterrupted one."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.randint(key, (BATCH, SEQ), 0, vocab_size, dtype=jnp.int32)


def train_steps(model, optimizer, n: int, seed: int = 0) -> float | None:
    """Run ``n`` optimizer steps; the batch depends on the optimizer's own step counter."""
    loss = None
    vocab = model.config.vocab_size
    for _ in range(n):
        step = int(optimizer.step[...])
        loss, grads = _loss_and_grad(model, batch_for(step, seed, vocab))
        optimizer.update(model, grads)
    return None if loss is None else float(loss)


# --------------------------------------------------------------------------------------
# bit-exact comparison
# --------------------------------------------------------------------------------------
def raw_bits(x) -> np.ndarray:
    """The raw bits of an array (typed PRNG keys as their key data) as an unsigned view."""
    if isinstance(x, nnx.Variable):
        x = x.get_value()
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a


def flat_state(tree) -> dict[str, object]:
    """Dotted key -> leaf value of a pytree or nnx state (Variables unwrapped)."""
    if isinstance(tree, nnx.Pytree):  # modules, optimizers, Rngs
        tree = nnx.state(tree)
    out = {}
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    for path, leaf in leaves:
        parts = []
        for p in path:
            for attr in ("key", "idx", "name"):
                if hasattr(p, attr):
                    parts.append(str(getattr(p, attr)))
                    break
            else:
                parts.append(str(p))
        out[".".join(parts)] = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    return out


class Snapshot(dict):
    """What ``bits_of`` returns: key -> (dtype, shape, raw bytes)."""


def bits_of(tree) -> Snapshot:
    """A snapshot of a tree that compares equal exactly when keys, dtypes, shapes and raw
    bits all agree (scalar leaves by type and value). Safe to keep across later updates."""
    out = Snapshot()
    for k, v in flat_state(tree).items():
        if hasattr(v, "dtype") and hasattr(v, "shape"):
            out[k] = (str(v.dtype), tuple(v.shape), raw_bits(v).tobytes())
        else:
            out[k] = (type(v).__name__, repr(v))
    return out


def assert_bit_equal(a, b, what: str = "") -> None:
    """``a`` and ``b`` (trees, modules, optimizers or ``bits_of`` snapshots) are bit-identical."""
    sa = a if _is_snapshot(a) else bits_of(a)
    sb = b if _is_snapshot(b) else bits_of(b)
    assert sorted(sa) == sorted(sb), f"{what}: keys differ: {sorted(set(sa) ^ set(sb))[:10]}"
    bad = [k for k in sa if sa[k] != sb[k]]
    assert not bad, f"{what}: {len(bad)} leaves differ, e.g. {bad[:5]}"


def _is_snapshot(x) -> bool:
    return isinstance(x, Snapshot)


def assert_not_bit_equal(a, b) -> None:
    sa = a if _is_snapshot(a) else bits_of(a)
    sb = b if _is_snapshot(b) else bits_of(b)
    assert any(sa[k] != sb.get(k) for k in sa)


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def this_host() -> str:
    """The host tag shardckpt puts into hidden tmp/old/del directory names."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def dead_pid() -> int:
    """A pid no process has: above the kernel's pid_max."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        pid_max = 1 << 22
    pid = pid_max + 4321
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def hidden_entries(directory: os.PathLike) -> list[str]:
    """Names of hidden entries (tmp/old/del leftovers) in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def tree_of_files(root: os.PathLike) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
