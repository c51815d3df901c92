"""Typed access to fastpath's maps.

Layouts come from bcc's ctypes classes generated from bpf/include/fastpath.h
(`table.Key`, `table.Leaf`); this module only fills them. It is also the one
place where host and network byte order are converted.
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass

from agent.datapath import libbpf
from agent.model import bpfdefs
from agent.model.endpoint import Endpoint, is_endpoint_key

DEFS = bpfdefs.load()
MAP = DEFS.maps


def be32(ip: str) -> int:
    """IPv4 text -> the integer whose in-memory bytes are the address in
    network order (what a __be32 field declared as a ctypes uint holds)."""
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def ip_from_be32(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def ip_text(value) -> str:
    """An address as conntrack keys hold it: a raw __be32 (IPv4) or the
    16 bytes of an IPv6 address."""
    if isinstance(value, (bytes, bytearray)):
        return str(ipaddress.IPv6Address(bytes(value)))
    return ip_from_be32(value)


def mac_bytes(mac: str) -> bytes:
    b = bytes(int(x, 16) for x in mac.split(":"))
    if len(b) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return b


def key6(table, ip6: str):
    """The key of an IPv6-keyed table (a struct of one 16-byte ip6 field)."""
    k = table.Key()
    k.ip6[:] = list(socket.inet_pton(socket.AF_INET6, ip6))
    return k


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


@dataclass(frozen=True)
class EndpointEntry:
    ip: str
    host_ifindex: int
    eni_ifindex: int
    pod_mac: str
    host_mac: str
    flags: int
    ep_id: int


@dataclass(frozen=True)
class CounterRow:
    ifindex: int
    direction: str
    reason: str
    reason_code: int
    packets: int
    bytes: int
    family: str = ""       # "ipv4" / "ipv6" from counters(by_family=True), else "" (both)

    @property
    def is_drop(self) -> bool:
        return DEFS.is_drop(self.reason_code)


class Maps:
    """Operations on the maps of one loaded module (or reopened pins)."""

    def __init__(self, tables):
        self._t = tables   # name -> bcc table

    def veth_put(self, ep: Endpoint) -> None:
        """Arm the anti-spoofing guard of ep's host veth (bpf/lib/guard.h):
        from now on fp_from_pod drops what it sends from other addresses."""
        t = self._t[MAP["FP_MAP_EP_IFINDEX"]]
        v = t.Leaf()
        v.ip4 = be32(ep.pod_key)
        v.flags = 0 if ep.ip else DEFS.defines["FP_EPIF_F_KEY"]
        if ep.ip6:
            v.ip6[:] = list(socket.inet_pton(socket.AF_INET6, ep.ip6))
            v.flags |= DEFS.defines["FP_EPIF_F_IP6"]
        t[t.Key(ep.host_ifindex)] = v

    def veth_delete(self, ifindex: int, ip: str) -> bool:
        """Disarm the guard of a veth, if it still names `ip` (the pod's key:
        the ifindex may since belong to another registration)."""
        t = self._t[MAP["FP_MAP_EP_IFINDEX"]]
        k = t.Key(ifindex)
        try:
            if t[k].ip4 != be32(ip):
                return False
            del t[k]
            return True
        except KeyError:
            return False

    def veths(self) -> dict[int, str]:
        """Registered host veths: ifindex -> the endpoint's key (its IPv4
        address, or an IPv6-only pod's endpoint key)."""
        t = self._t[MAP["FP_MAP_EP_IFINDEX"]]
        return {k.value: ip_from_be32(v.ip4) for k, v in t.items()}

    def veths_retain(self, wanted: dict[int, str]) -> int:
        """Remove every veth registration but `wanted` (ifindex -> IPv4)."""
        t = self._t[MAP["FP_MAP_EP_IFINDEX"]]
        n = 0
        for ifindex, ip in self.veths().items():
            if wanted.get(ifindex) != ip:
                try:
                    del t[t.Key(ifindex)]
                    n += 1
                except KeyError:
                    pass
        return n

    def endpoint_put(self, ep: Endpoint) -> None:
        # an IPv6 address the veth's endpoint no longer has is no destination
        old6 = self.veth_ip6(ep.host_ifindex)
        if old6 and old6 != ep.ip6:
            self.endpoint6_delete(old6, ep.host_ifindex)
        # the veth's guard before the entry that makes the pod a destination
        self.veth_put(ep)
        t = self._t[MAP["FP_MAP_ENDPOINTS"]]
        v = t.Leaf()
        v.host_ifindex = ep.host_ifindex
        v.eni_ifindex = ep.eni_ifindex
        v.pod_mac[:] = list(mac_bytes(ep.pod_mac))
        v.host_mac[:] = list(mac_bytes(ep.host_mac))
        v.ep_id = ep.ep_id
        # The flag is written in the same value: a map update is atomic per
        # element, so a reader sees the old entry or the complete new one.
        v.flags = DEFS.defines["FP_EP_F_REGISTERED"]
        if ep.ip:
            # (an IPv6-only pod has no IPv4 entry: its endpoint key is no
            # address a packet may be redirected to)
            t[t.Key(ip4=be32(ep.ip))] = v
        if ep.ip6:
            # the IPv6 twin (bpf/maps.c FP_MAP_ENDPOINTS6): the same value
            t6 = self._t[MAP["FP_MAP_ENDPOINTS6"]]
            t6[key6(t6, ep.ip6)] = v

    def endpoint_delete(self, ip: str, host_ifindex: int) -> bool:
        """Remove the endpoint known by `ip`, the pod's key: its IPv4
        address, or an IPv6-only pod's endpoint key. An IPv6-only pod has no
        IPv4 entry, so it is found by the registration of its veth,
        `host_ifindex` (one lookup, never a walk of the veth map); an IPv4
        entry names its veth itself, and that one wins."""
        t = self._t[MAP["FP_MAP_ENDPOINTS"]]
        k = t.Key(ip4=be32(ip))
        try:
            host_ifindex = t[k].host_ifindex
            del t[k]
        except KeyError:
            if not is_endpoint_key(ip) or self._veth_key(host_ifindex) != ip:
                return False
        self._endpoint6_delete_for(host_ifindex)
        self.veth_delete(host_ifindex, ip)
        return True

    def _veth_key(self, host_ifindex: int) -> str:
        """The endpoint key registered on a host veth ("" if none)."""
        t = self._t[MAP["FP_MAP_EP_IFINDEX"]]
        try:
            return ip_from_be32(t[t.Key(host_ifindex)].ip4)
        except KeyError:
            return ""

    def _endpoint6_delete_for(self, host_ifindex: int) -> None:
        """The IPv6 twin of the endpoint behind `host_ifindex`, found by the
        veth's registration (it holds the endpoint's IPv6 address)."""
        ip6 = self.veth_ip6(host_ifindex)
        if ip6:
            self.endpoint6_delete(ip6, host_ifindex)

    def veth_ip6(self, host_ifindex: int) -> str:
        """The IPv6 address registered on a host veth ("" if none)."""
        t = self._t[MAP["FP_MAP_EP_IFINDEX"]]
        try:
            v = t[t.Key(host_ifindex)]
        except KeyError:
            return ""
        if not v.flags & DEFS.defines["FP_EPIF_F_IP6"]:
            return ""
        return socket.inet_ntop(socket.AF_INET6, bytes(v.ip6))

    def endpoint6_delete(self, ip6: str, host_ifindex: int | None = None) -> bool:
        """Remove the IPv6 entry of `ip6` (only if it still names
        `host_ifindex`, when given: the address may since be another pod's)."""
        t = self._t[MAP["FP_MAP_ENDPOINTS6"]]
        k = key6(t, ip6)
        try:
            if host_ifindex is not None and t[k].host_ifindex != host_ifindex:
                return False
            del t[k]
            return True
        except KeyError:
            return False

    def endpoints6_retain(self, wanted: set[str]) -> int:
        """Remove every IPv6 endpoint entry but `wanted` (addresses)."""
        wanted = {str(ipaddress.IPv6Address(w)) for w in wanted}    # the map's spelling
        n = 0
        for e in self.endpoints6():
            if e.ip not in wanted and self.endpoint6_delete(e.ip):
                n += 1
        return n

    def endpoints6(self) -> list[EndpointEntry]:
        t = self._t[MAP["FP_MAP_ENDPOINTS6"]]
        out = [EndpointEntry(socket.inet_ntop(socket.AF_INET6, bytes(k.ip6)), v.host_ifindex,
                             v.eni_ifindex, mac_str(v.pod_mac), mac_str(v.host_mac), v.flags,
                             v.ep_id) for k, v in t.items()]
        return sorted(out, key=lambda e: ipaddress.ip_address(e.ip))

    def endpoints(self) -> list[EndpointEntry]:
        t = self._t[MAP["FP_MAP_ENDPOINTS"]]
        out = []
        for k, v in t.items():
            out.append(EndpointEntry(ip_from_be32(k.ip4), v.host_ifindex, v.eni_ifindex,
                                     mac_str(v.pod_mac), mac_str(v.host_mac), v.flags, v.ep_id))
        return sorted(out, key=lambda e: ipaddress.ip_address(e.ip))

    def counters(self, by_family: bool = False) -> list[CounterRow]:
        """Verdict counters summed over CPUs: one row per (interface,
        direction, reason), both families added up, or with `by_family` one
        per family as well (the metrics' `family` label)."""
        t = self._t[MAP["FP_MAP_COUNTERS"]]
        sums: dict[tuple, list[int]] = {}
        for k, per_cpu in t.items():
            fam = DEFS.family(k.family) if by_family else ""
            acc = sums.setdefault((k.ifindex, k.dir, k.reason, fam), [0, 0])
            acc[0] += sum(c.packets for c in per_cpu)
            acc[1] += sum(c.bytes for c in per_cpu)
        rows = [CounterRow(ifindex, DEFS.dir(d), DEFS.reason(reason), reason, p, b, fam)
                for (ifindex, d, reason, fam), (p, b) in sums.items()]
        return sorted(rows, key=lambda r: (r.ifindex, r.direction, r.reason_code, r.family))

    def counters_clear(self) -> None:
        self._t[MAP["FP_MAP_COUNTERS"]].clear()

    def bypass_set(self, cidrs) -> None:
        """Make the bypass trie hold exactly `cidrs` (adds first, then removals)."""
        t = self._t[MAP["FP_MAP_BYPASS"]]
        nets = [ipaddress.ip_network(c) for c in cidrs]
        want = {}
        for net in nets:
            if net.version != 4:
                continue
            want[(net.prefixlen, be32(str(net.network_address)))] = 1
        have = {(k.prefixlen, k.addr) for k, _ in t.items()}
        for (plen, addr) in want:
            t[t.Key(prefixlen=plen, addr=addr)] = t.Leaf(1)
        for (plen, addr) in have - set(want):
            del t[t.Key(prefixlen=plen, addr=addr)]
        # the IPv6 prefixes, in their own trie (fp_from_pod6)
        t6 = self._t[MAP["FP_MAP_BYPASS6"]]
        want6 = {(n.prefixlen, n.network_address.packed) for n in nets if n.version == 6}
        have6 = {(k.prefixlen, bytes(k.addr)) for k, _ in t6.items()}
        for plen, addr in want6:
            t6[self._lpm6(t6, plen, addr)] = t6.Leaf(1)
        for plen, addr in have6 - want6:
            del t6[self._lpm6(t6, plen, addr)]

    @staticmethod
    def _lpm6(table, plen: int, addr: bytes):
        k = table.Key()
        k.prefixlen = plen
        k.addr[:] = list(addr)
        return k

    def bypass(self) -> list[str]:
        t = self._t[MAP["FP_MAP_BYPASS"]]
        t6 = self._t[MAP["FP_MAP_BYPASS6"]]
        return (sorted(f"{ip_from_be32(k.addr)}/{k.prefixlen}" for k, _ in t.items())
                + sorted(f"{ipaddress.IPv6Address(bytes(k.addr))}/{k.prefixlen}"
                         for k, _ in t6.items()))

    def decision(self):
        """The decision record of the last test or what-if packet."""
        t = self._t[MAP["FP_MAP_DECISION"]]
        return t[t.Key(0)]

    def decision_reset(self, reason: int) -> None:
        t = self._t[MAP["FP_MAP_DECISION"]]
        v = t.Leaf()
        v.reason = reason
        v.pv[0] = v.pv[1] = DEFS.defines["FP_PV_NONE"]
        t[t.Key(0)] = v

    # -- IPv6 address marks (fastpath.h FP_MAP_MARK6) ----------------------
    # The datapath marks a reply entry's source before it writes the entry,
    # LbMaps an IPv6 frontend's address before it writes the frontend;
    # fp_from_pod6 skips a lookup whose slot is unmarked once the map is
    # armed (docs/ipv6.md "IPv6 per-packet cost: lookups only where they
    # can hit"). Entries nobody marked (written by an older generation of
    # programs or agent, carried over by a migration) are marked before
    # the map is armed. Marks are only ever added, one slot a write: never
    # a read-modify-write of what the datapath may be marking meanwhile.

    def mark6_armed(self) -> bool:
        t = self._t[MAP["FP_MAP_MARK6"]]
        return bool(t[t.Key(DEFS.defines["FP_MARK6_ARMED"])].value)

    def mark6_disarm(self) -> None:
        """Nothing is skipped until mark6_arm()."""
        t = self._t[MAP["FP_MAP_MARK6"]]
        t[t.Key(DEFS.defines["FP_MARK6_ARMED"])] = t.Leaf(0)

    def mark6_arm(self) -> int:
        """Mark the source of every IPv6 reply entry in the conntrack maps
        and the address of every IPv6 frontend, then arm; returns how many
        slots this marked. Call with every program of this generation
        attached (they mark what they write) and superseded maps carried
        over."""
        from agent.datapath import mapio
        t = self._t[MAP["FP_MAP_MARK6"]]
        reply = DEFS.defines["FP_CT_REPLY"]
        want = set()
        for name, region, field in (
                ("FP_MAP_CT6", "FP_MARK6_REPLY_SRC", "saddr"),
                ("FP_MAP_CT_NEW6", "FP_MARK6_REPLY_SRC", "saddr"),
                ("FP_MAP_SERVICES6", "FP_MARK6_FRONTEND", "vip")):
            tab = self._t[MAP[name]]
            kt = tab.Key
            ks, vs = ct.sizeof(kt), ct.sizeof(tab.Leaf)
            off, size = getattr(kt, field).offset, getattr(kt, field).size
            base = DEFS.defines[region]
            for kb, _, n in mapio.batches(tab.map_fd, ks, vs):
                raw = bytes(kb)
                for i in range(n):
                    k = raw[i * ks:(i + 1) * ks]
                    if field == "saddr" and k[kt.dir.offset] != reply:
                        continue
                    want.add(base + mark6_slot(k[off:off + size]))
        marked = 0
        for idx in sorted(want):
            if not t[t.Key(idx)].value:
                t[t.Key(idx)] = t.Leaf(1)
                marked += 1
        t[t.Key(DEFS.defines["FP_MARK6_ARMED"])] = t.Leaf(1)
        return marked

    def mark6_marked(self, region: str) -> set[int]:
        """The marked slots of FP_MARK6_REPLY_SRC or FP_MARK6_FRONTEND."""
        t = self._t[MAP["FP_MAP_MARK6"]]
        base = DEFS.defines[f"FP_MARK6_{region}"]
        return {k.value - base for k, v in t.items()
                if v.value and base <= k.value < base + mark6_slots()}


