"""A writer process SIGKILLed at random points leaves a root that every reopen finds consistent (docs/format.md).

The writer (`writer_main`, run in a subprocess) opens the root with a small host tier over a large nvme tier and
loops, driven by a seeded generator, over puts of keys k0..k3 (new keys and replacements, write-through or not),
deletes and gets; puts into the full host tier demote other entries to nvme. Every tensor encodes its key and
version, so a reader can tell which version it got, and whether it got one. Before each operation it prints
`begin ...` and after it `done ...`, and around every nvme write and removal `io ...` (the lines say where the
kill landed). The parent kills it after a seeded delay, reopens the root and checks it against those lines:

- every key listed reads back (no error) as exactly one version of that key: the one its last completed put
  wrote, or the one in flight; never a mix, never an older version that a completed put replaced;
- a key whose last completed op was a write-through put, with nothing begun on it since, is there (a put that
  reached nvme and returned is never lost); one whose last completed op was a delete is absent;
- tmp/ and trash/ are empty, entries/ holds one directory per entry listed and nothing else, no entry was
  skipped with a warning, and the nvme tier's used bytes are the sum of the listed entries' sizes;
- the root is usable: a new key is put, read back and deleted, and the cache closes.

A trial runs several rounds on one root: each round's writer starts from what the previous reopen found.
Entries only in the host tier die with the process; a put that was not write-through may therefore vanish.
The slow trials run only where selected: `pytest -m slow tests/test_crash.py` (or TIERCACHE_SLOW=1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import KiB, MiB, assert_same, kv, policy

import tiercache

KEYS = ("k0", "k1", "k2", "k3")
TESTS = Path(__file__).resolve().parent
FAST_TRIALS = [(0, 1), (1, 1), (2, 2), (3, 2)]  # (seed, rounds): about 3 s a round, mostly the writer's start
SLOW_ROUNDS = 3
KILL_AFTER_S = (0.005, 0.3)  # the kill lands this long after the writer printed "ready"
READY_TIMEOUT_S = 120.0

Say = Callable[[str], None]
State = dict[str, int]  # key -> the version the cache holds
Allowed = dict[str, set[int | None]]  # key -> versions a reopen may find (None: absent)


def crash_policy() -> tiercache.Policy:
    """No hbm, a 1 MiB host tier that the four keys overflow (puts demote), a 64 MiB nvme tier that evicts nothing."""
    return policy(
        tiers={"hbm": {"capacity": 0}, "host": {"capacity": 1 * MiB}, "nvme": {"capacity": 64 * MiB}},
        placement={"write": "back"},
    )


def entry_for(key: str, version: int) -> dict[str, torch.Tensor]:
    """The tensors of `version` of `key`: 8 KiB to 1 MiB in all, sized by (key, version), filled with its code."""
    rng = random.Random(f"{key}/{version}")
    total = int(8 * KiB * 128 ** rng.random())
    code = version * len(KEYS) + KEYS.index(key)
    rows = max(1, total // 4 // 4 // 64)
    return {
        "x": torch.full((max(1, total * 3 // 4 // 8),), code, dtype=torch.int64),
        "y": torch.full((rows, 64), -code, dtype=torch.int32),
    }


def decode(key: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """The version these tensors are, checked bit-exact against it (a mix of two versions fails here)."""
    assert list(tensors) == ["x", "y"], f"{key}: tensors {list(tensors)}"
    code = int(tensors["x"].cpu().reshape(-1)[0])
    version, index = divmod(code, len(KEYS))
    assert KEYS[index] == key, f"{key}: holds tensors of {KEYS[index]} (code {code})"
    assert_same(tensors, entry_for(key, version))
    return version


def nbytes_of(key: str, version: int) -> int:
    return sum(t.nbytes for t in entry_for(key, version).values())


# ---- the writer (a subprocess) -----------------------------------------------------------------------------------
def trace_disk(tier: Any, say: Say) -> None:
    """Print a line before and after every write and removal of an entry in the nvme tier (`source` is "put" for a
    write-through, "host" for a demotion). Instance attributes: the engine calls these through the same object."""
    put, delete = tier.put, tier.delete

    def traced_put(entry: Any, spec: Any, *args: Any, **kwargs: Any) -> None:
        say(f"io write {spec.key} {kwargs.get('source', '?')}")
        put(entry, spec, *args, **kwargs)
        say(f"io wrote {spec.key}")

    def traced_delete(entry: Any) -> None:
        key = tier.spec(entry).key if entry in tier else "?"
        say(f"io remove {key}")
        delete(entry)
        say(f"io removed {key}")

    tier.put = traced_put
    tier.delete = traced_delete


def writer_main(root: str, seed: int, first_version: int, state_json: str) -> None:
    """Open the root and run random operations until killed; `state_json` is what the cache holds at the start."""

    def say(line: str) -> None:
        print(line, flush=True)

    rng = random.Random(seed)
    present: State = json.loads(state_json)
    cache = tiercache.TierCache(root=root, policy=crash_policy())
    assert sorted(cache.keys()) == sorted(present), (cache.keys(), present)
    trace_disk(cache.tiers["nvme"], say)
    version = first_version
    say("ready")
    while True:
        key = rng.choice(KEYS)
        draw = rng.random()
        if key in present and draw < 0.15:
            say(f"begin delete {key} {present[key]}")
            cache.delete(key)
            del present[key]
            say(f"done delete {key}")
        elif key in present and draw < 0.3:
            say(f"begin get {key} {present[key]}")
            got = decode(key, cache.get(key))
            assert got == present[key], f"get({key!r}) gave version {got}, the cache holds {present[key]}"
            say(f"done get {key}")
        else:
            through = rng.random() < 0.3  # the others reach nvme only when demoted
            kind = "replace" if key in present else "new"
            say(f"begin put {key} {version} {'wt' if through else 'wb'} {kind}")
            cache.put(key, entry_for(key, version), write_through=through)
            present[key] = version
            say(f"done put {key} {version}")
            version += 1


# ---- the parent ------------------------------------------------------------------------------------------------
def run_writer(workdir: Path, root: Path, seed: int, round_: int, state: State) -> tuple[list[str], float]:
    """Start a writer on `root`, SIGKILL it a seeded delay after it is ready; its complete output lines and the
    delay."""
    out, err = workdir / f"writer{round_}.out", workdir / f"writer{round_}.err"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_crash; "
        f"test_crash.writer_main({str(root)!r}, {seed * 1000 + round_}, {round_ * 1_000_000 + 1}, "
        f"{json.dumps(state)!r})"
    )
    delay = random.Random(f"kill/{seed}/{round_}").uniform(*KILL_AFTER_S)
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=stdout, stderr=stderr)
    try:
        started = time.monotonic()
        while not out.read_text().startswith("ready\n"):
            assert proc.poll() is None, f"writer exited ({proc.returncode}) before ready:\n{err.read_text()}"
            assert time.monotonic() - started < READY_TIMEOUT_S, "writer not ready"
            time.sleep(0.001)
        time.sleep(delay)
        assert proc.poll() is None, f"writer exited ({proc.returncode}) by itself:\n{err.read_text()[-4000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"writer ended with {proc.returncode}:\n{err.read_text()[-4000:]}"
    text = out.read_text()
    lines = text.splitlines()
    if not text.endswith("\n"):  # a line cut by the kill
        lines = lines[:-1]
    return lines, delay


def allowed_states(lines: list[str], start: State) -> Allowed:
    """What a reopen may find for each key, from the writer's lines and what the round started from."""
    allowed: Allowed = {k: {start.get(k)} for k in KEYS}
    in_flight: list[str] | None = None
    for line in lines:
        words = line.split()
        if words[0] == "begin":
            in_flight = words
        elif words[0] == "done":
            assert in_flight is not None and words[1:3] == in_flight[1:3], (line, in_flight)
            op, key = in_flight[1], in_flight[2]
            if op == "put":  # a put that was not write-through may live in host memory only: gone with it
                allowed[key] = {int(in_flight[3])} if in_flight[4] == "wt" else {int(in_flight[3]), None}
            elif op == "delete":
                allowed[key] = {None}
            in_flight = None
    if in_flight is not None:
        op, key = in_flight[1], in_flight[2]
        if op == "put":  # done or not; a put not written through removes the old disk copy before it returns
            allowed[key] |= {int(in_flight[3])} if in_flight[4] == "wt" else {int(in_flight[3]), None}
        elif op == "delete":
            allowed[key] |= {None}
    return allowed


