"""--routing prefix: a request goes to the replica that already served the longest part of its prompt unless that replica is busier than the least busy one by more than a bound; Serve's HAProxy asks PrefixRoute which replica takes each request."""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import random
import time
from typing import Any, Hashable, Iterable, Mapping, Sequence, TypeVar

from ray import serve
from ray.serve.request_router import RequestRouter

from replica import ray_compat

logger = logging.getLogger("ray.serve")

# Prompts are compared block by block from their start, as vLLM's prefix cache compares blocks
# of tokens: a request shares a replica's cache only up to the first block that differs.
BLOCK_CHARS = 128
# Blocks remembered over all replicas, least recently used out first.
INDEX_BLOCKS = 500_000
# A request sent to a replica counts in its load until the replica's own count, reported every
# ROUTING_STATS_PERIOD_S, was taken after it (at most SENT_WINDOW_S: a report that is late).
ROUTING_STATS_PERIOD_S = 1.0
SENT_WINDOW_S = 3 * ROUTING_STATS_PERIOD_S
# Default of --prefix-imbalance: requests in flight a replica may have beyond the least busy one
# and still get the requests whose prefix it holds.
DEFAULT_IMBALANCE = 16
ROUTER_CLASS = f"{__name__}:PrefixAffinityRouter"
ROUTE_DEPLOYMENT = "PrefixRoute"
Replica = TypeVar("Replica", bound=Hashable)


# ---- the policy (pure) ---------------------------------------------------------------------------

def request_blocks(body: Any, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """The digests of a request's prompt blocks (see block_hashes): chat messages block by
    block, each message's end closing a block (a conversation's next turn repeats every earlier
    message whole, so its blocks match up to the newest message), the role part of each; a
    completion prompt in whole blocks; no blocks for anything else."""
    if not isinstance(body, dict):
        return []
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return block_hashes([f"\x1e{m.get('role', '')}\x1f{_content_text(m.get('content'))}"
                             for m in messages if isinstance(m, dict)], block_chars,
                            partial=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = json.dumps(prompt)  # token IDs or several prompts: their literal form
    if isinstance(prompt, str) and prompt:
        return block_hashes([prompt], block_chars)
    return []


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part)
                       for part in content)
    return "" if content is None else str(content)


def block_hashes(segments: Sequence[str], block_chars: int = BLOCK_CHARS,
                 partial: bool = False) -> list[bytes]:
    """One digest per block of the segments in order, each covering every block before it
    too (so equal digests mean equal prefixes). A segment's last, shorter block counts where
    `partial` (its end is a boundary a later prompt keeps); else it is left out."""
    hashes, digest = [], b""
    for segment in segments:
        for start in range(0, len(segment), block_chars):
            block = segment[start:start + block_chars]
            if len(block) < block_chars and not partial:
                break
            digest = hashlib.blake2b(digest + block.encode(), digest_size=12).digest()
            hashes.append(digest)
    return hashes


class PrefixIndex:
    """Which replicas served which prompt blocks lately, least recently used out first, and
    whether prompts went on differently after a block (a prefix many prompts share)."""

    def __init__(self, capacity: int = INDEX_BLOCKS):
        self.capacity = capacity
        self._holders: collections.OrderedDict[bytes, set[Hashable]] = collections.OrderedDict()
        # Block -> up to two of the blocks seen after it.
        self._next: dict[bytes, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, hashes: Sequence[bytes], candidates: Iterable[Replica]
              ) -> tuple[set[Replica], int]:
        """The candidates that served the longest prefix of these blocks, and its blocks."""
        best: set[Replica] = set(candidates)
        depth = 0
        for digest in hashes:
            holders = best & self._holders.get(digest, set())
            if not holders:
                break
            best, depth = holders, depth + 1
        return (best, depth) if depth else (set(), 0)

    def branches(self, digest: bytes) -> bool:
        """Whether prompts went on in more than one way after this block: it ends a prefix
        that several prompts share (a system prompt), not one conversation's own history."""
        return len(self._next.get(digest, ())) > 1

    def insert(self, hashes: Sequence[bytes], replica: Hashable) -> None:
        for index, digest in enumerate(hashes):
            self._holders.setdefault(digest, set()).add(replica)
            self._holders.move_to_end(digest)
            if index + 1 < len(hashes):
                after = self._next.setdefault(digest, set())
                if len(after) < 2:
                    after.add(hashes[index + 1])
        while len(self._holders) > self.capacity:
            digest, _ = self._holders.popitem(last=False)
            self._next.pop(digest, None)

    def remove(self, replica: Hashable) -> None:
        for digest in [d for d, holders in self._holders.items() if replica in holders]:
            holders = self._holders[digest]
            holders.discard(replica)
            if not holders:
                del self._holders[digest]
                self._next.pop(digest, None)


def choose(index: PrefixIndex, hashes: Sequence[bytes], loads: Mapping[Replica, float],
           imbalance: float, rng: random.Random | None = None) -> tuple[Replica, int]:
    """The replica for a request, and how many blocks of its prompt that replica served before.

    A prefix that only this request's own history has (a conversation's earlier turns) goes
    back to the replicas holding it, the least busy of them, unless even that one has more than
    `imbalance` requests beyond the least busy replica. A prefix several prompts share (it
    branched after its last block: a common system prompt) or no prefix at all: the least busy
    replica, one holding the prefix where loads tie; it then holds the prefix too, so a shared
    prompt ends up cached everywhere instead of drawing all traffic to its first replica.
    Remembers the choice."""
    least = min(loads.values())
    holders, depth = index.match(hashes, loads)
    own = depth > 0 and not index.branches(hashes[depth - 1])
    eligible = [r for r in holders if loads[r] - least <= imbalance] if own else []
    if not eligible:
        eligible = [r for r in loads if loads[r] == least]
        holding = [r for r in eligible if r in holders]
        eligible = holding or eligible
    low = min(loads[r] for r in eligible)
    pick = (rng.choice if rng else random.choice)(sorted(
        (r for r in eligible if loads[r] == low), key=str))
    index.insert(hashes, pick)
    return pick, depth if pick in holders else 0