def mark6_slots() -> int:
    return 1 << DEFS.defines["FP_MARK6_BITS"]


def mark6_slot(addr: bytes) -> int:
    """bpf/maps.c fp_mark6_slot of an IPv6 address's 16 bytes: its words as
    the datapath loads them (host order), XORed, times FP_MARK6_MULT, the
    top FP_MARK6_BITS bits."""
    a, b, c, d = struct.unpack("=4I", addr)
    return (((a ^ b ^ c ^ d) * DEFS.defines["FP_MARK6_MULT"]) & 0xFFFFFFFF) >> (
        32 - DEFS.defines["FP_MARK6_BITS"])


def mark6_frontends(table, addrs) -> None:
    """Mark IPv6 frontend addresses (16 bytes each) in FP_MAP_MARK6 before
    their entries are written (see Maps.mark6_arm)."""
    base = DEFS.defines["FP_MARK6_FRONTEND"]
    for idx in {base + mark6_slot(bytes(a)) for a in addrs}:
        if not table[table.Key(idx)].value:
            table[table.Key(idx)] = table.Leaf(1)

PROTO_NUM = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAME = {v: k for k, v in PROTO_NUM.items()}
FLOW_PROTO_NAME = {**PROTO_NAME, 1: "ICMP"}      # flows may be ICMP; frontends never


