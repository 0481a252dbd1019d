"""The replay buffer's contract, held against both backends: in-process and a real private Redis."""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import redis

from orchard.config import BufferConfig
from orchard.protocols import Buffer
from orchard.records import Completion, Group, Prompt
from orchard.services.buffer import STAT_KEYS, PassRateStats
from orchard.services.buffer import factory as factory_module
from orchard.services.buffer.factory import make_buffer
from orchard.services.buffer.memory import MemoryBuffer
from orchard.services.buffer.redis_buffer import BufferUnavailable, RedisBuffer
from orchard.services.redis_server import RedisServer, free_port


def make_group(version: int = 0, *, size: int = 8, tokens: int = 16, distribution: str = "addition") -> Group:
    """A realistic group: `size` completions of `tokens` tokens with logprobs, all from `version`."""
    rng = random.Random()
    prompt = Prompt(id=uuid.uuid4().hex[:8], text="12+34=", answer="46", distribution=distribution)
    completions = [
        Completion(
            text="46",
            token_ids=[rng.randrange(64) for _ in range(tokens)],
            logprobs=[-rng.random() for _ in range(tokens)],
            policy_version=version,
            reward=float(index % 2),
            correct=bool(index % 2),
        )
        for index in range(size)
    ]
    return Group(prompt=prompt, prompt_token_ids=[1, 2, 3, 4, 5, 6], completions=completions, worker="worker-0")


@pytest.fixture(params=["memory", "redis"])
def buffer(request) -> Buffer:
    if request.param == "memory":
        yield MemoryBuffer()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_buffer = RedisBuffer(server.url, f"test-{uuid.uuid4().hex[:8]}", reconnect_seconds=5)
    yield redis_buffer
    redis_buffer.close()


def ids(groups: list[Group]) -> list[str]:
    return [group.id for group in groups]


# ----------------------------------------------------------------------------- both backends
def test_both_backends_satisfy_the_buffer_protocol(buffer):
    assert isinstance(buffer, Buffer)
    assert set(buffer.stats()) == set(STAT_KEYS)
    assert all(value == 0 for value in buffer.stats().values())


def test_put_take_ack_round_trip_preserves_the_bytes(buffer):
    group = make_group(version=3)
    buffer.put(group)
    assert buffer.ready_count() == 1
    (taken,) = buffer.take(4, min_policy_version=0)
    assert taken.to_bytes() == group.to_bytes()
    assert buffer.ready_count() == 0 and buffer.pending_count() == 1
    buffer.ack([taken.id])
    assert buffer.pending_count() == 0
    stats = buffer.stats()
    assert (stats["put"], stats["taken"], stats["acked"], stats["ready"], stats["pending"]) == (1, 1, 1, 0, 0)


def test_a_multi_turn_group_keeps_its_observation_spans_through_the_buffer(buffer):
    group = make_group(version=2, tokens=30)
    for completion in group.completions:
        completion.observation_spans = [(4, 12), (20, 26)]
        completion.logprobs[4:12] = [0.0] * 8
        completion.logprobs[20:26] = [0.0] * 6
    buffer.put(group)
    (taken,) = buffer.take(1, min_policy_version=0)
    assert taken.to_bytes() == group.to_bytes()
    assert [c.observation_spans for c in taken.completions] == [[(4, 12), (20, 26)]] * 8
    assert [c.policy_token_count for c in taken.completions] == [16] * 8


def test_take_from_an_empty_buffer_returns_nothing(buffer):
    assert buffer.take(8, min_policy_version=0) == []
    assert buffer.take(0, min_policy_version=0) == []
    buffer.ack([])
    assert buffer.stats()["taken"] == 0


def test_take_returns_the_oldest_policy_versions_first(buffer):
    groups = {version: make_group(version) for version in (3, 1, 4, 2)}
    for group in groups.values():
        buffer.put(group)
    order = [buffer.take(1, min_policy_version=0)[0].policy_version for _ in range(4)]
    assert order == [1, 2, 3, 4]
    both = make_group(5), make_group(6)
    for group in reversed(both):
        buffer.put(group)
    assert [g.policy_version for g in buffer.take(2, min_policy_version=0)] == [5, 6]


def test_groups_older_than_the_minimum_version_are_never_returned_and_counted_stale(buffer):
    for version in (0, 0, 1, 2, 3):
        buffer.put(make_group(version))
    taken = buffer.take(10, min_policy_version=2)
    assert sorted(g.policy_version for g in taken) == [2, 3]
    assert buffer.stats()["stale"] == 3
    assert buffer.ready_count() == 0
    # nothing stale comes back later, even with a lower minimum
    assert buffer.take(10, min_policy_version=0) == []
    stats = buffer.stats()
    assert stats["put"] == stats["taken"] + stats["stale"] == 5


