"""The service's record over real HTTP: runs survive a restart, the journal is scoped per user."""

from __future__ import annotations

import httpx2

from sandbox_core.record import open_record, record_path
from sandbox_core.service.client import ServiceClient
from tests.service.conftest import tcp_service_with


async def test_runs_and_journal_survive_a_restart_and_are_scoped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with tcp_service_with(tmp_path) as live:
        async with ServiceClient(live.target, live.tokens["user01"]) as alice:
            events = [e async for e in alice.stream("exec", {"argv": ["sh", "-c", "echo hi; exit 4"]})]
            assert events[-1].data["exit_code"] == 4
            run_id = alice.last_run_id
        async with ServiceClient(live.target, live.tokens["user02"]) as bob:
            [e async for e in bob.stream("exec", {"shell": "true"})]
        async with httpx2.AsyncClient(base_url=live.target) as http:  # a wrong token: journaled
            assert (await http.get("/v1/runs", headers={"Authorization": "Bearer not-a-token"})).status_code == 401
    config = live.config

    # a new server on the same state directory
    async with tcp_service_with(tmp_path) as again:
        assert again.config.state_dir == config.state_dir
        async with ServiceClient(again.target, again.tokens["user01"]) as alice:
            (row,) = [r for r in await alice.runs() if r["run_id"] == run_id]
            assert row["recorded"] and row["exit_code"] == 4 and row["origin"] == "service"
            assert row["summary"]["argv"] == ["sh", "-c", "echo hi; exit 4"]
            assert {r["user_id"] for r in await alice.runs()} == {"user01"}  # only their own
            mine = await alice.journal()
            assert {e["user_id"] for e in mine} == {"user01"} and mine[0]["kind"] == "exec"
            assert await alice.journal(user_id="user02") == mine  # ?user= is an operator's filter only
        async with ServiceClient(again.target, again.tokens["ops"]) as ops:
            everyone = await ops.journal()
            assert {"user01", "user02"} <= {e["user_id"] for e in everyone}
            auth = await ops.journal(kind="auth")
            assert auth and auth[0]["detail"]["status"] == 401 and auth[0]["detail"]["credential"] == "bearer"
            assert "not-a-token" not in str(auth)
            only_bob = await ops.runs(user_id="user02")
            assert {r["user_id"] for r in only_bob} == {"user02"}
            assert await ops.journal(after=everyone[-1]["id"]) == []

    record = open_record(config)
    assert record is not None
    record.close()
    raw = b"".join(p.read_bytes() for p in record_path(config).parent.glob("record.sqlite3*"))
    for token in live.tokens.values():
        assert token.encode() not in raw


def test_log_lines_are_json_and_redact_tokens_and_the_key(capsys) -> None:  # type: ignore[no-untyped-def]
    import json
    import logging

    from sandbox_core.service import logs

    logs.configure("info", ["sk-ant-api03-SECRETKEY-abcdef"], json_lines=True)
    logs.log().info("auth %s with %s", "Authorization: Bearer tok-123456789abcdef", "sk-ant-api03-SECRETKEY-abcdef",
                    extra={"user": "u1", "header": "Bearer tok-123456789abcdef"})
    logging.getLogger("uvicorn.access").info('%s - "%s" %d', "127.0.0.1:5", "GET /v1/runs HTTP/1.1", 200)
    assert logs.flush(10)  # written by the log's own thread
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "auth Authorization: Bearer [redacted] with [redacted]"
    assert lines[0]["user"] == "u1" and lines[0]["header"] == "Bearer [redacted]" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "uvicorn.access" and "GET /v1/runs" in lines[1]["msg"]
