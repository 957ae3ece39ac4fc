"""The object tier's store: a thin wrapper over obstore's S3 client for the bucket a policy's `[tiers.object]` names,
with its timeouts and retries, and every failure turned into the cache's errors (a StorageError that names the
server, the bucket, the object and what to do; a missing object is `Missing`). A chunk is one object: written in
parts (multipart) and read in ranged parts in parallel once larger than `part_size`.

obstore (the Rust object_store crate) does the signing, retries, multipart uploads and parallel ranged reads; its
calls release the GIL, so the tier's threads keep several requests in flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch

from ...errors import StorageError
from ...policy.schema import ObjectBudget
from ..nvme.format import CHECKSUM_BYTES
from .store import Damaged, Exists, Listed, Missing, Store

try:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, UnauthenticatedError
    from obstore.store import S3Store
except ImportError:  # the `s3` extra is not installed
    obstore = None  # type: ignore[assignment]


class Bucket(Store):
    """The objects under one `s3://BUCKET/PREFIX`: paths given and returned are relative to the prefix."""

    def __init__(self, budget: ObjectBudget) -> None:
        if obstore is None:
            raise StorageError(
                "object tier: obstore is not installed; pip install 'tiercache-gpu[s3]' (or remove [tiers.object])"
            )
        self.budget = budget
        self.where = f"{budget.url} at {budget.endpoint or 'AWS ' + budget.region}"
        self._prefix = budget.prefix + "/" if budget.prefix else ""
        key_id, secret = os.environ.get(budget.access_key_env), os.environ.get(budget.secret_key_env)
        if not key_id or not secret:
            missing = [n for n, v in ((budget.access_key_env, key_id), (budget.secret_key_env, secret)) if not v]
            raise StorageError(
                f"object tier ({self.where}): the environment has no {' or '.join(missing)}; export the bucket's "
                "credentials there (tiers.object.access_key_env / secret_key_env name the variables)"
            )
        config: dict[str, Any] = {"region": budget.region, "access_key_id": key_id, "secret_access_key": secret}
        if budget.endpoint:
            config["endpoint"] = budget.endpoint
        self.store = S3Store(
            budget.bucket,
            client_options={
                "allow_http": budget.endpoint.startswith("http://"),
                "timeout": timedelta(seconds=budget.timeout_s),
                "connect_timeout": timedelta(seconds=budget.connect_timeout_s),
            },
            retry_config={
                "max_retries": budget.retries,
                "retry_timeout": timedelta(seconds=budget.timeout_s * (budget.retries + 1)),
                "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
            },
            **config,
        )
        # an entry's chunks, `concurrency` at a time; the ranged reads of one large chunk on a pool of their own,
        # since the chunk reads that wait for them hold the first pool's threads
        self._chunks = ThreadPoolExecutor(budget.concurrency, thread_name_prefix="tiercache-object-chunk")
        self._parts = ThreadPoolExecutor(budget.concurrency, thread_name_prefix="tiercache-object-part")

    def _path(self, path: str) -> str:
        return self._prefix + path

    def put(  # also parts, for put_chunks
        self, path: str, data: bytes | memoryview | Iterable[memoryview], *, create: bool = False
    ) -> None:
        """Write one object whole (atomic: readers see all of it or nothing); `create`: only if it is absent (the
        commit point of an entry), else Exists. Large or piecewise data goes up as a multipart upload."""
        multipart = not isinstance(data, bytes | memoryview) or len(data) > self.budget.part_size
        try:
            obstore.put(
                self.store,
                self._path(path),
                data,
                mode="create" if create else "overwrite",
                use_multipart=multipart,
                chunk_size=self.budget.part_size,
                max_concurrency=self.budget.concurrency,
            )
        except AlreadyExistsError:
            raise Exists(path) from None
        except Exception as exc:
            raise self.error(f"writing {path}", exc) from exc

    def get(self, path: str) -> memoryview:
        try:
            return memoryview(obstore.get(self.store, self._path(path)).bytes())
        except FileNotFoundError:
            raise Missing(path) from None
        except Exception as exc:
            raise self.error(f"reading {path}", exc) from exc

    def get_range(self, path: str, start: int, end: int) -> memoryview:
        """Bytes [start, end) of one object: one request, under its own timeout (obstore's get_ranges would merge
        adjacent ranges into one request, whose timeout a large chunk outlasts)."""
        try:
            return memoryview(obstore.get_range(self.store, self._path(path), start=start, end=end))
        except FileNotFoundError:
            raise Missing(path) from None
        except Exception as exc:
            raise self.error(f"reading {path}", exc) from exc

    def put_chunks(self, chunks: Sequence[tuple[str, torch.Tensor, bytes]], written: list[str]) -> None:
        def one(path: str, data: torch.Tensor, trailer: bytes) -> None:
            view = data.numpy().data
            # small chunks go up whole (one request; the copy is cheap), large ones as parts, uncopied
            whole = data.numel() <= self.budget.part_size
            self.put(path, bytes(view) + trailer if whole else [view, memoryview(trailer)])
            written.append(path)

        for future in [self._chunks.submit(one, *chunk) for chunk in chunks]:
            future.result()

    def read_chunks(self, chunks: Sequence[tuple[str, torch.Tensor]]) -> list[bytes | None]:
        return [future.result() for future in [self._chunks.submit(self._read_chunk, *c) for c in chunks]]

    def _read_chunk(self, path: str, out: torch.Tensor) -> bytes | None:
        total, part = out.numel() + CHECKSUM_BYTES, self.budget.part_size
        starts = list(range(0, total, part))
        if len(starts) == 1:
            pieces = [self.get_range(path, 0, total)]
        else:  # one request per part, in parallel, each under its own timeout
            futures = [self._parts.submit(self.get_range, path, s, min(s + part, total)) for s in starts]
            pieces = [future.result() for future in futures]
        if sum(len(p) for p in pieces) != total:
            raise Damaged(f"{path} holds {sum(len(p) for p in pieces)} bytes, not {total}")
        view, at = out.numpy().data, 0
        for piece in pieces:
            take = max(0, min(len(piece), out.numel() - at))
            view[at : at + take] = piece[:take]
            at += len(piece)
        # the trailer: the last 4 bytes, which may straddle the last two pieces (parts are >= 5 MiB)
        return b"".join(bytes(p[-CHECKSUM_BYTES:]) for p in pieces[-2:])[-CHECKSUM_BYTES:]

    def chunk_objects(self, path: str, nbytes: int) -> list[str]:
        return [path]

    def close(self) -> None:
        self._chunks.shutdown(wait=True)
        self._parts.shutdown(wait=True)

    def delete(self, paths: Sequence[str]) -> None:
        try:
            obstore.delete(self.store, [self._path(p) for p in paths])
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self.error(f"removing {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}", exc) from exc

    def objects(self, prefix: str) -> Iterator[Listed]:
        skip = len(self._prefix)
        try:
            for batch in obstore.list(self.store, prefix=self._path(prefix), chunk_size=1000):
                for meta in batch:
                    yield Listed(meta["path"][skip:], meta["size"], meta["last_modified"])
        except Exception as exc:
            raise self.error(f"listing {prefix}", exc) from exc

    def folders(self, prefix: str) -> list[str]:
        """The "directories" one level below `prefix` (one request per 1000, however many objects each holds)."""
        skip = len(self._prefix)
        try:
            listed = obstore.list_with_delimiter(self.store, prefix=self._path(prefix))
        except Exception as exc:
            raise self.error(f"listing {prefix}", exc) from exc
        return [p[skip:].rstrip("/") for p in listed["common_prefixes"]]

    def error(self, doing: str, exc: BaseException) -> StorageError:
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
            fix = (
                f"the server refused the credentials: check ${self.budget.access_key_env} and "
                f"${self.budget.secret_key_env}, and that they may read and write {self.budget.url}"
            )
        else:
            fix = (
                f"check that the server answers at {self.budget.endpoint or 'AWS'} and the bucket exists; "
                f"tiers.object.timeout_s ({self.budget.timeout_s:g}) and retries ({self.budget.retries}) bound the wait"
            )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(f"object tier ({self.where}): {doing} failed: {first[:300]}; {fix}")
