"""Every code example of seed/checkpointing_guide.md, as written, with ``linearnexus``
replaced by ``shardckpt``.

What the guide leaves open is filled in minimally: ``ModelConfig(...)`` is the tiny default
config, ``loss``/``acc`` come from a fake (or one real) training step, ``max_steps`` and
``save_interval`` are small, ``scheduler`` is a fake with ``state_dict``/``load_state_dict``,
and ``my_models`` is a module registered in ``sys.modules`` holding a small custom nnx
module and its config dataclass. Relative paths ("./checkpoints") are used as written,
inside a temporary working directory.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings

import jax.numpy as jnp
import optax
import pytest
from conftest import assert_bit_equal, assert_not_bit_equal, bits_of, make_optimizer, train_steps
from flax import nnx


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --- Quick Start -------------------------------------------------------------------------

def test_simple_save_load(model):
    original = bits_of(model)
    from shardckpt import load_model, save_model

    # Save model (auto-extracts config from model.config)
    save_model("./my_checkpoint", model)

    # Load model
    model, config = load_model("./my_checkpoint")

    from shardckpt import LMModel
    assert isinstance(model, LMModel)
    assert config == model.config.to_dict()
    assert_bit_equal(model, original, "simple save/load")


def test_with_optimizer_state(model, optimizer):
    train_steps(model, optimizer, 2)
    model_bits, opt_bits = bits_of(model), bits_of(optimizer)

    import optax

    from shardckpt import load_model, load_optimizer, save_model, save_optimizer

    # Save both model and optimizer
    save_model("./checkpoint", model)
    save_optimizer("./checkpoint", optimizer)

    # Load
    model, config = load_model("./checkpoint")
    tx = optax.adamw(1e-4)
    optimizer = load_optimizer("./checkpoint", model, tx)

    assert isinstance(optimizer, nnx.Optimizer)
    assert int(optimizer.step[...]) == 2
    assert_bit_equal(model, model_bits, "model")
    assert_bit_equal(optimizer, opt_bits, "optimizer")
    # The loaded pair trains on.
    train_steps(model, optimizer, 1)
    assert int(optimizer.step[...]) == 3


# --- CheckpointManager: Basic Usage / Loading Checkpoints ----------------------------------

# Fake per-step training loss: best three by "min" are steps 500, 200 and (final) 1000.
FAKE_LOSS = {0: 5.0, 100: 4.0, 200: 1.0, 300: 3.5, 400: 3.0, 500: 0.5, 600: 2.9,
             700: 2.8, 800: 2.7, 900: 2.6, 1000: 2.5}


def _basic_usage(model, optimizer):
    """The guide's "Basic Usage" block. Returns the manager and bit snapshots per step."""
    snapshots = {}
    from shardckpt import CheckpointManager

    # Initialize manager
    manager = CheckpointManager(
        directory="./checkpoints",
        max_to_keep=5,           # Keep last 5 checkpoints
        best_metric="loss",      # Track best by loss
        best_mode="min",         # Lower is better
        best_to_keep=3,          # Keep 3 best
    )

    # During training
    for step in range(1000):
        # ... training code ...
        if step % 100 == 0:   # (one real optimizer step per saved step keeps the test fast)
            train_steps(model, optimizer, 1)
        loss = jnp.float32(FAKE_LOSS.get(step, 9.0))   # a 0-d jax array, as a train step returns
        acc = 1.0 - step / 2000

        if step % 100 == 0:
            manager.save(
                step=step,
                model=model,
                optimizer=optimizer,
                metrics={"loss": loss, "accuracy": acc},
            )
            snapshots[step] = (bits_of(model), bits_of(optimizer))

    # Not in the guide's loop (it saves 0..900): a final save, so that the guide's
    # "./checkpoints/step_1000" below exists.
    train_steps(model, optimizer, 1)
    manager.save(step=1000, model=model, optimizer=optimizer,
                 metrics={"loss": jnp.float32(FAKE_LOSS[1000]), "accuracy": 0.5})
    snapshots[1000] = (bits_of(model), bits_of(optimizer))
    return manager, snapshots


