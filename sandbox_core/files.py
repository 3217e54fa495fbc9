"""The host half of the files crossing: ``pool.files`` (and through it ``sandbox cp`` and the
service's file routes).

Every transfer runs **inside the user's sandbox**: the host starts the inside half
(:mod:`sandbox_core.inside.files`, named by :data:`~sandbox_core.shared.FILES_ENTRY`) as an
``exec`` in the user's worker, and the tree travels as a tar stream on the worker's raw byte
pipes (stdin for uploads, stdout for downloads). So files land owned by the user's uid, under
every layer of the sandbox, and the host never opens, chmods or chowns a path inside a
workspace: a symlink the sandbox planted cannot redirect a host write. What the host unpacks
itself (a download into a local directory) goes through :func:`sandbox_core.tarstream.unpack`,
which never follows a symlink and never writes through an existing entry.

Bounded: ``limits.transfer_mb`` per transfer (both directions, counted on the host and inside),
the worker's pipes (a slow side slows the other), the workspace's disk quota inside (a full
quota is a :class:`FileTransferError` with ``reason = "quota"``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import json
import os
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from sandbox_core import tarstream
from sandbox_core.errors import FileTransferError, LimitExceeded
from sandbox_core.events import Event
from sandbox_core.requests import ExecRequest
from sandbox_core.shared import FILES_ENTRY

if TYPE_CHECKING:
    from sandbox_core.config import ProcessSandboxConfig

_MB = 1024 * 1024
SMALL_OUTPUT = 16 * _MB
"""Most a listing, a stat or an error message may be (they are JSON, not trees)."""
_AHEAD = 8
"""Chunks a packing or unpacking thread may run ahead of the pipe."""


class _Pool(Protocol):
    config: ProcessSandboxConfig

    def execute_stream(self, user_id: str, request: ExecRequest) -> AsyncGenerator[Event, None]: ...


def files_argv(config: ProcessSandboxConfig, *args: str) -> tuple[str, ...]:
    """The command that runs the inside half with ``args`` in a worker of this profile."""
    from sandbox_core.isolation.launch import worker_python

    python, package_root = worker_python(config)
    boot = f"import sys; sys.path.insert(0, {package_root!r}); from {FILES_ENTRY} import main; main()"
    return (python, "-I", "-S", "-B", "-c", boot, *args)  # -B: as the worker (spec.python_argv)


class PoolFiles:
    """Files in and out of users' workspaces (``pool.files``); paths are workspace-relative."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool

    @property
    def _limit(self) -> int:
        return self._pool.config.limits.transfer_mb * _MB

    # ------------------------------------------------------------------ streams

    async def upload_tar(self, user_id: str, dest: str, stream: AsyncIterable[bytes], *,
                         into: bool = True) -> dict[str, Any]:  # fmt: skip
        """Unpack a tar stream at ``dest`` in ``user_id``'s workspace; its summary.

        ``into``: the stream's entries go below directory ``dest`` (made if missing); else
        ``cp -r`` rules (into ``dest`` if it is a directory, else the stream's one top entry
        becomes ``dest``).
        """
        _parts(dest)
        args = ["put", dest, *(["--into"] if into else [])]
        if self._limit:
            args += ["--max-bytes", str(self._limit)]
        stdin = self._counted(stream)
        out, _ = await self._run(user_id, args, stdin=stdin)
        return _json(out).get("summary", {})  # type: ignore[no-any-return]

    async def download_tar(self, user_id: str, src: str) -> AsyncGenerator[bytes, None]:
        """A tar stream of ``src`` (a file, or a directory recursively; symlinks as symlinks)."""
        _parts(src)
        args = ["get", src, *(["--max-bytes", str(self._limit)] if self._limit else [])]
        request = ExecRequest(argv=files_argv(self._pool.config, *args), any_network=True)
        stream = self._pool.execute_stream(user_id, request)
        err = bytearray()
        sent = 0
        try:
            async for event in stream:
                if event.type == "stdout":
                    chunk = event.chunk()
                    sent += len(chunk)
                    if self._limit and sent > self._limit + _MB:  # tar headers on top of the counted bytes
                        raise self._too_large()
                    yield chunk
                elif event.type == "stderr":
                    _bounded(err, event.chunk())
                elif event.type == "done":
                    _check_done(event.data, bytes(err), user_id, src)
        finally:
            await stream.aclose()

    # ------------------------------------------------------------------ bytes and paths

    async def put(self, user_id: str, dest: str, data: bytes | str | Path, *, mode: int = 0o644) -> dict[str, Any]:
        """Write ``data`` (bytes or text) to file ``dest``, or copy local path ``data`` (a file or
        a directory, recursively) to ``dest`` with ``cp -r`` rules."""
        if isinstance(data, Path):
            return await self.upload_tar(user_id, dest, await pack_local(data), into=False)
        raw: bytes = data if isinstance(data, bytes) else str(data).encode()
        if not _parts(dest):
            raise FileTransferError("put bytes needs a file name", data={"reason": "usage"})
        return await self.upload_tar(user_id, dest, produced(lambda out: _one_file(out, "f", raw, mode)), into=False)

    async def get(self, user_id: str, src: str) -> bytes:
        """The bytes of file ``src`` (up to ``limits.transfer_mb``)."""
        return await first_file(self.download_tar(user_id, src), src)

    async def get_path(self, user_id: str, src: str, local: Path) -> dict[str, Any]:
        """Copy ``src`` to local path ``local`` with ``cp -r`` rules (into it when it is a directory).

        The stream comes from a sandbox, so it is unpacked as untrusted: below ``local`` only,
        never following a symlink, never writing through an existing entry.
        """
        return await unpack_local(self.download_tar(user_id, src), local, self._limit)

    async def list(self, user_id: str, path: str = ".") -> list[dict[str, Any]]:
        """The entries of directory ``path``: name, type, size, mode, mtime (symlinks not followed)."""
        out, _ = await self._run(user_id, ["list", path])
        rows = _json(out)
        return rows if isinstance(rows, list) else []

    async def stat(self, user_id: str, path: str) -> dict[str, Any]:
        """``path``'s type, size, mode and mtime (a symlink's own, with its ``target``)."""
        out, _ = await self._run(user_id, ["stat", path])
        info = _json(out)
        return info if isinstance(info, dict) else {}

    async def remove(self, user_id: str, path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink, an empty directory, or (``recursive``) a tree."""
        await self._run(user_id, ["remove", path, *(["--recursive"] if recursive else [])])

    # ------------------------------------------------------------------ running the inside half

    async def _run(self, user_id: str, args: builtins.list[str], *, stdin: AsyncIterable[bytes] | None = None
                   ) -> tuple[bytes, bytes]:  # fmt: skip
        _parts(args[1])
        request = ExecRequest(argv=files_argv(self._pool.config, *args), stdin=stdin, any_network=True)
        out, err = bytearray(), bytearray()
        stream = self._pool.execute_stream(user_id, request)
        try:
            async for event in stream:
                if event.type == "stdout":
                    _bounded(out, event.chunk())
                elif event.type == "stderr":
                    _bounded(err, event.chunk())
                elif event.type == "done":
                    _check_done(event.data, bytes(err), user_id, args[1] if len(args) > 1 else "")
        finally:
            await stream.aclose()
        return bytes(out), bytes(err)

    async def _counted(self, stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in stream:
            sent += len(chunk)
            if self._limit and sent > self._limit + _MB:
                raise self._too_large()
            yield chunk

    def _too_large(self) -> LimitExceeded:
        mb = self._pool.config.limits.transfer_mb
        return LimitExceeded(f"the transfer is larger than limits.transfer_mb ({mb} MiB)",
                             data={"setting": "limits.transfer_mb", "limit": mb})


async def pack_local(local: Path) -> AsyncIterator[bytes]:
    """A tar stream of the caller's local file or tree (symlinks as symlinks), packed in a thread."""
    local = Path(await asyncio.to_thread(os.path.abspath, local))
    if not await asyncio.to_thread(os.path.lexists, local):
        raise FileTransferError(f"{local}: no such file or directory", data={"reason": "not_found"})

    def pack_path(out: IO[bytes]) -> None:
        fd = os.open(local.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            tarstream.pack(out, fd, local.name)
        finally:
            os.close(fd)

    return produced(pack_path)


async def unpack_local(stream: AsyncIterator[bytes], local: Path, limit: int = 0) -> dict[str, Any]:
    """Unpack a tar stream from a sandbox (untrusted) at local path ``local``, ``cp -r`` rules."""
    local = Path(await asyncio.to_thread(os.path.abspath, local))
    if await asyncio.to_thread(os.path.isdir, local):
        target, rename = local, None
    else:
        target, rename = local.parent, local.name
    result: dict[str, Any] = {}

    def unpack(reader: IO[bytes]) -> None:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            limits = tarstream.Limits(max_bytes=limit)
            result.update(tarstream.unpack(reader, fd, [], rename=rename, limits=limits).as_dict())
        finally:
            os.close(fd)

    await _consumed(stream, unpack)
    return result


async def first_file(stream: AsyncIterator[bytes], src: str) -> bytes:
    """The bytes of the one regular file a tar stream holds."""
    holder: dict[str, bytes] = {}

    def take(reader: IO[bytes]) -> None:
        import tarfile

        with tarfile.open(fileobj=reader, mode="r|", bufsize=tarstream.STREAM_BUFFER) as archive:
            for member in archive:
                if not member.isreg():
                    raise tarstream.TransferError(f"{src}: not a regular file", "not_a_file", src)
                extracted = archive.extractfile(member)
                assert extracted is not None
                holder["data"] = extracted.read()
                return

    await _consumed(stream, take)
    if "data" not in holder:
        raise FileTransferError(f"{src}: not a regular file", data={"reason": "not_a_file", "path": src})
    return holder["data"]


def _parts(path: str) -> list[str]:
    """A workspace path's components, or FileTransferError (absolute, ``..``, NUL)."""
    try:
        return tarstream.split_path(path)
    except tarstream.TransferError as exc:
        raise FileTransferError(str(exc), data={"reason": exc.reason, "path": path}) from None


def _bounded(buf: bytearray, chunk: bytes) -> None:
    if len(buf) + len(chunk) > SMALL_OUTPUT:
        raise FileTransferError("the sandbox's answer is larger than a listing may be", data={"reason": "too_large"})
    buf += chunk


def _json(out: bytes) -> Any:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        raise FileTransferError(f"unexpected answer from the sandbox: {out[-200:]!r}",
                                data={"reason": "protocol"}) from None


def _check_done(done: dict[str, Any], err: bytes, user_id: str, path: str) -> None:
    """Raise for a transfer that did not succeed, with the inside half's own words."""
    code = done.get("exit_code")
    if code == 0:
        return
    reason, message = "failed", ""
    for line in reversed(err.decode(errors="replace").strip().splitlines()):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "error" in obj:
                reason, message, path = str(obj.get("reason")), str(obj["error"]), str(obj.get("path") or path)
                break
    if not message:
        killed = done.get("kill_reason")
        tail = err.decode(errors="replace").strip()[-300:]
        message = f"the transfer was killed: {killed}" if killed else f"the transfer failed (exit {code}): {tail}"
    if reason == "too_large":
        raise LimitExceeded(message, data={"setting": "limits.transfer_mb", "user_id": user_id, "path": path})
    raise FileTransferError(message, data={"reason": reason, "path": path, "user_id": user_id})


def _one_file(out: IO[bytes], name: str, data: bytes, mode: int) -> None:
    import tarfile
    import time

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=tarstream.STREAM_BUFFER) as archive:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode & 0o777, int(time.time())
        archive.addfile(info, io.BytesIO(data))


class _QueueWriter(io.RawIOBase):
    """A write-only file whose chunks go to a bounded queue (read by the event loop)."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        self._put = put

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if chunk:
            self._put(chunk)
        return len(chunk)


async def produced(fill: Callable[[IO[bytes]], None]) -> AsyncIterator[bytes]:
    """The bytes ``fill(file)`` writes, produced in a thread at most :data:`_AHEAD` chunks ahead."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
    room = threading.Semaphore(_AHEAD)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        while not room.acquire(timeout=0.5):
            if stop.is_set():
                raise EOFError("the consumer went away")
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(chunks.put_nowait, item)

    def run() -> None:
        try:
            fill(io.BufferedWriter(_QueueWriter(put), 256 * 1024))
            put(None)
        except EOFError:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            with contextlib.suppress(EOFError):
                put(exc)

    thread = threading.Thread(target=run, name="sandbox-pack", daemon=True)
    thread.start()
    try:
        while True:
            item = await chunks.get()
            room.release()
            if item is None:
                return
            if isinstance(item, BaseException):
                if isinstance(item, tarstream.TransferError):
                    raise FileTransferError(str(item), data={"reason": item.reason, "path": item.path}) from item
                raise item
            yield item
    finally:
        stop.set()


class _QueueReader(io.RawIOBase):
    """A read-only file fed chunk by chunk from the event loop through a bounded queue."""

    def __init__(self, source: queue.Queue[bytes]) -> None:
        self._source = source
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._rest:
            self._rest = self._source.get()
            if not self._rest:
                return 0
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


def _put_while(source: queue.Queue[bytes], item: bytes, done: threading.Event) -> None:
    """Put ``item`` on ``source``, waiting for room as long as its reader runs."""
    while not done.is_set():
        try:
            source.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


async def _consumed(stream: AsyncIterator[bytes], take: Callable[[IO[bytes]], None]) -> None:
    """Feed ``stream`` to ``take(file)`` running in a thread (bounded: :data:`_AHEAD` chunks).

    The stream is read to its end even when ``take`` stops early or fails, so that the inside
    half's own error (which comes last) is the one raised.
    """
    source: queue.Queue[bytes] = queue.Queue(maxsize=_AHEAD)
    finished = threading.Event()
    reader = io.BufferedReader(_QueueReader(source), 256 * 1024)

    def run() -> None:
        try:
            take(reader)
        finally:
            finished.set()

    worker = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        async for chunk in stream:
            if not finished.is_set():
                await asyncio.to_thread(_put_while, source, chunk, finished)
        if not finished.is_set():
            await asyncio.to_thread(_put_while, source, b"", finished)
        await worker
    except tarstream.TransferError as exc:
        raise FileTransferError(str(exc), data={"reason": exc.reason, "path": exc.path}) from None
    finally:
        finished.set()  # a reader still waiting gets its end of file
        with contextlib.suppress(queue.Full):
            source.put_nowait(b"")
        with contextlib.suppress(BaseException):
            await worker
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()


__all__ = ["PoolFiles", "files_argv", "first_file", "pack_local", "produced", "unpack_local"]
