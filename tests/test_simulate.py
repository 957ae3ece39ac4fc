"""The trace simulator: traces parse strictly, the real engine replays them, and Belady's MIN bounds every
eviction rule at every level for entries of one size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CacheFactory
from helpers import MiB, policy
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache import CapacityError
from tiercache.policy.eviction import EVICTION_RULES
from tiercache.tools.cli import main
from tiercache.tools.simulate import Request, TraceError, belady_hits, load_trace, parse_trace, replay, simulate_report

TRACES = Path(__file__).resolve().parent.parent / "bench" / "traces"


def req(op: str, key: str, size: int | None = 1, t: float = 0.0) -> Request:
    return Request(t=t, op=op, key=key, size=size)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{", "not a request"),
        ('{"t": 0, "op": "get"}', "not a request"),
        ('{"t": 0, "op": "scan", "key": "a"}', "op must be"),
        ('{"t": 0, "op": "put", "key": "a"}', "needs one"),
        ('{"t": 0, "op": "put", "key": "a", "size": -3}', "needs one"),
        ('{"t": 0, "op": "get", "key": "a", "size": -10}', "size must be"),
        ('{"t": 0, "op": "get", "key": "a", "size": "big"}', "size must be"),
        ('{"t": 0, "op": "put", "key": "a", "size": 1, "deadline_ms": "soon"}', "deadline_ms"),
        ('{"t": 0, "op": "put", "key": "a", "size": 1, "priority": "high"}', "priority"),
    ],
)
def test_bad_trace_lines_are_refused_naming_the_line(line: str, fragment: str) -> None:
    with pytest.raises(TraceError) as err:
        parse_trace(['{"t": 0, "op": "get", "key": "x", "size": 1}', line], "t.jsonl")
    assert "t.jsonl:2" in str(err.value) and fragment in str(err.value)


def test_time_may_not_go_backwards() -> None:
    with pytest.raises(TraceError, match="backwards"):
        parse_trace(['{"t": 5, "op": "get", "key": "x"}', '{"t": 4, "op": "get", "key": "x"}'])


def test_belady_on_a_textbook_sequence() -> None:
    # capacity 2, unit sizes; requests a b c a b d a: MIN keeps a, and b or c as needed
    trace = [req("get", k) for k in "abcabda"]
    assert belady_hits(trace, 2) == 3  # a (4th), b (5th) ... then a (7th)
    assert belady_hits(trace, 3) == 3
    assert belady_hits(trace, 1) == 2  # keep a throughout: hits at positions 4 and 7
    assert belady_hits(trace, 0) == 0


def test_replay_counts_hits_by_tier_and_predicts_transfer_time() -> None:
    pol = policy(
        profile="rtx-pro-6000-blackwell",
        tiers={"hbm": {"capacity": 100}, "host": {"capacity": 100}, "nvme": {"capacity": 1000}},
    )
    trace = [
        req("put", "a", 80),
        req("put", "b", 80),
        req("get", "a", 80),
        req("get", "zzz", None),
        req("get", "c", 50),
    ]
    outcome = replay(trace, pol)
    assert outcome.hits == {"hbm": 0, "host": 1, "remote": 0, "nvme": 0, "object": 0}
    assert outcome.misses == 2 and outcome.gets == 3
    assert outcome.moved_bytes["host(pageable)->hbm"] == 80  # the reload of a
    assert outcome.moved_seconds["host(pageable)->hbm"] == pytest.approx(80 / 31.5e9)


def test_a_promotion_into_host_is_charged_as_the_copy_the_cache_makes() -> None:
    """An entry too large for hbm, read from nvme, is promoted into host: the real cache copies the tensors it
    read to the compute device into the host pool (hbm->host), and the simulator charges that copy too."""
    pol = policy(
        profile="rtx-pro-6000-blackwell",
        tiers={"hbm": {"capacity": 10}, "host": {"capacity": 100}, "nvme": {"capacity": 1000}},
    )
    trace = [req("put", "a", 80), req("put", "b", 90), req("get", "a", 80)]  # b pushes a down to nvme
    outcome = replay(trace, pol)
    assert outcome.hits == {"hbm": 0, "host": 0, "remote": 0, "nvme": 1, "object": 0}
    assert outcome.moved_bytes["nvme->hbm"] == 80  # the read
    assert outcome.moved_bytes["hbm->host(pageable)"] == 80 + 90 + 80  # a's and b's puts, then a's promotion


def test_a_replacement_that_a_full_nvme_refuses_is_refused_in_the_simulator_too(make_cache: CacheFactory) -> None:
    """nvme is shared: an old version keeps its room until the new one commits, so a full tier cannot take the
    new one; the simulator's nvme has the same rule."""
    pol = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 10 * MiB}})
    cache = make_cache(pol)
    cache.put("a", {"x": torch.zeros(6 * MiB, dtype=torch.uint8)})
    with pytest.raises(CapacityError):
        cache.put("a", {"x": torch.ones(6 * MiB, dtype=torch.uint8)})
    outcome = replay([req("put", "a", 6 * MiB), req("put", "a", 6 * MiB), req("get", "a", 6 * MiB)], pol)
    assert outcome.refused == 1
    assert outcome.hits["nvme"] == 1  # the first version stayed, as in the cache
    assert cache.tier_of("a") == "nvme"


