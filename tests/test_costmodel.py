"""The cost model: the seed report's figures exactly, profile files checked, fitting, the `model` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiercache import Policy, PolicyError
from tiercache.policy import load_policy
from tiercache.policy.costmodel import PATHWAYS, PathwayCost, Profile, fit_line, profile_for, profile_names
from tiercache.tools.cli import main


def test_the_seed_figures_are_reproduced_for_8_gb() -> None:
    seed = Profile.load("rtx-pro-6000-blackwell")
    ms = {
        p: round(seed.seconds(p, 8 * 10**9) * 1e3, 2) for p in ("host(pinned)->hbm", "host(pageable)->hbm", "nvme->hbm")
    }
    assert ms == {"host(pinned)->hbm": 126.98, "host(pageable)->hbm": 253.97, "nvme->hbm": 571.43}


def test_the_model_command_prints_every_pathway(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        main(["model", "--size", "8GB", "--profile", "rtx-pro-6000-blackwell", "--plot", str(tmp_path / "c.png")]) == 0
    )
    out = capsys.readouterr().out
    for pathway in PATHWAYS:
        assert f"| {pathway} |" in out
    assert "| 126.98 ms |" in out and "| 253.97 ms |" in out and "| 571.43 ms |" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_every_preset_names_a_profile_that_loads_and_states_its_source() -> None:
    for name in ("cpu", "h100", "h200", "rtx-pro-6000-blackwell"):
        profile = profile_for(Policy.preset(name))
        assert profile.name == name and profile.source and not profile.measured
        assert "preset figures" in profile.describe()
    assert {"cpu", "h100", "h200", "rtx-pro-6000-blackwell"} <= set(profile_names())


def test_latency_adds_to_transfer_time() -> None:
    cost = PathwayCost(latency_s=1e-4, bandwidth=1e9)
    assert cost.seconds(0) == pytest.approx(1e-4) and cost.seconds(10**9) == pytest.approx(1.0001)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[pathways."nvme->hbm"]\nbandwidth = "1GB"\n', "missing"),
        ("speed = 3\n", "unknown key 'speed'"),
        ("".join(f'[pathways."{p}"]\nbandwidth = "fast"\n' for p in PATHWAYS), "bandwidth"),
        ("".join(f'[pathways."{p}"]\nbandwidth = "1GB"\nlatency_us = -1\n' for p in PATHWAYS), "latency_us"),
        ('measured = "yes"\n' + "".join(f'[pathways."{p}"]\nbandwidth = "1GB"\n' for p in PATHWAYS), "measured"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        Profile.load(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_a_policy_naming_a_missing_profile_is_refused_however_it_was_built(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('profile = "no-such-machine"\n')
    with pytest.raises(PolicyError, match="p.toml: profile: no hardware profile named 'no-such-machine'"):
        load_policy(path)
    for built in (Policy(profile="no-such-machine"), Policy.from_dict({"profile": "no-such-machine"})):
        with pytest.raises(PolicyError, match="no hardware profile named 'no-such-machine'"):
            load_policy(built)


def test_a_profile_path_is_found_beside_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(Profile.load("h100").to_toml().replace('name = "h100"', 'name = "mine"'))
    (tmp_path / "p.toml").write_text('profile = "./mine.toml"\n')
    assert profile_for(Policy.load(tmp_path / "p.toml")).name == "mine"


def test_to_toml_round_trips(tmp_path: Path) -> None:
    original = Profile.load("rtx-pro-6000-blackwell")
    (tmp_path / "x.toml").write_text(original.to_toml())
    again = Profile.load(tmp_path / "x.toml")
    for p in PATHWAYS:
        assert again.seconds(p, 10**9) == pytest.approx(original.seconds(p, 10**9), rel=1e-3)


def test_fit_recovers_latency_and_bandwidth() -> None:
    points = [(n, 2e-4 + n / 5e9) for n in (1 << 20, 16 << 20, 256 << 20)]
    cost = fit_line(points)
    assert cost.latency_s == pytest.approx(2e-4, rel=1e-6) and cost.bandwidth == pytest.approx(5e9, rel=1e-6)
    assert fit_line([(1000, 1.0), (2000, 1.0)]).latency_s == 0.0  # no size dependence: no negative bandwidth
    with pytest.raises(ValueError):
        fit_line([(1000, 1.0)])
