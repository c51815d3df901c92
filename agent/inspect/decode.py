"""Decode raw map entries and records into plain values, from BTF.

Pure: bytes in, dicts out. Layouts are the compiled programs' own, read
from BTF: a `schema` (agent/datapath/tables.Schema over one BTF object:
`fields(type)`, `ctype(type)`, `map_types(map)`) is passed in by the
caller, which takes it from the pinned map being read (its BTF is the
compile that made it) or from the loaded programs (records that are no
map's key or value: ring-buffer events). Nothing here restates a field;
bpf/include/fastpath.h is read (agent.model.bpfdefs) for names and codes
only.

The decoded form (also the `--json` form of `fastpath map dump`):
  * every field keeps its C name; `pad*` fields are left out;
  * `__be32` fields are IPv4 addresses as dotted strings, `__be16` fields
    are ports in host order, `__u8 x[6]` fields are MAC addresses, `__u8
    x[16]` fields are IPv6 addresses;
  * enumerations keep their number and gain `<field>_label`: `reason`
    (FP_REASONS), `dir` (FP_DIRS, or forward/reply in conntrack keys),
    `kind` (FP_REDIRECT_KINDS), `proto` (TCP/UDP/ICMP/SCTP), `state`
    (FP_CT_STATES in conntrack values);
  * flag words keep their number and gain `<field>_names` (the FP_*_F_*
    bits set, lower case, e.g. ["affinity", "local"]);
  * per-CPU values are summed over CPUs (numbers only).
"""
from __future__ import annotations

import ctypes as ct
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache

from agent.model import bpfdefs

PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
PROTO_NUMBERS = {v.upper(): k for k, v in PROTOCOLS.items()}

# Which FP_*_F_* bits belong to which struct's flag word.
FLAG_PREFIX = {
    ("fp_endpoint", "flags"): "FP_EP_F_",
    ("fp_ep_if", "flags"): "FP_EPIF_F_",
    ("fp_svc4", "flags"): "FP_SVC_F_",
    ("fp_backend4", "flags"): "FP_BE_F_",
    ("fp_ct4", "flags"): "FP_CT_F_",
    ("fp_ct6", "flags"): "FP_CT_F_",
    ("fp_ctpol4", "flags"): "FP_CT_F_",
    ("fp_config", "flags"): "FP_CFG_F_",
    ("fp_monitor", "events"): "FP_MON_EV_",
    ("fp_socklb_skip", "flags"): "FP_SOCKLB_SKIP_",
    ("fp_pol_dir", "flags"): "FP_POL_F_",
    ("fp_pol_rule", "flags"): "FP_RULE_F_",
    ("fp_event", "flags"): "FP_EV_F_",
    ("fp_bw", "flags"): "FP_BW_F_",
}
# Conntrack entry kinds (fp_ct4_key.dir) and policy verdicts (FP_PV_*).
CT_DIRS = ("FORWARD", "REPLY", "POLICY")


def ip4(raw: int) -> str:
    """A __be32 as read into a host integer -> dotted quad."""
    return socket.inet_ntoa(struct.pack("=I", raw))


def ip4_raw(text: str) -> int:
    return struct.unpack("=I", socket.inet_aton(text))[0]


def port(raw: int) -> int:
    """A __be16 as read into a host integer -> the port number."""
    return struct.unpack("!H", struct.pack("=H", raw))[0]


def encode_port(value: int) -> int:
    """A port -> the host integer whose bytes are it in network order."""
    return struct.unpack("=H", struct.pack("!H", value))[0]


