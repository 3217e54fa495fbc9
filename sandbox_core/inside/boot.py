"""The worker's entry point: the handshake before asyncio, then the serving loop.

Started by the launcher as ``python -I -S -c "... from sandbox_core.inside.boot import main;
main()" [MAX_FRAME_BYTES]`` (:data:`sandbox_core.shared.WORKER_ENTRY`). :mod:`handshake`
answers ``initialize`` (and ``bind``) with blocking reads; only then is :mod:`worker_main`,
with asyncio, imported to serve the rest.
"""

from __future__ import annotations

import sys

from sandbox_core.inside import handshake


def main() -> None:
    proto_in, proto_out = handshake.take_protocol_fds()
    max_frame = int(sys.argv[1]) if len(sys.argv) > 1 else handshake.DEFAULT_MAX_FRAME
    booted = handshake.serve_handshake(proto_in, proto_out, max_frame)
    if booted.input_ended and not booted.pending.strip():
        return  # the host went away during the handshake: nothing to serve
    from sandbox_core.inside import worker_main

    worker_main.serve(proto_in, proto_out, max_frame, booted)


if __name__ == "__main__":
    main()
