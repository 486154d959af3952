"""One of two processes (4 CPU devices each) joined by jax.distributed on localhost:
save global arrays that span both processes (each writes only its addressable shards),
then restore them onto another global layout. Prints one JSON line."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multihost_data import expected  # noqa: E402


def main(work, port, pid):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from shardckpt import Checkpoint
    from shardckpt.api.session import SaveOptions, save_session
    from shardckpt.store.registry import resolve
    from shardckpt.testing import save_items

    full = expected()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "v": P("data"), "b": P()}
    tree = {k: jax.make_array_from_callback(full[k].shape, NamedSharding(mesh, specs[k]), lambda idx, k=k: full[k][idx])
            for k in full}
    path = save_items(os.path.join(work, "step_1"), {"state": tree}, step=1, backend="threads",
                           save_timeout=120)
    ck = Checkpoint(path)
    res = {"process": jax.process_index(), "count": jax.process_count(), "coordinator": type(save_session(*resolve(path), SaveOptions(backend="threads")).coordinator).__name__,  # noqa: E501
           "files": {n: f.writer["pid"] for n, f in ck.manifest.files.items()}, "pid": os.getpid()}
    # restore onto another layout: 8 devices in one axis, other specs
    mesh2 = Mesh(np.array(jax.devices()), ("x",))
    target = {k: jax.ShapeDtypeStruct(full[k].shape, full[k].dtype) for k in full}
    shardings = {"w": NamedSharding(mesh2, P(None, "x")), "v": NamedSharding(mesh2, P("x")),
                 "b": NamedSharding(mesh2, P())}
    out, report = ck.restore("state", target, shardings=lambda key: shardings[key])
    ok = True
    for k, arr in out.items():
        ok &= arr.sharding == shardings[k]
        for shard in arr.addressable_shards:
            ok &= bool(np.array_equal(np.asarray(shard.data), full[k][shard.index]))
    res["restore_ok"] = bool(ok)
    res["bytes_read"] = report.bytes_read
    jax.distributed.shutdown()
    return res


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
