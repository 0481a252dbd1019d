"""Replay buffer throughput: `RedisBuffer` against raw redis-py pipelines, on one private redis-server.

Every variant stores N groups, reads them all back and deletes them, in batches of `--batch` groups
(the learner's take count); groups are realistic (8 completions x 16 tokens with logprobs, msgpack
via `Group.to_bytes`, about 2.3 KiB). Measured side by side in one run:

- baseline: a raw redis-py pipeline per batch, one command per group: HSET (after `to_bytes`),
  then HGET (then `Group.from_bytes`), then HDEL — the least any Redis store must do to hold, hand
  out and delete the same groups, with the same encoding and the same three round trips per batch;
- buffer: `put_many` per batch, then `take(batch)` + `ack` until empty; on top of the baseline it
  keeps the ready index by policy version, the pending set, the duplicate check, the counters and
  the retry token, inside one Lua script per call;
- buffer with one `put` per group (the driver's call pattern), for reference;
- the same two without the encoding (pre-encoded bytes; the buffer through its byte-level halves
  `_put_encoded` / `_take_encoded`), so the Redis-side cost is visible on its own;
- raw with one variadic command per batch (HSET with a mapping, HMGET, HDEL): the floor.

Each variant runs `--repeats` times, interleaved; the median is printed. Target: buffer >= 0.8x its
baseline, with and without the encoding.
Run: `python bench/buffer.py [--groups 3000] [--batch 16] [--repeats 5] [--appendonly]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable

import redis

from orchard.records import Completion, Group, Prompt
from orchard.services.buffer.redis_buffer import RedisBuffer
from orchard.services.redis_server import RedisServer

Entry = tuple[str, int, bytes]  # group id, policy version, Group.to_bytes()


def make_groups(count: int, *, size: int = 8, tokens: int = 16, seed: int = 0) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for index in range(count):
        prompt = Prompt(
            id=f"p{index}", text=f"{rng.randrange(1000)}+{rng.randrange(1000)}=", answer="0", distribution="addition"
        )
        completions = [
            Completion(
                text="".join(rng.choice("0123456789") for _ in range(4)),
                token_ids=[rng.randrange(64) for _ in range(tokens)],
                logprobs=[-rng.random() * 3 for _ in range(tokens)],
                policy_version=index // 1000,
                reward=float(rng.random() < 0.5),
                correct=rng.random() < 0.5,
            )
            for _ in range(size)
        ]
        groups.append(Group(prompt=prompt, prompt_token_ids=list(range(12)), completions=completions, worker="w0"))
    return groups


def batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# ----------------------------------------------------------------------------- raw redis-py
def raw_groups(client: redis.Redis, groups: list[Group], batch: int) -> float:
    key = f"bench:raw:{uuid.uuid4().hex}"
    started = time.perf_counter()
    for chunk in batches(groups, batch):
        pipeline = client.pipeline(transaction=False)
        for group in chunk:
            pipeline.hset(key, group.id, group.to_bytes())
        pipeline.execute()
    read = 0
    for chunk in batches([group.id for group in groups], batch):
        pipeline = client.pipeline(transaction=False)
        for group_id in chunk:
            pipeline.hget(key, group_id)
        read += len([Group.from_bytes(data) for data in pipeline.execute()])
        pipeline = client.pipeline(transaction=False)
        for group_id in chunk:
            pipeline.hdel(key, group_id)
        pipeline.execute()
    elapsed = time.perf_counter() - started
    assert read == len(groups) and client.exists(key) == 0
    return elapsed


def raw_bytes(client: redis.Redis, entries: list[Entry], batch: int) -> float:
    key = f"bench:raw:{uuid.uuid4().hex}"
    started = time.perf_counter()
    for chunk in batches(entries, batch):
        pipeline = client.pipeline(transaction=False)
        for group_id, _, data in chunk:
            pipeline.hset(key, group_id, data)
        pipeline.execute()
    read = 0
    for chunk in batches([group_id for group_id, _, _ in entries], batch):
        pipeline = client.pipeline(transaction=False)
        for group_id in chunk:
            pipeline.hget(key, group_id)
        read += len(pipeline.execute())
        pipeline = client.pipeline(transaction=False)
        for group_id in chunk:
            pipeline.hdel(key, group_id)
        pipeline.execute()
    elapsed = time.perf_counter() - started
    assert read == len(entries) and client.exists(key) == 0
    return elapsed


def raw_bytes_variadic(client: redis.Redis, entries: list[Entry], batch: int) -> float:
    key = f"bench:raw:{uuid.uuid4().hex}"
    started = time.perf_counter()
    for chunk in batches(entries, batch):
        client.hset(key, mapping={group_id: data for group_id, _, data in chunk})
    read = 0
    for chunk in batches([group_id for group_id, _, _ in entries], batch):
        read += len(client.hmget(key, chunk))
        client.hdel(key, *chunk)
    elapsed = time.perf_counter() - started
    assert read == len(entries) and client.exists(key) == 0
    return elapsed


# ----------------------------------------------------------------------------- the buffer
def buffer_groups(url: str, groups: list[Group], batch: int, *, one_put_per_group: bool = False) -> float:
    buffer = RedisBuffer(url, f"bench-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    if one_put_per_group:
        for group in groups:
            buffer.put(group)
    else:
        for chunk in batches(groups, batch):
            buffer.put_many(chunk)
    read = 0
    while taken := buffer.take(batch, min_policy_version=0):
        buffer.ack([group.id for group in taken])
        read += len(taken)
    elapsed = time.perf_counter() - started
    check(buffer, read, len(groups))
    return elapsed


def buffer_bytes(url: str, entries: list[Entry], batch: int) -> float:
    buffer = RedisBuffer(url, f"bench-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    for chunk in batches(entries, batch):
        buffer._put_encoded(chunk)
    read = 0
    while taken := buffer._take_encoded(batch, 0, uuid.uuid4().hex):
        buffer.ack([group_id for group_id, _ in taken])
        read += len(taken)
    elapsed = time.perf_counter() - started
    check(buffer, read, len(entries))
    return elapsed


def check(buffer: RedisBuffer, read: int, expected: int) -> None:
    stats = buffer.stats()
    assert read == expected == stats["put"] == stats["acked"], stats
    assert stats["ready"] == stats["pending"] == 0, stats
    buffer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=3000, help="groups per variant and repeat")
    parser.add_argument("--batch", type=int, default=16, help="take count = pipeline batch (learner.groups_per_step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--appendonly", action="store_true", help="AOF with appendfsync always (the private default)")
    args = parser.parse_args()

    groups = make_groups(args.groups)
    entries = [(group.id, group.policy_version, group.to_bytes()) for group in groups]
    size = sum(len(data) for _, _, data in entries) / len(entries)
    with RedisServer(appendonly=args.appendonly) as server:
        client = redis.Redis.from_url(server.url)
        url, batch = server.url, args.batch
        # name -> (run, the name of its baseline)
        raw, raw_b = "raw pipeline HSET/HGET/HDEL (baseline)", "raw pipeline HSET/HGET/HDEL, bytes (baseline)"
        variants: dict[str, tuple[Callable[[], float], str]] = {
            raw: (lambda: raw_groups(client, groups, batch), raw),
            "RedisBuffer put_many + take + ack": (lambda: buffer_groups(url, groups, batch), raw),
            "RedisBuffer put per group + take + ack": (
                lambda: buffer_groups(url, groups, batch, one_put_per_group=True),
                raw,
            ),
            raw_b: (lambda: raw_bytes(client, entries, batch), raw_b),
            "RedisBuffer, bytes (_put_encoded/_take_encoded/ack)": (lambda: buffer_bytes(url, entries, batch), raw_b),
            "raw variadic HSET/HMGET/HDEL, bytes (the floor)": (
                lambda: raw_bytes_variadic(client, entries, batch),
                raw_b,
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (run, _) in variants.items():
                seconds[name].append(run())
        client.close()

    rates = {name: args.groups / statistics.median(values) for name, values in seconds.items()}
    print(
        f"buffer bench: {args.groups} groups of {size / 1024:.1f} KiB (8 completions x 16 tokens), batch {batch}, "
        f"redis-server appendonly={'yes' if args.appendonly else 'no'}, median of {args.repeats}"
    )
    width = max(len(name) for name in rates)
    print(f"{'variant':<{width}}  {'groups/s':>9}  {'vs baseline':>11}")
    for index, (name, rate) in enumerate(rates.items()):
        if index == 3:
            print("-- without Group encode/decode:")
        elif index == 0:
            print("-- with Group.to_bytes / Group.from_bytes:")
        print(f"{name:<{width}}  {rate:>9.0f}  {rate / rates[variants[name][1]]:>10.2f}x")
    for name in ("RedisBuffer put_many + take + ack", "RedisBuffer, bytes (_put_encoded/_take_encoded/ack)"):
        ratio = rates[name] / rates[variants[name][1]]
        print(f"{name}: {ratio:.2f}x its baseline (target >= 0.80): {'ok' if ratio >= 0.8 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
