"""Reading a request body within a limit, before and after decompression."""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.ingest.call_checks import Rejection, RequestRejected

ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
X_GZIP = "x-gzip"  # RFC 9110 8.4.1.3: gzip; aiohttp leaves it to us


async def read_body(request: web.Request, limit: int) -> bytes:
    """The (decompressed) body, refused past ``limit`` bytes before or after
    decompression: aiohttp inflates in bounded steps, so a gzip bomb stops here."""
    encoding = request.headers.get("Content-Encoding", "")
    if encoding:
        encoding = encoding.strip().lower()
    if encoding not in ENCODINGS:
        raise RequestRejected(400, Rejection("encoding", f"Content-Encoding {encoding!r} is not supported "
                                             "(gzip, deflate or none)", "Content-Encoding"))
    size = request.content_length
    if size is not None and size > limit:
        raise RequestRejected(400, Rejection("size", f"request body is {size} bytes; the limit is {limit}",
                                             "body", limit))
    chunks: list[bytes] = []
    total = 0
    content = request.content
    try:
        if size == 0:
            return b""
        if size is not None and not encoding:
            # The usual case: the whole body is usually in the buffer already.
            try:
                return await content.readexactly(size)
            except asyncio.IncompleteReadError as e:
                raise RequestRejected(400, Rejection("json", f"the body ended after {len(e.partial)} of "
                                                     f"{size} bytes", "body")) from None
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise RequestRejected(400, Rejection(
                    "size", f"request body is over {limit} bytes{' once decompressed' if encoding else ''}",
                    "body", limit))
            chunks.append(chunk)
    except (HttpProcessingError, RequestPayloadError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, HttpProcessingError) else e
        detail = getattr(cause, "message", "") or type(cause).__name__
        raise RequestRejected(400, Rejection("encoding", f"the body could not be read as {encoding or 'sent'}: "
                                             f"{str(detail).strip()}", "Content-Encoding")) from None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return inflate_gzip(body, limit) if encoding == X_GZIP else body


def inflate_gzip(data: bytes, limit: int) -> bytes:
    """Gzip that aiohttp did not inflate, capped at ``limit`` bytes of output."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise RequestRejected(400, Rejection("encoding", f"the body could not be read as gzip: {e}",
                                             "Content-Encoding")) from None
    if len(out) > limit:
        raise RequestRejected(400, Rejection("size", f"request body is over {limit} bytes once decompressed",
                                             "body", limit))
    if not d.eof:
        raise RequestRejected(400, Rejection("encoding", "the gzip body ends before its trailer",
                                             "Content-Encoding"))
    return out
