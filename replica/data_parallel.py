"""A data-parallel rank's place in its vLLM group, from its Serve gang: rank 0 publishes the group's address, the others wait for it."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from replica import ray_compat

logger = logging.getLogger("ray.serve")

# Ranks of a gang start together; rank 0 publishes within seconds of its start, so a rank still
# waiting after this is in a gang whose rank 0 failed (Serve then restarts the whole gang).
RENDEZVOUS_TIMEOUT_S = 300.0
POLL_S = 0.5


def group_key(gang_id: str) -> str:
    return f"data-parallel-group/{gang_id}"


def member_key(replica_id: str) -> str:
    """Where a rank records its gang and rank under its replica ID (what check_cluster.py reads
    to group replicas by gang: Serve's replica details do not say)."""
    return f"{MEMBER_PREFIX}{replica_id}"


MEMBER_PREFIX = "data-parallel-member/"


def free_port(host: str) -> int:
    """A TCP port free on this node now (vLLM's data-parallel coordinator binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class RankGroup:
    """A rank's place in its data-parallel group: vLLM's rank kwargs (rank_engine_kwargs), the
    node of rank 0 (which hosts the group's rendezvous), and the keys this rank published (to
    remove when it stops)."""
    kwargs: dict[str, Any]
    first_node: str | None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.kwargs["data_parallel_rank"])


def rank_bundles(rank: int, per_rank: int, bundle_nodes: Sequence[str | None],
                 first_node: str | None) -> list[int]:
    """The bundles of the gang's placement group that a rank's tensor-parallel workers take.
    Serve's gang group holds every rank's bundles in a row, but PACK may put a rank's bundles on
    different nodes: the bundles are ordered by node, rank 0's node first (vLLM's global rank 0,
    which hosts the group's rendezvous, must sit where rank 0 advertised), and each rank takes
    the next `per_rank` of them, so a tensor-parallel group stays on one node wherever the
    nodes' bundle counts allow. A slice over two nodes is an error (RuntimeError: Serve then
    restarts the gang) rather than a tensor-parallel group across a slow link."""
    order = sorted(range(len(bundle_nodes)),
                   key=lambda i: (bundle_nodes[i] != first_node, bundle_nodes[i] or "", i))
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    if len(mine) != per_rank:
        raise RuntimeError(f"data-parallel rank {rank}: the gang's placement group has "
                           f"{len(bundle_nodes)} bundles, not {per_rank} per rank")
    nodes = {bundle_nodes[i] for i in mine}
    if len(nodes) != 1 or None in nodes:
        raise RuntimeError(
            f"data-parallel rank {rank}: its {per_rank} tensor-parallel GPUs (bundles "
            f"{mine}) are not on one node ({sorted(str(n)[:12] for n in nodes)}); the gang is "
            "restarted for a placement that keeps each rank on one node")
    return mine


def rank_engine_kwargs(rank: int, address: str, port: int) -> dict[str, Any]:
    """vLLM's engine arguments for one rank of an externally balanced data-parallel group: each
    rank an engine of its own, requests spread over the ranks by Serve's ingress."""
    return {"data_parallel_rank": rank, "data_parallel_address": address,
            "data_parallel_rpc_port": port}


async def join_group(data_parallel_size: int, timeout_s: float = RENDEZVOUS_TIMEOUT_S
                     ) -> RankGroup:
    """This replica's place in its group (RankGroup); the keys it published are its membership
    record and, on rank 0, the group's address. Errors say what is wrong: no gang, a gang of
    another size, or rank 0 that never published."""
    import ray
    from ray import serve

    gang = ray_compat.gang_context()
    if gang is None:
        raise RuntimeError(
            f"--data-parallel-size {data_parallel_size}: this replica is in no Serve gang; "
            "deploy through the scripts or the Serve config they print (gang_scheduling_config)")
    if gang.world_size != data_parallel_size:
        raise RuntimeError(f"the replica's gang has {gang.world_size} ranks, "
                           f"--data-parallel-size says {data_parallel_size}")
    member = member_key(serve.get_replica_context().replica_id.unique_id)
    ray_compat.kv_put(member, json.dumps({"id": gang.gang_id, "rank": gang.rank,
                                          "size": gang.world_size}).encode())
    key = group_key(gang.gang_id)
    if gang.rank == 0:
        address = ray.util.get_node_ip_address()
        port = free_port(address)
        node = ray.get_runtime_context().get_node_id()
        ray_compat.kv_put(key, json.dumps({"address": address, "port": port,
                                           "node": node}).encode())
        logger.info("data-parallel rank 0 of gang %s: group address %s:%d", gang.gang_id,
                    address, port)
        return RankGroup(rank_engine_kwargs(0, address, port), node, [member, key])
    started = time.monotonic()
    while (value := ray_compat.kv_get(key)) is None:
        waited = time.monotonic() - started
        if waited > timeout_s:
            ray_compat.kv_del(member)
            raise RuntimeError(f"data-parallel rank {gang.rank} of gang {gang.gang_id}: rank 0 "
                               f"published no group address in {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)
    group = json.loads(value)
    logger.info("data-parallel rank %d of gang %s: group address %s:%d", gang.rank,
                gang.gang_id, group["address"], group["port"])
    return RankGroup(rank_engine_kwargs(gang.rank, group["address"], int(group["port"])),
                     group.get("node"), [member])


def members() -> dict[str, dict[str, Any]]:
    """Replica ID -> its gang record ({id, rank, size}) for every rank that recorded one (a
    rank that died without stopping leaves its record: read it only for live replicas)."""
    return {key[len(MEMBER_PREFIX):]: json.loads(value)
            for key, value in ray_compat.kv_items(MEMBER_PREFIX).items()}
