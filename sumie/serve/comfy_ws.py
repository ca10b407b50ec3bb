"""ComfyUI's WebSocket ``/ws?clientId=...`` (``server.py`` ``websocket_handler`` / ``send_json`` / ``send_bytes``).

A connection gets ``status {status: {exec_info: {queue_remaining}}, sid}`` first (``sid`` is the ``clientId`` given,
else a new one); a client whose first message is ``{"type": "feature_flags", ...}`` gets the server's flags back.
Events of a prompt go to the socket of the ``client_id`` it was queued with (ComfyUI ``send_sync(event, data,
client_id)``); a message addressed to no client (``sid`` None) goes to every socket, as ComfyUI's does: ``status``
on every queue change, and for prompts queued without a client id only what ComfyUI sends with ``sid`` None
(``progress``, preview frames, ``execution_interrupted``). Binary frames are ``>I`` event type + payload (type 1:
``>I`` image format, 1 = JPEG, + the image), each after the ``progress`` message of its step.

Messages come from the event loop and from the engine workers' threads; :class:`Hub` hands them to the loop with
``call_soon_threadsafe``, so each socket sees them in the order they were sent. One task per socket writes; while
every half second it also looks at the queue length and sends ``status`` when it changed without a ComfyUI
prompt saying so (an A1111 job queued or finished; a status may then come twice with the same length, as ComfyUI's
also can).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

__all__ = ["PREVIEW_IMAGE", "Hub", "router"]

PREVIEW_IMAGE = 1  # BinaryEventTypes.PREVIEW_IMAGE
_IDLE_CHECK_S = 0.5


@dataclass
class _Client:
    sid: str
    queue: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    last_remaining: int | None = None
    flags: dict[str, Any] = field(default_factory=dict)


class Hub:
    """The connected sockets by client id, and thread-safe sending to one client or to all."""

    def __init__(self, remaining: Callable[[], int]) -> None:
        self._remaining = remaining
        self._clients: dict[str, _Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- from any thread
    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """A JSON message ``{type, data}`` to ``sid`` (None: every socket)."""
        self._post(json.dumps({"type": event, "data": data}), sid, data if event == "status" else None)

    def send_bytes(self, event_type: int, payload: bytes, sid: str | None) -> None:
        """A binary frame ``>I event_type`` + payload to ``sid`` (None: every socket)."""
        self._post(struct.pack(">I", event_type) + payload, sid, None)

    def status(self) -> dict[str, Any]:
        """ComfyUI's ``get_queue_info``."""
        return {"exec_info": {"queue_remaining": self._remaining()}}

    def broadcast_status(self) -> None:
        """``status`` to every socket (a queue change)."""
        self.send("status", {"status": self.status()}, None)

    def connected(self, sid: str) -> bool:
        """Whether a socket with this client id is connected."""
        return sid in self._clients

    def _post(self, message: str | bytes, sid: str | None, status: dict[str, Any] | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # nobody has connected yet: nobody to tell
        with contextlib.suppress(RuntimeError):  # the loop stopped while the server shuts down
            loop.call_soon_threadsafe(self._dispatch, message, sid, status)

    def _dispatch(self, message: str | bytes, sid: str | None, status: dict[str, Any] | None) -> None:
        targets = list(self._clients.values()) if sid is None else [c for c in [self._clients.get(sid)] if c]
        for c in targets:
            if status is not None:
                c.last_remaining = status["status"]["exec_info"]["queue_remaining"]
            c.queue.put_nowait(message)

    # ---------------------------------------------------------------- the loop's side
    def _connect(self, sid: str) -> _Client:
        self._loop = asyncio.get_running_loop()
        client = _Client(sid)
        self._clients[sid] = client  # a reconnecting client id replaces its old socket, as in ComfyUI
        return client

    def _disconnect(self, client: _Client) -> None:
        if self._clients.get(client.sid) is client:
            del self._clients[client.sid]

    async def serve(self, ws: WebSocket, *, server_flags: dict[str, Any],
                    on_connect: Callable[[str], None] | None = None) -> None:
        """One accepted socket until it closes."""
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        client = self._connect(sid)
        remaining = self._remaining()
        client.last_remaining = remaining
        client.queue.put_nowait(json.dumps({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": remaining}}, "sid": sid}}))
        if on_connect is not None:
            on_connect(sid)
        writer = asyncio.create_task(self._write(ws, client))
        first = True
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text is None:
                    continue
                try:
                    data = json.loads(text)
                except ValueError:
                    continue
                if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data")
                    client.flags = flags if isinstance(flags, dict) else {}
                    client.queue.put_nowait(json.dumps({"type": "feature_flags", "data": server_flags}))
                first = False
        except WebSocketDisconnect:
            pass
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            self._disconnect(client)

    async def _write(self, ws: WebSocket, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + _IDLE_CHECK_S
        while True:
            message: str | bytes | None = None
            try:
                message = await asyncio.wait_for(client.queue.get(), max(0.0, next_check - loop.time()))
            except TimeoutError:
                pass
            if message is not None:
                await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message))
            if loop.time() >= next_check:  # the queue changed without a broadcast (an A1111 job): tell this client
                next_check = loop.time() + _IDLE_CHECK_S
                remaining = self._remaining()
                if remaining != client.last_remaining:
                    client.last_remaining = remaining
                    await ws.send_text(json.dumps({"type": "status", "data": {"status": {"exec_info": {
                        "queue_remaining": remaining}}}}))


def basic_auth_ok(users: dict[str, str], header: str | None) -> bool:
    """HTTP Basic credentials in an ``Authorization`` header against ``--api-auth`` (no users: open)."""
    if not users:
        return True
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    want = users.get(user)
    return want is not None and secrets.compare_digest(want.encode(), password.encode())


router = APIRouter()


@router.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    """ComfyUI's ``/ws?clientId=``; the server's ``--api-auth`` applies (HTTP Basic on the upgrade request)."""
    server = ws.app.state.sumie
    if not basic_auth_ok(server.config.auth, ws.headers.get("authorization")):
        await ws.close(code=1008)
        return
    await ws.accept()
    comfy = server.comfy
    await comfy.hub.serve(ws, server_flags=comfy.feature_flags(), on_connect=comfy.on_connect)
