"""Raw clients that stall where a slow or hostile one would, for the connection tests
(tests/test_connections.py in-process, tests/test_connections_real.py against ``serve``)."""

from __future__ import annotations

import asyncio


async def stall(port: int, sent: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port`` that has sent ``sent`` and then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(sent)
    await writer.drain()
    return reader, writer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server ends the connection within ``seconds`` (whatever it sent first)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass  # reset rather than closed: ended all the same
    return True
