"""The load generator's HTTP/1.1 client: keep-alive connections to one server, a JSON POST, and
the answer's status, headers and body lines as they arrive. Nothing else (no TLS, redirects,
proxies or cookies): the bench talks to a server on this machine.

Why not httpx, which the rest of tokenmill uses: the load client shares the server's cores, so
its CPU is taken from the server being measured. `tools/client_cost.py` on 2 AMD EPYC cores: httpx
spent 0.78-0.91 ms of CPU on a refused request where this client spends 0.12-0.13, and 0.36-0.43
ms reading each streamed token's line where this client, parsing its JSON and timing it too,
spends 0.21-0.22. A flood of 60 requests a second beside a light key was the case that showed it.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit


class ConnectionDropped(ConnectionError):
    """The server closed the connection before answering (a kept-alive connection it had just
    dropped): the request never reached it, so sending it again is safe."""


class ProtocolError(ConnectionError):
    """The answer did not follow HTTP/1.1, or the connection closed in the middle of it."""


class Response:
    """One answer. Its body is read at most once, by `lines()` or `read()`; the connection goes
    back to the pool only when the body was read to its end and the server keeps it open."""

    def __init__(self, status: int, headers: dict[str, str], reader: asyncio.StreamReader):
        self.status_code = status
        self.headers = headers
        self._reader = reader
        self.complete = False
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._chunked = chunked
        self._left = None if chunked or length is None else int(length)
        self.reusable = (chunked or length is not None) and headers.get("connection", "").lower() != "close"

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        reader = self._reader
        try:
            if self._chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the end
                            pass
                        break
                    data = await reader.readexactly(size)
                    await reader.readexactly(2)
                    yield data
            elif self._left is not None:
                while self._left > 0:
                    data = await reader.read(min(self._left, 65536))
                    if not data:
                        raise ProtocolError("the connection closed before the body's end")
                    self._left -= len(data)
                    yield data
            else:  # no length: the body ends when the server closes the connection
                while data := await reader.read(65536):
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
            raise ProtocolError(f"malformed or cut-off body: {error!r}") from error
        self.complete = True

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (an SSE stream's), each as soon as its newline arrives."""
        pending = b""
        async for data in self.chunks():
            pending += data
            *whole, pending = pending.split(b"\n")
            for line in whole:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.decode()

    async def read(self) -> bytes:
        return b"".join([data async for data in self.chunks()])


class Http1Client:
    """Keep-alive HTTP/1.1 to `base_url`, up to `max_connections` at once (more wait for one).
    `timeout`: seconds a whole request may take, its body included."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        timeout: float = 600.0,
        max_connections: int = 10_000,
    ):
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"the bench's client speaks plain http to one host, not {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self._prefix = url.path.rstrip("/")
        self.timeout = timeout
        fixed = {"host": url.netloc, "accept": "*/*", "content-type": "application/json"}
        fixed |= {name.lower(): value for name, value in (headers or {}).items()}
        self._fixed_headers = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode()
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for writer in list(self._open):
            writer.close()
        self._open.clear()
        self._idle.clear()

    def post(self, path: str, body: dict) -> _Exchange:
        """`async with client.post(path, body) as response:` sends the body as JSON; the response
        is there once its status line and headers are."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = f"POST {self._prefix}{path} HTTP/1.1\r\ncontent-length: {len(payload)}\r\n".encode()
        return _Exchange(self, head + self._fixed_headers + b"\r\n" + payload)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection and whether it was kept alive from an earlier request."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            self._discard(writer)
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self._open.add(writer)
        return reader, writer, False

    def _discard(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()


class _Exchange:
    """One request on a pooled connection, from the send to the end of its body."""

    def __init__(self, client: Http1Client, request: bytes):
        self._client = client
        self._request = request
        self._connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._response: Response | None = None
        self._deadline: asyncio.Timeout | None = None
        self._holds_slot = False

    async def __aenter__(self) -> Response:
        self._deadline = asyncio.timeout(self._client.timeout)
        await self._deadline.__aenter__()
        try:
            return await self._send()
        except BaseException as error:  # no __aexit__ follows a failed __aenter__: clean up here
            await self.__aexit__(type(error), error, error.__traceback__)
            raise

    async def _send(self) -> Response:
        client = self._client
        await client._slots.acquire()
        self._holds_slot = True
        reader, writer, kept_alive = await client._connection()
        self._connection = (reader, writer)
        try:
            writer.write(self._request)
            await writer.drain()
            status_line = await reader.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            if kept_alive:  # closed while idle, unseen: the request never got there
                raise ConnectionDropped("the server closed a kept-alive connection before answering") from error
            raise ProtocolError(f"no answer: {error!r}") from error
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        try:
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except asyncio.IncompleteReadError as error:
            raise ProtocolError("the connection closed in the middle of the headers") from error
        self._response = Response(int(parts[1]), headers, reader)
        return self._response

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        client = self._client
        if self._connection is not None:
            reader, writer = self._connection
            response = self._response
            if kind is None and response is not None and response.complete and response.reusable:
                client._idle.append((reader, writer))
            else:  # a body left unread, an error, a cancel: the connection's state is unknown
                client._discard(writer)
        if self._holds_slot:
            client._slots.release()
        if self._deadline is not None:
            await self._deadline.__aexit__(kind, error, traceback)
