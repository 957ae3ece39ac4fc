"""The diffusers integration beside what diffusers users have, on a random-weight Wan-shaped WanTransformer3DModel.

Every figure is a ratio against a baseline measured in the same run, the cases alternating repetition by repetition;
absolute times are this machine's only. The model: BENCH_DIFFUSERS_SIZE blocks x width (default 12x768: 6 heads x
128, feed-forward 4x the width, Wan's 4096-wide text input), float32, called on a latent of 1x16x1x16x16 (64
tokens) with a 512-token text context, under torch.no_grad() as a pipeline calls it.

- Block offload: a forward with `offload_blocks(model, cache, lookahead=2)`, entries in host memory or forced to
  nvme (cold: the page cache of the chunk files dropped before each forward), beside diffusers'
  `enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)`,
  its disk mode (`offload_to_disk_path`, its safetensors files dropped from the page cache the same way) and the
  model without offload. Outputs are compared with the model's own. Peak memory: each variant in a fresh process
  (bench.diffusers probe), the peak RSS (VmHWM, reset through /proc/self/clear_refs once the model is set up and has
  run once) of one forward, above that process's RSS after its imports; glibc's mmap threshold is fixed
  (MALLOC_MMAP_THRESHOLD_) there, so that freed weights leave the RSS instead of staying in the heap.
  `enable_sequential_cpu_offload` is not measured: it is a pipeline method that needs accelerate and an accelerator
  (diffusers raises "requires accelerator, but not found" on a CPU).
- A stage switch, two models of that shape (as Wan 2.2's two experts): `park` one, `restore` the other, from host
  memory and from nvme (cold), beside their CPU stand-ins: `.to()` is a no-op on a CPU, so a copy of the state dict
  into a second buffer and back (what `.to("cpu")` / `.to("cuda")` cost on a GPU machine), and torch.save (fsynced)
  / torch.load (cold) of the state dict. Three pairings: the parked model unchanged since it was parked before
  (tiercache finds its entry by content and writes nothing) against copying both ways, then against a baseline that
  also kept its copy; and the parked model's entry written anew against copying both ways.
- Wan's cross-attention K/V: a forward with `cache_context_kv` (warm: the K/V of the context already in the cache,
  in hbm or host) beside the model's own forward.

Diffusers' group offloading calls accelerate (`accelerate.utils.send_to_device`) in every forward: without
accelerate installed its rows are left out and said so.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tiercache
from tiercache.io import drop_page_cache
from tiercache.pathway import Pathway

from .measure import Row, chunk_files, drop_page_caches, forcing_policy, host_mode, row, timed

DEFAULT_SIZE = "12x768"  # blocks x width: 433 MiB of block weights in float32, a forward of about 0.4 s here
HEAD_DIM = 128  # Wan's
TEXT_DIM = 4096  # umT5's width, what Wan's text embedder takes
TEXT_TOKENS = 512  # Wan's text length
LATENT = (1, 16, 1, 16, 16)  # batch, channels, frames, height, width: 64 tokens after the 1x2x2 patches
LOOKAHEAD = 2
VARIANTS = ("none", "group", "group-disk", "tiercache-host", "tiercache-nvme")
STEPS = 5 + len(VARIANTS)  # progress steps: build, block offload, context K/V, a probe per variant, 2 stage switches
PROBE_MMAP_THRESHOLD = str(1 << 20)
PROBES_AT_ONCE = 2


@dataclass(frozen=True)
class Shape:
    blocks: int
    width: int

    @property
    def config(self) -> dict[str, Any]:
        return {
            "patch_size": (1, 2, 2),
            "num_attention_heads": self.width // HEAD_DIM,
            "attention_head_dim": HEAD_DIM,
            "in_channels": LATENT[1],
            "out_channels": LATENT[1],
            "text_dim": TEXT_DIM,
            "freq_dim": 256,
            "ffn_dim": 4 * self.width,
            "num_layers": self.blocks,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 1024,
        }

    def __str__(self) -> str:
        return f"{self.blocks} blocks x {self.width}"


def parse_shape(spec: str) -> Shape | None:
    """BENCH_DIFFUSERS_SIZE: "BLOCKSxWIDTH" (the width a multiple of 128); "", "0" or "off": the suite is skipped."""
    spec = spec.strip().lower()
    if spec in ("", "0", "off", "none"):
        return None
    blocks, sep, width = spec.partition("x")
    if not sep or not blocks.isdigit() or not width.isdigit() or int(width) % HEAD_DIM or int(blocks) < 1:
        raise ValueError(f"BENCH_DIFFUSERS_SIZE={spec!r}: BLOCKSxWIDTH, the width a multiple of {HEAD_DIM} (or 0)")
    return Shape(int(blocks), int(width))


def diffusers_steps(spec: str) -> int:
    """How many progress steps the suite reports (0 where it is skipped)."""
    return STEPS if parse_shape(spec) is not None else 0


def build(shape: Shape, seed: int) -> torch.nn.Module:
    """The random-weight model: the same seed gives bitwise-equal weights, in any process on one machine."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: Any = WanTransformer3DModel(**shape.config)
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "hidden_states": torch.randn(*LATENT, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=gen),
    }


