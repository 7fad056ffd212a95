#!/usr/bin/env python3
"""Interop tests: Python `websockets` as an independent client of duplex-chat.

Starts the duplex-chat binary on a free loopback port, runs each test
against /echo, /chat/plain and /mirror, stops the server, and prints the plain
closing line "interop: N passed, M failed". Exits non-zero on any failure.

Usage: python_client.py --server PATH/TO/duplex-chat
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import traceback

import websockets
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def expect_close(ws):
    """Reads until the server closes; returns the Close frame it sent."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    except ConnectionClosed as e:
        return e.rcvd


@test
async def echo_greets_and_closes_on_bye(base):
    async with websockets.connect(base + "/echo", compression=None) as ws:
        assert await ws.recv() == "Please enter your name"
        await ws.send("Ada")
        assert await ws.recv() == "Hi, Ada!"
        await ws.send("bye")
        close = await expect_close(ws)
        assert close is not None and close.code == 1000, close
        assert close.reason == "Client said BYE", close.reason


async def lines_until(ws, marker):
    """Every text frame up to and including the first that ends with
    `marker`: nothing is skipped, so a repeated delivery is counted."""
    lines = []
    while True:
        line = await asyncio.wait_for(ws.recv(), 5)
        lines.append(line)
        if line.endswith(marker):
            return lines


@test
async def chat_counts_users_and_broadcasts_to_everyone(base):
    clients = []
    try:
        for n in range(1, 4):
            ws = await websockets.connect(base + "/chat/plain", compression=None)
            clients.append(ws)
            greeting = await asyncio.wait_for(ws.recv(), 5)
            assert greeting == f"You are connected! There are {n} users here.", greeting
        await clients[1].send("hello from the middle")
        # A second line from the same sender comes after the first on every
        # connection (the hub keeps a publisher's order): what arrives up to
        # it is everything the first one caused, each exactly once.
        await clients[1].send("end of test")
        for i, ws in enumerate(clients):
            lines = await lines_until(ws, "]: end of test")
            assert len(lines) == 2, f"client {i}: {lines}"
            assert lines[0].startswith("[user") and lines[0].endswith("]: hello from the middle"), lines
            assert lines[1] == lines[0].replace("hello from the middle", "end of test"), lines
    finally:
        for ws in clients:
            await ws.close()


async def next_of_type(ws, kind):
    """The next JSON event of `kind`, skipping others (directory updates)."""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if event["type"] == kind:
            return event


async def events_until(ws, marker_text):
    """Every JSON event up to and including the first message or dm whose
    text is `marker_text`; none is skipped."""
    events = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
        events.append(event)
        if event["type"] in ("message", "dm") and event.get("text") == marker_text:
            return events


def count(events, kind, **fields):
    return sum(
        1 for e in events if e["type"] == kind and all(e.get(k) == v for k, v in fields.items())
    )


@test
async def json_chat_rooms_and_direct_messages(base):
    ada = await websockets.connect(base + "/chat")
    grace = await websockets.connect(base + "/chat")
    try:
        for ws, name in [(ada, "Ada"), (grace, "Grace")]:
            await ws.send(json.dumps({"type": "hello", "name": name}))
            assert (await next_of_type(ws, "welcome"))["name"] == name
            await ws.send(json.dumps({"type": "join", "room": "general"}))
            await next_of_type(ws, "joined")
        # Ada's room message reaches both, her own echo included, once each:
        # her next message, which every member gets after it, ends the count.
        await ada.send(json.dumps({"type": "message", "room": "general", "text": "hi all"}))
        await ada.send(json.dumps({"type": "message", "room": "general", "text": "room marker"}))
        for who, ws in (("Ada", ada), ("Grace", grace)):
            events = await events_until(ws, "room marker")
            assert count(events, "message", text="hi all") == 1, f"{who}: {events}"
            assert count(events, "message", **{"from": "Ada", "text": "hi all", "room": "general"}) == 1, events
            assert count(events, "message") == 2, f"{who}: {events}"
            assert count(events, "dm") == 0, f"{who}: {events}"
        # Grace's dm goes to Ada and back to Grace, once each, and to nobody
        # in the room as a message.
        await grace.send(json.dumps({"type": "dm", "to": "Ada", "text": "psst"}))
        await grace.send(json.dumps({"type": "dm", "to": "Ada", "text": "dm marker"}))
        for who, ws in (("Ada", ada), ("Grace", grace)):
            events = await events_until(ws, "dm marker")
            assert count(events, "dm", **{"from": "Grace", "to": "Ada", "text": "psst"}) == 1, f"{who}: {events}"
            assert count(events, "dm") == 2, f"{who}: {events}"
            assert count(events, "message") == 0, f"{who}: {events}"
        await ada.send(json.dumps({"type": "hello", "name": "x" * 100}))
        assert (await next_of_type(ada, "error"))["code"], "bad input gets an error event"
    finally:
        await ada.close()
        await grace.close()