def test_taken_but_unacknowledged_groups_come_back_after_requeue(buffer):
    groups = [make_group(v) for v in (0, 1, 2)]
    for group in groups:
        buffer.put(group)
    first = buffer.take(2, min_policy_version=0)
    assert buffer.pending_count() == 2
    # the learner dies here, before acknowledging
    assert buffer.requeue_pending() == 2
    assert buffer.pending_count() == 0 and buffer.ready_count() == 3
    again = buffer.take(3, min_policy_version=0)
    assert set(ids(first)) <= set(ids(again))
    assert [g.to_bytes() for g in again] == [g.to_bytes() for g in groups]  # versions 0, 1, 2 in order
    stats = buffer.stats()
    assert stats["requeued"] == 2 and stats["taken"] == 5


def test_requeue_can_be_limited_to_groups_pending_for_a_while(buffer):
    buffer.put(make_group(0))
    buffer.take(1, min_policy_version=0)
    assert buffer.requeue_pending(older_than_seconds=60) == 0
    time.sleep(0.05)
    assert buffer.requeue_pending(older_than_seconds=0.01) == 1
    assert buffer.ready_count() == 1 and buffer.pending_count() == 0


def test_acknowledged_groups_are_gone_for_good(buffer):
    group = make_group(1)
    buffer.put(group)
    taken = buffer.take(1, min_policy_version=0)
    buffer.ack(ids(taken))
    buffer.ack(ids(taken))  # idempotent
    assert buffer.requeue_pending() == 0
    buffer.put(group)  # a worker re-sends it: ignored
    assert buffer.take(5, min_policy_version=0) == []
    stats = buffer.stats()
    assert (stats["acked"], stats["duplicates"], stats["ready"], stats["pending"]) == (1, 1, 0, 0)


def test_an_acknowledged_requeued_group_is_not_handed_out_again(buffer):
    group = make_group(0)
    buffer.put(group)
    buffer.take(1, min_policy_version=0)
    buffer.requeue_pending()  # the learner restarted...
    buffer.ack([group.id])  # ...but its checkpoint had committed the step that used the group
    assert buffer.take(1, min_policy_version=0) == []
    assert buffer.stats()["acked"] == 1


def test_a_duplicate_put_is_ignored_and_counted(buffer):
    group = make_group(0)
    buffer.put(group)
    buffer.put(group)  # while ready
    assert buffer.ready_count() == 1
    buffer.take(1, min_policy_version=0)
    buffer.put(group)  # while pending
    assert buffer.ready_count() == 0
    buffer.ack([group.id])
    buffer.put(group)  # after ack
    stats = buffer.stats()
    assert (stats["put"], stats["duplicates"], stats["ready"]) == (1, 3, 0)


def test_ready_count_honours_the_minimum_version(buffer):
    for version in (0, 1, 1, 2):
        buffer.put(make_group(version))
    assert buffer.ready_count() == 4
    assert buffer.ready_count(min_policy_version=1) == 3
    assert buffer.ready_count(min_policy_version=2) == 1
    assert buffer.ready_count(min_policy_version=3) == 0


def test_take_with_the_same_request_token_returns_the_same_groups(buffer):
    for version in range(5):
        buffer.put(make_group(version))
    first = buffer.take(2, min_policy_version=0, request_token="step-7")
    again = buffer.take(2, min_policy_version=0, request_token="step-7")
    assert ids(again) == ids(first)
    assert buffer.stats()["taken"] == 2 and buffer.ready_count() == 3
    other = buffer.take(2, min_policy_version=0, request_token="step-8")
    assert not set(ids(other)) & set(ids(first))


def test_prompt_and_distribution_stats_aggregate(buffer):
    buffer.record_prompt_stats("p1", "addition", 0.25, 1)
    buffer.record_prompt_stats("p1", "addition", 0.75, 3)
    buffer.record_prompt_stats("p1", "addition", 0.5, 2)
    buffer.record_prompt_stats("p2", "sorting", 1.0, 2)
    p1 = buffer.prompt_stats("p1")
    assert p1 == PassRateStats(distribution="addition", count=3, pass_rate_sum=1.5, last_policy_version=3)
    assert p1.mean_pass_rate == pytest.approx(0.5)
    assert buffer.prompt_stats("never-seen") is None
    distributions = buffer.distribution_stats()
    assert list(distributions) == ["addition", "sorting"]
    assert distributions["sorting"] == PassRateStats("sorting", 1, 1.0, 2)
    assert distributions["addition"].count == 3


