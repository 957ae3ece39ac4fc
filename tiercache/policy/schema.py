"""Policy: the typed, validated configuration of a cache, read from a TOML file under `policies/`.

Each setting is declared once, as a dataclass field whose metadata says how to read and check it; the TOML loader
and direct construction (`Policy(...)`, `Policy.from_dict(...)`) go through the same checks. A file may extend
another with a top-level `base = "h100"` (a preset name, or a path relative to the file): the base's tables are
merged under the file's key by key, and each file is checked on its own.
"""

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from ..errors import PolicyError
from ..units import SIZE_FORMS, parse_size

# Fastest first; eviction demotes one step to the right. The tiers on shared stores, "remote" (a Mooncake Store)
# and "object" (an S3 bucket), are off unless a policy gives them a capacity: a tier whose capacity is 0 admits
# nothing.
TIER_NAMES: tuple[str, ...] = ("hbm", "host", "remote", "nvme", "object")
SHARED_TIERS: tuple[str, ...] = ("remote", "object")

PRESET_DIRS: tuple[Path, ...] = (
    Path(__file__).resolve().parent.parent / "policies",  # inside an installed wheel
    Path(__file__).resolve().parents[2] / "policies",  # a source checkout or an editable install
)


def _size(*, default: int | None, optional: bool = False, doc: str) -> Any:
    return field(default=default, metadata={"kind": "size", "optional": optional, "doc": doc})


def _int(*, default: int, minimum: int, doc: str) -> Any:
    return field(default=default, metadata={"kind": "int", "min": minimum, "doc": doc})


def _seconds(*, default: float, doc: str) -> Any:
    return field(default=default, metadata={"kind": "seconds", "doc": doc})


def _bool(*, default: bool, doc: str) -> Any:
    return field(default=default, metadata={"kind": "bool", "doc": doc})


def _choice(*, default: str, doc: str) -> Any:
    """A setting whose values are its `Literal` type's (the one list of them)."""
    return field(default=default, metadata={"kind": "choice", "doc": doc})


def _text(*, default: str, doc: str) -> Any:
    return field(default=default, metadata={"kind": "text", "doc": doc})


def _note(*, default: str) -> Any:
    """Where a policy came from, set by the loader: not a key of the file, and no part of a policy's equality."""
    return field(default=default, compare=False, metadata={"key": False})


def _is_key(f: dataclasses.Field[Any]) -> bool:
    return f.metadata.get("key", True)  # type: ignore[no-any-return]


BASE_DOC = (
    "a preset name or a policy file (a path relative to this file) that this file extends: the base's tables are "
    "merged under this file's key by key, this file's values winning (name, description and profile included)"
)


IoMode = Literal["auto", "o_direct", "buffered"]
NvmeBackend = Literal["auto", "posix", "kvikio"]
EvictionRule = Literal["lru", "lfu", "fifo", "gdsf"]  # policy/eviction.py registers one class for each
PlacementRule = Literal["size"]  # policy/placement.py registers one class for each
OnFull = Literal["demote", "next_tier"]
WriteMode = Literal["back", "through", "behind"]


def _hints(section: type) -> dict[str, Any]:
    """A section's field types. This module's annotations are objects, not strings (no `from __future__ import
    annotations`): typing.get_type_hints compiled each string, in every new process's first policy load. A section
    declared elsewhere with string annotations still has them evaluated."""
    hints = {f.name: f.type for f in dataclasses.fields(section)}
    if any(isinstance(hint, str) for hint in hints.values()):
        hints = typing.get_type_hints(section)
    return hints


def choices(section: type, name: str) -> tuple[str, ...]:
    """The values a choice setting allows: the arguments of its Literal type."""
    return typing.get_args(_hints(section)[name])


