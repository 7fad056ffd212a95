#!/usr/bin/env python3
"""Writes the seed corpora in seeds/<target>/: a few valid and invalid
inputs per target, so the fuzzer starts from the shapes each input takes.
Run from this directory; the output is committed."""
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(opcode, payload, fin=True, rsv=0, mask=None):
    out = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        out.append(bit | n)
    elif n < 65536:
        out.append(bit | 126)
        out += struct.pack(">H", n)
    else:
        out.append(bit | 127)
        out += struct.pack(">Q", n)
    if mask is not None:
        out += bytes(mask)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out + payload)


def deflate(payload):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


bomb = deflate(b"\0" * (1 << 20))
for target, mask in [("frame_decode_server", [0x37, 0xFA, 0x21, 0x3D]),
                     ("frame_decode_client", None)]:
    f = lambda *a, **k: frame(*a, mask=mask, **k)
    # First byte: bit 0 raw mode, bits 1-2 deflate offer, bit 3 small
    # limits; second byte: chunking.
    seeds = {
        "text": bytes([0, 0]) + f(1, b"Hello"),
        "fragments": bytes([0, 1]) + f(1, b"Hel", fin=False) + f(9, b"ping")
        + f(0, "lo é".encode(), fin=True),
        "binary_ping_close": bytes([1, 2]) + f(2, bytes(range(200)))
        + f(9, b"x") + f(8, struct.pack(">H", 1000) + b"bye"),
        "close_empty": bytes([0, 3]) + f(8, b""),
        "bad_utf8": bytes([0, 4]) + f(1, b"ok\xc3"),
        "deflate_text": bytes([2, 0]) + f(1, deflate(b"Hello Hello Hello"), rsv=4),
        "deflate_fragments": bytes([4, 1]) + f(1, deflate(b"abc" * 50)[:10], rsv=4, fin=False)
        + f(0, deflate(b"abc" * 50)[10:]),
        "deflate_bomb": bytes([2, 5]) + f(2, bomb, rsv=4),
        "big_frame": bytes([8, 5]) + f(2, b"z" * 2000),
    }
    for name, data in seeds.items():
        write(target, name, data)

for name, header in {
    "plain": "permessage-deflate",
    "all": "permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
    "server_max_window_bits=10; client_max_window_bits",
    "list": 'x-foo; a="1", permessage-deflate; client_max_window_bits=9, permessage-deflate',
}.items():
    write("extensions_header", name, header.encode())

for name, text in {
    "hello": '{"type":"hello","name":"Ada","token":"t"}',
    "join": '{"type":"join","room":"Lobby"}',
    "message": '{"type":"message","room":"lobby","text":"hi\\n there"}',
    "dm": '{"type":"dm","to":"Bob","text":"psst"}',
    "ping": '{"type":"ping","id":7}',
    "unknown": '{"type":"nope"}',
    # Lowercases to more characters than it has (a past finding).
    "room_dotted_i": '{"type":"join","room":"\u0130stanbul"}',
}.items():
    write("chat_request", name, text.encode())

# inflate and upgrade_request read their input with `arbitrary`; the
# fuzzer finds their shapes quickly from an empty corpus.

# http2_preface: byte 0 picks the chunk size, the rest is what a client
# sends first.
for name, data in {
    "preface": b"\x03PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "p": b"\x00P",
    "get": b"\x07GET / HTTP/1.1\r\nHost: a\r\n\r\n",
}.items():
    write("http2_preface", name, data)