def be16(port: int) -> int:
    """Port -> the integer whose in-memory bytes are the port in network order."""
    return socket.htons(port)


def port_from_be16(value: int) -> int:
    return struct.unpack("!H", struct.pack("=H", value))[0]


@dataclass(frozen=True)
class CtRow:
    saddr: str
    sport: int
    daddr: str
    dport: int
    proto: str
    direction: str        # "forward" (client -> VIP), "reply" (backend -> client),
                          # or "policy" (a flow NetworkPolicy admitted)
    nat_addr: str
    nat_port: int
    backend_id: int
    svc_id: int
    last_seen_ns: int
    state: str = ""       # "new", "syn-recv", "established", "fin-wait", "closed"
    table: str = ""       # "established", "new" (translated flows) or "policy"
    flags: int = 0


class CtMaps:
    """The conntrack maps (bpf/include/fastpath.h), their entries as data.

    Translated flows live in two tables per family, "established" (FP_MAP_CT,
    a hash nothing evicts) and "new" (FP_MAP_CT_NEW, an LRU), and their IPv6
    twins "established6" (FP_MAP_CT6) and "new6" (FP_MAP_CT_NEW6), whose
    keys and values hold 16-byte addresses (bytes, where IPv4's are raw
    __be32 integers); flows NetworkPolicy admitted in "policy". Keys and
    values are agent.model.conntrack tuples, read in batches
    (agent/datapath/mapio) and unpacked by the compiled layouts; what to
    delete is agent/conntrack's decision, the same for both families."""

    NAT_TABLES = {"established": "FP_MAP_CT", "new": "FP_MAP_CT_NEW",
                  "established6": "FP_MAP_CT6", "new6": "FP_MAP_CT_NEW6"}
    IPV6_TABLES = frozenset({"established6", "new6"})

    def __init__(self, tables):
        from agent.model import conntrack as model
        from agent.datapath import mapio
        self._m = model
        self.tables = {t: tables[MAP[m]] for t, m in self.NAT_TABLES.items()}
        self.tables["policy"] = tables[MAP["FP_MAP_CT_POLICY"]]
        self.frag = tables[MAP["FP_MAP_FRAG"]]
        # per table: (key size, key unpacker, key fields, value size,
        # value unpacker, value fields)
        self._layout = {}
        for table, t in self.tables.items():
            kf, vf = mapio.fields_of(t.Key), mapio.fields_of(t.Leaf)
            ks, vs = ct.sizeof(t.Key), ct.sizeof(t.Leaf)
            vnames = model.PolicyValue._fields if table == "policy" else model.CtValue._fields
            self._layout[table] = (ks, mapio.Unpacker(kf, ks, model.CtKey._fields), kf,
                                   vs, mapio.Unpacker(vf, vs, vnames), vf)
        self.key_size = self._layout["established"][0]
        self._frag_ks, self._frag_vs = ct.sizeof(self.frag.Key), ct.sizeof(self.frag.Leaf)
        self._frag_seen = mapio.Unpacker(mapio.fields_of(self.frag.Leaf), self._frag_vs,
                                         ("first_seen",))
        # IPv6 flows NetworkPolicy admitted, and IPv6 fragment records:
        # tables of their own (keys kept as bytes; the value is IPv4's)
        self.pol6 = tables[MAP["FP_MAP_CT_POLICY6"]]
        self.frag6 = tables[MAP["FP_MAP_POLFRAG6"]]
        self._pol6_ks, self._pol6_vs = ct.sizeof(self.pol6.Key), ct.sizeof(self.pol6.Leaf)
        self._pol6_val = mapio.Unpacker(mapio.fields_of(self.pol6.Leaf), self._pol6_vs,
                                        model.PolicyValue._fields)
        self._pol6_proto = self.pol6.Key.proto.offset
        self._frag6_ks, self._frag6_vs = ct.sizeof(self.frag6.Key), ct.sizeof(self.frag6.Leaf)
        self._frag6_seen = mapio.Unpacker(mapio.fields_of(self.frag6.Leaf), self._frag6_vs,
                                          ("first_seen",))

    def _walk(self, table: str, make):
        from agent.datapath import mapio
        ks, kun, _, vs, vun, _ = self._layout[table]
        out = []
        for kb, vb, _ in mapio.batches(self.tables[table].map_fd, ks, vs):
            out.extend(zip(map(self._m.CtKey._make, kun.many(kb)), map(make, vun.many(vb))))
        return out

    def nat_entries(self, table: str) -> list[tuple]:
        """(CtKey, CtValue) of one translated-flow table."""
        return self._walk(table, self._m.CtValue._make)

    def policy_entries(self) -> list[tuple]:
        """(CtKey, PolicyValue) of the policy table."""
        return self._walk("policy", self._m.PolicyValue._make)

    def frag_entries(self, v6: bool = False) -> list[tuple[bytes, int]]:
        """(raw key, first_seen) of the fragment records (v6: the IPv6 ones)."""
        from agent.datapath import mapio
        t, ks, vs, unpack = ((self.frag6, self._frag6_ks, self._frag6_vs, self._frag6_seen) if v6
                             else (self.frag, self._frag_ks, self._frag_vs, self._frag_seen))
        out = []
        for kb, vb, n in mapio.batches(t.map_fd, ks, vs):
            kraw = bytes(kb)
            seen = [v[0] for v in unpack.many(vb)]
            out.extend((kraw[i * ks:(i + 1) * ks], seen[i]) for i in range(n))
        return out

    def policy6_entries(self) -> list[tuple]:
        """(Ct6Key, PolicyValue) of the IPv6 policy table."""
        from agent.datapath import mapio
        V, ks = self._m.PolicyValue._make, self._pol6_ks
        out = []
        for kb, vb, n in mapio.batches(self.pol6.map_fd, ks, self._pol6_vs):
            kraw = bytes(kb)
            vals = [V(v) for v in self._pol6_val.many(vb)]
            for i in range(n):
                raw = kraw[i * ks:(i + 1) * ks]
                out.append((self._m.Ct6Key(raw, raw[self._pol6_proto]), vals[i]))
        return out

    def key_bytes(self, key, table: str = "established") -> bytes:
        from agent.datapath import mapio
        ks, _, kf, *_ = self._layout[table]
        return mapio.pack(kf, ks, key._asdict())

    def _value(self, table: str, raw):
        V = self._m.PolicyValue if table == "policy" else self._m.CtValue
        return V._make(self._layout[table][4].one(raw))

    def get(self, table: str, key):
        """The value of `key` in `table` now (a CtValue or PolicyValue), or None."""
        from agent.datapath import mapio
        if table == "policy6":
            raw = mapio.lookup(self.pol6.map_fd, key.raw, self._pol6_vs)
            return None if raw is None else self._m.PolicyValue._make(self._pol6_val.one(raw))
        raw = mapio.lookup(self.tables[table].map_fd, self.key_bytes(key, table),
                           self._layout[table][3])
        return None if raw is None else self._value(table, raw)

    def put(self, table: str, key, value) -> None:
        from agent.datapath import mapio
        _, _, _, vs, _, vf = self._layout[table]
        raw = mapio.pack(vf, vs, value._asdict())
        err = mapio.update(self.tables[table].map_fd, self.key_bytes(key, table), raw)
        if err:
            raise OSError(err, f"conntrack {table}: update: {os.strerror(err)}")

    def delete(self, table: str, keys) -> int:
        """Delete these CtKeys from `table` (batched; keys already gone are
        skipped). Returns how many were deleted."""
        from agent.datapath import mapio
        if table == "policy6":
            return mapio.delete_batch(self.pol6.map_fd, [k.raw for k in keys])
        return mapio.delete_batch(self.tables[table].map_fd,
                                  [self.key_bytes(k, table) for k in keys])

    def delete_frag(self, raw_keys, v6: bool = False) -> int:
        from agent.datapath import mapio
        return mapio.delete_batch((self.frag6 if v6 else self.frag).map_fd, list(raw_keys))

    def flush(self) -> int:
        """Delete every conntrack entry (entries that go meanwhile are skipped)."""
        from agent.datapath import mapio
        n = 0
        for table, t in self.tables.items():
            ks, _, _, vs, _, _ = self._layout[table]
            keys = [k for kb, _, cnt in mapio.batches(t.map_fd, ks, vs)
                    for k in (bytes(kb)[i * ks:(i + 1) * ks] for i in range(cnt))]
            n += mapio.delete_batch(t.map_fd, keys)
        n += self.delete("policy6", [k for k, _ in self.policy6_entries()])
        self.delete_frag(k for k, _ in self.frag_entries())
        self.delete_frag((k for k, _ in self.frag_entries(v6=True)), v6=True)
        return n

    def max_entries(self, table: str) -> int:
        return libbpf.map_info(self.tables[table].map_fd).max_entries

    def rows(self) -> list[CtRow]:
        """Every entry of every table, for people and tests."""
        from agent.model.conntrack import DIRECTIONS, state_label
        rows = []
        for table in self.NAT_TABLES:
            for k, v in self.nat_entries(table):
                rows.append(CtRow(ip_text(k.saddr), port_from_be16(k.sport),
                                  ip_text(k.daddr), port_from_be16(k.dport),
                                  FLOW_PROTO_NAME.get(k.proto, str(k.proto)),
                                  DIRECTIONS.get(k.dir, str(k.dir)), ip_text(v.nat_addr),
                                  port_from_be16(v.nat_port), v.backend_id, v.svc_id,
                                  v.last_seen, state_label(v.state), table, v.flags))
        for k, v in self.policy_entries():
            rows.append(CtRow(ip_from_be32(k.saddr), port_from_be16(k.sport),
                              ip_from_be32(k.daddr), port_from_be16(k.dport),
                              FLOW_PROTO_NAME.get(k.proto, str(k.proto)), "policy", "0.0.0.0", 0, 0, 0,
                              v.last_seen, state_label(v.state), "policy", v.flags))
        for k, v in self.policy6_entries():
            r = k.raw
            rows.append(CtRow(str(ipaddress.IPv6Address(r[0:16])), int.from_bytes(r[32:34], "big"),
                              str(ipaddress.IPv6Address(r[16:32])), int.from_bytes(r[34:36], "big"),
                              FLOW_PROTO_NAME.get(k.proto, str(k.proto)), "policy", "::", 0, 0, 0,
                              v.last_seen, state_label(v.state), "policy6", v.flags))
        return rows


