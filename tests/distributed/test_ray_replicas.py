"""Serving replicas on Ray: the router on its own, then 2 replicas of a tiny model on a
local Ray cluster that this module starts (loopback only, 2 CPUs) behind the HTTP server:
requests are spread, shared-prefix requests stick to one replica, streams pass through,
a disconnect aborts on the replica, and a killed replica fails only its own requests, is
restarted by Ray and serves again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time

import pytest

from tests.helpers import stream_in_thread
from tests.server.conftest import LiveServer
from yun import LLM
from yun.config import EngineConfig
from yun.distributed.ray_replicas import ROUTING_POLICIES, Router, import_ray
from yun.engine.errors import EngineDeadError
from yun.sampling_params import SamplingParams
from yun.server import ServerSettings, build_app
from yun.server.settings import ROUTING_CHOICES

KV_BYTES = 4 * 2**20
BS = 16  # KV block size


def prompt(prefix: int, question: int, blocks: int = 4) -> list[int]:
    """`blocks` full blocks shared by every prompt with this prefix, then a question."""
    return [1000 + prefix] * (blocks * BS) + [2000 + question] * 5


# ---- the router alone ----------------------------------------------------------------------
def test_router_keeps_a_shared_prefix_on_one_replica_and_spreads_distinct_ones():
    router = Router(2, BS)
    loads = [0, 0]
    placed: dict[int, set[int]] = {0: set(), 1: set()}
    for q in range(6):
        for p in (0, 1):
            i = router.choose(prompt(p, q), loads, [True, True])
            loads[i] += 1
            placed[p].add(i)
    assert placed[0] != placed[1] and all(len(s) == 1 for s in placed.values())


def test_router_spills_a_hot_prefix_past_the_imbalance_bound_then_shares_it():
    router = Router(2, BS, max_imbalance=2)
    loads = [0, 0]
    for q in range(8):
        loads[router.choose(prompt(0, q), loads, [True, True])] += 1
    assert abs(loads[0] - loads[1]) <= 3 and min(loads) > 0  # both replicas now hold it


def test_router_matches_the_longest_prefix_and_skips_unhealthy_replicas():
    router = Router(2, BS)
    assert router.choose(prompt(0, 0, blocks=2), [0, 0], [True, True]) == 0
    assert router.choose(prompt(1, 0, blocks=2), [1, 0], [True, True]) == 1
    longer = prompt(1, 0, blocks=2)[:2 * BS] + [7] * (3 * BS)  # shares 2 blocks with p1
    assert router.choose(longer, [0, 1], [True, True]) == 1
    assert router.choose(longer, [0, 1], [True, False]) == 0
    router.forget(1)  # replica 1 restarted with an empty cache: only 0 holds p1 now
    assert router.choose(prompt(1, 5, blocks=2), [5, 0], [True, True]) == 0
    assert router.choose(prompt(1, 6, blocks=2), [9, 0], [True, True]) == 1  # past the bound
    with pytest.raises(EngineDeadError):
        router.choose(longer, [0, 0], [False, False])


def test_round_robin_and_least_loaded_ignore_prefixes():
    rr = Router(3, BS, "round-robin")
    assert [rr.choose(prompt(0, q), [0, 0, 0], [True, False, True]) for q in range(4)] == \
        [0, 2, 0, 2]
    ll = Router(2, BS, "least-loaded")
    assert ll.choose(prompt(0, 0), [3, 1], [True, True]) == 1
    with pytest.raises(ValueError, match="routing must be one of"):
        Router(2, BS, "random")
    assert ROUTING_POLICIES == ROUTING_CHOICES  # `yun serve --routing` offers them all


# ---- 2 replicas on a local Ray cluster -------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'yun[ray]')")
    ray = import_ray(local=True)  # loopback only
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def replicas(ray_cluster, qwen2_path):
    from yun.distributed.ray_replicas import RayReplicas

    engine = RayReplicas(EngineConfig(model=qwen2_path, kv_cache_memory=KV_BYTES,
                                      num_threads=1), replicas=2)
    live = LiveServer(build_app(engine, ServerSettings(port=0, served_model_name="tiny")),
                      engine).start()
    yield live
    live.stop()
    engine.shutdown()


def states(server: LiveServer) -> list[dict]:
    body = server.http().get("/health").json()
    return body["replicas"]


def wait_until(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def complete(server: LiveServer, ids: list[int], max_tokens: int = 4) -> dict:
    r = server.http().post("/v1/completions", json={
        "model": "tiny", "prompt": ids, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_replicas_are_released_by_shutdown_by_with_and_by_del(ray_cluster, qwen2_path):
    """A second front end in the same process after the first went away: each one's
    actors are killed when it is shut down, leaves its `with` block or is dropped.
    Runs before the module's 2-replica fixture exists (the cluster has 2 CPUs)."""
    import gc

    from yun.distributed.ray_replicas import RayReplicas

    config = EngineConfig(model=qwen2_path, kv_cache_memory=KV_BYTES, num_threads=1)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    with RayReplicas(config, replicas=1) as first:
        pid = first.replica_states()[0]["pid"]
        assert first.is_alive and not gone(pid)
    assert not first.is_alive and wait_until(lambda: gone(pid))
    first.shutdown()  # again: nothing to do

    second = RayReplicas(config, replicas=1)
    pid = second.replica_states()[0]["pid"]
    assert second.is_alive and not gone(pid)
    del second
    gc.collect()
    assert wait_until(lambda: gone(pid))
    assert ray_cluster.is_initialized()  # not ours to stop: the fixture started it