class _Section:
    """Normalises and checks every field of a frozen dataclass from its metadata (sizes parsed, types checked).

    Messages name the field; the TOML loader prefixes the table path and the file.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("kind") == "choice":
                allowed = typing.get_args(hints[f.name])
                if value not in allowed:
                    raise PolicyError(f"{f.name}: {value!r} is not one of {', '.join(map(repr, allowed))}")
            elif "kind" in f.metadata:
                object.__setattr__(self, f.name, _check(f.metadata, value, f.name))
            elif _is_key(f) and not isinstance(value, hints[f.name]):
                raise PolicyError(f"{f.name}: expected a {hints[f.name].__name__}, got {value!r}")


def _check(meta: Mapping[str, Any], value: Any, where: str) -> Any:
    kind = meta["kind"]
    if kind == "size":
        if value is None and meta["optional"]:
            return None
        try:
            return parse_size(value)
        except ValueError as exc:
            raise PolicyError(f"{where}: {exc}") from None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < meta["min"]:
            raise PolicyError(f"{where}: expected an integer >= {meta['min']}, got {value!r}")
        return value
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise PolicyError(f"{where}: expected a number of seconds >= 0, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise PolicyError(f"{where}: expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class TierBudget(_Section):
    """A tier's byte budget. Budgets count tensor payload bytes, in every tier alike."""

    capacity: int = _size(
        default=0,
        doc='bytes of tensor data the tier may hold; 0 disables the tier. Under policy="auto" (the default) the '
        "preset's, scaled down to what the machine has free (docs/design.md); a file's or preset's that is more "
        "than the machine has is refused",
    )
    max_entry: int | None = _size(
        default=None,
        optional=True,
        doc="entries larger than this skip the tier (placement and demotion); default: the capacity",
    )

    def admits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` may live in this tier at all."""
        limit = self.capacity if self.max_entry is None else min(self.max_entry, self.capacity)
        return nbytes <= limit and self.capacity > 0


@dataclass(frozen=True)
class HostBudget(TierBudget):
    """The host tier: a budget, allocated once as a pool when the cache opens."""

    pinned: bool = _bool(
        default=True,
        doc="page-lock the host pool once at open where CUDA works (full-speed DMA; the memory cannot be swapped)",
    )


@dataclass(frozen=True)
class NvmeBudget(TierBudget):
    """The nvme tier: a budget plus how its files are read and written."""

    io: IoMode = _choice(
        default="auto",
        doc="'o_direct' (O_DIRECT), 'buffered' (page cache) or 'auto' (O_DIRECT where the filesystem allows it)",
    )
    backend: NvmeBackend = _choice(
        default="auto",
        doc="'kvikio' (cuFile/GDS straight to and from GPU memory), 'posix' (threaded preadv/pwritev via host "
        "memory) or 'auto' (kvikio where CUDA and kvikio work, else posix)",
    )
    threads: int = _int(default=4, minimum=1, doc="I/O threads reading and writing one entry in parallel")
    task_size: int = _size(default=8 << 20, doc="bytes one I/O call moves; a multiple of 4 KiB")
    verify_checksums: bool = _bool(default=True, doc="check each tensor's CRC32C when it is read back")
    removal_grace_s: float = _seconds(
        default=1.0,
        doc="seconds a removed entry's chunks stay after its metadata is gone, for a zarr-python reader that opened it "
        "just before (not counted in the budget meanwhile: the disk may hold that much more); 0: removed at once",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_size == 0 or self.task_size % 4096 or self.task_size > 1 << 30:
            raise PolicyError(f"task_size: {self.task_size} is not a multiple of 4 KiB (4096) between 4KiB and 1GiB")
        if self.threads > 256:
            raise PolicyError(f"threads: {self.threads} is more than 256; each thread keeps a task_size buffer")


@dataclass(frozen=True)
class StoreBudget(TierBudget):
    """What every tier over a shared store (the object and remote tiers) has: the budget is a quota over every entry
    under the tier's prefix, whoever wrote it, and other caches' entries are found by listing."""

    timeout_s: float = _seconds(default=30.0, doc="seconds one request may take before it fails (a StorageError)")
    concurrency: int = _int(default=8, minimum=1, doc="requests one put or get keeps in flight")
    list_every_s: float = _seconds(
        default=1.0, doc="how often a cache lists the store for entries other caches wrote or removed"
    )
    orphan_age_s: float = _seconds(
        default=3600.0,
        doc="objects of an entry with no manifest (a writer died mid-put) older than this are removed",
    )
    keep_replaced_s: float = _seconds(
        default=30.0,
        doc="how long a version of a key stays in the store after a newer one committed, for readers in other caches "
        "that already hold it (a read that outlasts it is a miss, never wrong data); outside the quota meanwhile: the "
        "store may hold that much more",
    )
    verify_checksums: bool = _bool(default=True, doc="check each tensor's CRC32C when it is read back")


@dataclass(frozen=True)
class ObjectBudget(StoreBudget):
    """The object tier: entries in an S3 bucket (any S3-compatible server), shared by every cache that names it and
    durable; the budget is a quota over everything under `url`, whoever wrote it. Credentials come from the
    environment, never from the file."""

    url: str = _text(default="", doc='where entries live: "s3://BUCKET" or "s3://BUCKET/PREFIX"')
    endpoint: str = _text(default="", doc='the S3 server, e.g. "http://10.0.0.5:8333"; empty: AWS for the region')
    region: str = _text(default="us-east-1", doc="the bucket's region (what the request signatures name)")
    access_key_env: str = _text(default="AWS_ACCESS_KEY_ID", doc="the environment variable holding the access key id")
    secret_key_env: str = _text(
        default="AWS_SECRET_ACCESS_KEY", doc="the environment variable holding the secret access key"
    )
    connect_timeout_s: float = _seconds(default=5.0, doc="seconds to wait for a connection to the server")
    retries: int = _int(default=2, minimum=0, doc="times a failed request is retried (with backoff) before it fails")
    part_size: int = _size(
        default=16 << 20, doc="bytes per part of a multipart upload and per ranged read of one chunk in parallel"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity > 0 and not (self.url.startswith("s3://") and len(self.url) > len("s3://")):
            raise PolicyError(
                f'url: {self.url!r} is not "s3://BUCKET[/PREFIX]", which an object tier with a capacity needs'
            )
        if self.part_size < 5 << 20:
            raise PolicyError(f"part_size: {self.part_size} is below 5MiB, the smallest part S3 accepts")

    @property
    def bucket(self) -> str:
        return self.url.removeprefix("s3://").split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The key prefix inside the bucket, without slashes at either end ("" for the whole bucket)."""
        rest = self.url.removeprefix("s3://").split("/", 1)
        return rest[1].strip("/") if len(rest) > 1 else ""


@dataclass(frozen=True)
class RemoteBudget(StoreBudget):
    """The remote tier: entries in a Mooncake Store (the memory of the `mooncake_client` holders that a
    `mooncake_master` pools across machines), shared by every cache that names the master. Volatile: what a holder
    that dies held is lost, and a master restart forgets every entry (both are misses, never wrong data)."""

    master: str = _text(default="", doc='the mooncake_master\'s RPC address, "HOST:PORT" (its -rpc_port)')
    metadata_server: str = _text(
        default="",
        doc='the transfer metadata server, e.g. "http://HOST:8080/metadata" (the master\'s, started with '
        "-enable_http_metadata_server); empty: that of the master's host on port 8080",
    )
    admin: str = _text(
        default="",
        doc='the master\'s HTTP admin server, "http://HOST:PORT" (its -metrics_port), which lists the keys; empty: '
        "the master's host on port 9003",
    )
    prefix: str = _text(default="tiercache", doc="the key prefix of this cache's entries in the store")
    local_hostname: str = _text(
        default="127.0.0.1",
        doc="the address this node's transfer engine announces and listens on (across machines: this node's IP on "
        "the network the holders share)",
    )
    protocol: str = _text(default="tcp", doc='the transfer protocol: "tcp", or "rdma" with device_names')
    device_names: str = _text(default="", doc='RDMA devices for protocol "rdma", e.g. "mlx5_0,mlx5_1"')
    preferred_segment: str = _text(
        default="",
        doc="the holder (a segment name as ADMIN/get_all_segments lists it) whose memory puts go to first: the "
        "node that reads them next; empty: wherever the master places them",
    )
    lease_s: float = _seconds(
        default=10.0,
        doc="the master's read lease (its -default_kv_lease_ttl), which messages name: a batch of `concurrency` "
        "parts is leased at once and must arrive within it, so part_size x concurrency follows from it and the "
        "slowest link",
    )
    part_size: int = _size(
        default=64 << 20, doc="bytes per store object of one tensor; an entry's parts move `concurrency` per call"
    )
    orphan_age_s: float = _seconds(
        default=120.0,
        doc="objects of an entry with no manifest (a writer died mid-put) listed this long are removed",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity > 0 and (":" not in self.master or not self.master.rsplit(":", 1)[1].isdigit()):
            raise PolicyError(f'master: {self.master!r} is not "HOST:PORT", which a remote tier with a capacity needs')
        if self.protocol not in ("tcp", "rdma"):
            raise PolicyError(f'protocol: {self.protocol!r} is not "tcp" or "rdma"')
        if self.part_size < 1 << 20:
            raise PolicyError(f"part_size: {self.part_size} is below 1MiB")
        if not self.verify_checksums:
            raise PolicyError(
                "verify_checksums: the remote tier always verifies: a removal frees memory that a reader on another "
                "node may still be reading, and the checksum is what turns that into a miss; remove the key"
            )
        if "/" in self.prefix.strip("/") or not self.prefix.strip("/"):
            raise PolicyError(f'prefix: {self.prefix!r}: one name without slashes, e.g. "tiercache"')

    @property
    def master_host(self) -> str:
        return self.master.rsplit(":", 1)[0]

    @property
    def metadata_url(self) -> str:
        return self.metadata_server or f"http://{self.master_host}:8080/metadata"

    @property
    def admin_url(self) -> str:
        return (self.admin or f"http://{self.master_host}:9003").rstrip("/")


@dataclass(frozen=True)
class Tiers(_Section):
    hbm: TierBudget = field(default_factory=lambda: TierBudget(capacity=2 << 30))
    host: HostBudget = field(default_factory=lambda: HostBudget(capacity=8 << 30))
    remote: RemoteBudget = field(default_factory=RemoteBudget)  # off (capacity 0) unless a policy sets one
    nvme: NvmeBudget = field(default_factory=lambda: NvmeBudget(capacity=100 << 30))
    object: ObjectBudget = field(default_factory=ObjectBudget)  # off (capacity 0) unless a policy sets one

    def __getitem__(self, name: str) -> TierBudget:
        if name not in TIER_NAMES:
            raise KeyError(f"no tier named {name!r}; tiers are {', '.join(TIER_NAMES)}")
        return typing.cast(TierBudget, getattr(self, name))


@dataclass(frozen=True)
class EvictionSettings(_Section):
    rule: EvictionRule = _choice(
        default="lru",
        doc="which entries a full tier demotes first: 'lru', 'lfu', 'fifo' or 'gdsf' (reload cost x hits / size)",
    )
    ttl_s: float = _seconds(
        default=0.0,
        doc="entries not used for this many seconds expire; 0: never. Memory copies go by this cache's uses; an nvme "
        "copy stays while any cache used it within the ttl (remote and object copies go by this cache's uses), "
        "and a read-only cache drops its memory copies only",
    )
    nvme_admit_after: int = _int(
        default=1, minimum=1, doc="a victim is written back to nvme only once it has been used this many times"
    )


@dataclass(frozen=True)
class PlacementSettings(_Section):
    rule: PlacementRule = _choice(default="size", doc="how a new entry's tier is chosen")
    on_full: OnFull = _choice(
        default="demote",
        doc="when the preferred tier is full: 'demote' its victims, or use the 'next_tier' down with free space",
    )
    promote_on_hit: bool = _bool(default=True, doc="move an entry up to its preferred tier when it is read")
    write: WriteMode = _choice(
        default="back",
        doc="'back': an entry reaches nvme when demoted; 'through': every put also writes it to nvme at once; "
        "'behind': a background queue writes each put down to nvme soon after (keeping the memory copy, so that its "
        "eviction is free), giving way while reads run",
    )
    flush_on_close: bool = _bool(
        default=True,
        doc="close() writes every entry not yet on nvme down to it, within its budget, so that a later process finds "
        "it (a root the user gave; a temporary root is removed at close)",
    )


@dataclass(frozen=True)
class TransferSettings(_Section):
    chunk_size: int = _size(
        default=16 << 20,
        doc="largest single copy between host and device; offloads and reloads interleave at this grain",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 4096:
            raise PolicyError(f"chunk_size: {self.chunk_size} is below 4KiB; copies that small waste the link")


@dataclass(frozen=True)
class Policy(_Section):
    """Everything a cache is configured by. Build with `Policy.load(path)`, `Policy.preset(name)`, `from_dict` or
    directly; every way runs the same checks. The profile it names is resolved by `load_policy`, once per open."""

    name: str = _text(default="custom", doc="a label shown in stats()")
    description: str = _text(default="", doc="the hardware this policy is for and where its figures come from")
    profile: str = _text(
        default="cpu", doc="the hardware profile of the cost model: a name from policies/profiles/ or a path"
    )
    tiers: Tiers = field(default_factory=Tiers)
    eviction: EvictionSettings = field(default_factory=EvictionSettings)
    placement: PlacementSettings = field(default_factory=PlacementSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    source: str = _note(default="<defaults>")  # the file, "<dict>", "<defaults>" or "auto"
    chosen: str = _note(default="")  # what policy="auto" chose for this machine, and why; empty otherwise

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Self:
        """A policy from nested mappings shaped like the TOML file; any key left out takes its default. A `base`
        path is taken relative to the current directory."""
        merged = _merge_base(data, Path.cwd(), source, ())
        try:
            built = _build(cls(), merged, "")
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        return dataclasses.replace(built, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a TOML policy file, and the files it extends."""
        path = Path(path)
        return cls.from_dict(_policy_data(path, ()), source=str(path))

    @classmethod
    def preset(cls, name: str) -> Self:
        """A preset from `policies/NAME.toml`."""
        path = preset_file(name)
        if path is None:
            raise PolicyError(
                f"no policy preset named {name!r}; presets are {', '.join(preset_names()) or 'none found'}"
            )
        return cls.load(path)


def _policy_data(path: Path, chain: tuple[Path, ...]) -> Mapping[str, Any]:
    """A policy file's table with the files it extends merged under it. `chain`: the files that extend it."""
    if not path.exists():
        raise PolicyError(f"{path}: no such policy file; presets are {', '.join(preset_names())}")
    return _merge_base(read_toml(path, "policy"), path.parent, str(path), (*chain, path.resolve()))


def _merge_base(data: Mapping[str, Any], folder: Path, source: str, chain: tuple[Path, ...]) -> Mapping[str, Any]:
    """`data` over the policy its `base` names (checked on its own first, so that an error names the file that has
    it); `data` itself where it names none. `chain`: the files already on the way here, to refuse a cycle."""
    if not isinstance(data, Mapping) or "base" not in data:
        return data
    ref = data["base"]
    if not isinstance(ref, str) or not ref:
        raise PolicyError(f"{source}: base: expected a preset name or the path of a policy file, got {ref!r}")
    if looks_like_path(ref):
        path = folder / ref
        if not path.is_file():
            raise PolicyError(f"{source}: base: {path} is not a policy file; presets are {', '.join(preset_names())}")
    else:
        found = preset_file(ref)
        if found is None:
            raise PolicyError(
                f"{source}: base: no policy preset named {ref!r}; presets are {', '.join(preset_names())} "
                "(or give the path of a .toml file, relative to this one)"
            )
        path = found
    if path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(path.resolve()) :], path.resolve()))
        raise PolicyError(f"{source}: base: the files extend each other in a cycle: {loop}")
    base = dict(_policy_data(path, chain))
    profile = base.get("profile")
    if isinstance(profile, str) and looks_like_path(profile) and (path.parent / profile).is_file():
        # A relative profile means beside the file that names it, not beside a file extending that one.
        base["profile"] = str(path.parent / profile)
    try:
        _build(Policy(), base, "")
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc} (the base of {source})") from None
    return _deep_merge(base, {k: v for k, v in data.items() if k != "base"})


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` applied: tables merged key by key, any other value replaced."""
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        both = isinstance(below, Mapping) and isinstance(value, Mapping)
        merged[key] = _deep_merge(below, value) if both else value  # type: ignore[arg-type]
    return merged


def _build(base: Any, data: Mapping[str, Any], prefix: str) -> Any:
    """`base` (a default section) with the keys of `data` applied, refusing unknown keys, recursing into tables."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{prefix.rstrip('.') or 'policy'}: must be a table, got {data!r}")
    known = [f.name for f in dataclasses.fields(base) if _is_key(f)]
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise PolicyError(f"unknown key '{prefix}{key}'; allowed here: {', '.join(known)}")
        default = getattr(base, key)
        changes[key] = _build(default, value, f"{prefix}{key}.") if isinstance(default, _Section) else value
    try:
        return dataclasses.replace(base, **changes)
    except PolicyError as exc:
        raise PolicyError(f"{prefix}{exc}") from None