def kill_point(lines: list[str]) -> str:
    """Where the kill landed: the operation in flight and the disk step in flight within it."""
    op = "between ops"
    disk = "no disk step"
    for line in lines:
        words = line.split()
        if words[0] == "begin":
            op = f"{words[1]}-{words[5]}-{words[4]}" if words[1] == "put" else words[1]
            disk = "no disk step"
        elif words[0] == "done":
            op, disk = "between ops", "no disk step"
        elif words[:2] == ["io", "write"]:
            disk = {"put": "write-through write", "host": "demotion write"}.get(words[3], f"write from {words[3]}")
        elif words[:2] == ["io", "remove"]:
            disk = "removal"
        elif words[0] == "io":
            disk = "between disk steps"
    return f"{op} / {disk}"


def describe_root(root: Path) -> str:
    """The root's directories and every entry's manifest (key, nbytes, written_ns), for failure messages."""
    rows = []
    for sub in ("entries", "tmp", "trash"):
        for path in sorted((root / sub).iterdir()) if (root / sub).is_dir() else []:
            try:
                manifest = json.loads((path / "zarr.json").read_text())["attributes"]["tiercache"]
                what = f"key={manifest['key']} nbytes={manifest['nbytes']} written_ns={manifest['written_ns']}"
            except (OSError, ValueError, KeyError, TypeError) as exc:
                what = f"no manifest: {exc!r}"
            rows.append(f"  {sub}/{path.name}: {what}")
    return "\n".join(rows) or "  (empty)"


