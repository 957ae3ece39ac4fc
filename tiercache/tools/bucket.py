"""The ops commands on an object tier's bucket: `tiercache ls / du / verify / gc s3://BUCKET[/PREFIX]`.

They open the bucket as the object tier does (credentials from the environment, `--endpoint` and `--region` as in
`[tiers.object]`) and read or sweep it through the tier's own code, so they see exactly what a cache would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from ..policy.schema import ObjectBudget
from ..tiers.base import DataPath
from ..tiers.object import ObjectTier
from ..units import format_size
from .root import ago, show_key


def is_bucket(root: str) -> bool:
    return root.startswith("s3://")


@contextlib.contextmanager
def opened(args: argparse.Namespace, *, read_only: bool) -> Iterator[ObjectTier]:
    budget = ObjectBudget(
        capacity=1 << 62, url=args.root, endpoint=args.endpoint, region=args.region, list_every_s=3600.0
    )
    tier = ObjectTier("object", budget, DataPath(torch.device("cpu"), read_only=read_only))
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
        print(
            f"{args.root}: {usage['entries']} entries, {format_size(usage['payload'])} of tensors; "
            f"{usage['objects']} objects, {format_size(usage['stored'])} stored (checksums, metadata and objects "
            "not yet swept included)"
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
