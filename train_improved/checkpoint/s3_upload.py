"""One file to S3 in one read, in concurrent parts, every byte checked by the server's own MD5.

Every single PUT (checkpoints up to 64 MiB, the manifest) carries a CRC32 that S3 checks on
arrival (ON_ARRIVAL), so damaged bytes are refused before an object exists; parts carry the one
botocore adds by default (CRC32 since botocore 1.36). moto's server does not check either (its
source says so), so the tests rely on the second check: S3 answers a PUT, and each part of a
multipart upload, with an ETag that is the MD5 of the bytes it stored (for objects not encrypted
with KMS or customer keys); a completed multipart object's ETag is the MD5 of its parts' MD5s,
then "-N". Comparing them with the MD5s of the bytes read here
proves the object holds exactly those bytes: what a streamed read-back would prove, without the
second transfer. Where the ETags are not such MD5s, ServerChecksumMismatch says so and the caller
verifies another way.

The object appears under its key only when complete (a PUT, or the completion of the parts), so no
reader ever sees part of it; a kill leaves at most an incomplete multipart upload, which
`abort_incomplete` removes at the next start.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from .storage import yield_cpu_to_training

SINGLE_PUT_BYTES = 64 << 20  # up to this, one PUT: a multipart upload costs more requests than it saves
PART_BYTES = 16 << 20  # S3 wants >= 5 MiB per part (but the last) and at most 10,000 parts
CONCURRENCY = 4  # parts in flight; memory held is about (CONCURRENCY + 1) x the part size
# A checksum S3 checks on arrival (it refuses the PUT when the bytes differ), whatever the client's
# request_checksum_calculation setting. botocore computes it as it sends, so it costs no extra pass.
ON_ARRIVAL = {"ChecksumAlgorithm": "CRC32"}


class ServerChecksumMismatch(Exception):
    """The server's ETag is not the MD5 of what was sent: damage in transit, or ETags that are not MD5s."""


def supports(fs: Any) -> bool:
    """Whether `fs` is s3fs (the one filesystem whose raw S3 calls this module makes)."""
    return callable(getattr(fs, "call_s3", None)) and "s3" in (fs.protocol if isinstance(fs.protocol, tuple)
                                                              else (fs.protocol,))


