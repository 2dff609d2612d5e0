"""A data-parallel rank's place in its vLLM group, from its Serve gang: rank 0 publishes the group's address, the others wait for it."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

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


def rank_engine_kwargs(rank: int, address: str, port: int) -> dict[str, Any]:
    """vLLM's engine arguments for one rank of an externally balanced data-parallel group: each
    rank an engine of its own, requests spread over the ranks by Serve's ingress."""
    return {"data_parallel_rank": rank, "data_parallel_address": address,
            "data_parallel_rpc_port": port}


async def join_group(data_parallel_size: int, timeout_s: float = RENDEZVOUS_TIMEOUT_S
                     ) -> tuple[dict[str, Any], list[str]]:
    """This replica's rank kwargs (rank_engine_kwargs) and the keys it published (to remove
    when the replica stops): its membership record and, on rank 0, the group's address. Errors
    say what is wrong: no gang, a gang of another size, or rank 0 that never published."""
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
        ray_compat.kv_put(key, json.dumps({"address": address, "port": port}).encode())
        logger.info("data-parallel rank 0 of gang %s: group address %s:%d", gang.gang_id,
                    address, port)
        return rank_engine_kwargs(0, address, port), [member, key]
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
    return rank_engine_kwargs(gang.rank, group["address"], int(group["port"])), [member]


def members() -> dict[str, dict[str, Any]]:
    """Replica ID -> its gang record ({id, rank, size}) for every rank that recorded one (a
    rank that died without stopping leaves its record: read it only for live replicas)."""
    return {key[len(MEMBER_PREFIX):]: json.loads(value)
            for key, value in ray_compat.kv_items(MEMBER_PREFIX).items()}