def test_requests_are_spread_over_both_replicas(replicas, qwen2_path):
    before = [s["routed"] for s in states(replicas)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda p=p: results.append(complete(replicas, p)))
               for p in (prompt(10 + k, 0) for k in range(6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    routed = [s["routed"] - b for s, b in zip(states(replicas), before)]
    assert routed[0] > 0 and routed[1] > 0 and sum(routed) == 6
    assert all(s["healthy"] for s in states(replicas))
    metrics = replicas.http().get("/metrics").text
    assert 'yun_replica_routed_total{replica="1"}' in metrics
    assert 'yun_replica_healthy{replica="0"} 1.0' in metrics
    offline = LLM(qwen2_path, kv_cache_memory=KV_BYTES, num_threads=1)
    want = offline.generate({"prompt_token_ids": prompt(10, 0)},
                            SamplingParams(max_tokens=4, temperature=0))[0].outputs[0]
    assert complete(replicas, prompt(10, 0))["choices"][0]["text"] == want.text


def test_shared_prefix_requests_stick_to_one_replica(replicas):
    before = states(replicas)
    for q in range(4):
        complete(replicas, prompt(99, q))
    after = states(replicas)
    routed = [a["routed"] - b["routed"] for a, b in zip(after, before)]
    assert sorted(routed) == [0, 4]
    home = routed.index(4)
    assert wait_until(lambda: states(replicas)[home]["prefix_cache_hit_rate"] > 0)


def test_streaming_passes_through_and_a_disconnect_aborts_on_the_replica(replicas):
    body = {"model": "tiny", "prompt": prompt(5, 5), "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with replicas.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        events = [line for line in (next(lines) for _ in range(6)) if line]
        assert len(events) == 3 and json.loads(events[0][6:])["choices"]
        busy = [s for s in states(replicas) if s["in_flight"]]
        assert len(busy) == 1
    home = busy[0]["replica"]
    assert wait_until(lambda: states(replicas)[home]["in_flight"] == 0, 5)
    assert wait_until(lambda: states(replicas)[home]["num_running"] == 0, 5)


def test_a_killed_replica_fails_its_stream_is_restarted_and_the_service_keeps_answering(
        replicas):
    body = {"model": "tiny", "prompt": prompt(7, 7), "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    t, events, started = stream_in_thread(replicas.url + "/v1/completions", body)
    assert started.wait(30)
    victim = next(s for s in states(replicas) if s["in_flight"])
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(30)
    assert not t.is_alive(), "the stream hung after its replica died"
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and f"replica {victim['replica']}" in errors[0]["message"]
    # The other replica answers at once, whatever the prefix.
    for q in range(3):
        assert complete(replicas, prompt(7, q))["choices"][0]["text"] is not None
    assert replicas.http().get("/health").status_code == 200
    # Ray restarts the killed one (the model loads again) and it serves again.
    back = lambda: states(replicas)[victim["replica"]]  # noqa: E731
    assert wait_until(lambda: back()["healthy"] and back()["restarts"] == 1, 60)
    assert back()["pid"] != victim["pid"]
    before = back()["routed"]
    for k in range(12):  # new prefixes go to the least-loaded replicas in turn
        complete(replicas, prompt(50 + k, 0))
        if back()["routed"] > before:
            break
    assert back()["routed"] > before

