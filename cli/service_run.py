"""``sandbox run`` on a running service at a Unix socket, without the event loop or the full config.

The full command in client mode (:func:`cli.commands.run_impl.run_main`) loads asyncio, the
application state and the whole configuration (~110 ms on these machines) only to send one
request to the service and render its events. This path, the console script's first try for
``run`` (:mod:`cli.main`), takes the plain case the way :func:`cli.service_exec.exec_fast`
takes ``exec``: a checked connection on blocking sockets
(:func:`cli.service_exec.service_connection`), the request's body, and the events rendered by
the very renderers the full command uses (:mod:`cli.render`, with rich: that is what the run
is shown with). It declines, before a byte is sent, whatever the full command has something
to say about: ``--continue``, ``--provider`` and ``--profile`` (warned about in client mode),
a ``--user`` to compare, ``-v``, a prompt of ``-`` with no stdin to read, a TCP service or
none at all (then the run is in-process).
"""

from __future__ import annotations

import os
import sys

from cli import output

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from cli.render import JsonRenderer, RichRenderer
    from sandbox_core.service.blocking import BlockingClient


def run_fast(options: dict[str, Any], arguments: dict[str, Any]) -> int | None:
    """Run ``sandbox run`` on the service when it goes to one and nothing needs the full command.

    ``options`` are the global options and ``arguments`` the command's, as the fast parser of
    :mod:`cli.main` gives them (``provider`` and ``profile`` as strings). None: not taken, and
    nothing was sent or read.
    """
    from cli.service_exec import service_connection

    if arguments.get("resume_last") or arguments.get("provider") is not None or arguments.get("profile") is not None:
        return None
    prompt: str = arguments["prompt"]
    if prompt == "-" and (sys.stdin is None or output.is_tty(sys.stdin)):
        return None  # the full command says how to pass the prompt
    connected = service_connection(options, arguments)
    if connected is None:
        return None
    client, sock, _settings = connected
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        sock.close()
        output.fail("the prompt is empty", code=output.EXIT_USAGE)
    body = agent_body(text, arguments)
    return render_on_service(client, body, json_mode=bool(options.get("json") or arguments.get("as_json")), sock=sock)


def agent_body(text: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of ``POST /v1/runs/agent``, as :func:`cli.remote.request_body` writes it for the
    full command's request: in client mode only what was asked for explicitly (the service's
    config fills in the rest)."""
    from cli.service_exec import network_body

    conversation = arguments.get("conversation")
    body: dict[str, Any] = {"prompt": text, "conversation_id": conversation or f"run-{os.urandom(4).hex()}"}
    for key in ("system", "model", "max_turns", "timeout"):
        if arguments.get(key) is not None:
            body[key] = arguments[key]
    if conversation is not None:
        body["resume"] = True
    network = arguments.get("network")
    if network is not None:
        body["network"] = network_body(network)
    return body


def render_on_service(client: BlockingClient, body: dict[str, Any], *, json_mode: bool, sock: Any = None) -> int:
    """Run the agent ``body`` on the service and show it as ``sandbox run`` does; its exit code.

    Ctrl-C cancels the run on the service and waits (up to
    :data:`cli.service_exec.CANCEL_TIMEOUT`) for it to stop (:class:`cli.service_exec.ServiceRun`).
    """
    from cli.render import JsonRenderer, RichRenderer, finish_run
    from cli.service_exec import ServiceRun
    from sandbox_core.errors import SandboxError
    from sandbox_core.events import Event
    from sandbox_core.service.wire import ServiceError

    renderer: JsonRenderer | RichRenderer = JsonRenderer() if json_mode else RichRenderer(output.console())
    run = ServiceRun(client)
    try:
        for seq, kind, data in run.events("agent", body, sock):
            try:
                event = Event.from_dict({"type": kind, "seq": seq, "data": data})
            except ValueError as exc:
                raise ServiceError(f"the service sent an event that is not one: {exc}") from None
            renderer.handle(event)
    except SandboxError as exc:
        renderer.close()
        from cli.runtime import exit_code_for, report

        if json_mode:
            JsonRenderer.error(str(exc), exit_code_for(exc))
            return report(exc)
        # the rich renderer may have shown the error already: then only its exit code is left
        return exit_code_for(exc) if renderer.outcome.error else report(exc)
    except KeyboardInterrupt:
        renderer.close()
        return run.interrupted()
    except BaseException:  # our stdout went away (EPIPE), say: the run must not go on without us
        run.stop()
        raise
    finally:
        renderer.close()
    return finish_run(renderer.outcome, json_mode=json_mode)
