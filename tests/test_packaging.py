"""What a user installs: the distribution's name, version, extras, licence and typing marker, and the built wheel."""

from __future__ import annotations

import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

import tiercache
from tiercache.tools.cli import DISTRIBUTION, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def test_the_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"tiercache {tiercache.__version__}\n"


def test_the_distribution_is_named_apart_from_the_import_and_versioned_by_it(project: dict[str, Any]) -> None:
    assert project["name"] == DISTRIBUTION == "tiercache-gpu"  # `tiercache` on the index is someone else's
    assert "version" in project["dynamic"] and "version" not in project
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["tool"]["hatch"]["version"]["path"] == "tiercache/__init__.py"


def test_the_extras_name_the_builds_for_each_cuda_and_never_torch(project: dict[str, Any]) -> None:
    extras: dict[str, list[str]] = project["optional-dependencies"]
    assert {"cuda12", "cuda13", "diffusers", "plot", "progress", "dev"} <= set(extras)

    def names(extra: str) -> set[str]:
        return {req.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for req in extras[extra]}

    assert names("cuda12") == {"kvikio-cu12", "cupy-cuda12x"}
    assert names("cuda13") == {"kvikio-cu13", "cupy-cuda13x"}
    assert names("diffusers") == {"diffusers"} and names("progress") == {"tqdm"}
    # torch comes only from the dependencies, where `make` has already put torch==2.13.0 (a CPU wheel)
    assert not any("torch" in name for extra in extras for name in names(extra))


def test_the_licence_is_the_apache_text_and_the_package_is_typed(project: dict[str, Any]) -> None:
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert (Path(tiercache.__file__).parent / "py.typed").is_file()


def test_the_wheel_carries_the_typing_marker_the_presets_and_the_licence(tmp_path: Path) -> None:
    """A pure-Python wheel, built in-process by hatchling (under a second), as pip would build it."""
    wheel_builder = pytest.importorskip("hatchling.builders.wheel", reason="hatchling is in the dev extra")
    built = list(wheel_builder.WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"]))
    assert len(built) == 1
    with zipfile.ZipFile(built[0]) as wheel:
        files = set(wheel.namelist())
        info = f"tiercache_gpu-{tiercache.__version__}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "tiercache/py.typed" in files and f"{info}/licenses/LICENSE" in files
    assert any(f.startswith("tiercache/policies/") and f.endswith(".toml") for f in files)
    assert not any(f.startswith(("tests/", "bench/")) for f in files)
    assert "Name: tiercache-gpu\n" in metadata and f"Version: {tiercache.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0" in metadata and "Provides-Extra: cuda13" in metadata
    assert "tiercache = tiercache.tools.cli:main" in entry_points