def put(fs: Any, remote: str, src: BinaryIO, size: int, on_bytes: Callable[[bytes], None],
        before_commit: Callable[[], None]) -> None:
    """Upload `size` bytes of `src` to `remote`, each chunk passed to `on_bytes` as it is read.

    `before_commit()` runs once every byte has been read and sent, before the object appears under
    its key: it raises to abandon the upload (the bytes read were not the file they should be).
    Raises ServerChecksumMismatch (nothing left under the key) if an ETag differs from our MD5.
    """
    bucket, key, _ = fs.split_path(remote)
    if size <= SINGLE_PUT_BYTES:
        body = _read(src, size)
        on_bytes(body)
        before_commit()
        with ThreadPoolExecutor(1, "checkpoint-mirror-md5", initializer=yield_cpu_to_training) as pool:
            md5 = pool.submit(lambda: hashlib.md5(body, usedforsecurity=False).hexdigest())  # while it travels
            etag = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **ON_ARRIVAL)["ETag"]
        if _unquote(etag) != md5.result():
            _remove(fs, bucket, key)
            raise ServerChecksumMismatch(f"{remote}: the server's ETag {etag} is not the MD5 of the bytes sent")
        return
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    try:
        md5s = _put_parts(fs, bucket, key, upload_id, src, size, max(PART_BYTES, -(-size // 10_000)), on_bytes)
        before_commit()
        parts = [{"PartNumber": n, "ETag": f'"{m.hex()}"'} for n, m in enumerate(md5s, start=1)]
        etag = fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                          MultipartUpload={"Parts": parts})["ETag"]
    except BaseException:
        _abort(fs, bucket, key, upload_id)
        raise
    expected = f"{hashlib.md5(b''.join(md5s), usedforsecurity=False).hexdigest()}-{len(md5s)}"
    if _unquote(etag) != expected:
        _remove(fs, bucket, key)
        raise ServerChecksumMismatch(f"{remote}: the server's ETag {etag} is not {expected}, the MD5 of the parts")


def _put_parts(fs: Any, bucket: str, key: str, upload_id: str, src: BinaryIO, size: int, part_bytes: int,
               on_bytes: Callable[[bytes], None]) -> list[bytes]:
    """Send the parts, CONCURRENCY at a time, reading the next while the others travel; their MD5s in order."""

    def send(number: int, body: bytes) -> bytes:  # hashed here: the parts' MD5s are computed in parallel
        md5 = hashlib.md5(body, usedforsecurity=False)
        etag = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                          Body=body)["ETag"]
        if _unquote(etag) != md5.hexdigest():
            raise ServerChecksumMismatch(f"part {number}: the server's ETag {etag} is not the MD5 of the bytes sent")
        return md5.digest()

    md5s: list[bytes] = []
    inflight: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(CONCURRENCY, "checkpoint-mirror-part", initializer=yield_cpu_to_training) as pool:
        try:
            for number, offset in enumerate(range(0, size, part_bytes), start=1):
                body = _read(src, min(part_bytes, size - offset))
                on_bytes(body)
                inflight.append(pool.submit(send, number, body))
                del body
                while len(inflight) >= CONCURRENCY:
                    md5s.append(inflight.popleft().result())
            while inflight:
                md5s.append(inflight.popleft().result())
        finally:
            for future in inflight:
                future.cancel()
    return md5s


class PreconditionFailed(Exception):
    """A conditional PUT found another version of the object than the one it was told to replace."""


def get_with_etag(fs: Any, remote: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag of that very version (one GET), or None if there is no such object."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(remote)

    async def get() -> tuple[bytes, str] | None:
        try:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)  # noqa: SLF001 - s3fs's own call path
        except FileNotFoundError:
            return None
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def put_if(fs: Any, remote: str, body: bytes, etag: str | None) -> str:
    """PUT `body` only if the object is still the version `etag` (None: only if there is none); its new ETag.

    S3's conditional writes (If-Match / If-None-Match, 2024), which moto's server implements too;
    the server checks the bytes against Content-MD5 before the object exists. Raises
    PreconditionFailed when another writer replaced (or removed) the object since.
    """
    bucket, key, _ = fs.split_path(remote)
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **ON_ARRIVAL, **condition)["ETag"]
    except (FileExistsError, FileNotFoundError) as e:  # s3fs's words for If-None-Match, and If-Match on no object
        raise PreconditionFailed(str(e)) from None
    except OSError as e:
        response = getattr(e.__cause__, "response", None) or {}  # s3fs keeps botocore's error as the cause
        if response.get("Error", {}).get("Code") == "PreconditionFailed" or \
                response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
            raise PreconditionFailed(str(e)) from None
        raise
    finally:
        fs.invalidate_cache(remote)


def abort_incomplete(fs: Any, prefix: str) -> None:
    """Abort the multipart uploads a killed process left under `prefix` (never completed, never listed)."""
    bucket, key_prefix, _ = fs.split_path(prefix)
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix).get("Uploads", [])
    for upload in uploads:
        _abort(fs, bucket, upload["Key"], upload["UploadId"])


def _read(src: BinaryIO, n: int) -> bytes:
    body = src.read(n)
    if len(body) != n:
        raise OSError(f"the file ended {n - len(body)} bytes early while being uploaded")
    return body


def _unquote(etag: str) -> str:
    return etag.strip('"').lower()


def _abort(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception:  # noqa: BLE001 - already gone, or the endpoint is down: the next start aborts it
        pass


def _remove(fs: Any, bucket: str, key: str) -> None:
    fs.call_s3("delete_object", Bucket=bucket, Key=key)