def test_named_state_is_kept_and_replaced(buffer):
    assert buffer.load_state("curriculum") is None
    buffer.save_state("curriculum", b'{"version": 1}')
    buffer.save_state("other", b"\x00\xff")
    buffer.save_state("curriculum", b'{"version": 2}')
    assert buffer.load_state("curriculum") == b'{"version": 2}'
    assert buffer.load_state("other") == b"\x00\xff"


def test_concurrent_producers_and_one_consumer_lose_and_repeat_nothing(buffer):
    producers, per_producer, batch = 4, 40, 7
    expected = producers * per_producer
    put_ids: list[str] = []
    put_lock = threading.Lock()
    taken: Counter[str] = Counter()
    errors: list[BaseException] = []

    def produce(index: int) -> None:
        try:
            for step in range(per_producer):
                group = make_group(step % 3, size=4, tokens=8)
                with put_lock:
                    put_ids.append(group.id)
                buffer.put(group)
                if index == 0 and step % 10 == 0:
                    buffer.put(group)  # a re-sent group must not be delivered twice
        except BaseException as error:
            errors.append(error)

    def consume() -> None:
        try:
            deadline = time.monotonic() + 60
            while sum(taken.values()) < expected and time.monotonic() < deadline:
                groups = buffer.take(batch, min_policy_version=0)
                taken.update(ids(groups))
                buffer.ack(ids(groups))
                if not groups:
                    time.sleep(0.001)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    threads.append(threading.Thread(target=consume))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not errors
    assert set(taken) == set(put_ids) and len(put_ids) == expected
    assert max(taken.values()) == 1
    stats = buffer.stats()
    assert (stats["put"], stats["taken"], stats["acked"], stats["duplicates"]) == (expected, expected, expected, 4)
    assert stats["ready"] == stats["pending"] == 0