def test_basic_usage_and_loading(model, optimizer):
    manager, snapshots = _basic_usage(model, optimizer)
    # Retention: the last 5 (600..1000) plus the 3 best by loss (500, 200, 1000).
    assert manager.all_steps() == [200, 500, 600, 700, 800, 900, 1000]
    assert manager.latest_step == 1000
    assert manager.best_step == 500
    assert manager.checkpoints[1].metrics["loss"] == pytest.approx(0.5)

    # The seed guide's `manager.load_latest()` rebuilt the optimizer as optax.adamw(1e-4)
    # when no tx was given: a resumed run could silently train on with another optimizer.
    # shardckpt refuses and says what to pass (#18.1): the seed's calls, with the tx given.
    from shardckpt import CheckpointError
    with pytest.raises(CheckpointError, match=r"no tx= was given.*Pass the tx= it was saved with"):
        manager.load_latest()
    tx = optax.adamw(1e-4)

    # Load most recent
    state = manager.load_latest(tx=tx)
    model = state.model
    optimizer = state.optimizer
    start_step = state.step
    assert start_step == 1000
    assert_bit_equal(model, snapshots[1000][0], "latest model")
    assert_bit_equal(optimizer, snapshots[1000][1], "latest optimizer")
    assert state.metrics["loss"] == pytest.approx(2.5)
    assert state.metrics["accuracy"] == pytest.approx(0.5)

    # Load best checkpoint
    state = manager.load_best(tx=tx)
    assert state.step == 500
    assert_bit_equal(state.model, snapshots[500][0], "best model")
    assert_bit_equal(state.optimizer, snapshots[500][1], "best optimizer")

    # Load specific step
    state = manager.load_step(500, tx=tx)
    assert state.step == 500
    assert_bit_equal(state.model, snapshots[500][0], "step 500")
    assert_not_bit_equal(state.model, snapshots[1000][0])

    # Direct path load
    state = manager.load("./checkpoints/step_1000", tx=tx)
    assert state.step == 1000
    assert_bit_equal(state.model, snapshots[1000][0], "direct path")
    assert state.config == model.config.to_dict()


# --- Resume Training -------------------------------------------------------------------------

class SimulatedCrash(Exception):
    pass


def _resume_training_script(max_steps, save_interval, crash_at=None, directory="./checkpoints"):
    """The guide's "Resume Training" block, verbatim but for the directory argument, the
    ``...`` filled in, and an optional simulated crash."""
    import optax

    from shardckpt import CheckpointManager, LMModel, ModelConfig

    # Initialize manager
    manager = CheckpointManager(directory, max_to_keep=5)

    # Try to resume
    if manager.latest_step is not None:
        # Resume from checkpoint
        state = manager.load_latest(tx=optax.adamw(1e-4))
        model = state.model
        optimizer = state.optimizer
        start_step = state.step + 1
        print(f"Resuming from step {state.step}")
    else:
        # Start fresh
        config = ModelConfig(dropout=0.1)   # tiny defaults; dropout so RNG state matters
        model = LMModel(config, rngs=nnx.Rngs(0))
        # The guide omits wrt=; flax 0.12 requires it.
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
        start_step = 0

    # Training loop
    for step in range(start_step, max_steps):
        # ... training ...
        train_steps(model, optimizer, 1, seed=7)
        if step == crash_at:
            raise SimulatedCrash(step)

        if step % save_interval == 0:
            manager.save(step=step, model=model, optimizer=optimizer)
    return model, optimizer


def test_resume_training(capsys):
    max_steps, save_interval = 7, 2
    ref_model, ref_opt = _resume_training_script(max_steps, save_interval, directory="./reference")

    with pytest.raises(SimulatedCrash):
        _resume_training_script(max_steps, save_interval, crash_at=5)
    capsys.readouterr()
    model, optimizer = _resume_training_script(max_steps, save_interval)
    assert "Resuming from step 4" in capsys.readouterr().out

    assert int(optimizer.step[...]) == max_steps
    assert_bit_equal(model, ref_model, "resumed model (params and RNG state)")
    assert_bit_equal(optimizer, ref_opt, "resumed optimizer")

    # A third start finds the final checkpoint (step 6) and has nothing left to do.
    model, optimizer = _resume_training_script(max_steps, save_interval)
    assert "Resuming from step 6" in capsys.readouterr().out
    assert_bit_equal(model, ref_model, "reloaded final model")


# --- CheckpointState -------------------------------------------------------------------------