def preset_files(folder: str = "") -> dict[str, Path]:
    """Preset TOML files by name, in `policies/` or a folder of it ("profiles"); the first directory found wins."""
    found: dict[str, Path] = {}
    for directory in PRESET_DIRS:
        for path in sorted((directory / folder).glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def preset_file(name: str, folder: str = "") -> Path | None:
    """The preset TOML file `name` (preset_files' pick) without listing every preset: a stat per directory."""
    if not name or Path(name).name != name:
        return None
    for directory in PRESET_DIRS:
        path = directory / folder / f"{name}.toml"
        if path.is_file():
            return path
    return None


def preset_names() -> list[str]:
    """Names of the preset policy files that can be found."""
    return sorted(preset_files())


def looks_like_path(ref: str) -> bool:
    """Whether a policy or profile reference names a file rather than a preset."""
    return ref.endswith(".toml") or "/" in ref


def resolve_policy(policy: str | Path | Policy | None) -> Policy:
    """Accept a Policy, a path to a TOML file, or a preset name; None means the 'cpu' preset, unscaled: this knows
    no machine ("auto", the cache's default, is `tiercache.policy.load_policy`'s)."""
    if policy is None:
        return Policy.preset("cpu")
    if policy == "auto":
        raise PolicyError('policy="auto" is chosen for a machine: use tiercache.policy.load_policy("auto")')
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Path) or (isinstance(policy, str) and looks_like_path(policy)):
        return Policy.load(policy)
    if isinstance(policy, str):
        return Policy.preset(policy)
    raise PolicyError(f"policy= takes a Policy, a path to a .toml file or a preset name, not {type(policy).__name__}")


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every policy key, walking the default policy; `base` (a key of the file, not of
    the policy it makes) first."""
    rows: list[tuple[str, str, str]] = [("base", repr(None), BASE_DOC)]

    def walk(section: _Section, prefix: str) -> None:
        for f in dataclasses.fields(section):  # type: ignore[arg-type]
            value = getattr(section, f.name)
            if isinstance(value, _Section):
                walk(value, f"{prefix}{f.name}.")
            elif _is_key(f):
                rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("doc", "")))

    walk(Policy(), "")
    return rows


__all__ = [
    "HostBudget",
    "NvmeBudget",
    "ObjectBudget",
    "RemoteBudget",
    "StoreBudget",
    "EvictionSettings",
    "PlacementSettings",
    "Policy",
    "SHARED_TIERS",
    "TIER_NAMES",
    "TierBudget",
    "Tiers",
    "TransferSettings",
    "preset_names",
    "resolve_policy",
    "SIZE_FORMS",
]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A policy or profile file's TOML; any way it cannot be read is a PolicyError naming the file and the fix."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{path}: a {what} file is UTF-8 text and byte {exc.start} is not; save it as UTF-8"
        ) from None
    except IsADirectoryError:
        raise PolicyError(f"{path} is a directory; give the path of a {what} file (.toml) in it") from None
    except OSError as exc:
        raise PolicyError(f"{path}: the {what} file cannot be read: {exc.strerror or exc}") from None
