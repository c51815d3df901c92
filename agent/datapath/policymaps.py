"""The NetworkPolicy maps: agent/policy's operations as map writes, and the
maps read back as a MapImage (what a restarted agent starts its diff from).

Layouts are fastpath.h's (struct fp_pol_key, fp_pol_ep, fp_pol_rule); the
byte order of every field is stated there. The datapath keeps the lowest
policy id of a rule or a direction; the agent keeps the full lists, so a
MapImage read back from the maps names one policy where the compiled state
may name several (an attribution difference only: the same packets pass).
"""
from __future__ import annotations

import ctypes as ct
import ipaddress

from agent.model.bpfdefs import load as _defs
from agent.datapath import mapio
from agent.datapath.maps import MAP, be16, be32, ip_from_be32, port_from_be16
from agent.policy import addr, ip4
from agent.policy.diff import (
    EndpointDelete, EndpointPut, IpcacheDelete, IpcachePut, Op, RuleDelete, RulePut,
)
from agent.policy.ports import PROTO_ANY
from agent.policy.state import (
    RULE_FIXED_BITS, Direction, DirectionPolicy, EndpointConfig, MapImage, PolicyKey, RuleValue,
)

DEFS = _defs()
F_ENFORCED = DEFS.defines["FP_POL_F_ENFORCED"]
F_AUDIT = DEFS.defines["FP_POL_F_AUDIT"]
F_RULE_AUDIT = DEFS.defines["FP_RULE_F_AUDIT"]
VERDICTS = {DEFS.defines["FP_PV_ALLOW"]: "allow", DEFS.defines["FP_PV_DENY"]: "deny",
            DEFS.defines["FP_PV_AUDIT_DENY"]: "audit-would-deny"}


def _htonl(v: int) -> int:
    """An int whose in-memory (host order) bytes are `v` in network order."""
    return int.from_bytes(v.to_bytes(4, "big"), "little")


