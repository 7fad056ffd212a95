#!/usr/bin/env python3
"""Interop tests: Python's `h2` as an independent HTTP/2 peer of duplex-chat
(WebSockets over HTTP/2, RFC 8441).

Starts the duplex-chat binary on a free loopback port and speaks HTTP/2 to it
in clear with prior knowledge (the h2 state machine is the `h2` package's;
the WebSocket frames inside the streams are written and parsed here). Checks
that the server advertises SETTINGS_ENABLE_CONNECT_PROTOCOL, runs /echo over
an extended CONNECT, runs two sessions on one connection at once, checks the
refusals, and that HTTP/1.1 still works on the same port. Prints the plain
closing line "interop h2: N passed, M failed"; exits non-zero on a failure.

Usage: python_h2.py --server PATH/TO/duplex-chat   (needs `pip install h2`)
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import time
import traceback

import h2.config
import h2.connection
import h2.events
import h2.settings

TIMEOUT = 5.0
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    """One HTTP/2 connection; the h2 package keeps its state."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        config = h2.config.H2Configuration(
            client_side=True,
            # The malformed-request test sends what h2 would refuse to.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.flush()
        self.remote_settings = {}
        self.responses = {}  # stream id -> headers dict
        self.data = {}  # stream id -> bytearray
        self.ended = set()
        self.resets = {}  # stream id -> error code

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, until, what):
        """Reads and handles events until `until()` holds."""
        deadline = time.time() + TIMEOUT
        while not until():
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed while waiting for {what}")
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    for code, setting in event.changed_settings.items():
                        self.remote_settings[int(code)] = setting.new_value
                elif isinstance(event, h2.events.ResponseReceived):
                    self.responses[event.stream_id] = {
                        k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                        for k, v in event.headers
                    }
                elif isinstance(event, h2.events.DataReceived):
                    self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.resets[event.stream_id] = int(event.error_code)
            self.flush()

    def connect(self, path, protocol="websocket", extra=()):
        """Sends an extended CONNECT; returns its stream id."""
        stream = self.conn.get_next_available_stream_id()
        headers = [(":method", "CONNECT")]
        if protocol is not None:
            headers.append((":protocol", protocol))
        headers += [
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{self.port}"),
            ("sec-websocket-version", "13"),
        ]
        headers += list(extra)
        self.conn.send_headers(stream, headers, end_stream=False)
        self.flush()
        return stream

    def response(self, stream):
        self.pump(lambda: stream in self.responses or stream in self.resets, "a response")
        return self.responses.get(stream)

    def send_frame(self, stream, opcode, payload):
        """A masked WebSocket frame (RFC 6455 §5.2) as DATA on `stream`."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.conn.send_data(stream, head + mask + masked)
        self.flush()

    def send_text(self, stream, text):
        self.send_frame(stream, 0x1, text.encode())

    def recv_frame(self, stream):
        """The next whole server frame on `stream`: (opcode, payload)."""

        def parsed():
            buf = self.data.get(stream, bytearray())
            if len(buf) < 2:
                return None
            assert buf[1] & 0x80 == 0, "server frames must not be masked"
            n = buf[1] & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 4:
                    return None
                n = struct.unpack("!H", buf[2:4])[0]
                at = 4
            elif n == 127:
                if len(buf) < 10:
                    return None
                n = struct.unpack("!Q", buf[2:10])[0]
                at = 10
            if len(buf) < at + n:
                return None
            frame = (buf[0] & 0x0F, bytes(buf[at : at + n]))
            del buf[: at + n]
            return frame

        got = []

        def ready():
            if not got:
                frame = parsed()
                if frame is not None:
                    got.append(frame)
            return bool(got)

        self.pump(ready, "a WebSocket frame")
        return got[0]

    def recv_text(self, stream):
        opcode, payload = self.recv_frame(stream)
        assert opcode == 0x1, f"expected a text frame, got opcode {opcode}"
        return payload.decode()

    def close(self):
        self.sock.close()


@test
def rfc8441_3_server_advertises_enable_connect_protocol(port):
    peer = Peer(port)
    try:
        code = int(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
        peer.pump(lambda: code in peer.remote_settings, "the server's SETTINGS")
        assert peer.remote_settings[code] == 1, peer.remote_settings
    finally:
        peer.close()


@test
def rfc8441_4_5_extended_connect_runs_the_echo_session(port):
    peer = Peer(port)
    try:
        stream = peer.connect("/echo")
        headers = peer.response(stream)
        assert headers is not None, f"stream reset: {peer.resets}"
        assert headers[":status"] == "200", headers
        assert "sec-websocket-accept" not in headers, headers
        assert peer.recv_text(stream) == "Please enter your name"
        peer.send_text(stream, "Ada")
        assert peer.recv_text(stream) == "Hi, Ada!"
        peer.send_text(stream, "BYE")
        opcode, payload = peer.recv_frame(stream)
        assert opcode == 0x8, opcode
        code = struct.unpack("!H", payload[:2])[0]
        assert code == 1000, code
        assert payload[2:].decode() == "Client said BYE", payload
        # Our Close answers theirs; the server then ends its side of the stream.
        peer.send_frame(stream, 0x8, payload[:2])
        peer.conn.end_stream(stream)
        peer.flush()
        peer.pump(lambda: stream in peer.ended or stream in peer.resets, "the end of the stream")
        assert stream in peer.ended, f"stream reset instead of ended: {peer.resets}"
    finally:
        peer.close()


@test
def rfc8441_5_two_sessions_share_one_connection(port):
    peer = Peer(port)
    try:
        streams = [peer.connect("/echo"), peer.connect("/echo")]
        for stream in streams:
            assert peer.response(stream)[":status"] == "200"
            assert peer.recv_text(stream) == "Please enter your name"
        # Interleaved: each stream is its own session.
        for i, stream in enumerate(streams):
            peer.send_text(stream, f"peer{i}")
        for i, stream in enumerate(streams):
            assert peer.recv_text(stream) == f"Hi, peer{i}!"
    finally:
        peer.close()


@test
def rfc8441_4_other_protocol_gets_501(port):
    peer = Peer(port)
    try:
        stream = peer.connect("/echo", protocol="webtransport")
        headers = peer.response(stream)
        assert headers is not None and headers[":status"] == "501", (headers, peer.resets)
    finally:
        peer.close()


@test
def rfc8441_4_connect_with_path_but_no_protocol_is_malformed(port):
    # RFC 9113 §8.5: a CONNECT without :protocol carries no :scheme or :path.
    peer = Peer(port)
    try:
        stream = peer.connect("/echo", protocol=None)
        peer.pump(lambda: stream in peer.resets or stream in peer.responses, "the refusal")
        assert peer.resets.get(stream) == 1, (peer.resets, peer.responses)  # PROTOCOL_ERROR
    finally:
        peer.close()


@test
def rfc8441_5_plain_get_over_h2_still_serves_pages(port):
    peer = Peer(port)
    try:
        stream = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(
            stream,
            [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", f"127.0.0.1:{port}")],
            end_stream=True,
        )
        peer.flush()
        assert peer.response(stream)[":status"] == "200"
    finally:
        peer.close()


@test
def http11_upgrade_still_works_on_the_same_port(port):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(
            b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, "closed before the 101"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head, head


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True, help="path to the duplex-chat binary")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([args.server, "--addr", f"127.0.0.1:{port}"])
    passed = failed = 0
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    print("interop h2: duplex-chat did not start", file=sys.stderr)
                    sys.exit(1)
                time.sleep(0.05)
        for fn in TESTS:
            try:
                fn(port)
                passed += 1
                print(f"ok   {fn.__name__}")
            except Exception:
                failed += 1
                print(f"FAIL {fn.__name__}")
                traceback.print_exc()
    finally:
        server.terminate()
        server.wait(10)
    print(f"interop h2: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