def check_reopen(
    root: Path, lines: list[str], start: State, where: str, caplog: pytest.LogCaptureFixture
) -> tuple[State, Allowed]:
    """Reopen the root after a kill and check it against the writer's lines; returns what it holds."""
    allowed = allowed_states(lines, start)
    context = (
        f"{where}; killed during {kill_point(lines)}; round started from {start}\n"
        f"may find: {allowed}\nlast writer lines:\n  " + "\n  ".join(lines[-12:]) + f"\non disk:\n{describe_root(root)}"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        cache = tiercache.TierCache(root=root, policy=crash_policy())
    try:
        warned = [r.getMessage() for r in caplog.records if r.name.startswith("tiercache")]
        assert not warned, f"reopen warned: {warned}\n{context}"
        assert sorted(os.listdir(root / "tmp")) == [], f"tmp/ not emptied\n{context}"
        assert sorted(os.listdir(root / "trash")) == [], f"trash/ not emptied\n{context}"
        keys = cache.keys()
        assert set(keys) <= set(KEYS), f"unknown keys {keys}\n{context}"
        for key in keys:
            assert cache.info(key).tiers == ("nvme",), f"{key}: {cache.info(key).tiers} after a reopen\n{context}"
        check_nvme_used(cache, context)
        dirs = sorted(p.name for p in (root / "entries").iterdir() if p.is_dir())
        hashes = sorted(hashlib.sha256(k.encode()).hexdigest()[:32] for k in keys)
        assert sorted(d.split("-")[0] for d in dirs) == hashes, f"entries/ holds {dirs} for keys {keys}\n{context}"
        found: State = {}
        for key in keys:
            try:
                found[key] = decode(key, cache.get(key))
            except Exception as exc:  # noqa: BLE001 - a get must never raise after a crash: fail with the context
                pytest.fail(f"get({key!r}) after the reopen raised {exc!r}\n{context}")
            assert cache.info(key).nbytes == nbytes_of(key, found[key]), f"{key}: info().nbytes\n{context}"
        for key in KEYS:
            assert found.get(key) in allowed[key], (
                f"{key}: the reopen found {'no entry' if key not in found else f'version {found[key]}'}, "
                f"expected {sorted(allowed[key], key=str)} (None: absent)\n{context}"
            )
        check_nvme_used(cache, context)  # again after the gets promoted entries to host (their disk copies stay)
        probe = kv(len(lines))
        cache.put("probe", probe, write_through=True)
        assert_same(cache.get("probe"), probe)
        cache.delete("probe")
        assert "probe" not in cache
        return found, allowed
    finally:
        cache.close()


def check_nvme_used(cache: tiercache.TierCache, context: str) -> None:
    in_nvme = [k for k in cache.keys() if "nvme" in cache.info(k).tiers]
    used = cache.stats().tiers["nvme"].used
    want = sum(cache.info(k).nbytes for k in in_nvme)
    assert used == want, f"nvme used {used}, entries listed there {in_nvme} hold {want}\n{context}"


def run_trial(tmp_path: Path, seed: int, rounds: int, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    state: State = {}
    for round_ in range(rounds):
        lines, delay = run_writer(tmp_path, root, seed, round_, state)
        where = f"seed {seed} round {round_} (kill {delay * 1e3:.0f} ms after ready, {len(lines)} lines)"
        state, _ = check_reopen(root, lines, state, where, caplog)
        ops = sum(1 for line in lines if line.startswith("done "))
        writes = [line.split()[3] for line in lines if line.startswith("io write ")]
        disk = f"{writes.count('put')} write-through, {writes.count('host')} demotion writes"
        print(f"crash-trial {where}: {ops} ops done ({disk}); killed during {kill_point(lines)}; found {state}")


@pytest.mark.parametrize(("seed", "rounds"), FAST_TRIALS)
def test_a_writer_killed_at_random_points_leaves_a_consistent_root(
    tmp_path: Path, seed: int, rounds: int, caplog: pytest.LogCaptureFixture
) -> None:
    run_trial(tmp_path, seed, rounds, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 200))
def test_many_kills_leave_a_consistent_root(tmp_path: Path, seed: int, caplog: pytest.LogCaptureFixture) -> None:
    run_trial(tmp_path, seed, SLOW_ROUNDS, caplog)