# ----------------------------------------------------------------------------- Redis only
def test_an_unreachable_redis_at_start_is_buffer_unavailable_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(BufferUnavailable) as raised:
        RedisBuffer(url, "nowhere", reconnect_seconds=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0
    assert url in str(raised.value) and "redis-server" in str(raised.value)


def test_the_error_never_shows_a_password_in_the_url():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(BufferUnavailable) as raised:
        RedisBuffer(url, "nowhere", reconnect_seconds=0.2)
    assert "hunter2" not in str(raised.value) and ":***@127.0.0.1" in str(raised.value)


def test_a_redis_that_stays_down_fails_the_call_after_reconnect_seconds(start_redis_server):
    server = start_redis_server()
    buffer = RedisBuffer(server.url, "down", reconnect_seconds=0.5)
    buffer.put(make_group(0))
    server.stop()
    started = time.monotonic()
    with pytest.raises(BufferUnavailable, match=re.escape(server.url)):
        buffer.ready_count()
    assert time.monotonic() - started < 2.5
    buffer.close()


def test_a_redis_restart_keeps_unacknowledged_groups_and_calls_during_it_succeed(start_redis_server):
    server = start_redis_server(appendonly=True)
    buffer = RedisBuffer(server.url, "restart", reconnect_seconds=20)
    before = [make_group(0) for _ in range(10)]
    for group in before:
        buffer.put(group)
    taken = buffer.take(4, min_policy_version=0)
    acked, unacked = taken[:2], taken[2:]
    buffer.ack(ids(acked))
    port, pid = server.port, server.pid

    # The outage is held open until a put has met it, so the test cannot miss it however the
    # machine schedules the two threads.
    server.stop()
    during = [make_group(1) for _ in range(20)]
    with ThreadPoolExecutor(1) as pool:
        puts = pool.submit(lambda: [buffer.put(group) for group in during])
        deadline = time.monotonic() + 10
        while buffer.retries == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buffer.retries > 0, "no put met the outage within 10 s"
        assert not puts.done(), "a put finished while Redis was down"
        server.start()
        puts.result(timeout=30)  # every put of the outage succeeds once Redis is back

    assert server.port == port and server.pid not in (None, pid)
    assert buffer.pending_count() == 2
    assert buffer.requeue_pending() == 2
    remaining = buffer.take(10_000, min_policy_version=0)
    expected = {g.id for g in before} - set(ids(acked)) | {g.id for g in during}
    assert set(ids(remaining)) == expected
    assert set(ids(unacked)) <= set(ids(remaining))
    buffer.put(acked[0])  # acknowledged before the restart, still known to be finished after it
    assert buffer.ready_count() == 0
    assert buffer.stats()["acked"] == 2


def test_named_state_survives_a_redis_restart(start_redis_server):
    server = start_redis_server(appendonly=True)
    buffer = RedisBuffer(server.url, "state", reconnect_seconds=20)
    buffer.save_state("curriculum", b"scheduler and value model")
    server.restart()
    assert RedisBuffer(server.url, "state").load_state("curriculum") == b"scheduler and value model"
    buffer.close()


def test_a_take_whose_answer_is_lost_is_retried_without_losing_groups(redis_server):
    buffer = RedisBuffer(redis_server.url, f"lost-{uuid.uuid4().hex[:6]}", reconnect_seconds=5)
    for version in range(6):
        buffer.put(make_group(version))
    real_script = buffer._take_script
    calls = []

    def lose_first_answer(*args, **kwargs):
        answer = real_script(*args, **kwargs)  # the script ran in Redis...
        calls.append(kwargs["keys"][6])
        if len(calls) == 1:
            raise redis.ConnectionError("connection lost before the answer arrived")  # ...the answer did not
        return answer

    buffer._take_script = lose_first_answer
    taken = buffer.take(3, min_policy_version=0)
    assert len(calls) == 2 and calls[0] == calls[1]  # retried with the same request token
    assert [g.policy_version for g in taken] == [0, 1, 2]
    stats = buffer.stats()
    assert (stats["taken"], stats["pending"], stats["ready"]) == (3, 3, 3)
    buffer.close()


def test_corrupt_bytes_are_set_aside_counted_and_do_not_block_other_groups(redis_server):
    namespace = f"corrupt-{uuid.uuid4().hex[:6]}"
    buffer = RedisBuffer(redis_server.url, namespace, reconnect_seconds=5)
    good = [make_group(0), make_group(1), make_group(2)]
    for group in good:
        buffer.put(group)
    raw = redis.Redis.from_url(redis_server.url)
    prefix = f"orchard:{namespace}:"
    wrong_schema = msgpack.packb({"schema": 999})
    other_id = make_group(0).to_bytes()  # valid bytes, but of another group id
    bad = {"not-msgpack": b"\xc1\xc1garbage", "wrong-schema": wrong_schema, "wrong-id": other_id}
    for group_id, data in bad.items():
        raw.hset(prefix + "groups", group_id, data)
        raw.zadd(prefix + "ready", {group_id: 0})

    taken = buffer.take(3, min_policy_version=0)
    assert sorted(ids(taken)) == sorted(ids(good))
    stats = buffer.stats()
    assert (stats["corrupt"], stats["taken"], stats["pending"], stats["ready"]) == (3, 6, 3, 0)
    assert {k.decode(): v for k, v in raw.hgetall(prefix + "corrupt").items()} == bad
    assert buffer.requeue_pending() == 3  # the corrupt ones are not pending any more
    raw.close()
    buffer.close()


# ----------------------------------------------------------------------------- factory
def test_make_buffer_memory_and_an_existing_redis(redis_server):
    buffer, server = make_buffer(BufferConfig(backend="memory"), namespace="run-1")
    assert isinstance(buffer, MemoryBuffer) and server is None
    config = BufferConfig(backend="auto", redis_url=redis_server.url, namespace="chosen", reconnect_seconds=7)
    buffer, server = make_buffer(config, namespace="run-1")
    assert isinstance(buffer, RedisBuffer) and server is None
    assert buffer.namespace == "chosen" and buffer.reconnect_seconds == 7
    buffer.close()


@pytest.mark.parametrize("backend", ["auto", "redis"])
def test_make_buffer_starts_a_private_durable_redis_server_without_a_url(redis_server, backend):
    buffer, server = make_buffer(BufferConfig(backend=backend), namespace="run-2")
    try:
        assert isinstance(buffer, RedisBuffer) and server is not None and server.appendonly
        assert buffer.url == server.url and buffer.namespace == "run-2"
        buffer.put(make_group(0))
        assert buffer.ready_count() == 1
    finally:
        buffer.close()
        server.stop()
    assert not server.running


def test_make_buffer_without_redis_server_installed(monkeypatch):
    monkeypatch.setattr(factory_module, "find_redis_server", lambda: None)
    buffer, server = make_buffer(BufferConfig(backend="auto"), namespace="run-3")
    assert isinstance(buffer, MemoryBuffer) and server is None
    with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
        make_buffer(BufferConfig(backend="redis"), namespace="run-3")


def test_a_missing_redis_server_executable_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match="no-such-redis-server.*apt-get install redis-server"):
        RedisServer(executable="no-such-redis-server")