UNIFORM = st.lists(
    st.tuples(st.sampled_from(["put", "get", "get", "get", "delete"]), st.sampled_from("abcdefg")),
    min_size=1,
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(ops=UNIFORM, slots=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 4)))
def test_belady_bounds_every_rule_at_every_level_for_one_size(
    ops: list[tuple[str, str]], slots: tuple[int, int, int]
) -> None:
    size = 10
    trace = [Request(t=float(i), op=op, key=key, size=size) for i, (op, key) in enumerate(ops)]
    capacities = [n * size for n in slots]
    tiers = {name: {"capacity": c} for name, c in zip(("hbm", "host", "nvme"), capacities, strict=True)}
    bounds = [belady_hits(trace, sum(capacities[:k])) for k in (1, 2, 3)]
    for rule in EVICTION_RULES:
        outcome = replay(trace, policy(tiers=tiers, eviction={"rule": rule}))
        for k in (1, 2, 3):
            assert outcome.hits_within(k) <= bounds[k - 1], (rule, k)


def test_the_shipped_traces_load_and_replay(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("flux-wan.jsonl", "serving.jsonl"):
        trace = load_trace(TRACES / name)
        assert len(trace) > 1000 and {r.op for r in trace} >= {"put", "get"}
    report = simulate_report(load_trace(TRACES / "serving.jsonl"), ["cpu"], ["lru", "gdsf"])
    assert "| lru |" in report and "| gdsf |" in report and "| Belady MIN (reference" in report
    assert main(["simulate", str(TRACES / "serving.jsonl"), "--policy", "h100", "--rules", "fifo"]) == 0
    assert "| fifo |" in capsys.readouterr().out


def test_an_unknown_rule_is_refused() -> None:
    assert main(["simulate", str(TRACES / "serving.jsonl"), "--rules", "random"]) == 2


MIXED = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "get", "delete"]),
        st.sampled_from("abcdefgh"),
        st.integers(1, 60),
        st.one_of(st.none(), st.floats(0, 5)),
        st.integers(0, 2),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(
    ops=MIXED,
    caps=st.tuples(st.integers(0, 100), st.integers(0, 100), st.integers(0, 200)),
    ttl=st.sampled_from([0, 7]),
)
def test_no_placement_ever_exceeds_a_budget(
    ops: list[tuple[str, str, int, float | None, int]], caps: tuple[int, int, int], ttl: int
) -> None:
    trace = [Request(float(i), op, key, size, deadline, prio) for i, (op, key, size, deadline, prio) in enumerate(ops)]

    def budgets_hold(engine) -> None:  # type: ignore[no-untyped-def]
        for name, tier in engine.tiers.items():
            held = sum(r.spec.nbytes for r in engine.by_uid.values() if name in r.tiers)
            assert tier.used == held <= tier.capacity, name

    tiers = {name: {"capacity": c} for name, c in zip(("hbm", "host", "nvme"), caps, strict=True)}
    for rule in EVICTION_RULES:
        for write in ("back", "through"):
            pol = policy(tiers=tiers, eviction={"rule": rule, "ttl_s": ttl}, placement={"write": write})
            replay(trace, pol, after_each=budgets_hold)


def test_min_may_refetch_a_live_entry_on_a_miss_without_a_size() -> None:
    # hbm holds one entry; the gets carry no size. A policy keeps x below and promotes it; MIN may too.
    trace = [
        req("put", "x", 1),
        req("put", "y", 1),
        req("get", "x", None),
        req("get", "y", None),
        req("get", "y", None),
    ]
    outcome = replay(trace, policy(tiers={"hbm": {"capacity": 1}, "host": {"capacity": 5}, "nvme": {"capacity": 5}}))
    assert outcome.hits_within(1) <= belady_hits(trace, 1) == 2


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "get", "delete"]), st.sampled_from("abcde"), st.booleans()),
        max_size=60,
    ),
    slots=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 4)),
)
def test_belady_bounds_every_rule_when_some_gets_carry_no_size(
    ops: list[tuple[str, str, bool]], slots: tuple[int, int, int]
) -> None:
    trace = [
        Request(float(i), op, key, 10 if (op == "put" or sized) else None) for i, (op, key, sized) in enumerate(ops)
    ]
    capacities = [n * 10 for n in slots]
    tiers = {name: {"capacity": c} for name, c in zip(("hbm", "host", "nvme"), capacities, strict=True)}
    bounds = [belady_hits(trace, sum(capacities[:k])) for k in (1, 2, 3)]
    for rule in EVICTION_RULES:
        outcome = replay(trace, policy(tiers=tiers, eviction={"rule": rule}))
        assert all(outcome.hits_within(k) <= bounds[k - 1] for k in (1, 2, 3)), rule


def test_a_mixed_size_trace_labels_min_a_reference() -> None:
    trace = [req("put", "a", 10), req("put", "b", 20), req("get", "a", 10)]
    assert "not a proven bound" in simulate_report(trace, ["cpu"])
    assert "| Belady MIN (bound) |" in simulate_report([req("put", "a", 10), req("get", "a", 10)], ["cpu"])
