"""Conntrack entries as data, and the rules the datapath and the agent share
(plain data: the datapath unpacks map entries into these types, the
conntrack package decides over them).

An entry is what one of the conntrack maps holds for one key (see
bpf/include/fastpath.h, "Connection tracking"), unpacked into plain values:
`CtKey` and `CtValue` (translated flows), `PolicyValue` (flows NetworkPolicy
admitted). `Lifetimes` is the table both sides apply: an entry whose
`last_seen` is older than its state's lifetime is absent for the programs
(bpf/lib/ct.h fp_ct_expired) and removed by the agent's GC.

Pure module: no bcc, no kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from agent.model import bpfdefs

_D = bpfdefs.load()
DEFS = _D.defines
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP = 6, 17, 132, 1
NSEC = 1_000_000_000

FORWARD, REPLY, POLICY = DEFS["FP_CT_FORWARD"], DEFS["FP_CT_REPLY"], DEFS["FP_CT_POLICY"]
DIRECTIONS = {FORWARD: "forward", REPLY: "reply", POLICY: "policy"}
F_HAIRPIN = DEFS["FP_CT_F_HAIRPIN"]
F_SNAT = DEFS["FP_CT_F_SNAT"]

STATES = {c.value: c.label for c in _D.ct_states.values()}
STATE = {c.name[len("FP_CT_"):].lower(): c.value for c in _D.ct_states.values()}
NEW, SYN_RECV, ESTABLISHED = STATE["new"], STATE["syn_recv"], STATE["established"]
FIN_WAIT, CLOSED = STATE["fin_wait"], STATE["closed"]
# protocols whose flows never move to another backend mid-stream: only their
# opening packet picks one (a TCP SYN, an SCTP INIT)
CONNECTION_PROTOCOLS = (IPPROTO_TCP, IPPROTO_SCTP)


class CtKey(NamedTuple):
    saddr: int          # raw __be32 (the integer whose bytes are the address)
    daddr: int
    sport: int          # raw __be16
    dport: int
    proto: int
    dir: int


class CtValue(NamedTuple):
    last_seen: int      # ns, CLOCK_MONOTONIC
    nat_addr: int
    nat_port: int
    flags: int
    state: int
    backend_id: int
    svc_id: int
    peer_addr: int = 0  # with F_SNAT: forward: the source it leaves with; reply: the client
    peer_port: int = 0


class Ct6Key(NamedTuple):
    """A key of the IPv6 policy table (fastpath.h's fp_ctpol6_key), kept as
    its bytes: what the sweep needs of it is its protocol."""
    raw: bytes
    proto: int


class PolicyValue(NamedTuple):
    last_seen: int
    flags: int
    state: int


@dataclass(frozen=True)
class Lifetimes:
    """Seconds an entry may go without a packet, by protocol and state."""

    tcp_syn: int = 60
    tcp_established: int = 21600
    tcp_fin: int = 60
    tcp_close: int = 10
    other: int = 120

    @classmethod
    def from_config(cls, cfg) -> "Lifetimes":
        return cls(cfg.conntrack_tcp_syn_timeout, cfg.conntrack_tcp_idle_timeout,
                   cfg.conntrack_tcp_fin_timeout, cfg.conntrack_tcp_close_timeout,
                   cfg.conntrack_idle_timeout)

    def seconds(self, proto: int, state: int) -> int:
        """The twin of fp_ct_lifetime() in bpf/lib/ct.h."""
        if proto != IPPROTO_TCP:
            return self.other
        if state in (NEW, SYN_RECV):
            return self.tcp_syn
        if state == ESTABLISHED:
            return self.tcp_established
        if state == FIN_WAIT:
            return self.tcp_fin
        return self.tcp_close

    def expired(self, proto: int, state: int, last_seen: int, now_ns: int) -> bool:
        """The twin of fp_ct_expired()."""
        return now_ns - last_seen > self.seconds(proto, state) * NSEC


def state_label(state: int) -> str:
    return STATES.get(state, f"state-{state}")


def partner(key: CtKey, value: CtValue, hairpin_ip: int) -> CtKey:
    """The other entry of a translated flow (fp_ct_partner in bpf/lib/ct.h)."""
    hairpin = value.flags & F_HAIRPIN
    if value.flags & F_SNAT:
        if key.dir == FORWARD:
            return CtKey(value.nat_addr, value.peer_addr, value.nat_port, value.peer_port,
                         key.proto, REPLY)
        return CtKey(value.peer_addr, value.nat_addr, value.peer_port, value.nat_port,
                     key.proto, FORWARD)
    if key.dir == FORWARD:
        return CtKey(value.nat_addr, hairpin_ip if hairpin else key.saddr, value.nat_port,
                     key.sport, key.proto, REPLY)
    return CtKey(key.saddr if hairpin else key.daddr, value.nat_addr, key.dport,
                 value.nat_port, key.proto, FORWARD)