def forward(model: torch.nn.Module, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**kwargs, return_dict=False)[0]
    return out


def nbytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def block_bytes(model: torch.nn.Module) -> int:
    return nbytes(model.blocks.parameters())  # type: ignore[union-attr]


def accelerate_missing() -> bool:
    from diffusers.utils import is_accelerate_available

    return not is_accelerate_available()


def compared(ours: torch.Tensor, reference: torch.Tensor) -> str:
    if torch.equal(ours, reference):
        return "output bitwise equal"
    return f"output max abs diff {(ours - reference).abs().max().item():.2e}"


class Variant:
    """One way of running the model: set up on `model` in place; `before` runs untimed ahead of each forward."""

    def __init__(self, name: str, model: torch.nn.Module, root: Path) -> None:
        self.name = name
        self.model = model
        self.cache: tiercache.TierCache | None = None
        self.files: list[Path] = []
        self._offload: Any = None
        cpu = torch.device("cpu")
        if name in ("group", "group-disk"):
            disk = root / "group-disk" if name == "group-disk" else None
            model.enable_group_offload(  # type: ignore[operator]
                onload_device=cpu,
                offload_device=cpu,
                offload_type="block_level",
                num_blocks_per_group=1,
                offload_to_disk_path=None if disk is None else str(disk),
            )
            self.files = sorted(disk.glob("*.safetensors")) if disk is not None else []
        elif name in ("tiercache-host", "tiercache-nvme"):
            from tiercache.integrations.diffusers import offload_blocks

            tier = name.removeprefix("tiercache-")
            self.cache = tiercache.TierCache(
                root=root / f"blocks-{tier}", policy=forcing_policy(tier, block_bytes(model)), device="cpu"
            )
            self._offload = offload_blocks(model, self.cache, lookahead=LOOKAHEAD, to=tier)
            self.files = [p for p, _ in chunk_files(root / f"blocks-{tier}")] if tier == "nvme" else []
        else:
            assert name == "none", name

    def before(self) -> None:
        drop_page_caches(self.files)

    @property
    def pathway(self) -> Pathway | None:
        if self.cache is None:
            return None
        if self.name == "tiercache-host":
            return Pathway("host", "hbm", host_mode(self.cache))
        return Pathway("nvme", "hbm", self.cache.stats().nvme_io)

    def close(self) -> None:
        """Takes the offload off (the nvme entries stay for the probes to reuse) and closes the cache."""
        if self._offload is not None:
            self._offload.remove()
        if self.cache is not None:
            self.cache.close()


Case = tuple[Callable[[], object], Callable[[], None]]  # a timed function, and what runs untimed before each call


