"""The `tiercache` command: model pathway costs, calibrate this machine, simulate policies on a trace."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import TierCacheError
from ..pathway import Pathway
from ..policy.costmodel import PATHWAYS, Profile, profile_names
from ..policy.schema import resolve_policy
from ..units import parse_size
from .plotting import pyplot, save_loglog
from .progress import progress_callback

DISTRIBUTION = "tiercache-gpu"  # the name on the package index (pip install), not the import name


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def model_table(profile: Profile, nbytes: int) -> str:
    """Markdown table: every pathway's predicted time for one size."""
    lines = [
        f"{profile.describe()}",
        "",
        f"| pathway | latency | bandwidth | time for {nbytes / 1e9:g} GB ({nbytes} bytes) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for pathway in PATHWAYS:
        cost = profile.pathways[pathway]
        lines.append(
            f"| {pathway} | {cost.latency_s * 1e6:.0f} us | {cost.bandwidth / 1e9:.2f} GB/s | "
            f"{cost.seconds(nbytes) * 1e3:.2f} ms |"
        )
    return "\n".join(lines)


def plot_profiles(profiles: Sequence[Profile], out: Path, sizes: Sequence[int] | None = None) -> None:
    """Latency against size (log-log), one line per reload pathway and profile."""
    plt = pyplot()
    sizes = sizes or [int(2**e) for e in range(20, 36)]  # 1 MiB .. 32 GiB
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {
        Pathway("host", "hbm", "pinned"): "-",
        Pathway("host", "hbm", "pageable"): "--",
        Pathway("nvme", "hbm"): ":",
    }
    for index, profile in enumerate(profiles):
        color = f"C{index}"
        for pathway, style in styles.items():
            times = [profile.seconds(pathway, n) * 1e3 for n in sizes]
            ax.plot([n / 1e9 for n in sizes], times, style, color=color, label=f"{profile.name}: {pathway}")
    save_loglog(fig, ax, out, ylabel="predicted reload time (ms)", title="tiercache cost model: reload time by pathway")


def _cmd_model(args: argparse.Namespace) -> int:
    profiles = [Profile.load(name) for name in args.profile or ["cpu"]]
    for profile in profiles:
        print(model_table(profile, args.size))
        print()
    if args.plot:
        plot_profiles(profiles, Path(args.plot))
        print(f"written: {args.plot}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    out = Path(args.out)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):  # before minutes of measuring, not after
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist or is not writable")
    if len(set(args.sizes)) < 2:
        raise ValueError("--sizes: give two sizes or more, so that latency and bandwidth can both be fitted")
    nvme = resolve_policy(args.policy).tiers.nvme
    # A bar on stderr where it is a terminal; where it is not (a log, CI) a line per measurement on stdout instead,
    # so the record stays; --quiet: neither, only the fitted table.
    bar = not args.quiet and sys.stderr.isatty()
    with progress_callback(description="calibrate", enabled=bar) as progress:
        profile = calibrate(
            Path(args.root),
            sizes=args.sizes,
            repeat=args.repeat,
            name=args.name,
            progress=progress,
            log=print if not (bar or args.quiet) else lambda line: None,
            threads=nvme.threads,
            task_size=nvme.task_size,
            io=nvme.io,
        )
    out.write_text(profile.to_toml())
    print(model_table(profile, 8 * 10**9))
    print(f'\nwritten: {args.out} (name it in a policy: profile = "{args.out}")')
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import load_trace, simulate_report

    trace = load_trace(Path(args.trace))
    print(simulate_report(trace, policies=args.policy or ["cpu"], rules=args.rules))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiercache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="predicted time of every pathway for a size, from a hardware profile")
    model.add_argument("--size", type=_size, default=8 * 10**9, help="entry size, e.g. 8GB (default) or 512MiB")
    model.add_argument(
        "--profile", action="append", help=f"profile name or path (repeatable); names: {', '.join(profile_names())}"
    )
    model.add_argument("--plot", metavar="PNG", help="also plot reload time against size for every profile given")
    model.set_defaults(run=_cmd_model)

    cal = sub.add_parser("calibrate", help="measure this machine's pathways and write a profile")
    cal.add_argument("--root", required=True, help="a directory on the drive the nvme tier will use")
    cal.add_argument("--out", default="calibrated.toml", help="profile file to write (default calibrated.toml)")
    cal.add_argument("--name", default="calibrated", help="the profile's name")
    cal.add_argument(
        "--sizes",
        type=lambda s: [_size(x) for x in s.split(",")],
        default=[1 << 20, 16 << 20, 64 << 20, 256 << 20],
        help="comma-separated sizes to measure (default 1MiB,16MiB,64MiB,256MiB)",
    )
    cal.add_argument("--repeat", type=_positive, default=3, help="measurements per size (the median is fitted)")
    cal.add_argument("--policy", default="cpu", help="take nvme threads, task size and I/O mode from this policy")
    cal.add_argument(
        "-q", "--quiet", action="store_true", help="no progress (by default a bar on a terminal, else a line each)"
    )
    cal.set_defaults(run=_cmd_calibrate)

    sim = sub.add_parser("simulate", help="replay a trace through the real placement and eviction code")
    sim.add_argument("trace", help="a JSONL trace (see bench/traces/)")
    sim.add_argument("--policy", action="append", help="policy preset or file (repeatable; default cpu)")
    sim.add_argument(
        "--rules",
        type=lambda s: s.split(","),
        default=None,
        help="eviction rules to compare, e.g. lru,lfu,fifo,gdsf (default: each policy's own)",
    )
    sim.set_defaults(run=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ImportError as exc:
        print(
            f"tiercache {args.command}: {exc.name or exc} is needed here: pip install '{DISTRIBUTION}[plot]'",
            file=sys.stderr,
        )
    except (TierCacheError, OSError, ValueError) as exc:
        print(f"tiercache {args.command}: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