class LbMaps:
    """Service maps: frontends, slots, backends, conntrack, affinity.

    Writers are single map updates; the order in which callers use them is
    what keeps a service whole for the packets reading it (see fastpath.h)."""

    def __init__(self, tables):
        self._svc = tables[MAP["FP_MAP_SERVICES"]]
        self._slot = tables[MAP["FP_MAP_SLOTS"]]
        self._be = tables[MAP["FP_MAP_BACKENDS"]]
        self.ct = CtMaps(tables)
        self._ctstat = tables[MAP["FP_MAP_CT_STATS"]]
        self._aff = tables[MAP["FP_MAP_AFFINITY"]]
        self._sockrev = tables[MAP["FP_MAP_SOCKREV"]]
        self._maglev = tables[MAP["FP_MAP_MAGLEV"]]
        self._rng = tables[MAP["FP_MAP_SRC_RANGE"]]
        self._svcnet = tables[MAP["FP_MAP_SVCNET"]]
        # IPv6 twins (fastpath.h): an entry goes to the map of its
        # address's family; slots, Maglev tables and affinity are shared
        # (one id space over both families).
        self._svc6 = tables[MAP["FP_MAP_SERVICES6"]]
        self._mark6 = tables[MAP["FP_MAP_MARK6"]]
        self._be6 = tables[MAP["FP_MAP_BACKENDS6"]]
        self._svcnet6 = tables[MAP["FP_MAP_SVCNET6"]]
        self._sockrev6 = tables[MAP["FP_MAP_SOCKREV6"]]
        self._rng6 = tables[MAP["FP_MAP_SRC_RANGE6"]]
        self.maglev_size = len(self._maglev.Leaf().backend_ids)

    def _svc_key(self, vip: str, port: int, proto: str, scope: int = 0):
        if ":" in vip:
            k = self._svc6.Key(port=be16(port), proto=PROTO_NUM[proto], scope=scope)
            k.vip[:] = list(socket.inet_pton(socket.AF_INET6, vip))
            return k
        return self._svc.Key(vip=be32(vip), port=be16(port), proto=PROTO_NUM[proto], scope=scope)

    def put_backend(self, backend_id: int, ip: str, port: int, proto: str,
                    draining: bool = False) -> None:
        flags = DEFS.defines["FP_BE_F_DRAINING"] if draining else 0
        if ":" in ip:
            v = self._be6.Leaf(port=be16(port), proto=PROTO_NUM[proto], flags=flags)
            v.ip[:] = list(socket.inet_pton(socket.AF_INET6, ip))
            self._be6[self._be6.Key(backend_id)] = v
            return
        v = self._be.Leaf(ip=be32(ip), port=be16(port), proto=PROTO_NUM[proto], flags=flags)
        self._be[self._be.Key(backend_id)] = v

    def delete_backend(self, backend_id: int) -> None:
        # a backend id lives in one family's map; the caller need not know which
        for t in (self._be, self._be6):
            try:
                del t[t.Key(backend_id)]
            except KeyError:
                pass

    def put_slots(self, svc_id: int, backend_ids, first: int = 1) -> None:
        for i, bid in enumerate(backend_ids, start=first):
            self._slot[self._slot.Key(svc_id=svc_id, slot=i)] = self._slot.Leaf(backend_id=bid)

    def delete_slots(self, svc_id: int, first: int, last: int) -> None:
        for i in range(first, last + 1):
            try:
                del self._slot[self._slot.Key(svc_id=svc_id, slot=i)]
            except KeyError:
                pass

    def put_service(self, vip: str, port: int, proto: str, svc_id: int, count: int,
                    flags: int = 0, affinity_timeout: int = 0, scope: int = 0) -> None:
        t = self._svc6 if ":" in vip else self._svc
        v = t.Leaf(svc_id=svc_id, count=count, flags=flags, affinity_timeout=affinity_timeout)
        if t is self._svc6:
            mark6_frontends(self._mark6, [socket.inet_pton(socket.AF_INET6, vip)])
        t[self._svc_key(vip, port, proto, scope)] = v

    # Batched writes (BPF_MAP_UPDATE_BATCH): entries are applied in order.
    # Keys and values are packed straight to bytes by the maps' own layouts
    # (the fields the single writes above set; every other byte zero): a
    # ctypes object or array element per entry costs more than the syscalls
    # a batch saves.
    def _packers(self, table, key_names, value_names):
        from agent.datapath import mapio
        cache = self.__dict__.setdefault("_batch_packers", {})
        got = cache.get(table.name)
        if got is None:
            got = cache[table.name] = tuple(
                mapio.Packer(mapio.fields_of(t) if hasattr(t, "_fields_")
                             else [("value", 0, ct.sizeof(t))], ct.sizeof(t), names).pack
                for t, names in ((table.Key, key_names), (table.Leaf, value_names)))
        return got

    BATCH = 8192

    @classmethod
    def _update_batch(cls, table, n: int, fill) -> None:
        """`fill(keys, vals, lo, m)` fills ctypes arrays of entries lo..lo+m."""
        for lo in range(0, n, cls.BATCH):
            m = min(cls.BATCH, n - lo)
            keys, vals = (table.Key * m)(), (table.Leaf * m)()
            fill(keys, vals, lo, m)
            table.items_update_batch(keys, vals)

    @staticmethod
    def _write_packed(table, keys: list[bytes], values: list[bytes]) -> None:
        from agent.datapath import mapio
        mapio.update_batch_packed(table.map_fd, b"".join(keys), b"".join(values), len(keys))

    def put_backends(self, rows) -> None:
        """[(backend_id, ip, port, proto, draining)], in order (each family's
        rows in their own batch: no slot is written before all of them)."""
        drain = DEFS.defines["FP_BE_F_DRAINING"]
        rows4 = [r for r in rows if ":" not in r[1]]
        rows6 = [r for r in rows if ":" in r[1]]
        if rows4:
            kp, vp = self._packers(self._be, ("value",), ("ip", "port", "proto", "flags"))
            self._write_packed(self._be, [kp(r[0]) for r in rows4],
                               [vp(be32(ip), be16(port), PROTO_NUM[proto],
                                   drain if draining else 0)
                                for _, ip, port, proto, draining in rows4])
        if rows6:
            kp, vp = self._packers(self._be6, ("value",), ("ip", "port", "proto", "flags"))
            self._write_packed(self._be6, [kp(r[0]) for r in rows6],
                               [vp(socket.inet_pton(socket.AF_INET6, ip), be16(port),
                                   PROTO_NUM[proto], drain if draining else 0)
                                for _, ip, port, proto, draining in rows6])

    def put_slot_runs(self, runs) -> None:
        """[(svc_id, backend_ids, first slot)], in order."""
        kp, vp = self._packers(self._slot, ("svc_id", "slot"), ("backend_id",))
        self._write_packed(self._slot,
                           [kp(sid, i) for sid, bids, first in runs
                            for i in range(first, first + len(bids))],
                           [vp(bid) for _, bids, _ in runs for bid in bids])

    def put_services(self, rows) -> None:
        """[(vip, port, proto, svc_id, count, flags, affinity_timeout[, scope])], in order."""
        for table, v6 in ((self._svc, False), (self._svc6, True)):
            mine = [r for r in rows if (":" in r[0]) == v6]
            if not mine:
                continue
            kp, vp = self._packers(table, ("vip", "port", "proto", "scope"),
                                   ("svc_id", "count", "flags", "affinity_timeout"))
            keys, vals = [], []
            for vip, port, proto, sid, count, flags, aff, *scope in mine:
                addr = socket.inet_pton(socket.AF_INET6, vip) if v6 else be32(vip)
                keys.append(kp(addr, be16(port), PROTO_NUM[proto], scope[0] if scope else 0))
                vals.append(vp(sid, count, flags, aff))
            if v6:
                mark6_frontends(self._mark6, [socket.inet_pton(socket.AF_INET6, r[0])
                                              for r in mine])
            self._write_packed(table, keys, vals)

    def delete_service(self, vip: str, port: int, proto: str, scope: int = 0) -> None:
        t = self._svc6 if ":" in vip else self._svc
        try:
            del t[self._svc_key(vip, port, proto, scope)]
        except KeyError:
            pass

    def services(self) -> list[dict]:
        """Every frontend of both families."""
        out = []
        for t, v6 in ((self._svc, False), (self._svc6, True)):
            for k, v in t.items():
                vip = (str(ipaddress.IPv6Address(bytes(k.vip))) if v6
                       else ip_from_be32(k.vip))
                out.append({"vip": vip, "port": port_from_be16(k.port),
                            "proto": PROTO_NAME.get(k.proto, str(k.proto)), "scope": k.scope,
                            "svc_id": v.svc_id, "count": v.count, "flags": v.flags,
                            "affinity_timeout": v.affinity_timeout})
        return out

    # -- Maglev tables, source ranges, Service address ranges -------------

    def put_maglev(self, svc_id: int, table) -> None:
        """The whole table in one map update: a packet sees the old table or
        the new one."""
        if len(table) != self.maglev_size:
            raise ValueError(f"Maglev table of service {svc_id} has {len(table)} entries, the "
                             f"programs were built for {self.maglev_size} (maglev_table_size)")
        v = self._maglev.Leaf()
        v.backend_ids[:] = list(table)
        self._maglev[self._maglev.Key(svc_id)] = v

    def delete_maglev(self, svc_id: int) -> None:
        try:
            del self._maglev[self._maglev.Key(svc_id)]
        except KeyError:
            pass

    def maglev_tables(self) -> dict[int, tuple[int, ...]]:
        return {k.value: tuple(v.backend_ids) for k, v in self._maglev.items()}

    def _rng_key(self, svc_id: int, cidr: str):
        """The key in the map of the prefix's family, and that map."""
        net = ipaddress.ip_network(cidr)
        fixed = DEFS.defines["FP_SRC_RANGE_FIXED_BITS"]
        if net.version == 6:
            k = self._rng6.Key(prefixlen=fixed + net.prefixlen, svc_id=svc_id)
            k.addr[:] = list(net.network_address.packed)
            return self._rng6, k
        return self._rng, self._rng.Key(prefixlen=fixed + net.prefixlen, svc_id=svc_id,
                                        addr=be32(str(net.network_address)))

    def put_ranges(self, svc_id: int, cidrs) -> None:
        for c in cidrs:
            t, k = self._rng_key(svc_id, c)
            t[k] = t.Leaf(1)

    def delete_ranges(self, svc_id: int, cidrs) -> None:
        for c in cidrs:
            t, k = self._rng_key(svc_id, c)
            try:
                del t[k]
            except KeyError:
                pass

    def ranges(self) -> dict[int, set[str]]:
        """Both families' prefixes by service id."""
        fixed = DEFS.defines["FP_SRC_RANGE_FIXED_BITS"]
        out: dict[int, set[str]] = {}
        for k, _ in self._rng.items():
            out.setdefault(k.svc_id, set()).add(
                f"{ip_from_be32(k.addr)}/{k.prefixlen - fixed}")
        for k, _ in self._rng6.items():
            out.setdefault(k.svc_id, set()).add(
                f"{ipaddress.IPv6Address(bytes(k.addr))}/{k.prefixlen - fixed}")
        return out

    def _svcnet_key(self, prefix: str):
        net = ipaddress.ip_network(prefix)
        if net.version == 6:
            return self._lpm6_key(self._svcnet6, net)
        return self._svcnet.Key(prefixlen=net.prefixlen, addr=be32(str(net.network_address)))

    @staticmethod
    def _lpm6_key(table, net):
        k = table.Key()
        k.prefixlen = net.prefixlen
        k.addr[:] = list(net.network_address.packed)
        return k

    def _svcnet_table(self, prefix: str):
        return self._svcnet6 if ":" in prefix else self._svcnet

    def _svcnet_fill(self, items):
        """[(prefix, flags)] -> a batch's keys and values (the 10,000
        ClusterIPs of a full rebuild: ipaddress objects per entry cost more
        than the writes)."""
        def fill(keys, vals, lo, m):
            for i in range(m):
                prefix, flags = items[lo + i]
                net = ipaddress.ip_network(prefix) if not prefix.endswith("/32") else None
                k = keys[i]
                if net is None:
                    k.prefixlen, k.addr = 32, be32(prefix[:-3])
                else:
                    k.prefixlen, k.addr = net.prefixlen, be32(str(net.network_address))
                vals[i] = flags
        return fill

    def svcnet(self) -> dict[str, int]:
        """Both families' Service ranges and ClusterIPs."""
        out = {f"{ip_from_be32(k.addr)}/{k.prefixlen}": v.value
               for k, v in self._svcnet.items()}
        out.update({f"{ipaddress.IPv6Address(bytes(k.addr))}/{k.prefixlen}": v.value
                    for k, v in self._svcnet6.items()})
        return out

    def svcnet_put(self, prefix: str, flags: int) -> None:
        t = self._svcnet_table(prefix)
        t[self._svcnet_key(prefix)] = t.Leaf(flags)

    def svcnet_delete(self, prefix: str) -> None:
        t = self._svcnet_table(prefix)
        try:
            del t[self._svcnet_key(prefix)]
        except KeyError:
            pass

    def svcnet_set(self, want: dict[str, int]) -> None:
        """Make the maps hold exactly `want` (prefix -> flags, both
        families): additions and changes first, then removals."""
        have = self.svcnet()
        put = [(prefix, flags) for prefix, flags in want.items()
               if have.get(prefix) != flags and ":" not in prefix]
        self._update_batch(self._svcnet, len(put), self._svcnet_fill(put))
        for prefix, flags in want.items():
            if ":" in prefix and have.get(prefix) != flags:
                self.svcnet_put(prefix, flags)
        for prefix in set(have) - set(want):
            self.svcnet_delete(prefix)

    # -- state that names ids ------------------------------------------------

    def affinity_purge(self, svc_ids, backend_ids, pairs) -> int:
        """Delete ClientIP affinity entries of a released service id, of a
        deleted backend, or of a (service, backend) pair that ended."""
        gone = []
        for k, v in self._aff.items():
            if k.svc_id in svc_ids or v.backend_id in backend_ids or \
                    (k.svc_id, v.backend_id) in pairs:
                gone.append(self._aff.Key(svc_id=k.svc_id, client=k.client))
        n = 0
        for k in gone:
            try:
                del self._aff[k]
                n += 1
            except KeyError:
                pass       # evicted meanwhile (LRU)
        return n

    def named_ids(self) -> tuple[set[int], set[int]]:
        """(service ids, backend ids) that affinity and conntrack entries
        name: after a restart, none of them may come back as a fresh id."""
        sids: set[int] = set()
        bids: set[int] = set()
        for k, v in self._aff.items():
            sids.add(k.svc_id)
            bids.add(v.backend_id)
        for table in self.ct.NAT_TABLES:
            for _, v in self.ct.nat_entries(table):
                if v.svc_id:
                    sids.add(v.svc_id)
                if v.backend_id:
                    bids.add(v.backend_id)
        return sids, bids

    def slots(self, svc_id: int, count: int) -> list[int]:
        return [self._slot[self._slot.Key(svc_id=svc_id, slot=i)].backend_id
                for i in range(1, count + 1)]

    def backends(self) -> dict[int, tuple[str, int, str]]:
        """Every backend of both families, by id (one id space)."""
        out = {k.value: (ip_from_be32(v.ip), port_from_be16(v.port),
                         PROTO_NAME.get(v.proto, "?"))
               for k, v in self._be.items()}
        for k, v in self._be6.items():
            out[k.value] = (str(ipaddress.IPv6Address(bytes(v.ip))), port_from_be16(v.port),
                            PROTO_NAME.get(v.proto, "?"))
        return out

    def draining_backends(self) -> set[int]:
        """Backend ids kept only for the flows already on them."""
        drain = DEFS.defines["FP_BE_F_DRAINING"]
        return ({k.value for k, v in self._be.items() if v.flags & drain}
                | {k.value for k, v in self._be6.items() if v.flags & drain})

    def all_slots(self) -> dict[tuple[int, int], int]:
        return {(k.svc_id, k.slot): v.backend_id for k, v in self._slot.items()}

    def conntrack(self) -> list[CtRow]:
        """Every conntrack entry (translated flows and admitted flows)."""
        return self.ct.rows()

    def conntrack_flush(self) -> None:
        """Delete every conntrack entry (batched; entries that go meanwhile,
        to the datapath's LRU or the agent's GC, are skipped)."""
        self.ct.flush()

    def ct_events(self) -> dict[str, int]:
        """The datapath's conntrack event counters (FP_CT_EVENTS), summed over CPUs."""
        t = self._ctstat
        out = {}
        for code in DEFS.ct_events.values():
            out[code.label] = sum(int(v) for v in t[t.Key(code.value)])
        return out

    def sockrev_get(self, cookie: int, addr: str, port: int) -> tuple[str, int] | None:
        """The frontend (VIP, port) socket-LB translated socket `cookie` from,
        when it sent it to backend addr:port; None when it did not."""
        if ":" in addr:
            k = self._sockrev6.Key(cookie=cookie, port=be16(port))
            k.addr[:] = list(socket.inet_pton(socket.AF_INET6, addr))
            try:
                v = self._sockrev6[k]
            except KeyError:
                return None
            return str(ipaddress.IPv6Address(bytes(v.vip))), port_from_be16(v.vport)
        k = self._sockrev.Key(cookie=cookie, addr=be32(addr), port=be16(port))
        try:
            v = self._sockrev[k]
        except KeyError:
            return None
        return ip_from_be32(v.vip), port_from_be16(v.vport)


