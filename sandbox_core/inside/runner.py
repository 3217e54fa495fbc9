"""Runs one command inside the worker: stdin streamed in, output streamed out as bytes.

The command gets the worker's (already scrubbed) environment and the workspace as cwd,
in a process group of its own. On cancel, and after it exits, the whole group is
killed, so nothing it started in the background outlives the request.

Output is sent in chunks of up to :data:`_READ` bytes exactly as the command wrote it: raw
frames on the output pipe (:mod:`sandbox_core.datapipe`; the command's pipe is spliced
there, never read by the worker), or ``stdout``/``stderr`` events where there is none; each
write waits for the pipe to the host, so a host that reads slowly slows the command. Stdin
comes inline (``stdin_b64``, small) or streamed (``"stdin": "stream"``): the host sends raw
frames on the input pipe, and the request's :class:`StdinSink` has each payload spliced from
there into the command's stdin, taking nothing while that is full. A command killed by one
of its own limits says which (``kill_reason``); the host adds the cgroup limits it can see.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import functools
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from sandbox_core import datapipe
from sandbox_core.chunks import OutputEncoder
from sandbox_core.errors import ProtocolError
from sandbox_core.inside import children
from sandbox_core.inside.pipestream import PipeStream, in_pipe, writable
from sandbox_core.process_tree import alive, boot_ticks, descendants, parent

if TYPE_CHECKING:
    from sandbox_core.inside.channel import InputPipe, OutputPipe, RequestContext

Output = asyncio.StreamReader | PipeStream
"""A command's stdout or stderr as its pump reads it (``read(n)``)."""
_READ = 64 * 1024
"""Largest output frame. With the host reading frames exactly, 64 KiB and 256 KiB frames
measured the same MB/s (1 GiB of ``head -c``, in turns); the smaller keeps each read the host
makes in the CPU's cache and a command's turn on the output pipe short."""
_MB = 1024 * 1024
_DRAIN_AFTER_EXIT = 2.0
_REAP_WAIT = 3.0
"""Seconds to wait for killed strays to die and be reaped (a SIGKILLed process dies at once,
but a loaded machine can take a while to run its exit)."""
NOT_EXECUTABLE = 126
NOT_FOUND = 127


def command_argv(params: dict[str, Any]) -> list[str]:
    """The argv of an ``exec`` request (``argv`` list or ``shell`` string)."""
    argv, shell = params.get("argv"), params.get("shell")
    if argv is not None:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ProtocolError("argv must be a non-empty list of strings")
        return argv
    if isinstance(shell, str) and shell:
        return ["/bin/sh", "-c", shell]
    raise ProtocolError("exec needs argv or shell")


