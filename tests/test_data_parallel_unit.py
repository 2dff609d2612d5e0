"""A data-parallel rank joins its vLLM group from its Serve gang: rank 0 publishes, the others wait (Ray stubbed)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray
from ray import serve

from replica import data_parallel, ray_compat


@pytest.fixture
def gcs_kv(monkeypatch):
    store: dict[str, bytes] = {}
    monkeypatch.setattr(ray_compat, "kv_put", store.__setitem__)
    monkeypatch.setattr(ray_compat, "kv_get", store.get)
    monkeypatch.setattr(ray_compat, "kv_del", store.pop)
    monkeypatch.setattr(ray_compat, "kv_items", lambda prefix: {
        k: v for k, v in store.items() if k.startswith(prefix)})
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    return store


def in_gang(monkeypatch, rank: int, size: int = 2, gang_id: str = "g1") -> None:
    monkeypatch.setattr(ray_compat, "gang_context", lambda: SimpleNamespace(
        rank=rank, world_size=size, gang_id=gang_id))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=f"r{rank}")))


def test_rank_0_publishes_and_rank_1_gets_the_same_group(monkeypatch, gcs_kv):
    in_gang(monkeypatch, 1)

    async def both():
        later = asyncio.ensure_future(data_parallel.join_group(2))
        await asyncio.sleep(0.1)   # rank 1 is waiting: nothing published yet
        assert not later.done()
        in_gang(monkeypatch, 0)
        first, keys = await data_parallel.join_group(2)
        return first, keys, await later

    first, keys, (second, second_keys) = asyncio.run(both())
    assert keys == [data_parallel.member_key("r0"), data_parallel.group_key("g1")]
    assert second_keys == [data_parallel.member_key("r1")]
    # every rank recorded its gang under its replica ID (what check_cluster.py groups by)
    assert data_parallel.members() == {"r0": {"id": "g1", "rank": 0, "size": 2},
                                       "r1": {"id": "g1", "rank": 1, "size": 2}}
    assert first["data_parallel_rank"] == 0 and second["data_parallel_rank"] == 1
    assert first["data_parallel_address"] == second["data_parallel_address"] == "127.0.0.1"
    assert first["data_parallel_rpc_port"] == second["data_parallel_rpc_port"] > 0


def test_a_replica_outside_a_gang_or_in_a_gang_of_another_size_fails_clearly(monkeypatch,
                                                                              gcs_kv):
    monkeypatch.setattr(ray_compat, "gang_context", lambda: None)
    with pytest.raises(RuntimeError, match="in no Serve gang"):
        asyncio.run(data_parallel.join_group(2))
    in_gang(monkeypatch, 0, size=4)
    with pytest.raises(RuntimeError, match="gang has 4 ranks"):
        asyncio.run(data_parallel.join_group(2))


def test_a_rank_whose_rank_0_never_publishes_gives_up(monkeypatch, gcs_kv):
    in_gang(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="rank 0 published no group address"):
        asyncio.run(data_parallel.join_group(2, timeout_s=0.2))
    assert data_parallel.members() == {}   # its record went with it
