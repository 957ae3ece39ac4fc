"""The ops commands on a shared tier's store: `tiercache ls / du / verify / gc` of an object tier's
s3://BUCKET[/PREFIX] or a remote tier's mooncake://MASTER_HOST:PORT[/PREFIX].

They open the store as the tier does (for a bucket: credentials from the environment, `--endpoint` and `--region`
as in `[tiers.object]`; for a Mooncake Store: `--admin` and `--metadata` as in `[tiers.remote]`) and read or sweep
it through the tier's own code, so they see exactly what a cache would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from ..policy.schema import ObjectBudget, RemoteBudget
from ..tiers.base import DataPath
from ..tiers.object import ObjectTier
from ..tiers.remote import RemoteTier
from ..units import format_size
from .root import ago, show_key


@contextlib.contextmanager
def opened(args: argparse.Namespace, *, read_only: bool) -> Iterator[ObjectTier]:
    path = DataPath(torch.device("cpu"), read_only=read_only)
    tier: ObjectTier
    if args.root.startswith("mooncake://"):
        master, _, prefix = args.root.removeprefix("mooncake://").partition("/")
        remote = RemoteBudget(
            capacity=1 << 62, master=master, prefix=prefix.strip("/") or "tiercache", admin=args.admin,
            metadata_server=args.metadata, local_hostname=args.local_hostname, list_every_s=3600.0,
        )  # fmt: skip
        tier = RemoteTier("remote", remote, path)
    else:
        budget = ObjectBudget(
            capacity=1 << 62, url=args.root, endpoint=args.endpoint, region=args.region, list_every_s=3600.0
        )
        tier = ObjectTier("object", budget, path)
    try:
        yield tier
    finally:
        tier.close()


def ls(args: argparse.Namespace) -> int:
    with opened(args, read_only=True) as tier:
        rows: list[dict[str, Any]] = [
            {
                "key": e.spec.key,
                "name": e.path.name,
                "nbytes": e.spec.nbytes,
                "tensors": len(e.spec.tensors),
                "written_ns": e.written_ns,
            }
            for e in tier.stored()
            if e.spec.key.startswith(args.prefix)
        ]
        damaged = tier.damaged()
    rows.sort(key=lambda r: r["key"])
    if args.json:
        print(json.dumps(rows, indent=1))
    for r in [] if args.json else rows:
        size, tensors, age = format_size(r["nbytes"]), r["tensors"], ago(r["written_ns"])
        print(f"{size:>10}  {tensors:>4} tensors  {age:>10}  {show_key(r['key'])}")
    if damaged:
        print(f"{len(damaged)} entries with a damaged manifest (not served): tiercache gc {args.root} removes them")
    return 0


def du(args: argparse.Namespace) -> int:
    with opened(args, read_only=True) as tier:
        entries = tier.stored()
        assert tier.bucket is not None
        objects = list(tier.bucket.objects("entries/"))
    usage = {
        "entries": len(entries),
        "payload": sum(e.spec.nbytes for e in entries),
        "objects": len(objects),
        "stored": sum(o.size for o in objects),
    }
    if args.json:
        print(json.dumps(usage, indent=1))
    else:
        stored = (
            f"{format_size(usage['stored'])} stored (checksums, metadata and objects not yet swept included)"
            if usage["stored"]
            else "(the store lists no sizes)"
        )
        print(
            f"{args.root}: {usage['entries']} entries, {format_size(usage['payload'])} of tensors; "
            f"{usage['objects']} objects, {stored}"
        )
    return 0


def verify(args: argparse.Namespace) -> int:
    with opened(args, read_only=True) as tier:
        entries = tier.stored()
        problems = {e.spec.key: why for e in entries if (why := tier.check(e)) is not None}
        damaged = tier.damaged()
    total = sum(e.spec.nbytes for e in entries)
    print(f"verified {len(entries)} entries ({format_size(total)}) in {args.root}: {len(entries) - len(problems)} good")
    for key, why in problems.items():
        print(f"does not verify: {show_key(key)}: {why}")
    for name in damaged:
        print(f"damaged manifest: entries/{name}/zarr.json")
    if problems or damaged:
        print(f"delete those keys from a cache, or put them again; tiercache gc {args.root} removes damaged manifests")
    return 1 if problems or damaged else 0


def gc(args: argparse.Namespace) -> int:
    with opened(args, read_only=args.dry_run) as tier:
        removed = tier.collect(args.grace, dry_run=args.dry_run)
    print(
        f"{'would remove' if args.dry_run else 'removed'} {removed} objects from {args.root}: of entries with no "
        f"manifest or a damaged one, and of versions a newer one replaced, {args.grace:g} s old or more"
    )
    return 0
