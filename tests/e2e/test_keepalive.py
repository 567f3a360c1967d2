"""Streams behind a proxy with an idle timeout: SSE pings keep a queued stream alive, and the
tokenmill client takes a ping as proof of life between tokens. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from tokenmill.client import LLMClient, Timeouts
from tokenmill.client.errors import TimedOut

IDLE_TIMEOUT_S = 2.0  # as a reverse proxy's read timeout: no byte from upstream for this long ends it


class IdleTimeoutProxy:
    """A TCP proxy on 127.0.0.1 that closes a connection when the upstream sends nothing for
    IDLE_TIMEOUT_S (nginx's proxy_read_timeout, an AWS load balancer's idle timeout)."""

    def __init__(self, upstream_port: int):
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self.cut = 0

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)

        async def upward() -> None:
            while data := await client_reader.read(65536):
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def downward() -> None:
            while True:
                try:
                    data = await asyncio.wait_for(upstream_reader.read(65536), IDLE_TIMEOUT_S)
                except TimeoutError:
                    self.cut += 1
                    return
                if not data:
                    return
                client_writer.write(data)
                await client_writer.drain()

        up = asyncio.ensure_future(upward())
        try:
            await downward()
        finally:
            up.cancel()
            for writer in (client_writer, upstream_writer):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("ping_interval", ["1", "0"])
async def test_a_stream_queued_for_5_s_survives_a_2_s_idle_proxy_with_pings_at_1_s(serve_process, ping_interval):
    # one place: the first request holds it ~5 s (50 tokens at 100 ms), the second waits behind it
    server = serve_process(
        "--engine", "simulated", "--mode", "async", "--replicas", "1", "--sim-ttft-ms", "10",
        "--sim-itl-ms", "100", "--sse-ping-interval", ping_interval,
    )  # fmt: skip
    body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as direct:
        holder = asyncio.ensure_future(direct.post("/v1/chat/completions", json={**body, "max_tokens": 50}))
        await asyncio.sleep(0.3)
        proxy = IdleTimeoutProxy(_port(server.url))
        async with proxy as proxied_url, httpx.AsyncClient(base_url=proxied_url, timeout=30) as client:
            lines: list[str] = []
            status = None
            with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
                # usage, not chunks, counts the tokens: a character cut by max_tokens comes as a last
                # chunk of its own (its bytes so far, as U+FFFD) after the 4th token's text
                proxied = {**body, "max_tokens": 4, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/chat/completions", json=proxied) as response:
                    status = response.status_code
                    async for line in response.aiter_lines():
                        lines.append(line)
        assert (await holder).status_code == 200
    if ping_interval == "1":
        assert status == 200 and proxy.cut == 0
        assert ": ping" in lines  # what kept it alive while it waited for the place
        assert "data: [DONE]" in lines
        usage = json.loads(lines[lines.index("data: [DONE]") - 2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 4 and any('"finish_reason":"length"' in line for line in lines)
    else:  # the same wait without pings: the proxy cuts it before any byte (the test can fail)
        assert proxy.cut == 1 and "data: [DONE]" not in lines


@pytest.mark.parametrize("ping_interval", ["0.5", "0"])
async def test_the_client_takes_a_ping_as_life_between_tokens(serve_process, ping_interval):
    """Tokens 2.5 s apart, a client that gives up after 1.5 s of silence: pings every 0.5 s keep
    it reading; without them it times out between tokens."""
    server = serve_process(
        "--engine", "simulated", "--mode", "async", "--sim-ttft-ms", "10", "--sim-itl-ms", "2500",
        "--sse-ping-interval", ping_interval,
    )  # fmt: skip
    timeouts = Timeouts(first_token=10, between_tokens=1.5)
    async with LLMClient(server.url, timeouts=timeouts) as client:
        # greedy: a sampled pair of tokens can split a character, which comes as a third chunk
        stream = client.stream_chat([{"role": "user", "content": "hi"}], max_tokens=2, ignore_eos=True, temperature=0)
        if ping_interval == "0":
            with pytest.raises(TimedOut) as timed_out:
                [text async for text in stream]
            assert timed_out.value.phase == "between_tokens"
        else:
            assert len([text async for text in stream]) == 2