def test_checkpoint_state_fields():
    from shardckpt import CheckpointState

    assert dataclasses.is_dataclass(CheckpointState)
    fields = dataclasses.fields(CheckpointState)
    # the guide's fields, in the guide's order (positional construction keeps working) ...
    assert [f.name for f in fields][:7] == [
        "step", "model", "optimizer", "config", "train_config", "metrics", "extra"]
    # ... and only defaulted additions after them (items: the extra pytrees, by name)
    assert [f.name for f in fields][7:] == ["items"]
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in fields[7:])
    CheckpointState(0, None, None, {}, {}, {}, {})   # the guide's seven, positionally


# --- Advanced Usage: Save Extra Data --------------------------------------------------------

class FakeScheduler:
    def __init__(self, last_epoch=0, base_lrs=(1e-3,)):
        self.last_epoch = last_epoch
        self.base_lrs = list(base_lrs)

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "warmup": {"done": True}}

    def load_state_dict(self, d):
        self.last_epoch = d["last_epoch"]
        self.base_lrs = list(d["base_lrs"])


def test_save_extra_data(model):
    from shardckpt import CheckpointManager

    manager = CheckpointManager("./checkpoints")
    step = 42
    scheduler = FakeScheduler(last_epoch=17, base_lrs=(3e-4, 1e-4))

    manager.save(
        step=step,
        model=model,
        extra={
            "lr_schedule_state": scheduler.state_dict(),
            "best_eval_loss": 0.5,
            "wandb_run_id": "abc123",
        },
    )

    scheduler = FakeScheduler()
    # Load
    state = manager.load_latest()
    scheduler.load_state_dict(state.extra["lr_schedule_state"])

    assert (scheduler.last_epoch, scheduler.base_lrs) == (17, [3e-4, 1e-4])
    assert state.extra == {"lr_schedule_state": {"last_epoch": 17, "base_lrs": [3e-4, 1e-4],
                                                 "warmup": {"done": True}},
                           "best_eval_loss": 0.5, "wandb_run_id": "abc123"}
    assert state.step == 42
    assert state.optimizer is None
    assert_bit_equal(state.model, model)


# --- Advanced Usage: Custom Model Classes ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CustomConfig:
    features: int = 6
    hidden: int = 10
    dropout: float = 0.2

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class CustomModel(nnx.Module):
    """Linear -> BatchNorm -> Dropout -> Linear: parameters, batch stats and RNG state."""

    def __init__(self, config: CustomConfig, rngs: nnx.Rngs):
        self.config = config
        self.inp = nnx.Linear(config.features, config.hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(config.hidden, rngs=rngs)
        self.drop = nnx.Dropout(config.dropout, rngs=rngs)
        self.out = nnx.Linear(config.hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.inp(x)))))


@pytest.fixture
def my_models(monkeypatch):
    mod = types.ModuleType("my_models")
    mod.CustomModel, mod.CustomConfig = CustomModel, CustomConfig
    monkeypatch.setitem(sys.modules, "my_models", mod)
    return mod


def test_custom_model_classes(my_models):
    from shardckpt import CheckpointManager, save_model

    custom = my_models.CustomModel(my_models.CustomConfig(hidden=12), rngs=nnx.Rngs(3))
    custom(jnp.ones((4, 6)))          # moves batch stats and the dropout RNG counter
    saved = bits_of(custom)
    save_model("./checkpoint", custom)
    manager = CheckpointManager("./checkpoints")

    # If you have a custom model class
    from my_models import CustomConfig, CustomModel

    state = manager.load(
        "./checkpoint",
        model_cls=CustomModel,
        config_cls=CustomConfig,
    )

    assert isinstance(state.model, CustomModel)
    assert state.model.config == CustomConfig(hidden=12)
    assert state.config == CustomConfig(hidden=12).to_dict()
    assert state.optimizer is None
    assert_bit_equal(state.model, saved, "custom model")


# --- Advanced Usage: Different Optimizer for Fine-tuning ------------------------------------

def test_different_optimizer_for_fine_tuning(model):
    from shardckpt import CheckpointManager

    optimizer = make_optimizer(model, optax.adamw(1e-3))
    train_steps(model, optimizer, 2)
    manager = CheckpointManager("./checkpoints")
    manager.save(step=2, model=model, optimizer=optimizer)

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # adam's state is adamw's: nothing to warn about
        # Load checkpoint but use different optimizer
        state = manager.load_latest(
            tx=optax.adam(1e-5),  # New learning rate
        )

    assert_bit_equal(state.optimizer.opt_state[0], optimizer.opt_state[0], "mu/nu/count")
    assert int(state.optimizer.step[...]) == 2
    assert_bit_equal(state.model, model)
