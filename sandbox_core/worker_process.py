"""A worker's process as the host holds it: spawned, its pipes on the event loop, its exit.

:func:`spawn` forks and execs the launch spec's command with ``subprocess.Popen``, synchronously
(as asyncio's own subprocess support does, in the loop's thread), with the worker's two
private pipes (output data and streamed stdin) and, for a worker with a network, the socket
it hands client connections over. So the process exists, with every descriptor accounted
for, once :func:`spawn` returns: a start cancelled at any later point holds a process it can
kill, never a spawn half done (asyncio's cancelled ``subprocess_exec`` killed only bwrap and
then waited for pipes that bwrap's surviving sandbox init held open, for good).

:meth:`WorkerProcess.attach` then puts the process on the running event loop: stdin as a write
transport (its flow control tells the caller when the worker stops reading), stdout and
stderr as read transports whose data reach the caller in the read's own callback, and the
exit through a pidfd (no thread per child). Attaching is separate from spawning so that a
process spawned before any event loop existed (:mod:`sandbox_core.head_start`) is adopted the
same way. The caller hears of the exit once the process is reaped and its three pipes are
closed, or :data:`EXIT_DRAIN` seconds after the reap (a descriptor a leftover process still
holds must not keep anyone waiting).
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from sandbox_core import datapipe

if TYPE_CHECKING:
    import asyncio

    from sandbox_core.isolation.launch import LaunchSpec

EXIT_DRAIN = 1.0
"""Seconds to wait for the pipes to close after the process was reaped."""
CONTROL_READ = 64 * 1024
"""The control pipe's read size. asyncio reads 256 KiB at a time, and a buffer that size is
above malloc's mmap threshold: every answer cost an ``mmap``, an ``mremap`` down to the frame's
size and a ``munmap`` (seen with strace, one of each per ``ping``). Frames are small; a big one
takes a few more reads."""


class Sink(Protocol):
    """Who hears what the process does (the worker's handle)."""

    def on_stdout(self, data: bytes) -> None: ...

    def on_stderr(self, data: bytes) -> None: ...

    def on_writable(self, writable: bool) -> None: ...

    def on_exit(self) -> None: ...


class Spawned:
    """A worker process just spawned, and the host's ends of its private channel."""

    __slots__ = ("data_read", "handoff", "inside", "placement", "process", "stdin_write")

    def __init__(self, process: WorkerProcess, data_read: int, stdin_write: int, handoff: int | None,
                 inside: dict[str, int]) -> None:  # fmt: skip
        self.process = process
        self.data_read = data_read
        """The host's end of the output data pipe."""
        self.stdin_write = stdin_write
        """The host's end of the streamed-stdin pipe."""
        self.handoff = handoff
        """The host's end of the socket the worker hands client connections over (its network)."""
        self.inside = inside
        """The worker's ends by ``initialize`` parameter (``data_fd``, ``stdin_fd``, ``handoff_fd``):
        descriptor numbers in the worker, closed on the host."""
        self.placement: Placement | None = None
        """The spec's ``after_spawn`` (its cgroups), under way in a thread since the spawn."""

    def close(self) -> None:
        """Close the host's ends (a process that will not be attached)."""
        for fd in (self.data_read, self.stdin_write, self.handoff):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def spawn(spec: LaunchSpec) -> Spawned:
    """Start ``spec``'s command with its private pipes (and the handoff socket when its plan's
    network asks for one: the worker hands client connections over it).

    The process gets its own session (its group is what the host signals) and only the
    descriptors named here and in ``spec.pass_fds``. Raises ``OSError`` when it cannot be
    spawned; nothing stays open then.
    """
    data_read, data_write = os.pipe2(os.O_CLOEXEC)
    stdin_read, stdin_write = os.pipe2(os.O_CLOEXEC)
    inside = {"data_fd": data_write, "stdin_fd": stdin_read}
    host_ends: list[int] = [data_read, stdin_write]
    handoff_host: int | None = None
    net = spec.plan.get("network")
    if isinstance(net, dict) and net.get("handoff"):
        import socket  # here: a one-shot's spawn comes before anything else loads it (1.6 ms), and needs none

        host_sock, inside_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff_host = host_sock.detach()
        host_ends.append(handoff_host)
        inside["handoff_fd"] = inside_sock.detach()
    try:
        for fd in (data_write, stdin_write):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, datapipe.F_SETPIPE_SZ, datapipe.PIPE_BYTES)
        popen = subprocess.Popen(
            spec.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
            env=spec.env, cwd=spec.cwd, start_new_session=True, close_fds=True,
            pass_fds=(*spec.pass_fds, *inside.values()),
        )
    except BaseException:
        for fd in host_ends:
            os.close(fd)
        raise
    finally:
        for fd in inside.values():
            os.close(fd)
    spawned = Spawned(WorkerProcess(popen), data_read, stdin_write, handoff_host, inside)
    if spec.after_spawn is not None:
        spawned.placement = Placement(spec.after_spawn, popen.pid)
    return spawned


