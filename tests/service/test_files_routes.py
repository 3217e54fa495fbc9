"""The service's file routes: tar streams in and out, with the same ownership rules as runs."""

from __future__ import annotations

import io
import tarfile

import httpx2

from tests.service.conftest import Live


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_upload_download_list_and_ownership(tcp_service: Live) -> None:
    def auth(user: str) -> dict[str, str]:
        return {"authorization": f"Bearer {tcp_service.tokens[user]}"}

    payload = {"dir/a.bin": bytes(range(256)) * 100, "b.txt": b"hello"}
    async with httpx2.AsyncClient(base_url=tcp_service.target, timeout=60) as http:
        put = await http.put("/v1/files", params={"path": "in"}, content=_tar(payload), headers=auth("user00"))
        assert put.status_code == 200, put.text
        assert put.json()["summary"]["files"] == 2
        got = await http.get("/v1/files", params={"path": "in"}, headers=auth("user00"))
        assert got.status_code == 200 and got.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(got.content)) as archive:
            back = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}  # type: ignore[union-attr]
        assert back == {f"in/{k}": v for k, v in payload.items()}
        listing = await http.get("/v1/files", params={"path": "in", "list": "1"}, headers=auth("user00"))
        assert {e["name"] for e in listing.json()["entries"]} == {"dir", "b.txt"}
        other = await http.get("/v1/files", params={"path": "in/b.txt", "stat": "1"}, headers=auth("user01"))
        assert other.status_code == 404  # user01's own workspace has no such file
        foreign = await http.get("/v1/files", params={"path": "in", "user": "user00"}, headers=auth("user01"))
        assert foreign.status_code == 403
        operator = await http.get("/v1/files", params={"path": "in/b.txt", "user": "user00", "stat": "1"},
                                  headers=auth("ops"))
        assert operator.status_code == 200 and operator.json()["size"] == 5
        escape = await http.put("/v1/files", params={"path": "../x"}, content=_tar({"a": b"x"}), headers=auth("user00"))
        assert escape.status_code == 409 and escape.json()["reason"] == "bad_name"
        gone = await http.delete("/v1/files", params={"path": "in", "recursive": "1"}, headers=auth("user00"))
        assert gone.status_code == 200
        missing = await http.get("/v1/files", params={"path": "in"}, headers=auth("user00"))
        assert missing.status_code == 404 and "no such file" in missing.json()["error"]
        anonymous = await http.get("/v1/files", params={"path": "."})
        assert anonymous.status_code == 401
