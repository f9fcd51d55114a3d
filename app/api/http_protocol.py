"""uvicorn's HTTP protocol with a header timeout: slow-header clients are disconnected.

uvicorn times out idle kept-alive connections, but once a client has sent one
byte of a request nothing limits how long it may take to send the rest of the
headers: 200 sockets trickling a header each hold 200 connections open forever
(slow loris). Here a connection whose request headers are not complete within
``header_timeout_s`` of their first byte (or of the connection's opening) is
closed. The body is not timed: a large upload over a slow link is legitimate,
and the body limit bounds it. ``charnn serve`` uses this class; plain uvicorn
can with ``--http app.api.http_protocol:HeaderTimeoutProtocol``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import get_settings


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = get_settings().header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a full request is a slow client too

    def data_received(self, data: bytes) -> None:
        if not self._in_headers and self._header_timer is None and self._idle():
            self._arm()  # the first byte of a request on a kept-alive connection
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._in_headers or self._idle():
            self.transport.close()
