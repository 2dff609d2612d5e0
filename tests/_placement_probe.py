"""A stand-in replica for GPU-placement tests only: it reserves what vLLM would, and runs no model.

A CPU machine cannot run tensor parallel 8, so these tests swap the LLM deployments for this probe,
which takes the same deployment options and, like vLLM's Ray executor, starts one worker actor per
GPU bundle of the replica's placement group. The API and engine path are tested with the real
engine elsewhere (tests/test_api_http.py, tests/test_topology_cpu.py).
"""
from __future__ import annotations

import asyncio
import os

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

probe_app = FastAPI()


@ray.remote(num_cpus=0, num_gpus=1)
class GpuWorker:
    """What vLLM's Ray executor starts per tensor-parallel rank."""

    def where(self) -> tuple[str, list, str | None]:
        return (ray.get_runtime_context().get_node_id(), ray.get_gpu_ids(),
                os.environ.get("NCCL_SOCKET_IFNAME"))


class PlacementProbe:
    async def __init__(self, engine_config, serve_config, port: int = 0):
        self.node_id = ray.get_runtime_context().get_node_id()
        self.workers = []
        # A data-parallel rank joins its group as the real replica does (replica/server.py).
        self.gang = None
        rank_group = None
        if engine_config.data_parallel_size > 1:
            from replica import data_parallel, ray_compat

            rank_group = await data_parallel.join_group(engine_config.data_parallel_size)
            context = ray_compat.gang_context()
            self.gang = {"id": context.gang_id, "rank": rank_group.rank,
                         "address": rank_group.kwargs["data_parallel_address"],
                         "port": rank_group.kwargs["data_parallel_rpc_port"],
                         "first_node": rank_group.first_node}
        group = ray.util.get_current_placement_group()
        self.bundles: list[int] = []
        if group is not None and engine_config.uses_ray_workers:  # as replica/engine.py
            from replica.engine import worker_bundles

            # The bundles the real engine checks and hands to vLLM's Ray executor.
            self.bundles = worker_bundles(group, engine_config, rank_group)
            for index in self.bundles:
                self.workers.append(GpuWorker.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=index)).remote())
        worker_places = ray.get([w.where.remote() for w in self.workers])
        self.own_gpus = ray.get_gpu_ids()
        self.worker_nodes = [node for node, _, _ in worker_places]
        self.worker_gpus = [gpus for _, gpus, _ in worker_places]
        self.worker_nccl_ifname = [ifname for _, _, ifname in worker_places]

    def reconfigure(self, user_config: dict) -> None:
        """A backend's user_config records its version and pin (common/backend_stages.py)."""

    def check_health(self) -> None:
        """Fails once a worker is gone (its node died), as vLLM's engine does when a rank dies:
        Serve then replaces the replica."""
        ray.get([w.where.remote() for w in self.workers], timeout=10)

    def describe(self, delay_s: float = 0.0) -> dict:
        return {"node": self.node_id, "own_gpus": self.own_gpus,
                "worker_nodes": self.worker_nodes, "worker_gpus": self.worker_gpus,
                "worker_nccl_ifname": self.worker_nccl_ifname, "gang": self.gang,
                "bundles": self.bundles,
                "pid": os.getpid()}

    async def endpoint(self) -> str:
        """The backend interface the router uses: the URL of a server answering POST /."""
        from replica.backend_http import BackendHttpServer

        if getattr(self, "http", None) is None:
            backend_app = FastAPI()
            backend_app.post("/")(self.describe)
            self.http = BackendHttpServer(backend_app, ray.util.get_node_ip_address(), 0)
            await self.http.start()
        return self.http.url


@serve.deployment(name="LLMDeployment")
@serve.ingress(probe_app)
class HttpPlacementProbe(PlacementProbe):
    @probe_app.post("/")
    async def root(self, request: Request) -> dict:
        body = await request.json()
        await asyncio.sleep(float(body.get("delay_s", 0)))
        return self.describe()


BackendPlacementProbe = serve.deployment(PlacementProbe, name="LLMBackend")


def install(monkeypatch) -> None:
    """Swap the LLM deployments the scripts build for the probe."""
    import replica.ingress

    monkeypatch.setattr(replica.ingress, "LLMDeployment", HttpPlacementProbe)
    monkeypatch.setattr(replica.ingress, "LLMBackend", BackendPlacementProbe)
