"""The `tiercache` command: model pathway costs, calibrate this machine, simulate policies on a trace, and look
after an nvme root (ls, info, verify, du, stats read it while caches use it; gc tidies it). See docs/cli.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
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

STORES = ("s3://", "mooncake://")  # roots that are a shared tier's store (tools/bucket.py), not an nvme root


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


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


# ---- an nvme root ---------------------------------------------------------------------------------------------
# Exit codes: 0 done (all verify); 1 a key missing, an entry that does not verify, a removal gc could not do; 2 a
# usage error or a directory that cannot be read as a root (main() prints the message).


def _bar(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()  # a bar only on a terminal: never in a log or a pipe


def _cmd_ls(args: argparse.Namespace) -> int:
    if args.root.startswith(STORES):
        from . import bucket

        return bucket.ls(args)
    from .root import format_listing, listing, read_snapshot

    snapshot = read_snapshot(Path(args.root), from_manifests=True)
    if not snapshot.indexed:
        print(
            f"tiercache ls: {args.root} has no index: listed from the manifests on disk (uses and leases unknown)",
            file=sys.stderr,
        )
    entries = [e for e in listing(snapshot) if str(e["key"]).startswith(args.prefix)]
    if args.json:
        print(json.dumps(entries, indent=1))
    elif entries:
        print(format_listing(entries))
    else:
        print(f"tiercache ls: {args.root} holds no entries", file=sys.stderr)
    unreadable = sum(e["tensors"] is None for e in entries)
    if unreadable:
        print(
            f"tiercache ls: the manifests of {unreadable} entr{'y' if unreadable == 1 else 'ies'} could not be read "
            f"(removed meanwhile, or damaged: run tiercache verify {args.root})",
            file=sys.stderr,
        )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.root.startswith(STORES):
        raise ValueError(f"info looks after an nvme root; for a shared store: tiercache ls/du/verify/gc {args.root}")
    from .root import entry_info, format_info, read_snapshot

    snapshot = read_snapshot(Path(args.root))
    info = entry_info(snapshot, args.key)
    if info is None:
        count = len(snapshot.live)
        print(
            f"tiercache info: key {args.key!r} is not in {args.root} ({count} entr{'y' if count == 1 else 'ies'}: "
            f"tiercache ls {args.root} lists them)",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 1 if info["problem"] else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.root.startswith(STORES):
        from . import bucket

        return bucket.verify(args)
    from ..units import format_size
    from .root import read_snapshot, show_key, unindexed, verify_entries

    root = Path(args.root)
    live = read_snapshot(root).live
    with progress_callback(description="verify", enabled=_bar(args)) as progress:
        checks = verify_entries(root, [(r.name, r.key, r.nbytes) for r in live], progress, args.jobs)
    failed = [c for c in checks if not c.ok]
    gone = []
    if failed:  # an entry removed by a member while it was read is no damage
        after = read_snapshot(root)
        still = {r.name for r in after.live}
        gone = [c for c in failed if c.name not in still]
        failed = [c for c in failed if c.name in still]
    else:
        after = None
    total = sum(r.nbytes for r in live)
    print(
        f"verified {len(checks)} entries ({format_size(total)}) in {root}: {len(checks) - len(failed) - len(gone)} good"
    )
    for check in failed:
        what = "damaged" if check.damaged else "unreadable"
        key = "?" if check.key is None else show_key(check.key)
        print(f"{what}: {key} ({root / 'entries' / check.name}): {'; '.join(check.problems)}")
    for check in gone:
        print(f"removed while being verified (not counted): {show_key(check.key or '?')}")
    stray = unindexed(root, after or read_snapshot(root))
    if stray:
        print(
            f"{len(stray)} director{'y' if len(stray) == 1 else 'ies'} of entries/ not in the index: see "
            f"tiercache gc --dry-run {root}"
        )
    if failed:
        verb = "y does" if len(failed) == 1 else "ies do"
        print(f"{len(failed)} entr{verb} not verify: tiercache gc {root} removes them")
    return 1 if failed else 0


def _cmd_gc(args: argparse.Namespace) -> int:
    if args.root.startswith(STORES):
        from . import bucket

        return bucket.gc(args)
    from .root import collect_garbage, format_gc, gc_json

    with progress_callback(description="gc: verifying", enabled=_bar(args)) as progress:
        plan = collect_garbage(
            Path(args.root),
            dry_run=args.dry_run,
            grace_s=args.grace,
            lock_timeout=args.lock_timeout,
            jobs=args.jobs,
            progress=progress,
            chunks=not args.no_verify,
        )
    print(json.dumps(gc_json(plan), indent=1) if args.json else format_gc(plan))
    return 1 if any(a.error for a in plan.actions) else 0


def _cmd_du(args: argparse.Namespace) -> int:
    if args.root.startswith(STORES):
        from . import bucket

        return bucket.du(args)
    from .root import disk_usage, format_usage, read_snapshot

    usage = disk_usage(read_snapshot(Path(args.root), from_manifests=True))
    print(json.dumps(usage, indent=1) if args.json else format_usage(usage))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    if args.root.startswith(STORES):
        raise ValueError(f"stats looks after an nvme root; for a shared store: tiercache ls/du/verify/gc {args.root}")
    from .root import format_stats, read_snapshot, root_stats

    stats = root_stats(read_snapshot(Path(args.root)))
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
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
    _root_commands(sub)
    return parser


READ_ONLY = (
    "Safe while caches in other processes use ROOT: it reads the index read-only and the entries' files, never "
    "joins the root and changes nothing there."
)


def _root_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def command(name: str, summary: str, details: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}.\n\n{details}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "root",
            metavar="ROOT",
            help="the nvme tier's directory (TierCache(root=...)), an object tier's s3://BUCKET[/PREFIX] (ls, du, "
            "verify, gc; credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or a remote tier's "
            "mooncake://MASTER_HOST:PORT[/PREFIX] (ls, du, verify, gc)",
        )
        parser.add_argument("--endpoint", default="", help="a bucket's S3 server (tiers.object.endpoint; empty: AWS)")
        parser.add_argument("--region", default="us-east-1", help="a bucket's region (tiers.object.region)")
        parser.add_argument(
            "--admin", default="", help="a Mooncake master's HTTP admin server (tiers.remote.admin; empty: port 9003)"
        )
        parser.add_argument(
            "--metadata", default="", help="a Mooncake metadata server (tiers.remote.metadata_server; empty: port 8080)"
        )
        parser.add_argument(
            "--local-hostname",
            default="127.0.0.1",
            help="this node's address on the holders' network (tiers.remote.local_hostname; needed off the master's "
            "node to read entries: verify, gc)",
        )
        return parser

    def wrap(text: str) -> str:
        return "\n\n".join(textwrap.fill(p, 100) for p in text.split("\n"))  # a paragraph a line

    ls = command(
        "ls",
        "list the live entries of a root, sorted by key",
        wrap(
            "One line per entry: its size (the tensors' bytes), tensors, age (since it was written), uses (reads "
            "counted by the index), whether a live cache is reading it now, and its key. A root with entries but "
            "no index is listed from its manifests (uses and leases unknown; a note on stderr says so).\n" + READ_ONLY
        ),
    )
    ls.add_argument(
        "--json",
        action="store_true",
        help="a JSON list of objects: key, name, nbytes, tensors, written_ns, age_s, uses, last_used_ns, leases, "
        "leased",
    )
    ls.add_argument(
        "--prefix", default="", help="only the keys that start with it (a request's or a tenant's group: tenant7/)"
    )
    ls.set_defaults(run=_cmd_ls)

    info = command(
        "info",
        "everything about one entry",
        wrap(
            "Its directory, when it was written, its size, every tensor (name, dtype, shape, bytes, CRC32C), uses, "
            "last use and leases. Exit status 1 if KEY is not in ROOT, or its manifest cannot be read.\n" + READ_ONLY
        ),
    )
    info.add_argument("key", metavar="KEY", help="the entry's key")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=_cmd_info)

    verify = command(
        "verify",
        "read every chunk of every live entry and check it",
        wrap(
            "Each chunk's CRC32C must equal the one its file stores and the manifest's, and each manifest its seal. "
            "Exit status 0 if every entry verifies, 1 listing the keys and directories that do not (an entry "
            "removed by a cache while it was read is not counted). A bar on stderr where it is a terminal.\n"
            + READ_ONLY
        ),
    )
    verify.add_argument("-j", "--jobs", type=_positive, default=4, help="entries read at once (default 4)")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(run=_cmd_verify)

    gc = command(
        "gc",
        "remove what no cache needs",
        wrap(
            "Removes: removed entries nobody reads, past the grace period; dead members (their leases, "
            "reservations, lock files and staging directories); directories of entries/ without a manifest; "
            "older versions of a key the index does not list; tmp/ directories no write in progress names; "
            "trash/; and entries that do not verify (damaged; each one named). Never removes a live entry that "
            "verifies, a directory not yet indexed that verifies (the next cache to open the root indexes it), one "
            "a write in progress names, a removed entry still read, or an entry of another format version: each "
            "is listed as kept, with why. See docs/cli.md.\n"
            "Safe while caches in other processes use ROOT: every entry is verified first without a lock, then gc "
            "joins the root as a member and decides and acts inside one index write transaction, so that no cache "
            "publishes, removes or reads a new entry meanwhile; entries that failed are verified again under it. "
            "Exit status 1 if something could not be removed (it is left for the next sweep)."
        ),
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would go and its bytes; change nothing")
    gc.add_argument(
        "--grace",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="a removed entry's files stay this long after its removal (tiers.nvme.removal_grace_s; default 1)",
    )
    gc.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for another process's index transaction (default 30)",
    )
    gc.add_argument(
        "--no-verify",
        action="store_true",
        help="read no chunk: damage is found from the manifests only (seal, key, chunk sizes); for a large root",
    )
    gc.add_argument("-j", "--jobs", type=_positive, default=4, help="entries verified at once (default 4)")
    gc.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gc.add_argument("--json", action="store_true", help="one JSON object: dry_run, freed, actions, kept")
    gc.set_defaults(run=_cmd_gc)

    du = command(
        "du",
        "bytes a root holds, by what holds them",
        wrap(
            "Live entries, removed entries not yet swept, directories of entries/ not in the index, reservations "
            "(writes in progress: the bytes the index reserves; their files are under tmp/), tmp/, trash/, the "
            "index, members/ and the rest; every file counted once, so the parts add up to the total. 'payload' is "
            "the tensors' bytes the index counts (the shared budget), 'files' the files' sizes. A root with no "
            "index is read from its manifests.\n" + READ_ONLY
        ),
    )
    du.add_argument("--json", action="store_true", help="one JSON object, in bytes")
    du.set_defaults(run=_cmd_du)

    stats = command(
        "stats",
        "who uses a root now",
        wrap(
            "Its members (the caches open on it: PID, host, when opened, read-only, alive or dead), the leases "
            "(reads in progress), the reservations (writes in progress), the entries' count and bytes, and the "
            "uses counted.\n" + READ_ONLY
        ),
    )
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(run=_cmd_stats)


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