def text_of_bytes(n):
    """A str whose UTF-8 form is exactly n bytes, with 2-, 3- and 4-byte
    characters in it wherever it is long enough."""
    unit = "aü✓𝄞"  # 1 + 2 + 3 + 4 bytes
    text = unit * (n // 10)
    text += "a" * (n - len(text.encode()))
    assert len(text.encode()) == n
    return text


# The payload lengths where RFC 6455 §5.2 changes the length field (7 bits
# up to 125, 16 bits from 126 to 65535, 64 bits from 65536), on both sides of
# each edge, and two large ones.
EDGE_SIZES = [0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537, 1 << 20, 16 << 20]


@test
async def mirror_returns_text_and_binary_at_every_length_edge_up_to_16_mib(base):
    async with websockets.connect(base + "/mirror", compression=None, max_size=None) as ws:
        for n in EDGE_SIZES:
            data = bytes(i % 251 for i in range(min(n, 4096))) * (n // 4096 + 1)
            data = data[:n]
            await ws.send(data)
            back = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(back, bytes) and back == data, f"binary {n}"
            text = text_of_bytes(n)
            await ws.send(text)
            back = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(back, str) and back == text, f"text {n} bytes"


@test
async def mirror_reassembles_fragments(base):
    async with websockets.connect(base + "/mirror", compression=None) as ws:
        await ws.send(["frag", "men", "ted ✓"])
        assert await ws.recv() == "fragmented ✓"
        await ws.send([b"\x00\x01", b"", b"\x02"])
        assert await ws.recv() == b"\x00\x01\x02"


async def raw_upgrade(base, path):
    """A hand-made opening handshake; returns the streams after the 101."""
    host, port = base[len("ws://"):].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def masked_frame(opcode, payload, key=b"\x11\x22\x33\x44"):
    assert len(payload) <= 125
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + masked


async def read_frame(reader):
    """(fin, opcode, payload) of one unmasked server frame."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    assert not b1 & 0x80, "server frames are not masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return bool(b0 & 0x80), b0 & 0x0F, await asyncio.wait_for(reader.readexactly(n), 5)


@test
async def server_answers_ping_with_same_payload(base):
    # On the wire: a Pong (opcode 0xA) whose payload is the Ping's, for an
    # empty, a short and a 125-byte (the largest allowed) payload.
    reader, writer = await raw_upgrade(base, "/mirror")
    try:
        for payload in [b"", b"duplex?", bytes(range(125))]:
            writer.write(masked_frame(0x9, payload))
            await writer.drain()
            fin, opcode, got = await read_frame(reader)
            assert (fin, opcode) == (True, 0xA), (fin, opcode, got)
            assert got == payload, (got, payload)
        writer.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
        await writer.drain()
        _, opcode, got = await read_frame(reader)
        assert opcode == 0x8 and got[:2] == (1000).to_bytes(2, "big"), (opcode, got)
    finally:
        writer.close()
    # Through websockets: the pong it matched to its ping (by payload) comes
    # back, and its latency is a real round trip within the wait.
    async with websockets.connect(base + "/mirror", compression=None) as ws:
        started = time.monotonic()
        latency = await asyncio.wait_for(await ws.ping(b"duplex?"), 5)
        elapsed = time.monotonic() - started
        assert 0 < latency <= elapsed < 5, (latency, elapsed)


@test
async def client_close_is_echoed_with_its_code(base):
    ws = await websockets.connect(base + "/mirror", compression=None)
    await ws.close(code=4001, reason="done here")
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None and rcvd.code == 4001, rcvd
    assert rcvd.reason == "done here", rcvd.reason


@test
async def invalid_handshake_version_is_refused_with_426(base):
    host, port = base[len("ws://"):].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /mirror HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 426"), head
    assert b"sec-websocket-version: 13" in head.lower(), head


def deflate_configurations():
    """(name, list of offers): the client offers of RFC 7692 to try."""
    pmd = ClientPerMessageDeflateFactory
    yield "no parameters", [pmd(client_max_window_bits=None)]
    yield "both no-context-takeover flags", [
        pmd(server_no_context_takeover=True, client_no_context_takeover=True)
    ]
    for bits in range(9, 16):
        yield f"window bits {bits}", [pmd(server_max_window_bits=bits, client_max_window_bits=bits)]
    yield "several offers", [
        pmd(server_max_window_bits=10, client_no_context_takeover=True),
        pmd(),
    ]


@test
async def mirror_round_trips_compressed_messages_in_every_configuration(base):
    sizes = [0, 1, 200, 70_000, 1 << 20, 16 << 20]
    for name, offers in deflate_configurations():
        async with websockets.connect(base + "/mirror", extensions=offers, compression=None, max_size=None) as ws:
            answer = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert answer.startswith("permessage-deflate"), f"{name}: answered {answer!r}"
            assert ws.protocol.extensions, f"{name}: nothing negotiated"
            for n in sizes:
                data = (b"duplex deflate " * (n // 15 + 1))[:n]
                await ws.send(data)
                assert await asyncio.wait_for(ws.recv(), 30) == data, f"{name}: binary {n}"
                text = ("κόσμε " * (n // 11 + 1))[: n // 2]
                await ws.send(text)
                assert await asyncio.wait_for(ws.recv(), 30) == text, f"{name}: text {n}"


@test
async def rfc7692_7_1_1_default_policy_keeps_no_context_and_websockets_follows_it(base):
    # Offered as Chromium does (a bare client_max_window_bits), and with
    # websockets' own default offer: the shipped policy answers with both
    # no-context-takeover flags, websockets accepts them, and compressed
    # messages (several in a row, which context takeover would have
    # referenced) round-trip on /echo and /chat.
    expected = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    for offers in ([ClientPerMessageDeflateFactory(client_max_window_bits=True)], None):
        kwargs = {"extensions": offers, "compression": None} if offers else {}
        async with websockets.connect(base + "/mirror", **kwargs) as ws:
            answer = ws.response.headers["Sec-WebSocket-Extensions"]
            assert answer == expected, answer
            for i in range(5):
                text = f"the same compressible line, again and again ({i}) " * 40
                await ws.send(text)
                assert await asyncio.wait_for(ws.recv(), 10) == text
    async with websockets.connect(base + "/chat") as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == expected
        await ws.send(json.dumps({"type": "hello", "name": "Deflate Tester"}))
        assert (await next_of_type(ws, "welcome"))["name"] == "Deflate Tester"


@test
async def first_acceptable_offer_wins(base):
    offers = [
        ClientPerMessageDeflateFactory(server_max_window_bits=12, client_max_window_bits=12),
        ClientPerMessageDeflateFactory(),
    ]
    async with websockets.connect(base + "/mirror", extensions=offers, compression=None) as ws:
        answer = ws.response.headers["Sec-WebSocket-Extensions"]
        assert "server_max_window_bits=12" in answer and "client_max_window_bits=12" in answer, answer


async def run_all(base):
    passed, failed = 0, 0
    for fn in TESTS:
        try:
            await asyncio.wait_for(fn(base), 60)
            print(f"PASS {fn.__name__}")
            passed += 1
        except Exception:
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
            failed += 1
    return passed, failed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True, help="path to the duplex-chat binary")
    args = parser.parse_args()
    port = free_port()
    # /mirror reads 64 KiB a message by default; the edge tests send 16 MiB.
    server = subprocess.Popen(
        [args.server, "--addr", f"127.0.0.1:{port}", "--echo-max-message", str(16 << 20)]
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    print("interop: duplex-chat did not start", file=sys.stderr)
                    sys.exit(1)
                time.sleep(0.05)
        passed, failed = asyncio.run(run_all(f"ws://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(10)
    print(f"interop: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