class Placement:
    """The spec's ``after_spawn`` for one process, run in a thread from its spawn on.

    Into its cgroups, that is: the first write of a pid into a v1 ``cgroup.procs`` waits for an
    RCU grace period (8-12 ms measured on a 2-vCPU VM), as long as the worker's own boot. The
    host meanwhile writes its ``initialize``, which the worker answers with only our code
    running, and judges the answer only once the placement is done (:meth:`wait`): no request
    reaches a worker that is not in its cgroups. Whoever releases what the spec holds waits for
    it first, so a cgroup is never made again after its removal."""

    __slots__ = ("_done", "_error")

    def __init__(self, after_spawn: Callable[[int], None], pid: int) -> None:
        self._error: BaseException | None = None
        self._done = _thread.allocate_lock()
        self._done.acquire()  # released by the thread when it ends
        # _thread, not threading.Thread: Thread.start() waits until the new thread has run, and
        # that one goes straight into the placement holding the GIL (1-2 ms of a spawn measured)
        _thread.start_new_thread(self._run, (after_spawn, pid))

    def _run(self, after_spawn: Callable[[int], None], pid: int) -> None:
        try:
            after_spawn(pid)
        except BaseException as exc:  # noqa: BLE001 - raised again by wait(), in the caller's thread
            self._error = exc
        finally:
            self._done.release()

    @property
    def running(self) -> bool:
        """Not done yet (:meth:`wait` would block)."""
        return self._done.locked()

    def wait(self, timeout: float | None = None) -> None:
        """Block until it is done (TimeoutError after ``timeout`` seconds); raise what it raised."""
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"the placement did not end within {timeout}s")
        self._done.release()
        if self._error is not None:
            raise self._error


class WorkerProcess:
    """One spawned process: its pid, its pipes once attached to a loop, its exit code once reaped."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.stdout: asyncio.ReadTransport | None = None
        self.stderr: asyncio.ReadTransport | None = None
        self._sink: Sink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = 0
        """Pipes attached and not yet closed."""
        self._pidfd: int | None = None
        self._drain: asyncio.TimerHandle | None = None
        self._attaching = True
        """Until attach has connected (or failed to connect) every pipe: the exit waits for it."""
        self._told = False
        self._closed = False

    async def attach(self, sink: Sink) -> None:
        """Put the process on the running loop; ``sink`` hears its output, flow and exit.

        The exit watch comes first (it needs no await), so a process that is attached at all
        is reaped, whatever happens to the caller meanwhile.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        self._loop, self._sink = loop, sink
        self._watch_exit(loop)
        popen = self._popen
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        pipes = (popen.stdin, popen.stdout, popen.stderr)
        popen.stdin = popen.stdout = popen.stderr = None  # the transports own them from here
        stdin, stdout, stderr = pipes
        try:
            # the protocols are duck-typed: this module is imported before asyncio (see head_start)
            self.stdin, _ = await loop.connect_write_pipe(lambda: cast("asyncio.BaseProtocol", _Writer(self)), stdin)
            self.stdout, _ = await loop.connect_read_pipe(
                lambda: cast("asyncio.BaseProtocol", _Reader(self, sink.on_stdout)), stdout)
            self.stdout.max_size = CONTROL_READ  # type: ignore[attr-defined]
            self.stderr, _ = await loop.connect_read_pipe(
                lambda: cast("asyncio.BaseProtocol", _Reader(self, sink.on_stderr)), stderr)
        except BaseException:
            for pipe in pipes:  # those not yet handed to a transport (closing twice is harmless)
                if not any(t is not None and t.get_extra_info("pipe") is pipe
                           for t in (self.stdin, self.stdout, self.stderr)):
                    pipe.close()
            raise
        finally:
            self._attaching = False
            if self._closed:
                self.close()
            self._maybe_done()

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # a kernel without pidfds (before 5.3): a thread waits for the child
            threading.Thread(target=self._wait_thread, args=(loop,), daemon=True,
                             name=f"sandbox-reap-{self.pid}").start()  # fmt: skip
            return
        loop.add_reader(self._pidfd, self._reap)

    def _wait_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 255
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
            loop.call_soon_threadsafe(self._reaped, code)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: its status is lost
            pid, status = self.pid, None
        if pid == 0:
            return
        assert self._loop is not None and self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._reaped(255 if status is None else os.waitstatus_to_exitcode(status))

    def _reaped(self, code: int) -> None:
        self.returncode = self._popen.returncode = code
        if self._loop is not None:
            self._drain = self._loop.call_later(EXIT_DRAIN, self.close)
        self._maybe_done()

    def _pipe_closed(self) -> None:
        self._open -= 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._told or self._attaching or self.returncode is None or self._open > 0:
            return
        self._told = True
        if self._drain is not None:
            self._drain.cancel()
        if self._sink is not None:
            self._sink.on_exit()

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process alone, while it has not been reaped."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def close(self) -> None:
        """Close the pipes and kill the process if it still runs (it is still reaped: the
        caller hears of the exit then); idempotent."""
        self._closed = True
        self.send_signal(signal.SIGKILL)
        for pipe in (self.stdin, self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        if self._sink is None:  # never attached: nothing on a loop owns the pipes
            for file in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
                if file is not None:
                    file.close()
            self._popen.stdin = self._popen.stdout = self._popen.stderr = None

    def wait_unattached(self, timeout: float) -> int | None:
        """Reap a process that was never attached (blocking); its exit code, or None if it runs on."""
        if self._sink is not None:
            raise RuntimeError("the process is attached to an event loop: its exit is watched there")
        try:
            self.returncode = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode


class _Writer:
    """The stdin pipe's protocol: flow control and its close."""

    def __init__(self, process: WorkerProcess) -> None:
        self._process = process

    def connection_made(self, transport: Any) -> None:
        self._process._open += 1

    def pause_writing(self) -> None:
        if self._process._sink is not None:
            self._process._sink.on_writable(False)

    def resume_writing(self) -> None:
        if self._process._sink is not None:
            self._process._sink.on_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()  # nobody may wait for a pipe that is gone
        self._process._pipe_closed()


class _Reader:
    """A read pipe's protocol: data to ``deliver`` in the read's own callback."""

    def __init__(self, process: WorkerProcess, deliver: Callable[[bytes], None]) -> None:
        self._process = process
        self.data_received = deliver

    def connection_made(self, transport: Any) -> None:
        self._process._open += 1

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._process._pipe_closed()
