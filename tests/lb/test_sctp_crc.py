"""The constants behind the datapath's incremental SCTP checksum update
(FP_MAP_CRC32C), and the identity it relies on, checked against a plain
CRC32c over whole messages."""
from __future__ import annotations

import random

from agent.datapath.maps import CRC32C_POLY, crc32c_mulmod, crc32c_powers


def crc32c(data: bytes, init: int = 0xFFFFFFFF, xorout: int = 0xFFFFFFFF) -> int:
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY if crc & 1 else crc >> 1
    return crc ^ xorout


def test_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_powers_are_x_to_the_8k():
    p = crc32c_powers()
    assert len(p) == 512
    x8 = 0x80000000 >> 8
    acc = 0x80000000
    for k in range(300):
        if k < 256:
            assert p[k] == acc
        acc = crc32c_mulmod(acc, x8)
    # x^(8*256*k) == (x^(8*256))^k, and x^(8*256) is 256 steps of x^8
    step = p[1 + 256]
    assert step == crc32c_mulmod(p[255], x8)
    assert p[256 + 3] == crc32c_mulmod(crc32c_mulmod(step, step), step)


def test_a_port_change_updates_the_crc_like_the_datapath_does():
    rnd = random.Random(7)
    powers = crc32c_powers()
    for _ in range(40):
        n = rnd.randrange(16, 3000)
        msg = bytearray(rnd.randbytes(n))
        msg[8:12] = bytes(4)                      # the checksum field counts as zero
        at = rnd.choice((0, 2))                   # source or destination port
        new = bytearray(msg)
        new[at:at + 2] = rnd.randbytes(2)
        tail = n - at - 2
        crc = 0
        for b in (msg[at] ^ new[at], msg[at + 1] ^ new[at + 1]):
            crc = crc32c(bytes([b]), init=crc, xorout=0)
        power = crc32c_mulmod(powers[tail & 0xFF], powers[256 + (tail >> 8)])
        assert crc32c(bytes(new)) == crc32c(bytes(msg)) ^ crc32c_mulmod(power, crc)
