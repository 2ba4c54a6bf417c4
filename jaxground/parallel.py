"""Device mesh, the logical-axis rules table, and sharding helpers.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded),
`tensor` (Megatron-style model parallel). Model code only ever names *logical* axes; `RULES` maps them.
The mesh uses Auto axis types (classic jit-with-shardings): `jax.make_mesh`'s default Explicit types make
`with_sharding_constraint` refuse the mesh and a sharded embedding lookup fail with a duplicate-spec error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
)


class MeshError(ValueError):
    """A mesh shape that does not fit the devices or the batch."""


def mesh_shape(spec: dict[str, int] | Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Resolves a `{data, fsdp, tensor}` spec (one entry may be -1 = all remaining devices)."""
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES] if isinstance(spec, dict) else [int(s) for s in spec]
    if len(sizes) != 3:
        raise MeshError(f"mesh needs 3 sizes (data, fsdp, tensor), got {sizes}")
    if sizes.count(-1) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s < 1 and s != -1 for s in sizes):
        raise MeshError(f"mesh axis sizes must be >= 1 (or one -1), got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n_devices}")
    return tuple(sizes)


def make_mesh(spec: dict[str, int] | Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(spec, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(axes: Sequence[str | None]) -> P:
    table = dict(RULES)
    return P(*(table.get(a) if a is not None else None for a in axes))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops the mesh axes of `spec` that do not divide their array dimension (those dims are replicated):
    small heads (a 4-wide box decoder, a 5-token vocab extension) then still train on any mesh."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def _ways(spec: P, mesh: Mesh) -> int:
    names = [a for axes in spec for a in ((axes,) if isinstance(axes, str) else axes or ())]
    return math.prod(mesh.shape[a] for a in names)


def check_fit(state, mesh: Mesh, *, tolerance: float = 0.1, min_bytes: int = 64 << 20) -> None:
    """Raises MeshError when the mesh axes that `fit_spec` drops add more than `tolerance` to the per-device
    bytes of `state` as its rules plan it, and more than `min_bytes` (a tiny model on any mesh costs nothing).
    Small heads may stay whole; a mesh that divides no model width (fsdp=6 against LLaMA's 4096) would leave
    every matrix and its Adam moments whole on every device."""
    with nnx.logical_axis_rules(RULES):
        named = nnx.get_named_sharding(state, mesh)
    planned, lost = 0.0, []
    for (path, s), x in zip(jax.tree_util.tree_leaves_with_path(named), jax.tree.leaves(state), strict=True):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        want, got = _ways(s.spec, mesh), _ways(fit_spec(s.spec, x.shape, mesh), mesh)
        planned += nbytes / want
        if got < want:
            name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path).removesuffix("/value")
            lost.append((nbytes / got - nbytes / want, name, x.shape, s.spec))
    extra = sum(e for e, *_ in lost)
    if extra > max(tolerance * planned, min_bytes):
        lost.sort(key=lambda t: -t[0])
        shown = "\n  ".join(f"{k} {shape} {spec}: +{e / 2**20:.2f} MiB" for e, k, shape, spec in lost[:8])
        raise MeshError(
            f"mesh {dict(mesh.shape)} leaves {len(lost)} array(s) whole along an axis that does not divide them: "
            f"+{extra / 2**30:.2f} GiB per device over the {planned / 2**30:.2f} GiB planned (parameters, and in "
            f"training the optimizer state); pick axis sizes that divide the model's widths (e.g. powers of two):"
            f"\n  {shown}"
            + (f"\n  ... {len(lost) - 8} more" if len(lost) > 8 else ""))


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every array of a pytree holding NNX variables (a model state, or an optimizer state
    whose moments mirror it), from their logical axis annotations; plain arrays (counters) are replicated.
    Axes that do not divide a dimension are dropped (`fit_spec`); `check_fit` says when that costs memory."""
    with nnx.logical_axis_rules(RULES):
        named = nnx.get_named_sharding(state, mesh)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, fit_spec(s.spec, x.shape, mesh)), named, state
    )


def check_batch(global_batch: int, mesh: Mesh, *, micro_steps: int = 1, processes: int = 1) -> None:
    """Raises MeshError when the batch does not split over the data axes, the micro-steps and the hosts."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % (shards * micro_steps):
        raise MeshError(
            f"batch {global_batch} does not divide into {micro_steps} micro-step(s) x {shards} data shards "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )
    if global_batch % processes:
        raise MeshError(f"batch {global_batch} does not divide over {processes} processes")
    check_host_shards(mesh.devices)


def check_host_shards(devices) -> None:
    """Raises MeshError when a batch shard lies on devices of several processes: each host feeds rows for its
    own shards only, so hosts sharing a shard (batch axes not spanning the hosts) would silently shrink the
    global batch and compute on different data."""
    owners: dict[tuple[int, int], set[int]] = {}
    for (d, f, _), device in np.ndenumerate(devices):
        owners.setdefault((d, f), set()).add(device.process_index)
    for shard, processes in owners.items():
        if len(processes) > 1:
            raise MeshError(f"batch shard (data, fsdp)={shard} lies on processes {sorted(processes)}: make the "
                            "batch axes (data x fsdp) span the hosts, e.g. fsdp or data at least the host count")


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assembles each process's rows (`local`: numpy arrays, leading axis = this host's share of the batch)
    into global arrays split over (data, fsdp); on one process this is a device_put."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
        for k, v in local.items()
        if v is not None
    }


def host_rows(tree, mesh: Mesh):
    """The inverse of `global_batch`: this process's rows of batch-leading global arrays (the rows it fed, in its
    order) as numpy; on one process the whole arrays. Arrays sharded otherwise are resharded first."""
    from jax.experimental import multihost_utils

    local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(("data", "fsdp")))
    return jax.tree.map(np.asarray, local)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-leading arrays: axis 0 split over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))