def _ntohl(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def _rule_fields(v: RuleValue) -> tuple[int, int]:
    """What the rules map keeps of a rule's value: its lowest policy id
    and the audit flag."""
    return (min(v.policies) if v.policies else 0), (F_RULE_AUDIT if v.audit else 0)


def _packer(ctype, names=None) -> mapio.Packer:
    """A packer of these fields of a struct type; no names: its one value
    (a scalar type, or the first field of a struct)."""
    if hasattr(ctype, "_fields_"):
        layout = mapio.fields_of(ctype)
    else:
        layout = [("value", 0, ct.sizeof(ctype))]
    return mapio.Packer(layout, ct.sizeof(ctype), names or (layout[0][0],))


# The map entry an operation writes or deletes.
_ENTRY = {IpcachePut: lambda op: op.prefix, IpcacheDelete: lambda op: op.prefix,
          RulePut: lambda op: (op.endpoint, op.key), RuleDelete: lambda op: (op.endpoint, op.key),
          EndpointPut: lambda op: op.endpoint, EndpointDelete: lambda op: op.endpoint}


def _untouched(exc: OSError) -> bool:
    return isinstance(exc, mapio.BatchError) and exc.done == 0


class PolicyMaps:
    def __init__(self, tables):
        self.ipcache = tables[MAP["FP_MAP_IPCACHE"]]
        # IPv6 prefixes: their own trie (the same identities)
        self.ipcache6 = tables[MAP["FP_MAP_IPCACHE6"]]
        self.endpoints = tables[MAP["FP_MAP_POLICY_EP"]]
        self.rules = tables[MAP["FP_MAP_POLICY"]]
        self.counters = tables[MAP["FP_MAP_POLICY_CNT"]]
        # Bytes of keys and values for batched writes, by the maps' own
        # layouts (the fields set exactly as the ctypes writes below set them).
        self._ipc_key = _packer(self.ipcache.Key, ("prefixlen", "addr"))
        self._ipc_val = _packer(self.ipcache.Leaf)
        self._ipc6_val = _packer(self.ipcache6.Leaf)
        self._rule_key_packer = _packer(self.rules.Key, ("prefixlen", "ep_ip4", "identity", "dir",
                                                         "proto", "dport"))
        self._rule_val = _packer(self.rules.Leaf, ("policy_id", "flags", "flows"))
        self._flows_of = mapio.Unpacker(mapio.fields_of(self.rules.Leaf),
                                        ct.sizeof(self.rules.Leaf), ("flows",))
        self._ep_key = _packer(self.endpoints.Key)

    # ------------------------------------------------------------ keys
    def _ipcache_table(self, prefix: str):
        return self.ipcache6 if addr.is_ip6(prefix) else self.ipcache

    def _ipcache_key(self, prefix: str):
        p = ip4.parse_prefix(prefix)
        if p is None:
            net6 = ipaddress.IPv6Network(prefix)
            k = self.ipcache6.Key()
            k.prefixlen = net6.prefixlen
            k.addr[:] = list(net6.network_address.packed)
            return k
        plen, net = p
        return self.ipcache.Key(prefixlen=plen, addr=be32(ip4.to_text(net)))

    def _rule_key(self, ep: str, k: PolicyKey):
        return self.rules.Key(prefixlen=k.lpm_prefixlen, ep_ip4=be32(ep),
                              identity=_htonl(k.identity), dir=int(k.direction),
                              proto=k.protocol, dport=be16(k.port))

    def _ep_value(self, cfg: EndpointConfig):
        v = self.endpoints.Leaf()
        for d in Direction:
            dp = cfg.of(d)
            v.dir[int(d)].flags = (F_ENFORCED if dp.enforced else 0) | (F_AUDIT if dp.audit else 0)
            v.dir[int(d)].policy_id = min(dp.deciding) if dp.deciding else 0
        return v

    # ----------------------------------------------------------- writes
    def apply(self, op: Op) -> None:
        if isinstance(op, IpcachePut):
            t = self._ipcache_table(op.prefix)
            t[self._ipcache_key(op.prefix)] = t.Leaf(op.identity)
        elif isinstance(op, IpcacheDelete):
            self._delete(self._ipcache_table(op.prefix), self._ipcache_key(op.prefix))
        elif isinstance(op, RulePut):
            policy_id, flags = _rule_fields(op.value)
            was = op.was
            if isinstance(was, RuleValue) and _rule_fields(was) == (policy_id, flags):
                return        # an attribution the map does not hold: nothing to write
            key = self._rule_key(op.endpoint, op.key)
            v = self.rules.Leaf()
            v.policy_id, v.flags = policy_id, flags
            v.flows = 0
            if was is not None:          # a rewritten rule keeps its flow count
                try:
                    v.flows = self.rules[key].flows
                except KeyError:
                    pass
            self.rules[key] = v
        elif isinstance(op, RuleDelete):
            self._delete(self.rules, self._rule_key(op.endpoint, op.key))
        elif isinstance(op, EndpointPut):
            self.endpoints[self.endpoints.Key(be32(op.endpoint))] = self._ep_value(op.config)
        elif isinstance(op, EndpointDelete):
            self._delete(self.endpoints, self.endpoints.Key(be32(op.endpoint)))
        else:
            raise TypeError(f"unknown policy map operation {op!r}")

    # ---------------------------------------------------- batched writes
    def apply_all(self, ops) -> None:
        """A plan's operations in order, each run of one kind of operation
        as one batched update or delete of its map. The kernel applies a
        batch entry by entry in order and stops at the first entry it
        refuses (a full map), so what is in the maps when this raises is
        what the same operations written one by one would have left: every
        operation before the refused one, none after. A run is cut where an
        entry repeats, so a write that reads its entry first (a rewritten
        rule keeps its flow count) still sees the writes before it."""
        i, n = 0, len(ops)
        while i < n:
            kind = type(ops[i])
            batched = self._BATCHED.get(kind)
            if batched is None:
                self.apply(ops[i])
                i += 1
                continue
            entry = _ENTRY[kind]
            seen = {entry(ops[i])}
            j = i + 1
            while j < n and type(ops[j]) is kind and (e := entry(ops[j])) not in seen:
                seen.add(e)
                j += 1
            if j - i == 1:
                self.apply(ops[i])
            else:
                batched(self, ops[i:j])
            i = j

    def _ipcache_bytes(self, prefix: str) -> bytes:
        p = ip4.parse_prefix(prefix)
        if p is None:
            raise ValueError(f"ipcache: {prefix!r} is not an IPv4 prefix")
        plen, net = p
        return self._ipc_key.pack(plen, be32(ip4.to_text(net)))

    def _rule_bytes(self, ep: str, k: PolicyKey) -> bytes:
        return self._rule_key_packer.pack(k.lpm_prefixlen, be32(ep), _htonl(k.identity),
                                          int(k.direction), k.protocol, be16(k.port))

    def _write(self, table, pairs: list[tuple[bytes, bytes]]) -> None:
        try:
            mapio.update_batch(table.map_fd, pairs)
        except OSError as exc:
            # a kernel without batch operations for this map type refuses
            # before writing anything: the same writes one by one
            if exc.errno not in mapio.NO_BATCH or not _untouched(exc):
                raise
            for k, v in pairs:
                table[table.Key.from_buffer_copy(k)] = table.Leaf.from_buffer_copy(v)

    def _remove(self, table, keys: list[bytes]) -> None:
        try:
            mapio.delete_batch(table.map_fd, keys)
        except OSError as exc:
            if exc.errno not in mapio.NO_BATCH or not _untouched(exc):
                raise
            for k in keys:
                self._delete(table, table.Key.from_buffer_copy(k))

    def _put_ipcache(self, run) -> None:
        v4 = [op for op in run if not addr.is_ip6(op.prefix)]
        if v4:
            self._write(self.ipcache, [(self._ipcache_bytes(op.prefix),
                                        self._ipc_val.pack(op.identity)) for op in v4])
        if len(v4) != len(run):
            self._write(self.ipcache6, [(bytes(self._ipcache_key(op.prefix)),
                                         self._ipc6_val.pack(op.identity))
                                        for op in run if addr.is_ip6(op.prefix)])

    def _del_ipcache(self, run) -> None:
        v4 = [op for op in run if not addr.is_ip6(op.prefix)]
        if v4:
            self._remove(self.ipcache, [self._ipcache_bytes(op.prefix) for op in v4])
        if len(v4) != len(run):
            self._remove(self.ipcache6, [bytes(self._ipcache_key(op.prefix))
                                         for op in run if addr.is_ip6(op.prefix)])

    def _put_rules(self, run) -> None:
        pairs = []
        fd, vsize = self.rules.map_fd, self.rules.value_size
        for op in run:
            policy_id, flags = _rule_fields(op.value)
            was = op.was
            if isinstance(was, RuleValue) and _rule_fields(was) == (policy_id, flags):
                continue      # an attribution the map does not hold: nothing to write
            key = self._rule_bytes(op.endpoint, op.key)
            flows = 0
            if was is not None:          # a rewritten rule keeps its flow count
                raw = mapio.lookup(fd, key, vsize)
                if raw is not None:
                    flows = self._flows_of.one(raw)[0]
            pairs.append((key, self._rule_val.pack(policy_id, flags, flows)))
        self._write(self.rules, pairs)

    def _del_rules(self, run) -> None:
        self._remove(self.rules, [self._rule_bytes(op.endpoint, op.key) for op in run])

    def _put_endpoints(self, run) -> None:
        self._write(self.endpoints, [(self._ep_key.pack(be32(op.endpoint)),
                                      bytes(self._ep_value(op.config))) for op in run])

    def _del_endpoints(self, run) -> None:
        self._remove(self.endpoints, [self._ep_key.pack(be32(op.endpoint)) for op in run])

    _BATCHED = {IpcachePut: _put_ipcache, IpcacheDelete: _del_ipcache, RulePut: _put_rules,
                RuleDelete: _del_rules, EndpointPut: _put_endpoints,
                EndpointDelete: _del_endpoints}

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    def clear(self) -> int:
        """Empty the three maps (enforcement turned off). Rules first, the
        ipcache last, so no lookup ever finds a rule for a missing piece."""
        n = 0
        for table in (self.endpoints, self.rules, self.ipcache, self.ipcache6):
            keys = [k for k, _ in table.items()]
            for k in keys:
                self._delete(table, k)
            n += len(keys)
        return n

    # ------------------------------------------------------------ reads
    def identities_of(self, prefixes) -> dict[str, int]:
        """The identities the ipcache holds for exactly these prefixes (a
        lookup would answer with a covering prefix's: the trie is walked)."""
        want = set(prefixes)
        out = {}
        for text, ident in self._ipcache_entries():
            if text in want:
                out[text] = ident
        return out

    def _ipcache_entries(self):
        """(prefix text, identity) of both ipcache tries."""
        for k, v in self.ipcache.items():
            yield f"{ip_from_be32(k.addr)}/{k.prefixlen}", v.value
        for k, v in self.ipcache6.items():
            yield f"{ipaddress.IPv6Address(bytes(k.addr))}/{k.prefixlen}", v.value

    def image(self) -> MapImage:
        """What the maps hold, as the compiler's MapImage."""
        img = MapImage()
        for text, ident in self._ipcache_entries():
            img.put_ipcache(text, ident)
        for k, v in self.endpoints.items():
            dirs = {}
            for d in Direction:
                dv = v.dir[int(d)]
                dirs[d] = DirectionPolicy(bool(dv.flags & F_ENFORCED), bool(dv.flags & F_AUDIT),
                                          (dv.policy_id,) if dv.policy_id else ())
            img.put_endpoint(ip_from_be32(k.value),
                             EndpointConfig(dirs[Direction.INGRESS], dirs[Direction.EGRESS]))
        for k, v in self.rules.items():
            pk = self.decode_rule_key(k)
            img.put_rule(ip_from_be32(k.ep_ip4), pk,
                         RuleValue((v.policy_id,) if v.policy_id else (),
                                   bool(v.flags & F_RULE_AUDIT)))
        return img

    @staticmethod
    def decode_rule_key(k) -> PolicyKey:
        if k.prefixlen <= RULE_FIXED_BITS:
            return PolicyKey(Direction(k.dir), _ntohl(k.identity), PROTO_ANY, 0, 0)
        return PolicyKey(Direction(k.dir), _ntohl(k.identity), k.proto, port_from_be16(k.dport),
                         k.prefixlen - RULE_FIXED_BITS - 8)

    def rule_flows(self) -> dict[tuple[str, PolicyKey], int]:
        """New flows each rule admitted (since it was written)."""
        return {(ip_from_be32(k.ep_ip4), self.decode_rule_key(k)): v.flows
                for k, v in self.rules.items()}

    def verdicts(self) -> list[dict]:
        """Per-policy verdict counters (new flows), summed over CPUs."""
        out = []
        for k, vals in self.counters.items():
            out.append({"policy_id": k.policy_id, "direction": Direction(k.dir).label,
                        "verdict": VERDICTS.get(k.verdict, str(k.verdict)),
                        "flows": sum(v.packets for v in vals),
                        "bytes": sum(v.bytes for v in vals)})
        return sorted(out, key=lambda r: (r["policy_id"], r["direction"], r["verdict"]))

    def usage(self) -> dict[str, int]:
        return {"ipcache": sum(1 for _ in self.ipcache.keys()),
                "ipcache6": sum(1 for _ in self.ipcache6.keys()),
                "endpoints": sum(1 for _ in self.endpoints.keys()),
                "rules": sum(1 for _ in self.rules.keys())}


