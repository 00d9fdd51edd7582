"""Device mesh, shardings and multi-host start.

One mesh axis, 'data': the batch is split over every device of every host.
Parameters and optimizer state are replicated ('replicate') or split over the
same axis along their largest divisible dimension ('fsdp', ZeRO-3 style;
XLA inserts the all-gathers). The same code runs on one CPU, one GPU, many
devices and many hosts.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
    """Starts `jax.distributed` when launched as one process of a cluster.

    Explicitly with `JAX_COORDINATOR_ADDRESS` (host:port of process 0),
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; or `MTP_DISTRIBUTED=1`, where JAX
    detects the cluster itself (TPU pods, SLURM, Kubernetes). A single process
    does nothing.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("MTP_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D 'data' mesh over `devices` (default: all of them), with Auto axes: under jax
    0.10's default Explicit axes, `nnx.Embed` on a batch-sharded input fails."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shards the largest dimension divisible by n; small or indivisible arrays stay replicated."""
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < 4096:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % n == 0:
            return P(*[("data" if j == i else None) for j in range(len(shape))])
    return P()


def state_shardings(state, mesh, strategy: str):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs)."""
    n = mesh.shape["data"]

    def spec(x):
        return P() if strategy == "replicate" else _fsdp_spec(tuple(x.shape), n)

    return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), state)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into one global array sharded over 'data'."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def host_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch that every host holds whole."""
    i, n = jax.process_index(), jax.process_count()
    return {k: np.array_split(v, n)[i] for k, v in batch.items()}
