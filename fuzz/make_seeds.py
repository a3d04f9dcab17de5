#!/usr/bin/env python3
"""Writes the fuzzer's seed corpus (fuzz/seeds/): one valid pgoutput v1 message of each kind,
built field by field as PostgreSQL sends them. Run from anywhere: python3 fuzz/make_seeds.py"""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def u8(v): return struct.pack(">B", v)
def i16(v): return struct.pack(">h", v)
def u32(v): return struct.pack(">I", v)
def i32(v): return struct.pack(">i", v)
def u64(v): return struct.pack(">Q", v)
def i64(v): return struct.pack(">q", v)
def cstr(s): return s.encode() + b"\0"


def tuple_(cols):
    """cols: list of None (NULL), 'u' (unchanged TOAST), ('t', bytes) or ('b', bytes)."""
    out = i16(len(cols))
    for c in cols:
        if c is None:
            out += b"n"
        elif c == "u":
            out += b"u"
        else:
            kind, data = c
            out += kind.encode() + i32(len(data)) + data
    return out


SEEDS = {
    "begin": b"B" + u64(0x16B3748) + i64(767_000_000_000_000) + u32(742),
    "commit": b"C" + u8(0) + u64(0x16B3748) + u64(0x16B3778) + i64(767_000_000_000_123),
    "origin": b"O" + u64(0x16B3000) + cstr("node_a"),
    "relation": b"R" + u32(16384) + cstr("public") + cstr("orders") + b"d" + i16(3)
    + u8(1) + cstr("id") + u32(20) + i32(-1)
    + u8(0) + cstr("note") + u32(25) + i32(-1)
    + u8(0) + cstr("amount") + u32(1700) + i32(655366),
    "type": b"Y" + u32(90001) + cstr("public") + cstr("mood"),
    "insert": b"I" + u32(16384) + b"N" + tuple_([("t", b"1"), None, ("t", "é✓".encode())]),
    "insert_binary": b"I" + u32(16385) + b"N" + tuple_([("b", b"\0\0\0\x2a"), ("t", b"")]),
    "update": b"U" + u32(16384) + b"N" + tuple_([("t", b"1"), "u", ("t", b"12.50")]),
    "update_key": b"U" + u32(16384) + b"K" + tuple_([("t", b"1"), None, None])
    + b"N" + tuple_([("t", b"2"), "u", ("t", b"3")]),
    "update_old": b"U" + u32(16384) + b"O" + tuple_([("t", b"1"), ("t", b"x"), None])
    + b"N" + tuple_([("t", b"1"), ("t", b"y"), None]),
    "delete_key": b"D" + u32(16384) + b"K" + tuple_([("t", b"42"), None, None]),
    "delete_old": b"D" + u32(16384) + b"O" + tuple_([("t", b"42"), ("t", b"gone"), ("t", b"0")]),
    "truncate": b"T" + u32(3) + u8(3) + u32(16384) + u32(16385) + u32(16386),
    "message": b"M" + u8(1) + u64(0x16B3748) + cstr("philotes") + u32(5) + b"hello",
}

os.makedirs(HERE, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
print(f"wrote {len(SEEDS)} seeds to {HERE}")
