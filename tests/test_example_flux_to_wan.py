"""examples/flux_to_wan.py runs as the README says: stage 1 and stage 2 as two processes at once on one root, offline
with tiny random models, the second finding what the first committed without reopening."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tiercache

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flux_to_wan.py"


def test_both_stages_run_at_once_and_hand_over_the_image_and_prompt(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "both", "--root", str(root)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with tiercache.TierCache(root=root, read_only=True) as cache:
        handed = cache.keys(prefix="handoff/")
        videos = cache.keys(prefix="videos/")
        assert videos, (handed, done.stdout)
        assert {key.rsplit("/", 1)[-1] for key in handed} >= {"image", "prompt", "latents", "flux-prompt"}
        frames = next(iter(cache[videos[0]].values()))
        assert frames.dim() == 5 and frames.shape[2] == 3, frames.shape  # (batch, frames, channels, H, W)
