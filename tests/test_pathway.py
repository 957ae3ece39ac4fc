"""Pathway: one spelling per route, read back exactly, at the cost model's grain where it is charged."""

from __future__ import annotations

import itertools

import pytest

from tiercache.pathway import MODES, SOURCES, Pathway
from tiercache.policy.costmodel import PATHWAYS

ENDS = ("hbm", "host", "nvme", "cuda:1")


def every_pathway() -> list[Pathway]:
    found = []
    for source, dest in itertools.product(SOURCES, ENDS):
        for mode in (None, *MODES["host"], *MODES["nvme"]):
            try:
                found.append(Pathway(source, dest, mode))
            except ValueError:
                continue  # a mode of neither end
    return found


@pytest.mark.parametrize("pathway", every_pathway(), ids=str)
def test_every_pathway_reads_back_from_its_one_spelling(pathway: Pathway) -> None:
    assert Pathway.parse(str(pathway)) == pathway
    assert str(pathway).count("(") <= 1


def test_the_mode_sits_at_its_end_and_is_written_once() -> None:
    assert str(Pathway("host", "hbm", "pinned")) == "host(pinned)->hbm"
    assert str(Pathway("put", "nvme", "o_direct")) == "put->nvme(o_direct)"
    assert str(Pathway("host", "nvme", "buffered")) == "host->nvme(buffered)"  # between host and nvme: nvme's
    assert str(Pathway("host", "host", "pinned")) == "host(pinned)->host"  # a host reload into CPU memory
    with pytest.raises(ValueError, match="not a mode of either end"):
        Pathway("hbm", "cuda:1", "pinned")
    with pytest.raises(ValueError, match="one mode"):
        Pathway.parse("host(pinned)->nvme(o_direct)")


def test_the_cost_model_grain_drops_what_it_does_not_tell_apart() -> None:
    assert Pathway("nvme", "hbm", "gds").costed() == Pathway("nvme", "hbm")
    assert Pathway("put", "host", "pinned").costed() == Pathway("hbm", "host", "pinned")
    assert Pathway("host", "nvme", "o_direct").costed() == Pathway("host", "nvme")
    assert all(p.costed() == p for p in PATHWAYS)
