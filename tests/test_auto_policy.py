"""Defaults that fit the machine: policy="auto" picks the preset for the device and scales it to what is free; an
explicit policy asking for more than the machine has is refused; a deadline never passes over a faster tier with
room; a policy file extends another with `base =`. Machines are fakes: `Machine(...)` with the figures a test
needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tiercache import Policy, PolicyError
from tiercache.policy import Machine, load_policy
from tiercache.policy.placement import Attempt, make_placement_policy
from tiercache.policy.schema import TIER_NAMES, PlacementSettings
from tiercache.testing.policies import BUDGETS, reload_seconds

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def capacities(policy: Policy) -> tuple[int, int, int]:
    return policy.tiers.hbm.capacity, policy.tiers.host.capacity, policy.tiers.nvme.capacity


def gpu(name: str, *, total: int | None = 80 * GiB, free: int | None = 70 * GiB, ram: int = 512 * GiB) -> Machine:
    return Machine(name, device_free=free, ram_available=ram, disk_free=4 * TiB, device_total=total, disk_path="/d")


# ---- auto: which preset, and what budgets ------------------------------------------------------------------------


def test_auto_on_a_cpu_machine_scales_hbm_and_host_together_to_half_the_ram() -> None:
    machine = Machine("cpu", ram_available=12 * GiB, disk_free=50 * GiB, disk_path="/x")
    policy, profile = load_policy("auto", machine=machine)
    hbm, host, nvme = capacities(policy)
    assert (policy.name, policy.source, profile.name) == ("cpu", "auto", "cpu")
    assert hbm + host <= 6 * GiB and hbm + host > 6 * GiB - 2 * MiB  # both are RAM: 50% of it, together
    assert hbm == pytest.approx((hbm + host) / 5, rel=0.01)  # split as the preset's 2 GiB : 8 GiB
    assert nvme == 40 * GiB  # 80% of the free disk
    assert policy.chosen.startswith("auto: preset 'cpu' for no CUDA device; ")
    assert "50% of 12 GiB RAM available" in policy.chosen and "80% of 50 GiB free under /x" in policy.chosen
    assert policy.tiers.nvme.threads == Policy.preset("cpu").tiers.nvme.threads  # only the budgets change


def test_auto_keeps_the_presets_budgets_where_the_machine_has_room_for_them() -> None:
    policy, _ = load_policy(None, machine=Machine("cpu", ram_available=64 * GiB, disk_free=TiB, disk_path="/x"))
    assert policy == Policy.preset("cpu")  # equality leaves out source and chosen
    assert policy.source == "auto" and "(preset; together within 50% of 64 GiB RAM available)" in policy.chosen
    assert "nvme 100 GiB (preset; within 80% of 1 TiB free under /x)" in policy.chosen


@pytest.mark.parametrize(
    ("name", "preset"),
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "rtx-pro-6000-blackwell"),
        ("NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", "rtx-pro-6000-blackwell"),
    ],
)
def test_auto_picks_the_preset_named_for_the_device(name: str, preset: str) -> None:
    policy, profile = load_policy("auto", machine=gpu(name, total=141 * GiB, free=130 * GiB))
    assert (policy.name, profile.name, policy.source) == (preset, preset, "auto")
    assert capacities(policy) == capacities(Policy.preset(preset))  # a big machine: the preset's own budgets
    assert policy.chosen.startswith(f"auto: preset {preset!r} for {name}; ")


def test_auto_on_a_gpu_scales_hbm_to_the_free_device_memory_and_host_to_the_ram() -> None:
    machine = Machine("NVIDIA H100 80GB HBM3", device_free=20 * GiB, ram_available=100 * GiB, device_total=80 * GiB)
    policy, _ = load_policy("auto", machine=machine)
    assert capacities(policy) == (10 * GiB, 40 * GiB, TiB)  # 50% of free hbm, 40% of the RAM; disk not known
    assert "hbm 10 GiB (50% of 20 GiB free device memory; preset 16 GiB)" in policy.chosen
    assert "host 40 GiB (40% of 100 GiB RAM available; preset 64 GiB)" in policy.chosen
    assert "nvme 1 TiB (preset; free disk not known)" in policy.chosen


@pytest.mark.parametrize(
    ("name", "total", "preset", "why"),
    [
        ("NVIDIA A100-SXM4-40GB", 40 * GiB, "rtx-pro-6000-blackwell", "closest below the device's 40 GiB"),
        ("NVIDIA A100-SXM4-80GB", 80 * GiB, "h200", "closest below the device's 80 GiB"),
        ("NVIDIA GH200 480GB", 96 * GiB, "h200", "closest below"),  # not taken for an H200 by its name
        ("NVIDIA L4", 22 * GiB, "h100", "closest below the device's 22 GiB"),
        ("Tesla T4", 15 * GiB, "h100", "no GPU preset's hbm budget fits in its 15 GiB, so the smallest"),
        ("NVIDIA A10", None, "h100", "its memory is not known, so the GPU preset with the smallest hbm budget"),
    ],
)
def test_auto_on_an_unknown_gpu_takes_the_preset_whose_hbm_is_closest_below_its_memory(
    name: str, total: int | None, preset: str, why: str
) -> None:
    policy, _ = load_policy("auto", machine=gpu(name, total=total, free=None))
    assert policy.name == preset
    assert policy.chosen.startswith(f"auto: preset {preset!r} for {name}, which no preset is named for")
    assert why in policy.chosen
    if total is not None:  # free memory not known: half the device's, never more than it holds
        assert policy.tiers.hbm.capacity <= total // 2 and "device memory (free not known)" in policy.chosen


def test_auto_never_goes_below_the_floors_nor_above_what_the_machine_has() -> None:
    machine = Machine("NVIDIA H200", device_free=300 * MiB, ram_available=400 * MiB, disk_free=600 * MiB)
    policy, _ = load_policy("auto", machine=machine)
    assert capacities(policy) == (256 * MiB, 256 * MiB, 600 * MiB)  # the nvme floor (1 GiB) is more than the disk
    assert "hbm 256 MiB (the floor; 50% of 300 MiB free device memory is less)" in policy.chosen
    tiny = Machine("cpu", ram_available=100 * MiB, disk_free=10 * GiB)
    hbm, host, _ = capacities(load_policy("auto", machine=tiny)[0])
    assert hbm + host <= 100 * MiB and "the floor" in load_policy("auto", machine=tiny)[0].chosen


def test_auto_counts_the_bytes_the_root_already_stores_as_nvme_room() -> None:
    machine = Machine("cpu", ram_available=64 * GiB, disk_free=50 * GiB, disk_path="/x")
    policy, _ = load_policy("auto", machine=machine, stored_bytes=20 * GiB)
    assert policy.tiers.nvme.capacity == 60 * GiB  # 80% of 50 GiB, plus the 20 GiB it holds already
    assert "plus 20 GiB already stored" in policy.chosen


def test_auto_without_a_machine_measures_the_cpu_side_and_explicit_policies_are_unchanged() -> None:
    policy, profile = load_policy(None)
    assert (policy.name, policy.source, profile.name) == ("cpu", "auto", "cpu")
    assert policy.chosen.startswith("auto: preset 'cpu' for no CUDA device; ") and "nvme 100 GiB" in policy.chosen
    explicit, _ = load_policy("h100")
    assert explicit == Policy.preset("h100") and explicit.chosen == "" and explicit.source.endswith("h100.toml")


def test_machine_detect_measures_ram_and_the_disk_under_a_root_that_does_not_exist_yet(tmp_path: Path) -> None:
    machine = Machine.detect(torch.device("cpu"), tmp_path / "not" / "yet")
    assert (machine.device_kind, machine.device_free, machine.device_total, machine.cuda) == ("cpu", None, None, False)
    assert machine.disk_path == str(tmp_path) and machine.disk_free is not None and machine.disk_free > 0
    assert machine.ram_available is None or machine.ram_available > 0
    assert Machine.detect(torch.device("cpu"), None).disk_free is None


@pytest.mark.gpu
def test_machine_detect_reads_the_cuda_device() -> None:
    machine = Machine.detect(torch.device("cuda"), None)
    assert machine.cuda and machine.device_kind == torch.cuda.get_device_name()
    assert machine.device_free is not None and machine.device_total is not None
    assert 0 < machine.device_free <= machine.device_total


# ---- explicit policies are checked against the machine -----------------------------------------------------------


def test_an_explicit_host_budget_above_the_ram_is_refused_with_key_value_figure_and_fix() -> None:
    with pytest.raises(PolicyError) as err:
        load_policy("h100", machine=gpu("NVIDIA H100", ram=32 * GiB))
    message = str(err.value)
    assert "h100.toml" in message and "tiers.host.capacity = 64 GiB is more than the 32 GiB of RAM available" in message
    assert "lower it" in message and 'policy="auto"' in message and "tiers.hbm" not in message


def test_an_explicit_hbm_budget_is_checked_against_the_devices_total_memory_not_its_free_memory() -> None:
    assert load_policy("h200", machine=gpu("NVIDIA H200", total=141 * GiB, free=1 * GiB))[0].name == "h200"
    with pytest.raises(PolicyError, match=r"tiers\.hbm\.capacity = 48 GiB is more than the 40 GiB of memory of"):
        load_policy("h200", machine=gpu("NVIDIA A100-SXM4-40GB", total=40 * GiB))


def test_without_cuda_hbm_and_host_together_are_checked_against_the_ram() -> None:
    with pytest.raises(PolicyError) as err:
        load_policy("cpu", machine=Machine("cpu", ram_available=9 * GiB))
    message = str(err.value)
    assert "tiers.hbm.capacity + tiers.host.capacity = 2 GiB + 8 GiB = 10 GiB is more than the 9 GiB" in message
    assert load_policy("cpu", machine=Machine("cpu", ram_available=10 * GiB))[0].name == "cpu"  # exactly fits


def test_an_explicit_nvme_budget_is_refused_above_the_filesystems_size_only() -> None:
    small = Machine("cpu", ram_available=64 * GiB, disk_free=10 * GiB, disk_path="/mnt/nvme", disk_size=50 * GiB)
    with pytest.raises(PolicyError, match=r"tiers\.nvme\.capacity = 100 GiB is more than the 50 GiB of the filesystem"):
        load_policy("cpu", machine=small)
    # above today's free space but within the disk: allowed (the nvme tier warns when it opens)
    roomy = Machine("cpu", ram_available=64 * GiB, disk_free=10 * GiB, disk_path="/mnt/nvme", disk_size=200 * GiB)
    assert load_policy("cpu", machine=roomy)[0].name == "cpu"


def test_every_key_over_is_named_at_once_and_a_file_or_object_is_named_by_its_source(tmp_path: Path) -> None:
    f = tmp_path / "big.toml"
    f.write_text('[tiers.host]\ncapacity = "1TiB"\n[tiers.nvme]\ncapacity = "1TiB"\n')
    machine = Machine("cpu", ram_available=16 * GiB, disk_free=100 * GiB, disk_size=200 * GiB)
    with pytest.raises(PolicyError) as err:
        load_policy(f, machine=machine)
    assert str(err.value).startswith(str(f)) and "tiers.host.capacity" in str(err.value)
    assert "tiers.nvme.capacity" in str(err.value) and "lower them" in str(err.value)
    built = Policy.from_dict({"tiers": {"host": {"capacity": "64GiB"}}})
    with pytest.raises(PolicyError, match="<dict>: tiers.hbm.capacity"):
        load_policy(built, machine=machine)


def test_figures_the_machine_does_not_know_are_not_checked() -> None:
    assert load_policy("h200", machine=Machine("NVIDIA H200"))[0].name == "h200"
    assert load_policy("cpu", machine=Machine("cpu"))[0].name == "cpu"


def test_sizes_that_read_alike_are_given_in_bytes() -> None:
    with pytest.raises(
        PolicyError, match=r"10 GiB \(10737418240 bytes\) is more than the 10 GiB \(10737418239 bytes\)"
    ):
        load_policy("cpu", machine=Machine("cpu", ram_available=10 * GiB - 1))


def test_what_auto_chooses_always_fits_the_machine_it_was_chosen_for() -> None:
    for machine in (
        Machine("cpu", ram_available=3 * GiB, disk_free=5 * GiB),
        gpu("NVIDIA H100", total=80 * GiB, free=2 * GiB, ram=8 * GiB),
        gpu("Unknown GPU", total=12 * GiB, free=11 * GiB, ram=6 * GiB),
    ):
        load_policy("auto", machine=machine)  # the same checks an explicit policy gets: none raises


# ---- a deadline never sends an entry below a faster tier with room -------------------------------------------------


@pytest.mark.parametrize("on_full", ["demote", "next_tier"])
def test_a_generous_deadline_takes_the_fastest_tier_with_room(on_full: str) -> None:
    p = make_placement_policy(PlacementSettings(on_full=on_full), BUDGETS, reload_seconds)  # type: ignore[arg-type]
    # 20 bytes reload in 0 ms from hbm, 20 ms from host, 200 ms from nvme: a 1000 ms deadline nvme meets
    plan = p.place(20, dict.fromkeys(TIER_NAMES, 1000), deadline_ms=1000)
    assert plan.attempts[0].tier == "hbm"
    assert plan.reason == (
        "hbm: a faster tier with room for it, whose predicted reload (0 ms) meets the 1000 ms deadline; a deadline "
        "never sends an entry below a faster tier with room (nvme is the cheapest that meets it)"
    )
    plan = p.place(20, {"hbm": 19, "host": 20, "nvme": 1000}, deadline_ms=1000)
    assert [a.tier for a in plan.attempts] == ["host", "nvme", "hbm"]  # hbm is one byte short
    plan = p.place(20, {"hbm": 0, "host": 0, "nvme": 1000}, deadline_ms=1000)  # no faster tier has room
    assert plan.attempts[0].tier == "nvme" and "the cheapest tier whose predicted reload (200 ms)" in plan.reason
    plan = p.place(20, {"hbm": 0, "host": 0, "nvme": 0}, deadline_ms=1000)  # none has room: nvme makes it
    assert plan.attempts[0] == Attempt("nvme", evict=True)


def test_a_faster_tier_with_room_that_misses_the_deadline_is_not_taken() -> None:
    slow_host = {"hbm": 0.0, "host": 1e-2, "nvme": 1e-3}  # a fast drive, slow pageable copies: host is slower

    def reload(tier: str, nbytes: int) -> float:
        return slow_host[tier] * nbytes

    p = make_placement_policy(PlacementSettings(), BUDGETS, reload)
    plan = p.place(20, {"hbm": 0, "host": 1000, "nvme": 1000}, deadline_ms=50)  # host 200 ms, nvme 20 ms
    assert plan.attempts[0].tier == "nvme" and plan.reason.startswith("nvme: the cheapest tier")


def test_next_tier_mode_names_the_tier_its_plan_tries_first() -> None:
    p = make_placement_policy(PlacementSettings(on_full="next_tier"), BUDGETS, reload_seconds)
    plan = p.place(30, {"hbm": 0, "host": 1000, "nvme": 1000})
    assert plan.attempts[0].tier == "host"
    assert plan.reason.startswith("host: the fastest tier with free room for it (on_full = next_tier); hbm, the ")


# ---- base = : a file extends a preset or another file ------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_extends_a_preset_key_by_key(tmp_path: Path) -> None:
    f = write(tmp_path / "mine.toml", 'base = "h100"\nname = "mine"\n[tiers.host]\ncapacity = "32GiB"\n')
    mine, h100 = Policy.load(f), Policy.preset("h100")
    assert mine.tiers.host.capacity == 32 * GiB and mine.tiers.host.pinned == h100.tiers.host.pinned
    host = dataclasses.replace(h100.tiers.host, capacity=32 * GiB)
    assert mine == dataclasses.replace(h100, name="mine", tiers=dataclasses.replace(h100.tiers, host=host))
    assert mine.source == str(f) and load_policy(f)[1].name == "h100"  # the profile is the base's too


def test_bases_nest_and_relative_paths_are_taken_from_the_file_that_names_them(tmp_path: Path) -> None:
    write(tmp_path / "site" / "profiles" / "lab.toml", Path(_profile_path()).read_text().replace('"cpu"', '"lab"', 1))
    site = 'base = "h200"\nprofile = "profiles/lab.toml"\n[tiers.hbm]\ncapacity = "8GiB"\n'
    write(tmp_path / "site" / "base.toml", site)
    leaf = write(tmp_path / "jobs" / "leaf.toml", 'base = "../site/base.toml"\n[tiers.nvme]\nthreads = 2\n')
    policy, profile = load_policy(leaf)
    assert capacities(policy) == (8 * GiB, 128 * GiB, 2 * TiB) and policy.tiers.nvme.threads == 2
    assert policy.tiers.nvme.task_size == 16 * MiB and policy.name == "h200"  # from the preset, two levels down
    assert profile.name == "lab"  # beside site/base.toml, not beside jobs/leaf.toml


def _profile_path() -> str:
    from tiercache.policy.schema import preset_files

    return str(preset_files("profiles")["cpu"])


def test_an_unknown_base_names_the_file_and_the_presets(tmp_path: Path) -> None:
    f = write(tmp_path / "child.toml", 'base = "gb300"\n')
    with pytest.raises(PolicyError) as err:
        Policy.load(f)
    assert str(f) in str(err.value) and "base" in str(err.value) and "h100" in str(err.value)
    g = write(tmp_path / "other.toml", 'base = "missing.toml"\n')
    with pytest.raises(PolicyError, match=r"base: .*missing\.toml is not a policy file; presets are"):
        Policy.load(g)
    h = write(tmp_path / "typed.toml", "base = 3\n")
    with pytest.raises(PolicyError, match="base: expected a preset name or the path of a policy file"):
        Policy.load(h)


def test_a_cycle_of_bases_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'base = "b.toml"\n')
    write(tmp_path / "b.toml", 'base = "./a.toml"\n')
    with pytest.raises(PolicyError, match="cycle"):
        Policy.load(tmp_path / "a.toml")
    write(tmp_path / "self.toml", 'base = "self.toml"\n')
    with pytest.raises(PolicyError, match="cycle"):
        Policy.load(tmp_path / "self.toml")


def test_a_bad_key_is_reported_in_the_file_that_has_it(tmp_path: Path) -> None:
    base = write(tmp_path / "base.toml", '[tiers.hbm]\ncapacty = "1GiB"\n')
    child = write(tmp_path / "child.toml", 'base = "base.toml"\n[tiers.host]\ncapacity = "1GiB"\n')
    with pytest.raises(PolicyError) as err:
        Policy.load(child)
    assert str(err.value).startswith(f"{base}: unknown key 'tiers.hbm.capacty'") and str(child) in str(err.value)
    bad_child = write(tmp_path / "bad.toml", 'base = "h100"\n[tiers.host]\ncapacity = "lots"\n')
    with pytest.raises(PolicyError, match=r"bad\.toml: tiers\.host\.capacity"):
        Policy.load(bad_child)
    nested = write(tmp_path / "nested.toml", '[tiers]\nbase = "h100"\n')
    with pytest.raises(PolicyError, match="unknown key 'tiers.base'"):  # a base is a top-level key only
        Policy.load(nested)


def test_from_dict_takes_a_base_too() -> None:
    policy = Policy.from_dict({"base": "h200", "tiers": {"hbm": {"capacity": "1GiB"}}})
    assert policy.tiers.hbm.capacity == GiB and policy.tiers.host.capacity == 128 * GiB and policy.name == "h200"