def kill_group(pgid: int) -> None:
    """SIGKILL a process group, ignoring one that is already gone (and never our own: 0)."""
    if pgid <= 0:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class ExitWatch(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol, plus a future that resolves when the process exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


@functools.cache
def _in_worker() -> bool:
    from sandbox_core.inside.identity import is_subreaper

    return is_subreaper()


def kill_strays(since: int, exclude: frozenset[int] = frozenset(), *, alone: bool = False) -> None:
    """Kill what a request started that is still running, wherever it went (``setsid``,
    double fork, a fork-and-exit chain), and reap every child the worker has left.

    With ``alone`` (no other request runs, and the worker is alone in a pid namespace made
    for it: strict; the caller checks both, when it cleans up) this is ``kill(-1, SIGKILL)``:
    the kernel signals every process of the namespace but us and its init under the
    task-list lock, which fork also needs, so no process escapes by forking. Otherwise
    (another request runs, or the ``process`` profile, where -1 would mean the host) every
    descendant started since the request began is killed, in passes until none is left or
    :data:`_REAP_WAIT` runs out, but for what belongs to a request still running: the
    commands their requests wait for (:func:`children.waited`), what runs below them, and what
    is in their process group or session (a background child whose parent has exited is the
    worker's child now, but keeps both). A process that left both and lost its parent cannot
    be told from one of this request's, and is killed with them. Orphans are ours (the worker
    is a child subreaper), so afterwards every child not managed by asyncio (``exclude``) is
    reaped: an unreaped zombie still counts against the pids limit. A child someone waits for
    is neither killed nor reaped here: that is its own request's to do.
    """
    if not _in_worker():  # only a worker owns all of its descendants (tests run tools in-process)
        return
    others = children.waited() - exclude  # the commands of other requests, still waited for by them
    exclude |= others
    deadline = time.monotonic() + _REAP_WAIT
    if alone:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        reap_children(exclude, deadline)
        return
    me = os.getpid()
    while time.monotonic() < deadline:
        strays = [p for p in descendants(me, started_since=since, pruned=others)
                  if p not in exclude and alive(p) and not _theirs(p, others)]  # fmt: skip
        if not strays:
            break
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for pid in descendants(me):  # the dead among our children (others may still run)
        if pid not in exclude and parent(pid) == me and not alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _theirs(pid: int, commands: frozenset[int]) -> bool:
    """Whether ``pid`` is in the process group or session of one of ``commands`` (each leads its own)."""
    if not commands:
        return False
    try:
        return os.getpgid(pid) in commands or os.getsid(pid) in commands
    except OSError:  # gone: nothing left to kill
        return False


def reap_children(exclude: frozenset[int], deadline: float) -> None:
    """Reap until nothing is left below us (but ``exclude``), or ``deadline``.

    Killed processes take a moment to die, and an orphan becomes our child only once its
    parent has died, so one pass is not enough: keep reaping while anything remains.
    """
    me = os.getpid()
    while True:
        below = [p for p in descendants(me) if p not in exclude]
        for pid in below:
            if parent(pid) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if not below or time.monotonic() > deadline:
            return
        time.sleep(0.002)


class StdinSink:
    """The inside end of one command's streamed stdin, taken from the input pipe frame by frame.

    Until the command has started the sink is not ready, so the input pipe waits (its frames
    stay in the pipe, the host's writes wait). A command's stdin pipe (:meth:`attach_fd`)
    gets each payload spliced from the input pipe by the kernel, never read here; while that
    pipe is full the sink is not ready, so a command that reads slowly slows the sender. A
    stream writer (:meth:`attach`: a terminal, or a command started through asyncio's
    transports) is written what is read, and waits past :data:`HIGH` bytes queued. When the
    command closes its stdin (or exits) the sink drops what still comes and tells the host
    once (``on_closed``) to stop sending.
    """

    HIGH = 256 * 1024
    """Bytes queued on a stream writer past which the sink stops taking input until they drain."""

    def __init__(self, pipe: InputPipe, on_closed: Callable[[], None]) -> None:
        self._pipe = pipe
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._full = False
        """The command's stdin is full (or the writer's queue over HIGH): waiting for it to drain."""
        self._draining: asyncio.Task[None] | None = None
        self.closed = False

    def ready(self) -> bool:
        return self.closed or ((self._fd is not None or self._writer is not None) and not self._full)

    def attach_fd(self, fd: int) -> None:
        """The command started with the write end ``fd`` of its stdin pipe (the sink owns it now)."""
        if self.closed:
            os.close(fd)
            return
        os.set_blocking(fd, False)
        self._fd = fd
        self._pipe.resume()

    def attach(self, writer: asyncio.StreamWriter) -> None:
        """The command started with ``writer`` on its stdin (a terminal's, or a transport's)."""
        if self.closed:
            writer.close()
            return
        self._writer = writer
        self._pipe.resume()

    def take(self, source: int, n: int) -> int:
        if self._fd is not None:
            return self._splice(source, n)
        assert self._writer is not None
        if self._writer.is_closing():
            self.close(tell=True)
            return 0
        try:
            data = os.read(source, n)  # n: what is left of one payload (MAX_PAYLOAD at most)
        except (BlockingIOError, InterruptedError):
            return 0
        self._writer.write(data)
        if self._writer.is_closing():  # the write found the pipe broken
            self.close(tell=True)
        elif self._writer.transport.get_write_buffer_size() > self.HIGH:
            self._full = True
            self._draining = asyncio.create_task(self._drain())
        return len(data)

    def _splice(self, source: int, n: int) -> int:
        assert self._fd is not None
        try:
            return os.splice(source, self._fd, n, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            if in_pipe(source):  # the bytes are there: the command's stdin is full
                self._full = True
                self._loop.add_writer(self._fd, self._drained)
            return 0
        except (BrokenPipeError, ConnectionResetError):  # the command closed its stdin
            self.close(tell=True)
            return 0

    def _drained(self) -> None:
        if self._fd is not None:
            self._loop.remove_writer(self._fd)
        self._full = False
        self._pipe.resume()

    def end(self) -> None:
        """No more stdin: the command reads the end of its stdin."""
        self._release()
        self.closed = True

    def close(self, *, tell: bool = False) -> None:
        """Take no more input (the command is gone, or closed its stdin)."""
        if self.closed:
            return
        self.closed = True
        self._release()
        self._pipe.resume()
        if tell:
            self._on_closed()

    def _release(self) -> None:
        if self._fd is not None:
            if self._full:
                self._loop.remove_writer(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._draining is not None:
            self._draining.cancel()
            self._draining = None
        if self._writer is not None:
            self._writer.close()
        self._full = False

    async def _drain(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._draining = None
            self.close(tell=True)
            return
        self._draining = None
        self._full = False
        self._pipe.resume()


class OutputBudget:
    """``limits.output_mb`` of one command: what it may still send; past it the command's
    process group is killed and the rest of its output is drained unsent."""

    def __init__(self, limit: int, pgid: int = 0) -> None:
        self.limit = limit
        self.pgid = pgid
        """Set once the command runs (0 until then)."""
        self.total = 0
        self.limited = False

    def take(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` to send (empty once the limit is hit)."""
        allowed = self.allow(len(chunk))
        return chunk if allowed == len(chunk) else chunk[:allowed]

    def allow(self, size: int) -> int:
        """How many of the next ``size`` bytes to send (0 once the limit is hit)."""
        if self.limited:
            return 0
        if self.limit and self.total + size > self.limit:
            size = self.limit - self.total
            self.limited = True
            kill_group(self.pgid)
        self.total += size
        return size


def exit_result(returncode: int, started: float, budget: OutputBudget) -> dict[str, Any]:
    """The ``done`` data of a command that ended with ``returncode``: exit code (128 + N for
    signal N), duration, and the kill reason if a limit ended it."""
    result: dict[str, Any] = {"duration_s": round(time.monotonic() - started, 6)}
    if returncode < 0:
        result["signal"] = -returncode
        result["exit_code"] = 128 - returncode
    else:
        result["exit_code"] = returncode
    reason = f"output limit {budget.limit / _MB:g} MB" if budget.limited else own_limit_reason(returncode)
    if reason is not None:
        result["kill_reason"] = reason
    return result


class _Output(OutputBudget):
    """Both output streams of one command: sent as read (data pipe, else events), and the limit."""

    def __init__(self, ctx: RequestContext, pipe: OutputPipe | None, limit: int, pgid: int) -> None:
        super().__init__(limit, pgid)
        self._ctx = ctx
        self._pipe = pipe if isinstance(ctx.request.id, int) else None

    async def pump(self, stream: Output, event: Literal["stdout", "stderr"]) -> None:
        kind = datapipe.KIND_STDOUT if event == "stdout" else datapipe.KIND_STDERR
        if self._pipe is not None and isinstance(stream, PipeStream):
            await self._splice(stream, self._pipe, kind)
            return
        encoder = OutputEncoder()
        while raw := await stream.read(_READ):
            if not (chunk := self.take(raw)):
                continue  # past the limit: drain what is left without sending it
            if self._pipe is not None:
                await self._pipe.send(int(self._ctx.request.id), kind, chunk)
            elif (data := encoder.encode(chunk)) is not None:
                await self._ctx.emit(event, data)
        tail = encoder.flush()
        if tail is not None:
            await self._ctx.emit(event, tail)

    async def _splice(self, stream: PipeStream, pipe: OutputPipe, kind: int) -> None:
        """The command's pipe to the host's without a copy in the worker (past the limit: dropped)."""
        while waiting := await stream.ready(_READ):
            if allowed := self.allow(waiting):
                await pipe.splice(int(self._ctx.request.id), kind, stream, allowed)
            if allowed < waiting:
                await stream.skip(waiting - allowed)

    async def end(self) -> None:
        """Tell the host this request's output is complete (before its answer)."""
        if self._pipe is not None:
            await self._pipe.send(int(self._ctx.request.id), datapipe.KIND_END)


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            stdin.write(data)
            await stdin.drain()
    stdin.close()


async def _feed_fd(fd: int, data: bytes) -> None:
    """Write ``data`` to the command's stdin pipe ``fd`` (owned from here), then close it."""
    view = memoryview(data)
    os.set_blocking(fd, False)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except (BlockingIOError, InterruptedError):
                await writable(fd)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command closed its stdin: the rest is not wanted
    finally:
        os.close(fd)


Alone = Callable[[], bool]
"""Asked when a request cleans up: whether no other request runs in the worker now (see
:func:`kill_strays`). At the start is not enough: another may have come since."""


def never_alone() -> bool:
    return False


def _end_command(pid: int, since: int, alone: Alone) -> None:
    """Kill what the command ``pid`` started: its process group, and the strays that left it."""
    kill_group(pid)
    kill_strays(since, frozenset({pid}), alone=alone())


def own_limit_reason(returncode: int) -> str | None:
    """The rlimit that killed a command, from the signal it died of."""
    if returncode == -signal.SIGXCPU:
        soft, _hard = resource.getrlimit(resource.RLIMIT_CPU)
        return f"cpu limit {soft} s" if soft != resource.RLIM_INFINITY else "cpu limit"
    if returncode == -signal.SIGXFSZ:
        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        return f"file size limit {soft // _MB} MB" if soft != resource.RLIM_INFINITY else "file size limit"
    return None


async def run_command(
    ctx: RequestContext,
    params: dict[str, Any],
    sink: StdinSink | None = None,
    pipe: OutputPipe | None = None,
    *,
    alone: Alone = never_alone,
) -> dict[str, Any]:
    """Run the command of an ``exec`` request; the result carries ``exit_code``.

    ``sink`` is the request's streamed stdin (``"stdin": "stream"``); it is closed however
    the command ends (what still arrives for it is dropped). ``pipe`` carries the
    output (``"output": "data_pipe"``); its end frame is sent before the result, also when
    the command could not start. ``alone`` (asked at the clean-up: no other request runs in this
    worker) lets the clean-up kill every process of the sandbox, not only what this command started.
    """
    output = _Output(ctx, pipe, output_limit(params), 0)
    try:
        return await _run(ctx, params, sink, output, alone)
    finally:
        if sink is not None:
            sink.close()
        if not _cancelled():
            await output.end()


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def output_limit(params: dict[str, Any]) -> int:
    limit = params.get("output_limit")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0


class _Command:
    """A command started for a request: its pid, its output streams, its stdin (when piped), its exit."""

    pid: int
    stdout: Output
    stderr: Output
    stdin: asyncio.StreamWriter | None = None

    def has_exited(self) -> bool:
        raise NotImplementedError

    async def exit(self) -> int:
        """Its exit status (``-N`` for signal N), once it has exited and been reaped."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop reading its output (the process itself is killed by :func:`_end_command`)."""
        raise NotImplementedError


class _StreamCommand(_Command):
    """A command through asyncio's subprocess transports: where pidfds are not to be had."""

    def __init__(self, transport: asyncio.SubprocessTransport, protocol: ExitWatch) -> None:
        self._transport, self._protocol = transport, protocol
        process = asyncio.subprocess.Process(transport, protocol, asyncio.get_running_loop())
        assert process.stdout is not None and process.stderr is not None
        self.pid, self.stdout, self.stderr, self.stdin = process.pid, process.stdout, process.stderr, process.stdin
        for fd in (0, 1, 2):
            _widen_pipe(transport.get_pipe_transport(fd))

    @classmethod
    async def start(cls, argv: list[str], cwd: str, piped: bool, since: int, alone: Alone) -> _StreamCommand:
        loop = asyncio.get_running_loop()
        spawn = asyncio.ensure_future(loop.subprocess_exec(
            lambda: ExitWatch(loop),
            *argv,
            stdin=asyncio.subprocess.PIPE if piped else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            process_group=0,
        ))
        try:
            transport, protocol = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            await _undo_spawn(spawn, since, alone)
            raise
        return cls(transport, protocol)

    async def exit(self) -> int:
        await self._protocol.exited  # not proc.wait(): on 3.11 that also waits for every pipe to close
        returncode = self._transport.get_returncode()
        assert returncode is not None
        return returncode

    def has_exited(self) -> bool:
        return self._transport.get_returncode() is not None

    def close(self) -> None:
        self._transport.close()


async def _undo_spawn(spawn: asyncio.Future[Any], since: int, alone: Alone) -> None:
    """The request was cancelled while its command was being started (a timeout, a cancel).

    The process is forked before ``subprocess_exec`` returns, and an abandoned start would
    only kill the process itself (``sh``), not what it started: ``sleep`` in ``sh -c 'sleep
    60; true'`` ran on for its minute. So the start is finished, then what it started is
    killed like that of any command that ends."""
    try:
        transport, _ = await spawn
    except BaseException:  # noqa: BLE001 - it failed to start: nothing runs
        return
    _end_command(transport.get_pid(), since, alone)
    transport.close()


def _widen_pipe(pipe: asyncio.BaseTransport | None) -> None:
    """Ask for a larger pipe buffer (fewer, larger reads); the kernel may refuse."""
    handle = pipe.get_extra_info("pipe") if pipe is not None else None
    if handle is not None:
        with contextlib.suppress(ValueError):  # closed already (a command that closed its stdin at once)
            _widen(handle.fileno())


def _widen(fd: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(fd, datapipe.F_SETPIPE_SZ, datapipe.PIPE_BYTES)


class _PlainCommand(_Command):
    """A command started and watched with no transport in between; its stdin is ``/dev/null``,
    or (``piped``) a pipe whose write end the caller takes (:meth:`take_stdin`).

    asyncio's ``subprocess_exec`` connects each pipe through a transport and a protocol in
    turns of the event loop of their own, and watches the exit through a child watcher: CPU
    the worker spends on every command (a warm ``exec true``: 1.82-2.09 ms of worker CPU that
    way, 1.47-1.81 ms this way; a freshly claimed worker's first command is dominated by its
    Python running cold instead, and barely changes). Here the command is started by
    :class:`subprocess.Popen` as asyncio would start it (``close_fds``, the default signal
    dispositions restored, a process group of its own, the request's cwd), its output pipes
    are taken only when the pump asks (:class:`~sandbox_core.inside.pipestream.PipeStream`:
    spliced to the output pipe, else one read per chunk; nothing read ahead), and its exit is
    its pidfd turning readable, then reaped here. Needs pidfds (:func:`pidfds_in_use`).
    """

    def __init__(self, argv: list[str], cwd: str, piped: bool = False) -> None:
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r = err_w = in_r = in_w = -1
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            if piped:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
            self._process = subprocess.Popen(argv, stdin=in_r if piped else subprocess.DEVNULL, stdout=out_w,
                                             stderr=err_w, cwd=cwd, process_group=0)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd >= 0:
                    os.close(fd)
        self._stdin_fd = in_w if piped else None
        self.pid = self._process.pid
        children.waiting_for(self.pid)
        self._exited: asyncio.Future[int] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            os.kill(self.pid, signal.SIGKILL)  # cannot watch it: it must not run unwatched
            os.waitpid(self.pid, 0)
            children.reaped(self.pid)
            self._process.returncode = -signal.SIGKILL
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        loop.add_reader(self._pidfd, self._reap)
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                _widen(fd)
        self.stdout, self.stderr = self._streams = (PipeStream(out_r), PipeStream(err_r))

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else: asyncio's watcher says 255 then too
            code = 255
        children.reaped(self.pid)
        self._process.returncode = code  # so that Popen never waits for it itself
        if not self._exited.done():
            self._exited.set_result(code)

    def has_exited(self) -> bool:
        return self._exited.done()

    async def exit(self) -> int:
        return await asyncio.shield(self._exited)  # a cancelled request still reaps it when it dies

    def take_stdin(self) -> int | None:
        """The write end of its stdin pipe, which the caller now owns (None: not piped, or taken)."""
        fd, self._stdin_fd = self._stdin_fd, None
        return fd

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        if (fd := self.take_stdin()) is not None:
            os.close(fd)


async def _run(
    ctx: RequestContext, params: dict[str, Any], sink: StdinSink | None, output: _Output, alone: Alone
) -> dict[str, Any]:
    argv = command_argv(params)
    stdin_b64 = params.get("stdin_b64")
    try:
        data = base64.b64decode(stdin_b64, validate=True) if isinstance(stdin_b64, str) else None
    except (binascii.Error, ValueError):
        raise ProtocolError("stdin_b64 is not base64") from None
    started = time.monotonic()
    since = boot_ticks()
    piped = data is not None or sink is not None
    try:
        if not children.pidfds_in_use():
            command: _Command = await _StreamCommand.start(argv, ctx.cwd, piped, since, alone)
        else:
            command = _PlainCommand(argv, ctx.cwd, piped)
    except FileNotFoundError:
        await ctx.emit("stderr", {"data": f"{argv[0]}: command not found\n"})
        return {"exit_code": NOT_FOUND, "duration_s": 0.0}
    except PermissionError:
        await ctx.emit("stderr", {"data": f"{argv[0]}: permission denied\n"})
        return {"exit_code": NOT_EXECUTABLE, "duration_s": 0.0}
    output.pgid = command.pid
    tasks = [
        asyncio.create_task(output.pump(command.stdout, "stdout")),
        asyncio.create_task(output.pump(command.stderr, "stderr")),
    ]
    stdin = command.stdin
    stdin_fd = command.take_stdin() if isinstance(command, _PlainCommand) else None
    if sink is not None and stdin_fd is not None:
        sink.attach_fd(stdin_fd)
    elif sink is not None and stdin is not None:
        sink.attach(stdin)
    elif data is not None and stdin_fd is not None:
        tasks.append(asyncio.create_task(_feed_fd(stdin_fd, data)))
    elif data is not None and stdin is not None:
        tasks.append(asyncio.create_task(_feed(stdin, data)))
    try:
        returncode = await command.exit()
        _end_command(command.pid, since, alone)  # background children must not outlive the request
        if sink is not None:
            sink.close()
        _done, pending = await asyncio.wait(tasks, timeout=_DRAIN_AFTER_EXIT)
        for task in pending:  # a process that left the group still holds the pipe
            task.cancel()
    except BaseException:
        _end_command(command.pid, since, alone)
        for task in tasks:
            task.cancel()
        command.close()
        raise
    finally:
        if command.has_exited():
            command.close()
    return exit_result(returncode, started, output)
