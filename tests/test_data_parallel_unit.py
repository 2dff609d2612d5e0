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
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(
        get_node_id=lambda: "node-a"))
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
        first = await data_parallel.join_group(2)
        return first, await later

    first, second = asyncio.run(both())
    assert first.keys == [data_parallel.member_key("r0"), data_parallel.group_key("g1")]
    assert second.keys == [data_parallel.member_key("r1")]
    # every rank recorded its gang under its replica ID (what check_cluster.py groups by)
    assert data_parallel.members() == {"r0": {"id": "g1", "rank": 0, "size": 2},
                                       "r1": {"id": "g1", "rank": 1, "size": 2}}
    assert first.rank == 0 and second.rank == 1
    assert first.kwargs["data_parallel_address"] == second.kwargs["data_parallel_address"]
    assert first.kwargs["data_parallel_rpc_port"] == second.kwargs["data_parallel_rpc_port"] > 0
    # every rank knows rank 0's node, where its rendezvous is
    assert first.first_node == second.first_node == "node-a"


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


def test_a_ranks_tensor_parallel_bundles_are_on_one_node_rank_0s_first():
    # A gang of 4 ranks x TP 2 packed over two nodes, bundles interleaved as PACK may leave them.
    nodes = ["B", "A", "A", "B", "B", "A", "A", "B"]
    ranks = [data_parallel.rank_bundles(r, 2, nodes, first_node="A") for r in range(4)]
    assert ranks == [[1, 2], [5, 6], [0, 3], [4, 7]]
    assert sorted(i for r in ranks for i in r) == list(range(8))
    assert all(len({nodes[i] for i in r}) == 1 for r in ranks)


def test_a_rank_whose_gpus_would_span_nodes_fails_so_serve_restarts_the_gang():
    with pytest.raises(RuntimeError, match="not on one node"):
        data_parallel.rank_bundles(1, 2, ["A", "A", "A", "B"], first_node="A")
    with pytest.raises(RuntimeError, match="bundles, not 2 per rank"):
        data_parallel.rank_bundles(2, 2, ["A", "A", "A", "A"], first_node="A")
