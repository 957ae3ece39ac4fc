"""`tiercache calibrate` at tiny sizes: every pathway measured, fitted, written as a profile a policy can name."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiercache
from tiercache.policy.costmodel import PATHWAYS, Profile
from tiercache.tools.calibrate import calibrate
from tiercache.tools.cli import main


def test_calibrate_measures_every_pathway_and_writes_a_loadable_profile(tmp_path: Path) -> None:
    lines: list[str] = []
    profile = calibrate(tmp_path / "root", sizes=[64 << 10, 1 << 20], repeat=1, name="here", progress=lines.append)
    assert profile.measured and profile.name == "here" and "measured by tiercache calibrate" in profile.describe()
    assert len(lines) == 2 * len(PATHWAYS) and lines[-1].startswith("[16/16]")
    for pathway in PATHWAYS:
        cost = profile.pathways[pathway]
        assert cost.bandwidth > 0 and cost.latency_s >= 0
    assert list((tmp_path / "root").iterdir()) == []  # its files are gone
    (tmp_path / "here.toml").write_text(profile.to_toml())
    assert Profile.load(tmp_path / "here.toml").measured


def test_the_calibrate_command_writes_a_profile_a_policy_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "measured.toml"
    assert (
        main(
            [
                "calibrate",
                "--root",
                str(tmp_path / "root"),
                "--out",
                str(out),
                "--sizes",
                "64KiB,256KiB",
                "--repeat",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[16/16]" in printed and "| nvme->hbm |" in printed and str(out) in printed
    (tmp_path / "policy.toml").write_text('profile = "./measured.toml"\n')
    with tiercache.TierCache(root=tmp_path / "cache", policy=tmp_path / "policy.toml") as cache:
        stats = cache.stats()
        assert stats.profile_measured and any("measured by tiercache calibrate" in n for n in stats.notes)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["calibrate", "--root", "R", "--out", "/no/such/dir/p.toml"], "does not exist or is not writable"),
        (["calibrate", "--root", "R", "--sizes", "1MiB"], "two sizes or more"),
        (["calibrate", "--root", "R", "--policy", "nope"], "no policy preset named 'nope'"),
        (["simulate", "/no/such/trace.jsonl"], "No such file"),
        (["model", "--profile", "nope"], "no hardware profile named 'nope'"),
    ],
)
def test_command_errors_exit_2_with_a_message(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / "root") if a == "R" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_a_zero_repeat_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--root", "x", "--repeat", "0"])
    assert exit_.value.code == 2 and "integer >= 1" in capsys.readouterr().err
