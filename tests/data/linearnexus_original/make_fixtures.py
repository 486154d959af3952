"""Regenerate the files in this folder with the ORIGINAL LinearNexus checkpoint code.

    python tests/data/linearnexus_original/make_fixtures.py /path/to/linearnexus/checkpoint.py

The original module is loaded from the path given (it is not part of this repository); its
own ``CheckpointManager.save``, ``save_checkpoint``, ``save_model`` and ``save_optimizer``
write the files. Nothing here imitates them. Regenerating gives other bytes (random
init, zip timestamps); the tests read whatever is here.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import jax
import optax
from flax import nnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))   # tests/ (conftest's training loop)
sys.path.insert(0, str(HERE.parents[2]))   # the repository (shardckpt's LMModel)

from conftest import train_steps

from shardckpt import LMModel, ModelConfig

TINY = {"vocab_size": 32, "hidden_size": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16,
        "intermediate_size": 32}


def main(original: str) -> None:
    spec = importlib.util.spec_from_file_location("linearnexus_checkpoint_original", original)
    orig = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = orig     # its dataclasses look their module up there
    spec.loader.exec_module(orig)
    for name in ("manager", "save_checkpoint", "bfloat16"):
        shutil.rmtree(HERE / name, ignore_errors=True)

    # CheckpointManager.save: config.json (model_config, step, train_config), metrics.json, extra.json
    model = LMModel(ModelConfig(**TINY, dropout=0.1), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    train_steps(model, optimizer, 2)
    mgr = orig.CheckpointManager(HERE / "manager", max_to_keep=3)
    mgr.save(100, model, optimizer, metrics={"loss": 1.25}, train_config={"lr": 1e-3},
             extra={"wandb_run_id": "abc123"})

    # save_checkpoint: meta.json (step, metrics) instead of metrics.json
    orig.save_checkpoint(HERE / "save_checkpoint", model, step=7, optimizer=optimizer,
                         metrics={"loss": 2.5})

    # bfloat16 parameters and Adam moments (numpy stores them as raw V2), whole config.json dict
    model = LMModel(ModelConfig(**TINY, dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    train_steps(model, optimizer, 1)
    orig.save_model(HERE / "bfloat16", model, {"model_config": model.config.to_dict(), "step": 3})
    orig.save_optimizer(HERE / "bfloat16", optimizer)
    print("jax", jax.__version__, "written under", HERE)


if __name__ == "__main__":
    main(sys.argv[1])
