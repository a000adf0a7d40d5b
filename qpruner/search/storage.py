"""Storage every trial can reach: a multi-node search refuses a node-local storage before any training.

On more than one node, a trial writes its checkpoint (its LoRA adapter, which `qpruner export` needs) and
reads the pruned weights under the run's storage (``search.storage_path``, else ``results/<job>/``). On a
disk local to one node, the checkpoints land on whichever worker ran the trial, and go when the autoscaler
removes that node; the other nodes cannot read the weights at all. Nothing in Ray warns.

:func:`check_shared_storage` decides, once the driver is connected:

* one node that can hold a trial: nothing to check;
* a URI (``s3://``, ``gs://``, ...): shared by construction;
* a local path: it must sit on a network filesystem (NFS, SMB, Lustre, CephFS, a FUSE mount such as
  gcsfuse; read from the mount table), or the user says it is shared (``search.storage_shared: true``, e.g.
  one machine running several Ray nodes). Then every live node must also *see* it: a probe file written
  by the driver is looked for by a zero-CPU task pinned to each node.

Anything else is a :class:`~qpruner.errors.ConfigError` (exit code 2) naming the fix. The driver checks once it
has joined the cluster, before it prunes (:func:`preflight`). A node the autoscaler adds later is not probed;
on node-local storage its trials cannot read the pruned weights (they live under the same storage) and fail
with a message that says so, rather than leaving checkpoints behind silently. Under Ray Client (``ray://``)
the driver's files are not the cluster's: nothing is checked there.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)
# filesystem types (as /proc/mounts names them) that several machines mount together
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs", "wekafs",
              "orangefs", "pvfs2", "ocfs2", "gfs2", "afs")
PROBE_TIMEOUT_S = 60.0


def mounts(table: str = "/proc/mounts") -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, from the kernel's table ([] where there is none)."""
    try:
        lines = Path(table).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def filesystem_of(path: str | os.PathLike) -> str | None:
    """The filesystem type holding ``path`` (its nearest existing ancestor), by the longest mount point."""
    where = Path(path).expanduser().resolve()
    best, kind = "", None
    for point, fstype in mounts():
        if (str(where) == point or str(where).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def is_network_fs(kind: str | None) -> bool:
    return bool(kind) and (kind in NETWORK_FS or kind.startswith(("nfs", "fuse.", "ceph")))


def trial_nodes(ray, cpus: float, gpus: float) -> tuple[bool, list[dict]]:
    """(whether trials run beyond one node, the live nodes). Beyond one: more than one node is up, or the one
    node cannot hold a trial (so the autoscaler will add others)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1:
        return len(nodes) > 1, nodes
    have = nodes[0].get("Resources", {})
    return float(have.get("CPU", 0)) < cpus or float(have.get("GPU", 0)) < gpus, nodes


def check_shared_storage(ray, where: str, cpus: float, gpus: float, declared_shared: bool) -> None:
    """Refuse a search whose trials run on several nodes with ``where`` (the run's storage) local to one."""
    if where.startswith("file://"):
        where = where[len("file://"):]
    many, nodes = trial_nodes(ray, cpus, gpus)
    if not many or "://" in where:
        return
    fix = ("Set search.storage_path to a URI every node can write (s3://bucket/qpruner, gs://bucket/qpruner) or "
           "to a shared filesystem mounted at the same path on every node (NFS, EFS, Filestore, a ReadWriteMany "
           "volume); if this path is shared though its filesystem is not a known network one (e.g. several Ray "
           "nodes on one machine), set search.storage_shared: true")
    kind = filesystem_of(where)
    if not declared_shared and not is_network_fs(kind):
        raise ConfigError([f"search.storage_path: the trials of this search run on more than one node "
                           f"({len(nodes)} up now; or more to come from the autoscaler), but their storage {where} "
                           f"is on a node-local filesystem ({kind or 'unknown'}): checkpoints (the adapters export "
                           f"needs) would stay on whichever worker ran a trial, and other nodes could not read the "
                           f"pruned weights. {fix}"])
    blind = nodes_not_seeing(ray, where, nodes)
    if blind:
        raise ConfigError([f"search.storage_path: {where} is not visible on {len(blind)} of the {len(nodes)} nodes "
                           f"({', '.join(blind[:4])}): a probe file the driver wrote there was not found. {fix}"])


def nodes_not_seeing(ray, where: str, nodes: list[dict]) -> list[str]:
    """Addresses of the live nodes on which a file the driver writes under ``where`` does not appear."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    os.makedirs(where, exist_ok=True)
    probe = os.path.join(os.path.abspath(where), f".qpruner-probe-{uuid.uuid4().hex}")
    Path(probe).write_text("qpruner storage probe\n")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        refs = {n.get("NodeManagerAddress", n["NodeID"]) + f" ({n['NodeID'][:8]})":
                sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe)
                for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        blind = []
        for name, ref in refs.items():
            if ref not in ready:
                logger.warning("node %s did not answer the storage probe within %.0f s; not counted", name,
                               PROBE_TIMEOUT_S)
                ray.cancel(ref, force=True)
                continue
            if not ray.get(ref):
                blind.append(name)
        return blind
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def preflight(job, run_path) -> bool:
    """On a cluster (``search.ray_address``, or a submitted job): join it now and check the run's storage, before
    any pruning. Returns whether this call connected (the caller disconnects at the end)."""
    from .run import in_submitted_job, init_ray
    cfg = job.search
    if not (cfg.ray_address or in_submitted_job()) or str(cfg.ray_address or "").startswith("ray://"):
        return False
    import ray
    connected = init_ray(job)
    try:
        from ..rundir import storage_dir
        check_shared_storage(ray, storage_dir(job, run_path), cfg.cpus_per_trial, cfg.gpus_per_trial,
                             cfg.storage_shared)
    except BaseException:
        if connected:
            ray.shutdown()
        raise
    return connected