def mac(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def flag_names(struct_name: str, field: str, value: int) -> list[str] | None:
    prefix = FLAG_PREFIX.get((struct_name, field))
    if prefix is None:
        return None
    return [name for bit, name in _flag_bits(prefix) if value & bit == bit]


@lru_cache(maxsize=None)
def _flag_bits(prefix: str) -> tuple[tuple[int, str], ...]:
    """(bit, lower-case name) of the FP_*_F_* flags of one prefix, by value."""
    defs = bpfdefs.load().defines
    return tuple((bit, name[len(prefix):].lower())
                 for name, bit in sorted(defs.items(), key=lambda kv: kv[1])
                 if name.startswith(prefix) and bit)


def enum_label(struct_name: str, field: str, value: int) -> str | None:
    d = bpfdefs.load()
    if field == "reason":
        return d.reason(value)
    if field == "dir":
        if struct_name.startswith(("fp_ct4", "fp_ct6")):
            return {d.defines[f"FP_CT_{n}"]: n.lower() for n in CT_DIRS
                    if f"FP_CT_{n}" in d.defines}.get(value, f"dir-{value}")
        if struct_name.startswith("fp_pol"):
            return policy_dir(value)
        return d.dir(value)
    if field in ("verdict", "pv"):
        return policy_verdict(value)
    if field == "state" and struct_name.startswith("fp_ct"):
        code = (d.ct_states or {}).get(value)
        return code.label if code else f"state-{value}"
    if field == "kind" and struct_name in ("fp_testrec", "fp_decision"):
        code = d.redirect_kinds.get(value)
        return code.label if code else f"kind-{value}"
    if field in ("proto", "protocol"):
        return PROTOCOLS.get(value, str(value))
    if field == "family" and struct_name == "fp_counter_key":
        return d.family(value)
    if field == "type" and struct_name.startswith("fp_event"):
        return event_type(value)
    return None


def policy_dir(value: int) -> str:
    for name, v in bpfdefs.load().defines.items():
        if v == value and name in ("FP_POL_INGRESS", "FP_POL_EGRESS"):
            return name.rsplit("_", 1)[-1].lower()
    return f"dir-{value}"


def policy_verdict(value: int) -> str:
    """FP_PV_ALLOW -> allow, FP_PV_AUDIT_DENY -> audit-deny, FP_PV_NONE -> none."""
    for name, v in bpfdefs.load().defines.items():
        if v == value and name.startswith("FP_PV_"):
            return name[len("FP_PV_"):].lower().replace("_", "-")
    return f"verdict-{value}"


def event_type(value: int) -> str:
    code = (bpfdefs.load().event_types or {}).get(value)
    return code.label if code is not None else f"type-{value}"


# The header's conventions decoding relies on, by name and shape (BTF
# carries no comments; tests/bpf/test_tables.py lists every field of these
# shapes, so a new one is looked at): a __be32 named *identity* holds a
# peer identity, not an address; every two-element array is indexed by
# FP_POL_INGRESS / FP_POL_EGRESS; a __u8[16] is an IPv6 address.

def _is_identity(f) -> bool:
    return "identity" in f.name


def _directional(f) -> bool:
    """A two-element array indexed by FP_POL_INGRESS / FP_POL_EGRESS."""
    return f.count == 2


def _is_ip6(f) -> bool:
    return f.ctype == "__u8" and f.count == 16


def _be32_int(raw: int) -> int:
    return struct.unpack("!I", struct.pack("=I", raw))[0]


def _is_record(type_name: str) -> bool:
    return type_name.startswith(("struct ", "union "))


def decode_value(type_name: str, obj, schema) -> object:
    """A ctypes instance (or scalar) of a type of `schema` -> plain data."""
    t = type_name.strip()
    if not _is_record(t):
        v = getattr(obj, "value", obj)
        if t == "__be32":
            return ip4(v)
        if t == "__be16":
            return port(v)
        return v
    sname = t.split(" ", 1)[1]
    out: dict = {}
    for f in schema.fields(t):
        if f.name.startswith("pad") or f.name.startswith("_"):
            continue
        v = getattr(obj, f.name)
        if f.count and _directional(f):
            vals = {}
            for i, d in enumerate(("ingress", "egress")):
                x = v[i]
                if f.ctype.startswith("struct "):
                    vals[policy_dir(i)] = decode_value(f.ctype, x, schema)
                else:
                    vals[policy_dir(i)] = x
                    label = enum_label(sname, f.name, x)
                    if label is not None:
                        vals[policy_dir(i) + "_label"] = label
            out[f.name] = vals
            continue
        if f.count:
            if f.ctype == "__u8" and f.count == 6:
                out[f.name] = mac(v)
            elif _is_ip6(f):
                out[f.name] = socket.inet_ntop(socket.AF_INET6, bytes(v))
            elif f.ctype == "char":
                out[f.name] = bytes(v).split(b"\0", 1)[0].decode(errors="replace")
            elif f.ctype == "__be32":
                out[f.name] = [ip4(x) for x in v]
            elif f.ctype.startswith("struct "):
                out[f.name] = [decode_value(f.ctype, x, schema) for x in v]
            else:
                out[f.name] = list(v)
            continue
        if f.ctype.startswith("struct "):
            out[f.name] = decode_value(f.ctype, v, schema)
        elif f.ctype == "__be32":
            out[f.name] = _be32_int(v) if _is_identity(f) else ip4(v)
        elif f.ctype == "__be16":
            out[f.name] = port(v)
        else:
            out[f.name] = v
            label = enum_label(sname, f.name, v)
            if label is not None:
                out[f.name + "_label"] = label
            names = flag_names(sname, f.name, v)
            if names is not None:
                out[f.name + "_names"] = names
    return out


def from_bytes(type_name: str, raw: bytes, schema):
    cls = schema.ctype(type_name)
    size = ct.sizeof(cls)
    if len(raw) < size:
        raise ValueError(f"{type_name}: {len(raw)} bytes, layout needs {size}")
    return cls.from_buffer_copy(raw[:size])


def _sum(values: list):
    first = values[0]
    if isinstance(first, dict):
        return {k: _sum([v[k] for v in values]) if isinstance(first[k], (int, dict)) and not
                k.endswith("_label") else first[k] for k in first}
    if isinstance(first, bool) or not isinstance(first, int):
        return first
    return sum(values)


@dataclass(frozen=True)
class Layout:
    """How to decode one map: its key and value types as the schema names
    them ("struct fp_endpoint", "__u32"), their sizes, and the schema (BTF)
    that describes them."""
    name: str
    key: str
    value: str
    key_size: int
    value_size: int
    schema: object

    @classmethod
    def of_schema(cls, name: str, key: str, value: str, schema) -> "Layout":
        """From a map's own record of its types (a pinned map's BTF)."""
        return cls(name, key, value, ct.sizeof(schema.ctype(key)),
                   ct.sizeof(schema.ctype(value)), schema)

    @classmethod
    def compiled(cls, name: str, schema) -> "Layout":
        """From the programs' BTF: the types the compile declared table
        `name` with."""
        key, value = schema.map_types(name)
        return cls.of_schema(name, key, value, schema)

    def matches(self, key_size: int, value_size: int) -> bool:
        return (self.key_size, self.value_size) == (key_size, value_size)


def decode_entry(layout: Layout, key: bytes, value: bytes, percpu: bool = False,
                 ncpus: int = 1) -> dict:
    sch = layout.schema
    k = decode_value(layout.key, from_bytes(layout.key, key, sch), sch)
    if percpu:
        slot = (layout.value_size + 7) // 8 * 8
        vals = [decode_value(layout.value, from_bytes(layout.value, value[i * slot:], sch), sch)
                for i in range(ncpus) if len(value) >= (i + 1) * slot]
        v = _sum(vals)
    else:
        v = decode_value(layout.value, from_bytes(layout.value, value, sch), sch)
    return {"key": k, "value": v}


def encode_key(schema, type_name: str, /, **fields) -> bytes:
    """Bytes of a struct of `schema` from host-order values (addresses as
    text for __be32, ports as numbers for __be16)."""
    obj = schema.ctype(type_name)()
    kinds = {f.name: f.ctype for f in schema.fields(type_name)}
    for name, v in fields.items():
        if kinds[name] == "__be32":
            v = struct.unpack("=I", struct.pack("!I", v))[0] if isinstance(v, int) else ip4_raw(v)
        elif kinds[name] == "__be16":
            v = encode_port(v)
        elif isinstance(v, str):
            # a 16-byte address field (__u8[16]) given as IPv6 text
            v = (ct.c_uint8 * 16)(*socket.inet_pton(socket.AF_INET6, v))
        setattr(obj, name, v)
    return bytes(obj)
