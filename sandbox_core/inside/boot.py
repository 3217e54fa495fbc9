"""The worker's entry point: the handshake before asyncio, then the serving loop.

Started by the launcher as ``python -I -S -c "... from sandbox_core.inside.boot import main;
main()" [MAX_FRAME_BYTES]`` (:data:`sandbox_core.shared.WORKER_ENTRY`). :mod:`handshake`
answers ``initialize`` (and ``bind``) with blocking reads; only then is :mod:`worker_main`,
with asyncio, imported to serve the rest (:func:`serving_loop`), unless the host is not
ready when the worker is (:func:`_frame_waiting`): then the import comes first.
"""

from __future__ import annotations

import sys

from sandbox_core import standin
from sandbox_core.inside import handshake

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing before the handshake
if TYPE_CHECKING:
    from types import ModuleType


def main() -> None:
    proto_in, proto_out = handshake.take_protocol_fds()
    if not _frame_waiting(proto_in):  # the host is still loading (a head start): import meanwhile
        _first_request_modules()
    max_frame = int(sys.argv[1]) if len(sys.argv) > 1 else handshake.DEFAULT_MAX_FRAME
    booted = handshake.serve_handshake(proto_in, proto_out, max_frame)
    if booted.input_ended and not booted.pending.strip():
        return  # the host went away during the handshake: nothing to serve
    serving_loop().serve(proto_in, proto_out, max_frame, booted)
    _leave()


def _leave() -> None:
    """End the worker once its serving loop has returned, without the interpreter's teardown.

    By then every request was answered or cancelled and the channel is closed; what a normal
    exit would add is freeing every module and object one by one (more with the agent's SDK
    loaded), which nobody waits for but the host stopping this worker, and no exit hook of the
    worker's matters (its commands end with its sandbox). Output is flushed first."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _frame_waiting(fd: int) -> bool:
    """Whether the host has written to the channel already (its ``initialize``, usually).

    The host writes ``initialize`` right after the spawn, and a worker that finds it waiting
    answers first and imports its serving loop after (the answer is what the pool waits for).
    A worker spawned ahead of its pool (:mod:`sandbox_core.head_start`) finds nothing: the host
    is still importing, so the worker imports too instead of sitting idle. Only our own modules
    run then, before any request of the host's, so nothing untrusted runs unconfined.
    """
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(0))


def _first_request_modules() -> None:
    """The serving loop and what it loads before its first command runs: the listeners it
    attaches after the handshake (model endpoint, network proxy) and the command runner."""
    serving_loop()
    from sandbox_core.inside import model_endpoint, proxy, runner  # noqa: F401


def serving_loop() -> ModuleType:
    """:mod:`worker_main`, imported without the ``ssl``, ``logging``, ``inspect`` and ``traceback`` modules
    asyncio would load with it.

    asyncio imports ``ssl`` (a tenth of its import time) only to offer TLS on the connections
    it opens or serves itself, and the worker has none: its channel is pipes, its listeners
    (the model endpoint, the network proxy) speak plain HTTP on the sandbox's loopback and
    relay TLS as opaque bytes. So ``ssl`` is kept out while asyncio loads (its modules then
    say ``ssl = None``, their documented fallback) and is importable again right after: the
    agent's SDK (httpx) imports it itself and uses it directly, never through asyncio.

    asyncio and concurrent.futures import ``logging`` (3-4 ms of its own) only to make their
    loggers, which speak only when something goes wrong (an exception nobody retrieved, a
    transport left open). While they load, ``logging`` is a stand-in (:class:`_LazyLogging`):
    its ``getLogger`` hands out loggers that load the real module at their first use and are
    then that module's logger of the same name, so what they say, and where it goes, is what
    it was. The real ``logging`` is importable right after, as ``ssl`` is.

    ``inspect`` (with the ``ast`` and ``dis`` it loads, 4-6 ms) is asked by asyncio only
    whether a function is a coroutine function (debug checks, its public
    ``iscoroutinefunction``), how to name a callback (reprs) and, in its pure-Python task
    step, never taken with the C tasks, about generators. Its stand-in
    (:class:`sandbox_core.standin.Deferred`) imports the real module at the first such question.
    ``traceback`` and ``linecache`` (with ``tokenize`` and ``textwrap``, ~4 ms) likewise:
    asyncio reads and formats stacks with them only in debug mode (a future's source
    traceback), for ``Task.print_stack`` and in the reports of its exception handler. Its C
    accelerator takes ``traceback.extract_stack`` when it loads, so that stand-in has one of
    its own (:class:`_LazyTraceback`) that loads the real module when called.
    """
    blocked = "ssl" not in sys.modules
    if blocked:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
    deferred = {"logging": standin.defer("logging", _LazyLogging("logging")), "inspect": standin.defer("inspect"),
                "traceback": standin.defer("traceback", _LazyTraceback("traceback")),
                "linecache": standin.defer("linecache")}
    try:
        from sandbox_core.inside import worker_main
    finally:
        if blocked and sys.modules.get("ssl", False) is None:
            del sys.modules["ssl"]
        for name, stand_in in deferred.items():  # the real modules import as usual from here on
            if stand_in is not None and sys.modules.get(name) is stand_in:
                del sys.modules[name]
    return worker_main


class _LazyTraceback(standin.Deferred):
    """``traceback`` while asyncio loads: ``extract_stack`` (which ``_asyncio`` keeps) without loading it."""

    @staticmethod
    def extract_stack(f: object = None, limit: int | None = None) -> object:
        """The real ``extract_stack``, of the caller's frame when none is given (as if called directly)."""
        return standin.real("traceback").extract_stack(sys._getframe(1) if f is None else f, limit)


class _LazyLogging(standin.Deferred):
    """``logging`` while asyncio loads: its level numbers and ``getLogger`` without loading it."""

    DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

    @staticmethod
    def getLogger(name: str | None = None) -> _LazyLogger:  # logging's own name
        return _LazyLogger(name)


class _LazyLogger:
    """A logger by name that is ``logging.getLogger(name)`` from its first use that can say anything.

    ``debug`` and ``info`` while nothing has imported the real ``logging`` are dropped here,
    as the real module would drop them: nobody can have configured it yet, and its default
    (the root logger at WARNING, no handler but the last-resort one at WARNING) says nothing
    below WARNING. asyncio calls ``debug`` on every event loop it makes.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str | None) -> None:
        self._name = name

    def debug(self, *args: object, **kwargs: object) -> None:
        if _logging_loaded():
            standin.real("logging").getLogger(self._name).debug(*args, **kwargs)

    def info(self, *args: object, **kwargs: object) -> None:
        if _logging_loaded():
            standin.real("logging").getLogger(self._name).info(*args, **kwargs)

    def __getattr__(self, attr: str) -> object:
        return getattr(standin.real("logging").getLogger(self._name), attr)


def _logging_loaded() -> bool:
    return sys.modules.get("logging") is not None and not standin.deferred("logging")


if __name__ == "__main__":
    main()
