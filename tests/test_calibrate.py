"""`tiercache calibrate` at tiny sizes: every pathway measured, fitted, written as a profile a policy can name."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

import tiercache
from tiercache.pathway import Pathway
from tiercache.policy.costmodel import PATHWAYS, Profile
from tiercache.tools import progress as progress_module
from tiercache.tools.calibrate import calibrate
from tiercache.tools.cli import main
from tiercache.tools.progress import Callback, StderrCallback, progress_callback


class Recorder(Callback):
    """Keeps what a progress callback is told."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.descriptions: list[str] = []
        self.closed = False

    def set_size(self, size: int) -> None:
        self.sizes.append(size)
        super().set_size(size)

    def set_description(self, text: str) -> None:
        self.descriptions.append(text)
        super().set_description(text)

    def close(self) -> None:
        self.closed = True


def test_calibrate_measures_every_pathway_and_writes_a_loadable_profile(tmp_path: Path) -> None:
    lines: list[str] = []
    bar = Recorder()
    sizes = [64 << 10, 1 << 20]
    profile = calibrate(tmp_path / "root", sizes=sizes, repeat=1, name="here", progress=bar, log=lines.append)
    assert profile.measured and profile.name == "here" and "measured by tiercache calibrate" in profile.describe()
    assert len(lines) == 2 * len(PATHWAYS) and lines[-1].startswith("[16/16]")
    assert bar.sizes == [2 * len(PATHWAYS)] and bar.value == 2 * len(PATHWAYS) and not bar.closed  # the caller's
    assert {d.split(" ")[0] for d in bar.descriptions} == {str(p) for p in PATHWAYS}
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
    printed = capsys.readouterr()
    assert "[16/16]" in printed.out and f"| {Pathway('nvme', 'hbm')} |" in printed.out and str(out) in printed.out
    assert printed.err == ""  # stderr is no terminal here: no bar, a line per measurement instead
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


def _calibrate_argv(tmp_path: Path, *extra: str) -> list[str]:
    root, out = str(tmp_path / "root"), str(tmp_path / "p.toml")
    return ["calibrate", "--root", root, "--out", out, "--sizes", "64KiB,128KiB", "--repeat", "1", *extra]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_calibrate_on_a_terminal_shows_a_bar_instead_of_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Callback] = []

    def recorded(size: int | None = None, description: str = "", *, enabled: bool | None = None) -> Callback:
        made.append(StderrCallback(size, description) if enabled else Callback(size, description))
        return made[-1]

    monkeypatch.setattr("tiercache.tools.cli.progress_callback", recorded)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(_calibrate_argv(tmp_path)) == 0
    assert isinstance(made[0], StderrCallback) and made[0].value == made[0].size == 2 * len(PATHWAYS)
    assert "[16/16]" not in capsys.readouterr().out  # the bar says it
    text = sys.stderr.getvalue()
    # one line, rewritten: at set_size, then at each measurement's description and step; ended at close
    assert text.count("\r") == 1 + 2 * made[0].value and text.count("\n") == 1 and text.endswith("\n")

    made.clear()
    assert main(_calibrate_argv(tmp_path, "--quiet")) == 0
    assert type(made[0]) is Callback and "[16/16]" not in capsys.readouterr().out  # quiet: neither


def test_the_stderr_printer_rewrites_one_line() -> None:
    stream = io.StringIO()
    with StderrCallback(3, "measuring", stream=stream) as bar:
        bar.relative_update()
        bar.set_description("x")
        bar.relative_update(2)
    assert stream.getvalue() == "\rmeasuring [1/3]\rx [1/3]        \rx [3/3]\n"


def test_progress_callback_picks_tqdm_or_the_printer_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(progress_callback(enabled=False)) is Callback
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: nothing by default
    assert type(progress_callback()) is Callback
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: `import tqdm.auto` raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert type(progress_callback(enabled=True)) is StderrCallback


def test_the_tqdm_bar_follows_the_callback() -> None:
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    bar = progress_module.TqdmCallback(4, "start", file=stream)
    bar.relative_update()
    bar.set_description("half")
    bar.relative_update()
    shown = stream.getvalue().rsplit("\r", 1)[-1]  # the bar as last drawn, before close
    assert "half" in shown and "2/4" in shown and (bar.value, bar.size) == (2, 4)
    bar.close()
    assert "half" in stream.getvalue() and "2/4" in stream.getvalue()
