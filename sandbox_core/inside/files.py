"""The inside half of the files crossing: one transfer, run as a command in the user's sandbox.

``sandbox cp``, ``pool.files`` and the service's file routes run this as an ``exec`` in the
user's worker (so as the user's uid, under every layer of the sandbox, in the workspace):

    put DEST [--into] [--max-bytes N]   unpack the tar stream on stdin at DEST
    get SRC [--max-bytes N]             write a tar stream of SRC to stdout
    list PATH | stat PATH               JSON on stdout
    remove PATH [--recursive]

Paths are relative to the workspace and never leave it (no ``..``, no absolute path, no
symlink followed on the way: :mod:`sandbox_core.tarstream`). ``put`` without ``--into``
follows ``cp -r``: into DEST when DEST is a directory, else the stream's one top entry becomes
DEST. A failure is one JSON object on stderr (``{"error", "reason", "path"}``) and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from typing import Any

from sandbox_core import tarstream
from sandbox_core.tarstream import TransferError

EXIT_REFUSED = 2


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args)
    except TransferError as exc:
        _fail(str(exc), exc.reason, exc.path)
    except OSError as exc:
        err = tarstream._os_error(exc, exc.filename if isinstance(exc.filename, str) else "")
        _fail(str(err), err.reason, err.path)
    if result is not None:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def _fail(message: str, reason: str, path: str) -> None:
    sys.stderr.write(json.dumps({"error": message, "reason": reason, "path": path}) + "\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_REFUSED)


def _option(args: list[str], name: str) -> int:
    if name in args:
        at = args.index(name)
        value = int(args[at + 1])
        del args[at : at + 2]
        return value
    return 0


def run(args: list[str]) -> Any:
    if not args:
        raise TransferError("no operation", "usage")
    op, rest = args[0], args[1:]
    limits = tarstream.Limits(max_bytes=_option(rest, "--max-bytes"), max_entries=_option(rest, "--max-entries"))
    into, recursive = "--into" in rest, "--recursive" in rest
    rest = [a for a in rest if a not in ("--into", "--recursive")]
    if len(rest) != 1:
        raise TransferError(f"{op} takes one path", "usage")
    path = rest[0]
    root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if op == "put":
            return _put(root, path, into, limits)
        if op == "get":
            stdout = sys.stdout.buffer
            summary = tarstream.pack(stdout, root, path, limits=limits)
            stdout.flush()
            sys.stderr.write(json.dumps({"summary": summary.as_dict()}) + "\n")
            return None
        if op == "stat":
            st = tarstream.lstat_at(root, path)
            info = tarstream.entry_info(st, path)
            if stat.S_ISLNK(st.st_mode):
                parts = tarstream.split_path(path)
                parent = tarstream.open_dir(root, parts[:-1])
                try:
                    info["target"] = os.readlink(parts[-1], dir_fd=parent)
                finally:
                    os.close(parent)
            return info
        if op == "list":
            fd = tarstream.open_dir(root, tarstream.split_path(path))
            try:
                with os.scandir(fd) as it:
                    names = sorted(e.name for e in it)
                return [tarstream.entry_info(os.stat(n, dir_fd=fd, follow_symlinks=False), n) for n in names]
            finally:
                os.close(fd)
        if op == "remove":
            return _remove(root, path, recursive)
        raise TransferError(f"unknown operation {op!r}", "usage")
    finally:
        os.close(root)


def _put(root: int, path: str, into: bool, limits: tarstream.Limits) -> dict[str, Any]:
    parts = tarstream.split_path(path)
    stdin = sys.stdin.buffer
    if into or not parts:
        summary = tarstream.unpack(stdin, root, parts, limits=limits)
        return {"summary": summary.as_dict()}
    try:
        st = tarstream.lstat_at(root, path)
        is_dir = stat.S_ISDIR(st.st_mode)
    except TransferError:
        is_dir = False
    if is_dir:
        summary = tarstream.unpack(stdin, root, parts, limits=limits)
    else:
        summary = tarstream.unpack(stdin, root, parts[:-1], rename=parts[-1], limits=limits)
    return {"summary": summary.as_dict()}


def _remove(root: int, path: str, recursive: bool) -> dict[str, Any]:
    parts = tarstream.split_path(path)
    if not parts:
        raise TransferError("refusing to remove the workspace itself", "refused", path)
    parent = tarstream.open_dir(root, parts[:-1])
    try:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                os.rmdir(parts[-1], dir_fd=parent)
            else:
                shutil.rmtree(parts[-1], dir_fd=parent)
        else:
            os.unlink(parts[-1], dir_fd=parent)
    except FileNotFoundError:
        raise TransferError(f"{path}: no such file or directory", "not_found", path) from None
    finally:
        os.close(parent)
    return {"removed": path}


if __name__ == "__main__":
    main()