def interleaved(cases: dict[str, Case], repeat: int) -> dict[str, list[float]]:
    """Each case (timed function, untimed `before`) once as a warm-up, then all of them in turn `repeat` times."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(repeat + 1):
        for name, (fn, before) in cases.items():
            before()
            took = timed(fn)
            if rep:
                times[name].append(took)
    return times


# ---- peak memory, one variant per process ------------------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def probe(variant: str, spec: str, root: Path) -> dict[str, Any]:
    """In a fresh process: the variant's peak RSS over one forward, once it is set up and has run once."""
    shape = parse_shape(spec)
    assert shape is not None
    kwargs = inputs()
    after_imports = _status("VmRSS")
    setup = Variant(variant, build(shape, 0), root)
    setup.before()
    forward(setup.model, kwargs)
    gc.collect()
    settled = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0 on)
        scope = "one forward"
    except OSError:
        scope = "the process's life (VmHWM could not be reset)"
    setup.before()
    forward(setup.model, kwargs)
    peak = _status("VmHWM")
    if setup.cache is not None:  # closed with the next blocks' prefetches in flight, as a process ending would
        setup.cache.close()
    return {
        "after_imports": after_imports,
        "settled": settled,
        "peak": peak,
        "peak_above_imports": peak - after_imports,
        "scope": scope,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_probe(variant: str, spec: str, root: Path) -> dict[str, Any]:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": PROBE_MMAP_THRESHOLD}
    done = subprocess.run(
        [sys.executable, "-m", "bench.diffusers", "probe", variant, spec, str(root)],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.diffusers probe {variant} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def memory_note(ours: dict[str, Any], theirs: dict[str, Any] | None, target: bool) -> str:
    if theirs is None:
        return f"peak RSS of a forward {mib(ours['peak_above_imports'])} above imports"
    ratio = ours["peak_above_imports"] / max(1, theirs["peak_above_imports"])
    verdict = f", target <= 1.00x: {'met' if ratio <= 1.0 else 'BELOW'}" if target else ""
    scope = "" if ours["scope"] == theirs["scope"] == "one forward" else f", peak over {ours['scope']}"
    return (
        f"peak RSS of a forward {mib(ours['peak_above_imports'])} vs {mib(theirs['peak_above_imports'])} above "
        f"imports ({ratio:.2f}x{verdict}{scope})"
    )


# ---- the suite ----------------------------------------------------------------------------------------------------


def bench_diffusers(spec: str, root: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    shape = parse_shape(spec)
    if shape is None:
        return []
    root = root / "diffusers"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        return _bench(shape, spec, root, repeat, progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(shape: Shape, spec: str, root: Path, repeat: int, progress: Callable[[str], None]) -> list[Row]:
    progress(f"diffusers: building a Wan transformer, {shape}")
    base = build(shape, 0)
    kwargs = inputs()
    blocks = block_bytes(base)
    total = nbytes(base.parameters())
    described = (
        f"Wan {shape}, {mib(total)} fp32 ({mib(blocks)} in blocks), latent {'x'.join(map(str, LATENT))} "
        f"+ {TEXT_TOKENS} text tokens"
    )
    no_group = accelerate_missing()
    variants = [v for v in VARIANTS if not (no_group and v.startswith("group"))]

    progress(f"diffusers: block offload, {len(variants)} variants side by side")
    setups = {v: Variant(v, base if v == "none" else copy.deepcopy(base), root) for v in variants}
    outputs: dict[str, torch.Tensor] = {}

    def runner(variant: Variant) -> Callable[[], None]:
        def run() -> None:
            outputs[variant.name] = forward(variant.model, kwargs)

        return run

    times = interleaved({v: (runner(s), s.before) for v, s in setups.items()}, repeat)
    pathways = {v: s.pathway for v, s in setups.items()}
    for s in setups.values():
        s.close()  # the nvme entries and safetensors files stay: the probes reuse them
    del setups

    progress("diffusers: cache_context_kv, warm")
    kv_rows = _context_kv(shape, base, kwargs, outputs["none"], root, repeat, described)
    rows: list[Row] = []

    memory: dict[str, dict[str, Any]] = {}
    # Two probes at a time: each measures its own process's RSS, which the other's CPU time does not change.
    with concurrent.futures.ThreadPoolExecutor(max_workers=PROBES_AT_ONCE) as pool:
        probes = {pool.submit(run_probe, v, spec, root): v for v in variants}
        for done in concurrent.futures.as_completed(probes):
            progress(f"diffusers: peak memory of {probes[done]} measured (a process of its own each)")
            memory[probes[done]] = done.result()
    for _ in range(len(VARIANTS) - len(variants)):
        progress("diffusers: group offloading left out (no accelerate)")

    def offload_row(ours: str, baseline: str, label: str, target: float | None, *, memory_target: bool) -> Row:
        cold = ", cold" if ours == "tiercache-nvme" else ""
        notes = [
            f"diffusers offload_blocks(lookahead={LOOKAHEAD}){cold}, {described}",
            compared(outputs[ours], outputs["none"]),
            memory_note(memory[ours], memory.get(baseline), memory_target),
        ]
        if baseline == "group":
            notes.append("on a CPU group offloading cpu->cpu moves no bytes (.to() of a CPU tensor is itself)")
        if baseline == "none" and ours == "tiercache-host":
            notes.append("enable_sequential_cpu_offload not measured: it needs accelerate and an accelerator")
            if no_group:
                notes.append("group offloading not measured: it calls accelerate, which is not installed")
        return row(
            blocks,
            pathways[ours],
            times[ours],
            label,
            times[baseline],
            target,
            detail="; ".join(notes),
            suite="diffusers",
            checksums=True if ours == "tiercache-nvme" else None,
        )

    if not no_group:
        group_out = {v: compared(outputs[v], outputs["none"]) for v in ("group", "group-disk")}
        rows.append(
            offload_row(
                "tiercache-host",
                "group",
                f"diffusers group offload, block_level, 1 block a group, cpu->cpu ({group_out['group']})",
                1 / 1.1,
                memory_target=True,
            )
        )
        rows.append(
            offload_row(
                "tiercache-nvme",
                "group-disk",
                f"diffusers group offload to disk (safetensors), cold ({group_out['group-disk']})",
                1.0,
                memory_target=False,
            )
        )
    for ours in ("tiercache-host", "tiercache-nvme"):
        rows.append(offload_row(ours, "none", "the model without offload", None, memory_target=False))
    gc.collect()

    rows += _stage_switches(base, shape, root, repeat, progress, described)
    return rows + kv_rows


def context_share(blocks: int, width: int) -> float:
    """The share of a forward's linear-layer FLOPs that cache_context_kv skips: every block's attn2 K and V
    projections of the text context, against those plus the latent tokens' projections and feed-forward (attn1's
    q, k, v, o, attn2's q and o, a feed-forward 4x the width) and the text embedder (TEXT_DIM -> width -> width)."""
    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    context = TEXT_TOKENS * 2 * 2 * width * width
    latent = tokens * 2 * (6 * width * width + 2 * width * 4 * width)
    embedder = TEXT_TOKENS * 2 * (TEXT_DIM * width + width * width)
    return blocks * context / (blocks * (context + latent) + embedder)


def _context_kv(
    shape: Shape,
    base: torch.nn.Module,
    kwargs: dict[str, torch.Tensor],
    reference: torch.Tensor,
    root: Path,
    repeat: int,
    described: str,
) -> list[Row]:
    from tiercache.integrations.diffusers import cache_context_kv

    blocks, width = shape.blocks, shape.width
    kv_bytes = blocks * 2 * TEXT_TOKENS * width * 4
    caches: dict[str, tiercache.TierCache] = {}
    handles: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {"none": base}
    outputs: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for tier in ("hbm", "host"):
            caches[tier] = stack.enter_context(
                tiercache.TierCache(root=root / f"kv-{tier}", policy=forcing_policy(tier, kv_bytes), device="cpu")
            )
            models[tier] = copy.deepcopy(base)
            handles[tier] = cache_context_kv(models[tier], caches[tier])
            forward(models[tier], kwargs)  # computes the K/V and stores them: the timed forwards find them

        def runner(name: str) -> Callable[[], None]:
            def run() -> None:
                outputs[name] = forward(models[name], kwargs)

            return run

        times = interleaved({name: (runner(name), lambda: None) for name in models}, repeat)
        rows = []
        for tier in ("hbm", "host"):
            handle = handles[tier]
            pathway = None if tier == "hbm" else Pathway("host", "hbm", host_mode(caches[tier]))
            where = "hbm hit, no copy" if tier == "hbm" else "reloaded from host each forward"
            share = context_share(blocks, width)
            rows.append(
                row(
                    kv_bytes,
                    pathway,
                    times[tier],
                    "the model's own forward (attn2 projects the context every call)",
                    times["none"],
                    detail=(
                        f"Wan forward with cache_context_kv, K/V warm ({where}), {described}; "
                        f"{compared(outputs[tier], reference)}; {handle.hits} hits, {handle.misses} miss; "
                        f"the context K/V projections are {share:.0%} of this forward's matmul FLOPs (at a real "
                        "video latent of thousands of tokens, well under 1%)"
                    ),
                    suite="diffusers",
                )
            )
            handle.remove()
    return rows


def _stage_switches(
    base: torch.nn.Module, shape: Shape, root: Path, repeat: int, progress: Callable[[str], None], described: str
) -> list[Row]:
    """park one model and restore the other, beside the CPU stand-ins of what users do, through host and nvme."""
    pair = {"A": base, "B": build(shape, 1)}  # ours; the baselines' are copies of their own
    theirs = {name: copy.deepcopy(m) for name, m in pair.items()}
    rows: list[Row] = []
    for tier in ("host", "nvme"):
        progress(f"diffusers: stage switch through {tier}")
        rows += _switch_through(tier, pair, theirs, root, repeat, described.split(", latent")[0])
    return rows


def _switch_through(
    tier: str,
    pair: dict[str, torch.nn.Module],
    theirs: dict[str, torch.nn.Module],
    root: Path,
    repeat: int,
    described: str,
) -> list[Row]:
    """Both pairs start and end with A resident and B's weights elsewhere: in the cache (ours), in a second buffer or
    a torch.save file (theirs). Each call switches: the resident one goes, the other comes back."""
    from tiercache.integrations.diffusers import park, restore
    from tiercache.integrations.diffusers.fingerprint import module_tensors
    from tiercache.integrations.diffusers.stages import Parked

    size = nbytes(pair["A"].parameters())
    with tiercache.TierCache(
        root=root / f"stages-{tier}", policy=forcing_policy(tier, 2 * size), device="cpu"
    ) as cache:
        records: dict[str, Parked] = {"B": park(pair["B"], cache, "B", to=tier)}
        ours = ["A", "B"]  # resident, parked

        def switch() -> None:
            out, back = ours
            records[out] = park(pair[out], cache, out, to=tier)
            restore(pair[back], cache)
            ours.reverse()

        def drop() -> None:  # cold: nvme's chunk files out of the page cache
            if tier == "nvme":
                drop_page_caches([p for p, _ in chunk_files(cache.root)])

        def anew() -> None:  # the resident model's entry goes, so that this park writes it again
            record = records.get(ours[0])
            if record is not None:
                cache.delete(record.key)
            drop()

        kept: dict[str, dict[str, torch.Tensor]] = {}  # the baselines' second buffers (host)
        files = {name: root / f"stages-{name}.pt" for name in theirs}  # and files (nvme)
        for name, model in theirs.items():
            if tier == "host":
                kept[name] = {n: t.detach().clone() for n, t in module_tensors(model)}
            else:
                _save(model, files[name])
        _drop(theirs["B"])
        their = ["A", "B"]

        def baseline(write: bool) -> None:
            out, back = their
            if tier == "host":
                if write:
                    kept[out] = {n: t.detach().clone() for n, t in module_tensors(theirs[out])}
                _drop(theirs[out])
                for n, t in module_tensors(theirs[back]):
                    t.data = kept[back][n].clone()
            else:
                if write:
                    _save(theirs[out], files[out])
                _drop(theirs[out])
                stored = torch.load(files[back], weights_only=True)
                for n, t in module_tensors(theirs[back]):
                    t.data = stored[n]
            their.reverse()

        def their_drop() -> None:
            if tier == "nvme":
                drop_page_cache(files[their[1]])

        # The first round (the warm-up) parks A for the first time, writing its entry: from then on a park finds
        # the entry of the unchanged model by its content and writes nothing, unless anew() deleted it.
        times = interleaved(
            {
                "ours": (switch, drop),
                "ours-anew": (switch, anew),
                "copy": (lambda: baseline(True), their_drop),
                "kept": (lambda: baseline(False), their_drop),
            },
            repeat,
        )
        if ours[0] != "A":  # back to A resident, B's weights in B (ours, for the next tier, and theirs)
            switch()
        if their[0] != "A":
            baseline(False)
        restore(pair["B"], cache)
        back = kept["B"] if tier == "host" else torch.load(files["B"], weights_only=True)
        for n, t in module_tensors(theirs["B"]):
            t.data = back[n].clone()
        pathway = Pathway(tier, "hbm", host_mode(cache) if tier == "host" else cache.stats().nvme_io)
    if tier == "host":
        copy_label = "state dict copied into a second buffer and back (the CPU stand-in of .to('cpu'), .to(device))"
        kept_label = "the same, the parked model's buffer kept from before (dropped, not copied)"
    else:
        copy_label = "torch.save (fsync) of the parked model's state dict, torch.load (cold) of the other's"
        kept_label = "torch.load (cold) only: the parked model's file kept from before, not saved again"
    cold = ", cold" if tier == "nvme" else ""
    return [
        row(
            size,
            pathway,
            times[ours_case],
            label,
            times[baseline_case],
            detail=f"stage switch: park one model + restore the other{cold}; {what}; two models of {described}",
            suite="diffusers",
            checksums=True if tier == "nvme" else None,
        )
        for ours_case, baseline_case, label, what in (
            ("ours", "copy", copy_label, "the parked model unchanged since it was parked before: nothing written"),
            ("ours", "kept", kept_label, "the parked model unchanged: nothing written on either side"),
            ("ours-anew", "copy", copy_label, "the parked model's entry written anew each switch"),
        )
    ]


def _save(model: torch.nn.Module, path: Path) -> None:
    from tiercache.integrations.diffusers.fingerprint import module_tensors

    with open(path, "wb") as f:
        torch.save({n: t.detach() for n, t in module_tensors(model)}, f)
        f.flush()
        os.fsync(f.fileno())


def _drop(model: torch.nn.Module) -> None:
    from tiercache.integrations.diffusers.fingerprint import module_tensors

    for _, t in module_tensors(model):
        t.data = torch.empty(0, dtype=t.dtype)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "probe":
        print(json.dumps(probe(argv[1], argv[2], Path(argv[3]))))
        return 0
    print("usage: python -m bench.diffusers probe VARIANT BLOCKSxWIDTH ROOT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
