"""Concurrent item saves into one checkpoint (issue #11.11): no lost update.

``save_model`` and ``save_optimizer`` each write one item and carry the other over from
the version they find (``keep_other_items``). Two processes doing so on one path used to
each carry over the version *before* the other's save, so a ``save_optimizer`` that had
returned was silently reverted. Now the committer re-reads the checkpoint right before
publishing and carries over again if it changed, and on a local disk the two take turns
under ``.<name>.lock`` beside the checkpoint: both items survive, each with the last value
its writer saved, and once a save returned no later version has an older value of it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from shardckpt.errors import CheckpointError, CheckpointNotFoundError
from shardckpt.loading.checkpoint import Checkpoint, read_consistently
from shardckpt.testing import save_items

STRESS = os.environ.get("SHARDCKPT_STRESS") == "1"
ROUNDS = 120 if STRESS else 25


def _tree(i: int) -> dict:
    return {"w": np.full((4, 8), i, np.int32), "b": np.full(3, i, np.float32)}


def _item_saver(path: str, item: str, rounds: int, acked, start) -> None:
    """Save ``item`` with values 0..rounds-1, recording each value once its save returned."""
    start.wait()
    for i in range(rounds):
        save_items(path, {item: _tree(i)}, keep_other_items=True, num_shards=2,
                        compress=(i % 3 == 0), backend="threads")
        acked.value = i


def _value(path: str, item: str) -> int | None:
    def load():
        ck = Checkpoint(path)
        if item not in ck.items:
            return None
        return int(ck.read_arrays(item, ["w"])["w"][0, 0])
    return read_consistently(load)


def _race(path: Path, rounds: int, target=_item_saver) -> dict:
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    acked = {item: ctx.Value("i", -1) for item in ("model", "optimizer")}
    procs = [ctx.Process(target=target, args=(str(path), item, rounds, acked[item], start))
             for item in ("model", "optimizer")]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    reads = regressions = 0
    while any(p.is_alive() for p in procs):
        for item in ("model", "optimizer"):
            before = acked[item].value
            try:
                v = _value(str(path), item)
            except CheckpointNotFoundError:
                continue
            reads += 1
            if before >= 0 and (v is None or v < before):
                regressions += 1        # a value that had been acknowledged was lost
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return {"reads": reads, "regressions": regressions}


@pytest.mark.parametrize("run", range(2))
def test_concurrent_item_saves_both_survive(tmp_path, run):
    path = tmp_path / "ck"
    figures = _race(path, ROUNDS)
    ck = Checkpoint(path)
    assert sorted(ck.items) == ["model", "optimizer"]
    for item in ("model", "optimizer"):
        got = ck.read_arrays(item)
        np.testing.assert_array_equal(got["w"], _tree(ROUNDS - 1)["w"])
        np.testing.assert_array_equal(got["b"], _tree(ROUNDS - 1)["b"])
    assert figures["regressions"] == 0, figures
    assert not (tmp_path / ".ck.lock").exists()          # the lock file goes with its holder
    print(f"lost update: {2 * ROUNDS} racing item saves, {figures['reads']} reads, "
          f"{figures['regressions']} acknowledged values lost")


def _nnx_saver(path: str, item: str, rounds: int, acked, start, no_exchange: bool = False) -> None:
    """The public functions: save_model / save_optimizer of real nnx objects. ``no_exchange``:
    as on a filesystem without ``renameat2(RENAME_EXCHANGE)`` (overlay, some FUSE mounts),
    where a replacement is a pair of renames and the directory is briefly absent."""
    if no_exchange:
        import errno

        from shardckpt.testing import Fault, FaultPlan
        FaultPlan(Fault("exchange", "*", errno.EINVAL, times=1 << 62)).__enter__()
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from shardckpt import save_model, save_optimizer
    from shardckpt.lm.models import LMModel, ModelConfig
    model = LMModel(ModelConfig(), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    start.wait()
    for i in range(rounds):
        if item == "model":
            model.embed.embedding.value = jnp.full_like(model.embed.embedding.value, i)
            save_model(path, model, backend="threads")
        else:
            opt.step.value = jnp.asarray(i, opt.step.value.dtype)
            save_optimizer(path, opt, backend="threads")
        acked.value = i


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "rename-pair"])
def test_save_model_and_save_optimizer_racing(tmp_path, no_exchange):
    pytest.importorskip("optax")
    path = tmp_path / "ck"
    rounds = 8
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    acked = {item: ctx.Value("i", -1) for item in ("model", "optimizer")}
    procs = [ctx.Process(target=_nnx_saver, args=(str(path), item, rounds, acked[item], start, no_exchange))
             for item in ("model", "optimizer")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    ck = Checkpoint(path)
    assert sorted(ck.items) == ["model", "optimizer"]
    emb = [k for k in ck.item_record("model").arrays if "embed" in k]
    assert emb and int(np.asarray(ck.read_arrays("model", emb)[emb[0]]).reshape(-1)[0]) == rounds - 1
    step_key = [k for k in ck.item_record("optimizer").arrays if k.endswith("step") or ".step" in k]
    opt_arrays = ck.read_arrays("optimizer", step_key)
    assert int(np.asarray(opt_arrays[step_key[0]])) == rounds - 1
    assert (Path(path) / "config.json").exists()            # save_model's metadata survived too


def test_concurrent_item_saves_both_survive_on_s3(s3_server):
    """The same race on the loopback S3 server: there is no lock, the manifest PUT is
    conditional (If-Match the version the carry-over read), so a save that lost the race
    carries over again instead of reverting the other's item or naming deleted objects."""
    import uuid
    uri = f"s3://ckpts/lost-update-{uuid.uuid4().hex[:6]}/ck?endpoint_url={s3_server.endpoint}"
    rounds = max(8, ROUNDS // 2)
    figures = _race(uri, rounds)
    ck = Checkpoint(uri)
    assert sorted(ck.items) == ["model", "optimizer"]
    for item in ("model", "optimizer"):
        np.testing.assert_array_equal(ck.read_arrays(item)["w"], _tree(rounds - 1)["w"])
    assert figures["regressions"] == 0, figures


def test_replaceable_check_sees_a_publish_between_its_two_looks(tmp_path):
    """Where a replacement is a pair of renames, a concurrent save can make the checkpoint
    directory absent for the manifest check and present again for the listing (the CI
    failure of session 2). The check must take the listing's word, not call the
    freshly published checkpoint foreign."""
    from shardckpt.saving.pipeline import check_replaceable
    from shardckpt.store.local import LocalStore

    save_items(tmp_path / "ck", {"model": {"w": np.arange(4.0)}})
    save_items(tmp_path / "next", {"model": {"w": np.arange(4.0) + 1}})

    class PublishedMeanwhile(LocalStore):
        """Runs another saver's two renames around the manifest check, as the kernel may."""
        def exists(self, name):
            os.rename(tmp_path / "ck", tmp_path / ".ck.old")
            seen = super().exists(name)
            os.rename(tmp_path / "next", tmp_path / "ck")
            return seen

    check_replaceable(PublishedMeanwhile(tmp_path), "ck")      # no CheckpointError
    (tmp_path / "next").mkdir()
    (tmp_path / "next" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        check_replaceable(LocalStore(tmp_path), "next")
