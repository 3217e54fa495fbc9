"""A fake ``sandbox serve`` run as another uid: it records what clients send and forges answers.

:func:`serve` (as the impostor's uid) creates the socket's directory if needed, listens
(socket mode 0777, so any uid may connect), prints ``ready``, then serves one connection
at a time. Per connection it prints ``connect``, then ``bytes N`` (what the client sent, up
to the end of one request), and answers like the service would: a health document, or an
exec whose stream says ``forged`` and exit 0. A connection that sends ``SYNC`` first only
prints ``sync``: since connections are served in order, everything before it is recorded.

:class:`Impostor` starts it and reads the record (no sleeps: the sync connection is the
barrier).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HEALTH = json.dumps({"status": "ok", "profile": "strict", "draining": False}).encode()
FORGED = (
    b'id: 1\nevent: started\ndata: {"run_id": "run_forged", "method": "exec", "user_id": "x"}\n\n'
    b'id: 2\nevent: stdout\ndata: {"data": "forged\\n"}\n\n'
    b'id: 3\nevent: done\ndata: {"exit_code": 0}\n\n'
)


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP request (headers and a Content-Length body), or what came before EOF."""
    data = b""
    while b"\r\n\r\n" not in data and not data.startswith(b"SYNC"):
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            while len(body) < int(value):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
                data += chunk
    return data


def _answer(request: bytes) -> bytes:
    if request.startswith(b"POST /v1/runs/exec"):
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-run-id: run_forged\r\n"
        return head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(FORGED) + FORGED
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    return head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(HEALTH) + HEALTH


def serve(path: Path) -> None:
    path.parent.mkdir(mode=0o755, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o777)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            try:
                request = _read_request(conn)
            except OSError:
                request = b""
            if request.startswith(b"SYNC"):
                print("sync", flush=True)
                continue
            print("connect", flush=True)
            print(f"bytes {len(request)}", flush=True)
            if request:
                print("request " + request.split(b"\r\n", 1)[0].decode(errors="replace"), flush=True)
                if b"argv" in request:
                    print("argv " + request.rsplit(b"\r\n\r\n", 1)[-1].decode(errors="replace"), flush=True)
                try:
                    conn.sendall(_answer(request))
                except OSError:
                    pass


@dataclass
class Record:
    """What the impostor saw: connections, request bytes, request lines and argv bodies."""

    connections: int = 0
    received: int = 0
    lines: list[str] = field(default_factory=list)


class Impostor:
    """:func:`serve` at ``path`` in a forked child running as ``uid`` (a context manager).

    Forked rather than started as a script: this machine's interpreter lives where other
    uids cannot reach it, so the child switches uid and serves without exec'ing.
    """

    def __init__(self, path: Path, uid: int) -> None:
        self.path = path
        self.uid = uid
        self.pid: int | None = None
        self.out: IO[str] | None = None

    def __enter__(self) -> Impostor:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(self.uid)
                os.setuid(self.uid)
                sys.stdout = os.fdopen(write_end, "w")
                serve(self.path)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        self.pid, self.out = pid, os.fdopen(read_end)
        line = self.out.readline()  # bounded: the child prints ready or exits (EOF)
        if line != "ready\n":  # the child has exited: reap it and close our end, then say so
            self.out.close()
            os.waitpid(pid, 0)
            raise AssertionError(f"impostor did not start: {line!r} (its traceback is on stderr)")
        return self

    def move_to(self, dest: Path, owner: int = 0) -> None:
        """Move the listening socket to ``dest``, owned by ``owner``: on disk it looks like the service's."""
        os.rename(self.path, dest)
        os.chown(dest, owner, owner)
        self.path = dest

    def record(self) -> Record:
        """Everything recorded so far (a SYNC connection waits for the connections before it)."""
        assert self.out is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sync:
            sync.settimeout(10)
            sync.connect(str(self.path))
            sync.sendall(b"SYNC\n")
        record = Record()
        for line in iter(self.out.readline, "sync\n"):
            assert line, "the impostor exited"
            if line == "connect\n":
                record.connections += 1
            elif line.startswith("bytes "):
                record.received += int(line.split()[1])
            else:
                record.lines.append(line.rstrip("\n"))
        return record

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        if self.out is not None:
            self.out.close()
