"""Unit tests: --routing prefix's policy (replica/prefix_routing.py) and the placement-group router's use of it."""
from __future__ import annotations

import json
import random

from replica.prefix_routing import PrefixIndex, block_hashes, choose, request_blocks

SYSTEM = "You are a careful assistant. " * 20


def chat(*turns: str, system: str = SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def hashes(body: dict) -> list[bytes]:
    blocks = request_blocks(body)
    assert blocks
    return blocks


def test_blocks_of_messages_end_with_each_message_and_of_a_prompt_are_whole():
    assert len(request_blocks({"prompt": "p" * 300})) == 2          # the last 44 chars: no
    assert request_blocks({"prompt": [1, 2, 3]}) == []              # shorter than a block
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert request_blocks(parts) == request_blocks(
        {"messages": [{"role": "user", "content": "hi"}]})
    # The role is part of the text: the same words from another role are another prefix.
    assert request_blocks(chat("x", system="")) != request_blocks(
        {"messages": [{"role": "system", "content": "x"}]})
    # A conversation's next turn repeats the earlier messages whole: all their blocks match,
    # the short last block of each message included.
    first = request_blocks(chat("a short question"))
    second = request_blocks(chat("a short question", "answer", "next"))
    assert second[:len(first)] == first and len(second) > len(first)
    for nothing in (None, {}, {"messages": []}, {"prompt": ""}, "text", []):
        assert request_blocks(nothing) == []


def test_blocks_cover_whole_prefixes_and_a_partial_block_is_left_out():
    a, b = block_hashes(["x" * 300 + "a" * 100]), block_hashes(["x" * 300 + "b" * 100])
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes(["y" * 127]) == [] and len(block_hashes(["y" * 127], partial=True)) == 1
    # Each digest covers every block before it: the same block after another start differs.
    assert block_hashes(["p" * 128 + "q" * 128])[1] != block_hashes(["r" * 128 + "q" * 128])[1]


def test_index_matches_the_longest_prefix_forgets_the_oldest_and_a_removed_replica():
    index = PrefixIndex(capacity=10)
    first = hashes(chat("tell me about the history of computing " * 5))
    index.insert(first, "A")
    later = hashes(chat("tell me about the history of computing " * 5, "an answer " * 30,
                        "and then? " * 20))
    holders, depth = index.match(later, ["A", "B"])
    assert holders == {"A"} and depth == len(first)
    assert index.match(later, ["B"]) == (set(), 0)
    index.insert(block_hashes(["z" * 128 * 10]), "B")   # fills the index: A's blocks go
    assert len(index) == 10 and index.match(later, ["A", "B"]) == (set(), 0)
    index.remove("B")
    assert len(index) == 0


def test_a_conversation_keeps_its_replica_turn_after_turn():
    index, rng = PrefixIndex(), random.Random(7)
    replicas = {"A": 0.0, "B": 0.0}
    homes = {}
    for conversation in range(8):
        history = [f"conversation {conversation}: " + "question " * 40]
        homes[conversation], _ = choose(index, hashes(chat(*history, system="")), replicas, 16,
                                        rng)
        replicas[homes[conversation]] += 1    # each conversation keeps one request in flight
    assert set(homes.values()) == {"A", "B"}   # no shared prefix: by load, both used
    for turn in range(1, 4):
        for conversation, home in homes.items():
            history = [f"conversation {conversation}: " + "question " * 40] + \
                [f"turn {t} " * 30 for t in range(1, turn + 1)]
            pick, depth = choose(index, hashes(chat(*history, system="")), replicas, 16, rng)
            assert pick == home and depth > 0


def test_a_hot_prefix_spills_to_the_least_busy_replica_past_the_imbalance_bound():
    index = PrefixIndex()
    body = hashes(chat("the same question " * 20))
    assert choose(index, body, {"A": 0.0, "B": 0.0}, 4, random.Random(1))[0] in ("A", "B")
    home = next(iter(index.match(body, ["A", "B"])[0]))
    other = "B" if home == "A" else "A"
    assert choose(index, body, {home: 4.0, other: 0.0}, 4)[0] == home       # within the bound
    pick, depth = choose(index, body, {home: 5.0, other: 0.0}, 4)           # beyond it
    assert (pick, depth) == (other, 0)
    # The spilled request is remembered: the prefix now has two homes, the less busy wins.
    assert index.match(body, ["A", "B"])[0] == {"A", "B"}
    assert choose(index, body, {home: 3.0, other: 1.0}, 4)[0] == other


def test_placement_group_router_routes_by_prefix_among_the_backends_up():
    from test_router_unit import FakeEndpointHandle, router_with

    handles = [FakeEndpointHandle(f"http://{name}") for name in "ab"]
    router = router_with(*handles, routing="prefix")
    router.up = [True, True]
    first = json.dumps(chat("what is a transformer? " * 10)).encode()
    home = router.order(None, first)[0]
    router.in_flight[home] += 1
    again = json.dumps(chat("what is a transformer? " * 10, "an answer " * 20, "more " * 10))
    # Its home first, then the other backend up (an unreachable pick falls over to it).
    assert router.order(None, again.encode()) == [home, 1 - home]
    # A body that is not JSON, or names no prompt: the least busy backend first.
    assert router.order(None, b"not json")[0] != home
    router.up = [home == 0, home == 1]
    assert router.order(None, first)[0] == home and len(router.order(None, first)) == 2
    router.up = [home != 0, home != 1]                                # its home went down
    assert router.order(None, again.encode())[0] != home


def test_a_shared_system_prompt_does_not_draw_every_conversation_to_one_replica():
    index, rng = PrefixIndex(), random.Random(3)
    loads = {"A": 0.0, "B": 0.0}
    homes = []
    for conversation in range(8):     # a long shared system prompt, then each its own question
        pick, _ = choose(index, hashes(chat(f"question {conversation} " * 10)), loads, 16, rng)
        loads[pick] += 1
        homes.append(pick)
    assert homes.count("A") in (3, 4, 5), homes   # by load once the prompt is seen as shared
    # ...and each conversation's next turn still finds the replica that holds its history.
    for conversation, home in enumerate(homes):
        body = chat(f"question {conversation} " * 10, "answer " * 30, "next " * 10)
        assert choose(index, hashes(body), loads, 16, rng)[0] == home


def test_a_replicas_load_counts_what_was_sent_after_its_own_count_was_taken():
    import collections

    from replica.prefix_routing import SENT_WINDOW_S, replica_load

    sent = collections.deque([10.0, 10.5, 11.2, 11.8])
    # The replica counted 2 in flight at 11.0: the two sent after that come on top.
    assert replica_load(sent, {"in_flight": 2, "at": 11.0}, now=12.0) == 4
    assert list(sent) == [11.2, 11.8]
    # No count yet: what was sent lately, up to SENT_WINDOW_S back.
    assert replica_load(sent, {}, now=11.8 + SENT_WINDOW_S - 0.1) == 1
