"""Find and close sockets through the kernel's sock_diag netlink interface.

Socket-LB connects a UDP socket straight to a backend; when that backend
leaves the Service, nothing on the packet path can move the socket (its
packets carry the backend's address, not the VIP). The agent closes such
sockets the way `ss -K` does: a SOCK_DESTROY request (the kernel needs
CONFIG_INET_DIAG_DESTROY) aborts the socket with ECONNABORTED and
disconnects it, so the application's next recv() fails with ECONNABORTED
and its next send() with EDESTADDRREQ, never a datagram to the dead backend;
a client that reconnects to the VIP gets a live backend.

sock_diag answers for one network namespace: the one the netlink socket was
created in (`netns` below: a name or path; None = the caller's own).
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from agent.datapath.nsenter import in_netns

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_ESTABLISHED = 1          # a connected UDP socket's state

_NLMSG = struct.Struct("=IHHII")
# inet_diag_sockid: sport, dport (NBO), src[4], dst[4] (NBO), if, cookie[2]
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_REQ_HEAD = struct.Struct("=BBBBI")      # family, protocol, ext, pad, states
_MSG_HEAD = struct.Struct("=BBBB")       # family, state, timer, retrans


@dataclass(frozen=True)
class DiagSocket:
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int
    cookie: int
    state: int
    inode: int
    raw_id: bytes            # the inet_diag_sockid as the kernel sent it
    family: int = socket.AF_INET   # the socket's; an IPv6 one talking IPv4 (mapped)
                                   # shows its IPv4 peer as IPv4 text


def _sockid(src: str = "0.0.0.0", sport: int = 0, dst: str = "0.0.0.0", dport: int = 0,
            ifindex: int = 0, cookie: int = 0xFFFFFFFFFFFFFFFF) -> bytes:
    return (_SOCKID.pack(sport, dport, socket.inet_aton(src).ljust(16, b"\0"),
                         socket.inet_aton(dst).ljust(16, b"\0"))
            + _SOCKID_TAIL.pack(ifindex, cookie & 0xFFFFFFFF, cookie >> 32))


def _request(msg_type: int, flags: int, proto: int, states: int, sockid: bytes,
             seq: int, family: int = socket.AF_INET) -> bytes:
    body = _REQ_HEAD.pack(family, proto, 0, 0, states) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, 0) + body


_V4MAPPED = b"\0" * 10 + b"\xff\xff"


def _addr(fam: int, raw: bytes) -> str:
    if fam == socket.AF_INET6:
        if raw[:12] == _V4MAPPED:
            return socket.inet_ntoa(raw[12:16])
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntoa(raw[:4])


def _parse_msg(payload: bytes) -> DiagSocket:
    fam, state, _t, _r = _MSG_HEAD.unpack_from(payload, 0)
    raw_id = payload[4:4 + 48]
    sport, dport, src, dst = _SOCKID.unpack_from(raw_id, 0)
    ifindex, c0, c1 = _SOCKID_TAIL.unpack_from(raw_id, _SOCKID.size)
    # expires, rqueue, wqueue, uid, inode follow the sockid
    inode = struct.unpack_from("=I", payload, 4 + 48 + 16)[0]
    return DiagSocket(_addr(fam, src), sport, _addr(fam, dst), dport,
                      ifindex, c0 | (c1 << 32), state, inode, raw_id, fam)


def _open(netns: str | None) -> socket.socket:
    with in_netns(netns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    s.settimeout(5)
    return s


def udp_connected(netns: str | None = None) -> list[DiagSocket]:
    """Every connected UDP socket of the network namespace, both families."""
    out = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        out += _udp_connected(netns, fam)
    return out


def _udp_connected(netns: str | None, family: int) -> list[DiagSocket]:
    out = []
    with _open(netns) as s:
        s.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, socket.IPPROTO_UDP,
                        1 << TCP_ESTABLISHED, _sockid(), 1, family))
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, typ, _f, _seq, _pid = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    return out
                if typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                    raise OSError(err, f"sock_diag dump: {os.strerror(err)}")
                if typ == SOCK_DIAG_BY_FAMILY:
                    out.append(_parse_msg(data[off + _NLMSG.size:off + length]))
                off += (length + 3) & ~3


def destroy_udp(sock: DiagSocket, netns: str | None = None) -> bool:
    """Abort one UDP socket (found by udp_connected in the same netns).
    False when it is gone already; OSError when the kernel refuses
    (EOPNOTSUPP: no CONFIG_INET_DIAG_DESTROY; EPERM: no CAP_NET_ADMIN)."""
    with _open(netns) as s:
        s.send(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, socket.IPPROTO_UDP,
                        0xFFFFFFFF, sock.raw_id, 2, sock.family))
        data = s.recv(1 << 16)
    length, typ, _f, _seq, _pid = _NLMSG.unpack_from(data, 0)
    if typ != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"sock_diag destroy: unexpected reply type {typ}")
    err = -struct.unpack_from("=i", data, _NLMSG.size)[0]
    if err == 0:
        return True
    if err == errno.ENOENT:
        return False
    raise OSError(err, f"sock_diag destroy {sock.src}:{sock.sport} -> {sock.dst}:{sock.dport}: "
                  f"{os.strerror(err)}")
