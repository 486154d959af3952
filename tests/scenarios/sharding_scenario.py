"""Run in a subprocess with 8 fake CPU devices (see tests/loading/test_sharding.py): save sharded
nnx state and restore it onto other layouts. Prints one JSON line of findings."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from shardckpt import Checkpoint, load_model, save_model  # noqa: E402


class Net(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(1.0)
        self.w1 = nnx.Param(nnx.with_partitioning(init, ("data", "model"))(rngs.params(), (64, 32)))
        self.w2 = nnx.Param(nnx.with_partitioning(init, ("model", None))(rngs.params(), (32, 16)))
        self.b = nnx.Param(jnp.arange(16, dtype=jnp.bfloat16))       # replicated
        self.emb = nnx.Param(nnx.with_partitioning(init, (None, "data"))(rngs.params(), (10, 24)))
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    return a.view(f"uint{a.dtype.itemsize * 8}").tobytes() if a.dtype.kind != "b" else a.tobytes()


def state_bits(m):
    return {jax.tree_util.keystr(p): bits(v) for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(m))[0]}


def specs(m):
    out = {}
    for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(m))[0]:
        s = v.sharding
        out[jax.tree_util.keystr(p)] = [len(s.device_set), str(getattr(s, "spec", "single"))]
    return out


def main(work):
    res = {}
    devs = np.array(jax.devices())
    mesh8 = Mesh(devs.reshape(4, 2), ("data", "model"))
    with jax.sharding.set_mesh(mesh8):
        model = Net(nnx.Rngs(0, dropout=1))
    ref = state_bits(model)
    res["saved_specs"] = specs(model)
    path = save_model(os.path.join(work, "ck8"), model, config={"kind": "Net"}, num_shards=3)
    ck = Checkpoint(path)
    arrays = ck.manifest.items["model"].arrays
    index = ck.index()["model"]
    res["chunks"] = {k: len(v) for k, v in index.items()}
    res["stored_bytes"] = {k: sum(c.nbytes for _, c in v) for k, v in index.items()}
    res["array_bytes"] = {k: arrays[k].stored_nbytes for k in arrays}

    layouts = {
        "8dev_same": (devs.reshape(4, 2), ("data", "model")),
        "4dev": (devs[:4].reshape(2, 2), ("data", "model")),
        "2dev": (devs[:2].reshape(2, 1), ("data", "model")),
        "1dev": (devs[:1].reshape(1, 1), ("data", "model")),
        "8dev_transposed": (devs.reshape(2, 4), ("model", "data")),
    }
    res["layouts"] = {}
    for name, (arr, axes) in layouts.items():
        mesh = Mesh(arr, axes)
        with jax.sharding.set_mesh(mesh):
            abstract_ctor = lambda: Net(nnx.Rngs(0, dropout=1))  # noqa: E731
            from shardckpt.api.nnx_state import restore_module_state
            restored = restore_module_state(Checkpoint(path), "model", abstract_ctor)
        ok = state_bits(restored) == ref
        res["layouts"][name] = {"bit_exact": ok, "specs": specs(restored), "devices": int(arr.size)}

    # an explicit shardings= pytree onto 4 devices with other PartitionSpecs
    mesh4 = Mesh(devs[4:].reshape(4), ("x",))
    one = Mesh(devs[7:8].reshape(1, 1), ("data", "model"))
    with jax.sharding.set_mesh(one):
        target = Net(nnx.Rngs(5, dropout=6))      # concrete, different values, one device
    shard = {"w1": NamedSharding(mesh4, P(None, "x")), "w2": NamedSharding(mesh4, P("x")),
             "emb": NamedSharding(mesh4, P())}
    m2, _ = load_model(path, model=target, shardings={f"{k}": v for k, v in shard.items()} | {"b": NamedSharding(mesh4, P("x"))})
    res["explicit"] = {"bit_exact": state_bits(m2) == ref,
                       "w1_spec": str(m2.w1[...].sharding.spec), "w1_devices": len(m2.w1[...].sharding.device_set)}

    # one device restore of the 8-device checkpoint reads each chunk exactly once
    with jax.sharding.set_mesh(one):
        single = Net(nnx.Rngs(0, dropout=1))
    _, report = Checkpoint(path).restore("model", nnx.state(single))
    res["one_device_read"] = {"chunks_read": report.chunks_read, "chunks_total": sum(res["chunks"].values()),
                              "bytes_read": report.bytes_read, "bytes_total": sum(res["array_bytes"].values())}

    # partial restore: only w2 (select), only the chunks of w2 read
    with jax.sharding.set_mesh(one):
        fresh = Net(nnx.Rngs(9, dropout=9))
    before = state_bits(fresh)
    _, report = Checkpoint(path).restore("model", nnx.state(fresh), select=lambda k: k == "w2")
    res["partial"] = {"bytes_read": report.bytes_read, "w2_bytes": res["array_bytes"]["w2"],
                      "restored": report.restored}
    m3, _ = load_model(path, model=fresh, select=lambda k: k.startswith("w2"))
    after = state_bits(m3)
    res["partial"]["w2_equal"] = after["['w2'].value"] == ref["['w2'].value"]
    res["partial"]["w1_untouched"] = after["['w1'].value"] == before["['w1'].value"]

    # a restore onto 8 devices reads less than the whole array per device
    with jax.sharding.set_mesh(mesh8):
        _, rep8 = Checkpoint(path).restore("model", nnx.state(nnx.eval_shape(lambda: Net(nnx.Rngs(0, dropout=1)))))
    res["eight_device_read_bytes"] = rep8.bytes_read
    return res


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