# ---- in Serve ----------------------------------------------------------------------------------

# The index every route replica shares (Serve runs one or more per proxy node, and HAProxy asks
# any of them): one actor per application, named after it in Serve's namespace.
INDEX_ACTOR_PREFIX = "prefix-index:"
SERVE_NAMESPACE = "serve"


class SharedPrefixIndex:
    """The application's PrefixIndex, in an actor of its own: every route replica chooses
    through it, so a conversation's turns find their replica whichever route replica HAProxy
    asks. stop_service.py ends it with its application."""

    def __init__(self) -> None:
        self.index = PrefixIndex()

    def choose(self, hashes: list[bytes], loads: dict[str, float], imbalance: float
               ) -> tuple[str, int]:
        return choose(self.index, hashes, loads, imbalance)

    def remove(self, replica: str) -> None:
        self.index.remove(replica)


def replica_load(sent: collections.deque, stats: dict, now: float) -> float:
    """A replica's requests in flight: its own count (`stats`: in_flight, taken at `at`) plus
    the requests sent to it since (`sent`: their times, oldest first; older ones are dropped)."""
    taken = float(stats.get("at", 0.0))
    while sent and (sent[0] <= taken or sent[0] < now - SENT_WINDOW_S):
        sent.popleft()
    return float(stats.get("in_flight", 0)) + len(sent)


def index_actor_name(app_name: str) -> str:
    return f"{INDEX_ACTOR_PREFIX}{app_name}"


class PrefixAffinityRouter(RequestRouter):
    """Serve's request router for the LLM deployment under --routing prefix (see choose()); a
    replica's load is its own count of requests in flight (record_routing_stats) plus what
    this router sent it since that count. Called by PrefixRoute, once per request."""

    def initialize_state(self, imbalance: float = DEFAULT_IMBALANCE,
                         block_chars: int = BLOCK_CHARS, **_: Any) -> None:
        import ray

        self.imbalance = imbalance
        self.block_chars = block_chars
        self.sent: dict[Any, collections.deque] = collections.defaultdict(collections.deque)
        # Restarted (empty) where its node goes; meanwhile this router's own record serves.
        self.shared = ray.remote(num_cpus=0, max_restarts=-1)(SharedPrefixIndex).options(
            name=index_actor_name(self.app_name), namespace=SERVE_NAMESPACE,
            get_if_exists=True, lifetime="detached").remote()
        self.local = PrefixIndex()
        self.shared_down = False

    def _load(self, replica: Any, now: float) -> float:
        stats = replica.routing_stats or {}
        return replica_load(self.sent[replica.replica_id], stats, now)

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None
                              ) -> list[list]:
        if not candidate_replicas:
            return []
        now = time.time()
        by_name = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        body = pending_request.args[0] if pending_request is not None and \
            pending_request.args else None
        hashes = request_blocks(body, self.block_chars)
        loads = {name: self._load(r, now) for name, r in by_name.items()}
        try:
            pick, _ = await self.shared.choose.remote(hashes, loads, self.imbalance)
            self.shared_down = False
        except Exception as exc:  # noqa: BLE001 - the index restarts; route on meanwhile
            if not self.shared_down:  # once per outage, not once per request
                logger.warning("the shared prefix index did not answer (%s: %s); choosing "
                               "from this route replica's own record until it does",
                               type(exc).__name__, exc)
            self.shared_down = True
            pick, _ = choose(self.local, hashes, loads, self.imbalance)
        replica = by_name[pick]
        self.sent[replica.replica_id].append(now)
        return [[replica]]

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.sent.pop(replica_id, None)
        self.shared.remove.remote(replica_id.to_full_id_str())


class RouteApp:
    """PrefixRoute's ASGI app: POST /internal/route with a request's body -> its replica."""

    def __init__(self, server: Any):
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http" or scope["path"] != "/internal/route" or \
                scope["method"] != "POST":
            return await _json(send, 404, {"detail": "POST /internal/route only"})
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            body = None  # a truncated or non-JSON body: the least busy replica takes it
        try:
            host, port, replica_id = await ray_compat.choose_backend(self.server, body)
        except Exception as exc:  # noqa: BLE001 - HAProxy answers any non-200 with a 503
            logger.warning("no replica chosen: %s: %s", type(exc).__name__, exc)
            return await _json(send, 503, {"detail": f"{type(exc).__name__}: {exc}"})
        await _json(send, 200, {"host": host, "port": port, "replica_id": replica_id})


@serve.deployment(name=ROUTE_DEPLOYMENT)
@serve.ingress()
class PrefixRoute:
    """Serve's HAProxy asks this deployment, per request and with its body, which replica of
    the LLM deployment takes it (POST /internal/route: {"host", "port", "replica_id"}); the
    deployment's PrefixAffinityRouter chooses, and HAProxy sends the request there."""

    def __init__(self, server: Any):
        self.route_app = RouteApp(server)

    async def __serve_build_asgi_app__(self):
        return self.route_app


async def _json(send: Any, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def request_router_config(imbalance: float) -> dict[str, Any]:
    """The LLM deployment's request_router_config under --routing prefix."""
    return {"request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"imbalance": imbalance},
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
            "request_routing_stats_timeout_s": ROUTING_STATS_PERIOD_S}