SO_NETNS_COOKIE = 71


def netns_cookie(netns: str | None = None) -> int:
    """The kernel's cookie of a network namespace (what bpf_get_netns_cookie
    returns for sockets in it)."""
    import socket as _socket
    from agent.datapath.nsenter import in_netns
    with in_netns(netns):
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    with s:
        return struct.unpack("=Q", s.getsockopt(_socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


class ConfigMap:
    """The programs' runtime settings (one array entry). Each writer changes
    only its own fields: socket-LB, policy, bandwidth and the node's address
    are set by different threads of the agent at different times, each a
    read-modify-write of the one entry, so one lock orders them (without
    it a thread could write back a copy read before another's change: the
    socket-LB or policy flag lost). The monitor, another process, has a map
    of its own (MonitorMap)."""

    def __init__(self, tables):
        self._t = tables[MAP["FP_MAP_CONFIG"]]
        self._lock = threading.Lock()

    def _update(self, *, set_flags: int = 0, clear_flags: int = 0, **fields) -> None:
        with self._lock:
            v = self._t[self._t.Key(0)]
            v.flags = (v.flags & ~clear_flags) | set_flags
            for name, value in fields.items():
                setattr(v, name, value)
            self._t[self._t.Key(0)] = v

    def set(self, *, socket_lb: bool, hostns_only: bool, host_netns_cookie: int) -> None:
        sock = DEFS.defines["FP_CFG_F_SOCKLB"]
        hostns = DEFS.defines["FP_CFG_F_SOCKLB_HOSTNS"]
        self._update(set_flags=(sock if socket_lb else 0) | (hostns if hostns_only else 0),
                     clear_flags=sock | hostns, host_netns_cookie=host_netns_cookie)

    def socket_lb(self) -> bool:
        """Whether the programs see socket-LB on (FP_CFG_F_SOCKLB)."""
        return bool(self._t[self._t.Key(0)].flags & DEFS.defines["FP_CFG_F_SOCKLB"])

    def set_node(self, ip4: str, primary_ifindex: int, ip6: str = "") -> None:
        """The node's primary addresses and NIC (SNAT source, unbound sockets)."""
        addr6 = (ct.c_uint8 * 16)(*(socket.inet_pton(socket.AF_INET6, ip6) if ip6
                                    else bytes(16)))
        self._update(node_ip4=be32(ip4) if ip4 else 0, primary_ifindex=primary_ifindex,
                     node_ip6=addr6)

    def set_policy(self, enabled: bool) -> None:
        flag = DEFS.defines["FP_CFG_F_POLICY"]
        self._update(set_flags=flag if enabled else 0, clear_flags=flag)

    def set_bandwidth(self, enabled: bool, edt: bool = False) -> None:
        """FP_CFG_F_BW: limits in force (the kernel supports them and some
        pod is limited); FP_CFG_F_BW_EDT: traffic to the VPC is paced by
        EDT timestamps (else by the ENIs' HTB classes)."""
        on, e = DEFS.defines["FP_CFG_F_BW"], DEFS.defines["FP_CFG_F_BW_EDT"]
        self._update(set_flags=(on if enabled else 0) | (e if enabled and edt else 0),
                     clear_flags=on | e)

    def get(self) -> dict:
        v = self._t[self._t.Key(0)]
        return {"host_netns_cookie": v.host_netns_cookie, "flags": v.flags,
                "node_ip4": ip_from_be32(v.node_ip4) if v.node_ip4 else "",
                "primary_ifindex": v.primary_ifindex,
                "node_ip6": (str(ipaddress.IPv6Address(bytes(v.node_ip6)))
                             if any(v.node_ip6) else "")}



class MonitorMap:
    """FP_MON_EV_* bits: which events besides drops reach the ring buffer
    (`fastpath monitor` sets them while it runs; tests set them here)."""

    def __init__(self, tables):
        self._t = tables[MAP["FP_MAP_MONITOR"]]

    def set_events(self, mask: int) -> None:
        self._t[self._t.Key(0)] = self._t.Leaf(events=mask)

    def events(self) -> int:
        return self._t[self._t.Key(0)].events


class SocketLbSkipMap:
    """Network namespaces (by cookie) whose sockets socket-LB leaves alone."""

    def __init__(self, tables):
        self._t = tables[MAP["FP_MAP_SOCKLB_SKIP"]]

    def get(self) -> dict[int, int]:
        return {k.value: v.flags for k, v in self._t.items()}

    def set(self, want: dict[int, int]) -> tuple[int, int]:
        """Make the map hold exactly `want` {netns cookie: flags}: additions
        first, then removals. Returns (written, removed)."""
        have = self.get()
        written = removed = 0
        for cookie, flags in want.items():
            if have.get(cookie) != flags:
                self._t[self._t.Key(cookie)] = self._t.Leaf(flags=flags)
                written += 1
        for cookie in set(have) - set(want):
            try:
                del self._t[self._t.Key(cookie)]
                removed += 1
            except KeyError:
                pass
        return written, removed


CRC32C_POLY = 0x82F63B78          # reflected Castagnoli polynomial


def crc32c_mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC32c polynomial, bit-reflected (x^0 = 1 << 31)."""
    p = 0
    for i in range(32):
        if a & (0x80000000 >> i):
            p ^= b
        b = (b >> 1) ^ CRC32C_POLY if b & 1 else b >> 1
    return p


def crc32c_powers() -> list[int]:
    """FP_MAP_CRC32C's content: x^(8k) for k < 256, then x^(8*256*k)."""
    one, x8 = 0x80000000, 0x80000000 >> 8
    lo = [one]
    for _ in range(255):
        lo.append(crc32c_mulmod(lo[-1], x8))
    step = crc32c_mulmod(lo[255], x8)            # x^(8*256)
    hi = [one]
    for _ in range(255):
        hi.append(crc32c_mulmod(hi[-1], step))
    return lo + hi


def crc32c_fill(tables) -> None:
    """Write the SCTP checksum constants (idempotent; done at every load)."""
    t = tables[MAP["FP_MAP_CRC32C"]]
    want = crc32c_powers()
    assert len(want) == DEFS.defines["FP_CRC32C_POWERS"]
    for i, v in enumerate(want):
        t[t.Key(i)] = t.Leaf(v)
