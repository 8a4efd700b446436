"""SecAgg+ (Bell et al. 2020): the sparse neighbour graph, its parameters, exact sums with and without
drop-outs, clean aborts, and that a client sees only its neighbours (transport-free, no sockets)."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

from fedzmq.secagg import (
    NeighbourGraph, SecAggAborted, SecAggClient, SecAggConfig, SecAggProtocolError, SecAggServer, choose_parameters,
    run_round,
)
from fedzmq.secagg.graph import binomial_tail, connected_bound


def config(n: int, degree: int | None, threshold: int, d: int = 12, **extra) -> SecAggConfig:
    return SecAggConfig(client_ids=tuple(range(n)), threshold=threshold, vector_length=d, clip=100.0,
                        degree=degree, graph_seed=os.urandom(16), **extra)


def updates_for(n: int, d: int, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(d, generator=g) for i in range(n)}


def assert_mean(result, updates, ids) -> None:
    exact = torch.stack([updates[i].double() for i in ids]).mean(0)
    assert result.survivors == tuple(sorted(ids))
    assert torch.allclose(result.mean.double(), exact, atol=result.error_bound + 1e-6), (result.mean, exact)
    assert result.error_bound < 1e-4


# ---- the graph


def test_graph_is_regular_symmetric_and_the_same_for_everyone_with_the_seed():
    ids, seed = list(range(0, 120, 2)), b"round seed"
    graph = NeighbourGraph(ids, 8, seed)
    again = NeighbourGraph(list(reversed(ids)), 8, seed)
    for i in ids:
        hood = graph.neighbours(i)
        assert len(hood) == 8 and i not in hood and set(hood) <= set(ids)
        assert hood == again.neighbours(i)
        assert all(i in graph.neighbours(j) for j in hood)  # undirected
    other = NeighbourGraph(ids, 8, b"another seed")
    assert any(other.neighbours(i) != graph.neighbours(i) for i in ids)  # the seed decides the graph
    # the ring lattice is connected: a walk from one client reaches all
    seen, frontier = {ids[0]}, [ids[0]]
    while frontier:
        frontier = [j for i in frontier for j in graph.neighbours(i) if j not in seen and not seen.add(j)]
    assert seen == set(ids)


def test_config_validates_the_degree_and_the_per_neighbourhood_threshold():
    with pytest.raises(ValueError, match="even"):
        config(20, 7, 4)
    with pytest.raises(ValueError, match=r"threshold must be an integer in \[2, 9\]"):
        config(20, 8, 10)  # a neighbourhood has degree + 1 = 9 points
    assert config(20, 19, 11).complete and config(20, None, 11).complete and not config(20, 8, 5).complete
    cfg = config(20, 8, 5)
    assert SecAggConfig.from_wire(cfg.to_wire()) == cfg
    assert SecAggConfig.from_wire(cfg.to_wire()).neighbours(3) == cfg.neighbours(3)
    assert config(20, 8, 5).digest() != cfg.digest()  # the graph seed is bound into every key
    assert "round_id" in cfg.to_wire() and "session" not in cfg.to_wire()


def test_choose_parameters_grows_as_log_n_and_meets_its_stated_bounds():
    chosen = {n: choose_parameters(n) for n in (16, 100, 1000, 10_000, 100_000)}
    assert chosen[16].degree is None and chosen[16].threshold == 9  # too small: the complete graph, majority
    ks = [chosen[n].degree for n in (100, 1000, 10_000, 100_000)]
    assert all(k is not None and k % 2 == 0 for k in ks)
    assert ks == sorted(ks) and ks[-1] < 2 * ks[0]  # 1000x more clients, less than twice the degree
    for n in (100, 1000, 10_000, 100_000):
        p = chosen[n]
        k, t = p.degree, p.threshold
        assert p.meets_bounds and 2 <= t <= k
        assert connected_bound(n, k, p.dropout, p.corrupt) <= 2.0**-p.sigma
        assert n * binomial_tail(k, p.dropout, k - t + 1) <= 2.0**-p.eta  # enough neighbours answer
        assert n * binomial_tail(k, p.corrupt, 2 * t - k - 1) <= 2.0**-p.sigma  # too few corrupted
    fixed = choose_parameters(100, degree=8)
    assert fixed.degree == 8 and not fixed.meets_bounds and fixed.threshold == 5


# ---- rounds


def test_sum_is_exact_without_dropouts():
    n, d = 40, 12
    cfg = config(n, 8, 5, d)
    updates = updates_for(n, d)
    assert_mean(run_round(cfg, updates), updates, range(n))


def test_sum_is_exact_with_dropouts_below_the_bound():
    n, d = 60, 12
    cfg = config(n, 10, 6, d)
    updates = updates_for(n, d, seed=1)
    # one drop-out at each step, none of them neighbours of each other's neighbours' thresholds' worth
    drops = {"drop_before_keys": [3], "drop_before_shares": [17], "drop_before_masked": [29, 41],
             "drop_before_unmask": [52]}
    result = run_round(cfg, updates, **drops)
    out = {3, 17, 29, 41}
    assert_mean(result, updates, [i for i in range(n) if i not in out])
    assert set(result.dropped) == {29, 41} and set(result.excluded) == {3, 17}
    assert 52 not in result.responders and 52 in result.survivors  # its input counts; its shares were not needed


def test_the_default_parameters_survive_their_dropout_fraction_with_100_clients():
    n, d = 100, 8
    p = choose_parameters(n)
    assert p.degree is not None
    cfg = config(n, p.degree, p.threshold, d)
    updates = updates_for(n, d, seed=2)
    gone = list(range(0, n, 20))  # 5%: the fraction the parameters were chosen for
    result = run_round(cfg, updates, drop_before_masked=gone, serialize=False)
    assert_mean(result, updates, [i for i in range(n) if i not in gone])
    assert sorted(result.dropped) == gone


def test_round_aborts_cleanly_when_a_neighbourhood_falls_under_its_threshold():
    n, d = 40, 6
    cfg = config(n, 8, 6, d)
    victim = 5
    # the victim and 4 of its 8 neighbours drop before their masked inputs: 4 of its 9 points remain < 6
    gone = [victim, *cfg.neighbours(victim)[:4]]
    with pytest.raises(SecAggAborted, match="neighbourhood sent masked inputs, threshold is 6") as info:
        run_round(cfg, updates_for(n, d), drop_before_masked=gone)
    assert info.value.step == "MaskedInputCollection"
    # a neighbourhood too thin at unmasking: the survivors sent their inputs, but too few answer
    silent = cfg.neighbours(victim)[:4]
    with pytest.raises(SecAggAborted, match="neighbourhood revealed shares of its self-mask seed") as info:
        run_round(cfg, updates_for(n, d), drop_before_unmask=[victim, *silent])
    assert info.value.step == "Unmasking"


def test_a_client_gets_nothing_of_non_neighbours_and_refuses_their_keys():
    n, d = 50, 6
    cfg = config(n, 6, 4, d)
    seen: dict[int, set[int]] = defaultdict(set)

    def deliver(to: int, step: str, msg) -> None:
        if step == "keys":
            seen[to] |= {entry[0] for entry in msg["keys"]}
        elif step == "routed":
            seen[to] |= set(msg["u1"]) | {entry[0] for entry in msg["shares"]}
        else:
            seen[to] |= set(msg["u2"]) | set(msg["dropped"])

    run_round(cfg, updates_for(n, d), deliver=deliver, drop_before_masked=[7])
    assert set(seen) == set(range(n))
    for i, ids in seen.items():
        assert ids <= cfg.neighbourhood(i), (i, ids - cfg.neighbourhood(i))
    # a server that relays a non-neighbour's keys is refused before anything is shared
    clients = {i: SecAggClient(i, cfg) for i in range(n)}
    server = SecAggServer(cfg)
    assert server.collect_keys(c.advertise() for c in clients.values()) is None  # no broadcast with SecAgg+
    stranger = next(j for j in range(n) if j not in cfg.neighbourhood(0))
    keys = server.keys_for(0)
    # the stranger's own entry (its key list also holds its neighbours, some of whom may be 0's too)
    strangers_key = next(e for e in server.keys_for(stranger)["keys"] if e[0] == stranger)
    forged = {**keys, "keys": sorted([*keys["keys"], strangers_key])}
    with pytest.raises(SecAggProtocolError, match="not a neighbour"):
        clients[0].share_keys(forged)
    assert clients[0].stage == "advertised"


def test_messages_per_client_grow_with_the_degree_not_with_n():
    """Entries (keys, ciphertexts, ids) each client receives: flat in n at a fixed degree, linear in n for
    the complete graph."""
    d = 4

    def per_client(n: int, degree: int | None, threshold: int) -> int:
        counts: dict[int, int] = defaultdict(int)

        def deliver(to: int, step: str, msg) -> None:
            for key in ("keys", "u1", "shares", "u2", "dropped", "confirm"):
                counts[to] += len(msg.get(key, ()))

        run_round(config(n, degree, threshold, d), updates_for(n, d), deliver=deliver, serialize=False)
        return max(counts.values())

    sparse = [per_client(n, 6, 4) for n in (20, 40, 80)]
    # keys, u1, and u2 with the dropped twice (to confirm, to unmask): 7 entries each; shares, tags: 6
    assert sparse[0] == sparse[1] == sparse[2] == 6 * 7 - 2
    complete = [per_client(n, None, n // 2 + 1) for n in (20, 40)]
    assert complete == [6 * 20 - 2, 6 * 40 - 2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_thousand_clients_with_the_default_parameters():
    n, d = 1000, 16
    p = choose_parameters(n)
    cfg = config(n, p.degree, p.threshold, d)
    updates = updates_for(n, d, seed=3)
    gone = list(range(0, n, 40))  # 2.5% drop out after sharing their keys
    result = run_round(cfg, updates, drop_before_masked=gone, serialize=False)
    assert_mean(result, updates, [i for i in range(n) if i not in gone])
