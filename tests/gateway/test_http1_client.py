"""The remote engine's HTTP/1.1 client against real servers: keep-alive reuse, chunked and streamed
bodies, upstreams that close connections, and limits on open connections."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from gateway.engines.http1 import Http1Pool, UpstreamError


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def server():
    peers: list[tuple[str, int]] = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return web.Response(body=await request.read(), content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
        await resp.write_eof()
        return resp

    async def hang_up(request: web.Request) -> web.Response:
        request.transport.close()  # type: ignore[union-attr]
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/echo", echo)
    app.router.add_post("/v1/chunked", chunked)
    app.router.add_post("/v1/hang-up", hang_up)
    runner, url = await _serve(app)
    yield url, peers
    await runner.cleanup()


async def test_keep_alive_reuses_one_connection_for_sequential_requests(server) -> None:
    url, peers = server
    pool = Http1Pool(url)
    for i in range(5):
        resp = await pool.request("POST", "/echo", f'{{"n":{i}}}'.encode())
        assert resp.status == 200 and await resp.read() == f'{{"n":{i}}}'.encode()
    assert len(set(peers)) == 1
    await pool.aclose()


async def test_chunked_body_is_streamed_and_joined(server) -> None:
    url, _ = server
    pool = Http1Pool(url)
    resp = await pool.request("POST", "/chunked", b"{}")
    assert b"".join([c async for c in resp.chunks()]) == b"part0;part1;part2;part3;part4;"
    await pool.aclose()


async def test_upstream_hanging_up_is_an_upstream_error_not_a_hang(server) -> None:
    url, _ = server
    pool = Http1Pool(url)
    with pytest.raises(UpstreamError):
        async with asyncio.timeout(5):
            await pool.request("POST", "/hang-up", b"{}")
    resp = await pool.request("POST", "/echo", b"ok")  # the pool recovers with a fresh connection
    assert await resp.read() == b"ok"
    await pool.aclose()


async def test_a_stale_keep_alive_connection_is_retried_on_a_fresh_one() -> None:
    """The upstream restarts between two requests: the idle connection is dead, the request still works."""
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/v1/echo", echo)
    runner, url = await _serve(app)
    pool = Http1Pool(url)
    assert await (await pool.request("POST", "/echo", b"one")).read() == b"one"
    port = int(url.split(":")[2].split("/")[0])
    await runner.cleanup()  # closes the idle keep-alive connection from the server side
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    assert await (await pool.request("POST", "/echo", b"two")).read() == b"two"
    await pool.aclose()
    await runner.cleanup()


async def test_nothing_listening_is_an_upstream_error() -> None:
    pool = Http1Pool("http://127.0.0.1:9/v1", connect_timeout_s=1)
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request("POST", "/echo", b"{}")


async def test_open_connections_never_exceed_the_limit(server) -> None:
    url, peers = server
    pool = Http1Pool(url, max_connections=3)

    async def one(i: int) -> int:
        return int(await (await pool.request("POST", "/echo", str(i).encode())).read())

    assert sorted(await asyncio.gather(*(one(i) for i in range(20)))) == list(range(20))
    assert len(set(peers)) <= 3
    await pool.aclose()


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError):
        Http1Pool("ftp://example/v1")
