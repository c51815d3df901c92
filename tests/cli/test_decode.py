"""Map decoding with the compiled programs' layouts (their BTF, the
`compiled` fixture): every pinned map, values, labels."""
from __future__ import annotations

import ctypes as ct

import pytest

from agent.model import bpfdefs
from agent.inspect import decode, events
from agent.inspect.table import entries_table, flatten, table


def test_every_pinned_map_has_a_decodable_layout_in_the_programs_btf(compiled):
    for macro, name in bpfdefs.load().maps.items():
        if macro in ("FP_MAP_TESTREC", "FP_MAP_TAILS", "FP_MAP_EVENTS"):
            continue              # test builds only / program fds / a stream of records
        layout = decode.Layout.compiled(name, compiled)
        assert layout.key_size > 0 and layout.value_size > 0, name
        assert decode.decode_entry(layout, bytes(layout.key_size), bytes(layout.value_size)), name
    # the ring buffer's record, found in the same BTF by name
    assert ct.sizeof(compiled.ctype(events.EVENT)) > 0


def ct_entry(compiled, saddr, daddr, sport, dport, proto, d, nat, nport, last_seen=5,
             flags=0):
    d_ = bpfdefs.load().defines
    key = decode.encode_key(compiled, "struct fp_ct4_key", saddr=saddr, daddr=daddr,
                            sport=sport, dport=dport, proto=proto,
                            dir=d_["FP_CT_REPLY"] if d == "reply" else d_["FP_CT_FORWARD"])
    v = compiled.ctype("struct fp_ct4")()
    v.last_seen, v.nat_addr, v.nat_port = last_seen, decode.ip4_raw(nat), decode.encode_port(nport)
    v.flags, v.backend_id, v.svc_id = flags, 7, 3
    v.state = next(c.value for c in bpfdefs.load().ct_states.values()
                   if c.label == "established")
    layout = decode.Layout.compiled(bpfdefs.load().maps["FP_MAP_CT"], compiled)
    return decode.decode_entry(layout, key, bytes(v))


def v_state():
    return next(c.value for c in bpfdefs.load().ct_states.values() if c.label == "established")


def test_conntrack_entry_decodes_addresses_ports_direction_and_flags(compiled):
    hairpin = bpfdefs.load().defines["FP_CT_F_HAIRPIN"]
    e = ct_entry(compiled, "10.0.0.1", "192.168.1.1", 40000, 80, 6, "forward", "10.0.0.9", 8080,
                 flags=hairpin)
    assert e["key"] == {"saddr": "10.0.0.1", "daddr": "192.168.1.1", "sport": 40000, "dport": 80,
                        "proto": 6, "proto_label": "TCP", "dir": 0, "dir_label": "forward"}
    assert e["value"] == {"last_seen": 5, "nat_addr": "10.0.0.9", "nat_port": 8080,
                          "flags": hairpin, "flags_names": ["hairpin"], "state": v_state(),
                          "state_label": "established", "backend_id": 7, "svc_id": 3,
                          "peer_addr": "0.0.0.0", "peer_port": 0}


def test_endpoint_entry_decodes_macs_and_flags(compiled):
    name = bpfdefs.load().maps["FP_MAP_ENDPOINTS"]
    key = decode.encode_key(compiled, "struct fp_endpoint_key", ip4="10.1.2.3")
    v = compiled.ctype("struct fp_endpoint")()
    v.host_ifindex, v.eni_ifindex, v.ep_id = 4, 3, 99
    v.pod_mac[:] = [2, 0, 0, 0, 0xa, 0xa]
    v.host_mac[:] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee]
    v.flags = bpfdefs.load().defines["FP_EP_F_REGISTERED"]
    e = decode.decode_entry(decode.Layout.compiled(name, compiled), key, bytes(v))
    assert e == {"key": {"ip4": "10.1.2.3"},
                 "value": {"host_ifindex": 4, "eni_ifindex": 3, "pod_mac": "02:00:00:00:0a:0a",
                           "host_mac": "ee:ee:ee:ee:ee:ee", "flags": 1,
                           "flags_names": ["registered"], "ep_id": 99}}


def test_veth_registration_decodes_both_addresses_and_flags(compiled):
    import socket
    import struct
    name = bpfdefs.load().maps["FP_MAP_EP_IFINDEX"]
    v = compiled.ctype("struct fp_ep_if")()
    v.ip4 = struct.unpack("=I", socket.inet_aton("10.1.2.3"))[0]
    v.ip6[:] = list(socket.inet_pton(socket.AF_INET6, "fd00::a"))
    v.flags = bpfdefs.load().defines["FP_EPIF_F_IP6"]
    layout = decode.Layout.compiled(name, compiled)
    e = decode.decode_entry(layout, struct.pack("=I", 17), bytes(v))
    assert e == {"key": 17, "value": {"ip4": "10.1.2.3", "flags": 1, "flags_names": ["ip6"],
                                      "ip6": "fd00::a"}}


def test_per_cpu_counters_are_summed_over_cpus_and_labelled(compiled):
    d = bpfdefs.load()
    name = d.maps["FP_MAP_COUNTERS"]
    drop = d.reason_value("dropped-source-spoofed")
    six = next(c.value for c in d.families.values() if c.label == "ipv6")
    key = decode.encode_key(compiled, "struct fp_counter_key", ifindex=5, reason=drop, dir=0,
                            family=six)
    cnt = compiled.ctype("struct fp_counter")
    slot = (ct.sizeof(cnt) + 7) // 8 * 8
    raw = b"".join(bytes(cnt(packets=p, bytes=b)).ljust(slot, b"\0")
                   for p, b in ((1, 100), (2, 200), (0, 0), (4, 400)))
    layout = decode.Layout.compiled(name, compiled)
    e = decode.decode_entry(layout, key, raw, percpu=True, ncpus=4)
    assert e["key"] == {"ifindex": 5, "reason": drop, "reason_label": "dropped-source-spoofed",
                        "dir": 0, "dir_label": "from-pod", "family": six, "family_label": "ipv6"}
    assert e["value"] == {"packets": 7, "bytes": 700}


def test_scalar_keys_and_service_flags(compiled):
    d = bpfdefs.load()
    be = decode.Layout.compiled(d.maps["FP_MAP_BACKENDS"], compiled)
    v = compiled.ctype("struct fp_backend4")(ip=decode.ip4_raw("10.0.0.5"),
                                            port=decode.encode_port(8080), proto=17)
    e = decode.decode_entry(be, (42).to_bytes(4, "little"), bytes(v))
    assert e == {"key": 42, "value": {"ip": "10.0.0.5", "port": 8080, "proto": 17,
                                      "proto_label": "UDP", "flags": 0, "flags_names": []}}
    v.flags = d.defines["FP_BE_F_DRAINING"]
    assert decode.decode_entry(be, (42).to_bytes(4, "little"), bytes(v))["value"][
        "flags_names"] == ["draining"]
    svc = decode.Layout.compiled(d.maps["FP_MAP_SERVICES"], compiled)
    f = d.defines["FP_SVC_F_AFFINITY"] | d.defines["FP_SVC_F_LOCAL"]
    sv = compiled.ctype("struct fp_svc4")(svc_id=1, count=2, flags=f, affinity_timeout=30)
    k = decode.encode_key(compiled, "struct fp_svc4_key", vip="192.168.0.10", port=53, proto=17)
    e = decode.decode_entry(svc, k, bytes(sv))
    assert e["value"]["flags_names"] == ["affinity", "local"]
    assert e["key"] == {"vip": "192.168.0.10", "port": 53, "proto": 17, "proto_label": "UDP",
                        "scope": 0}


def test_layout_mismatch_is_detected(compiled):
    layout = decode.Layout.compiled(bpfdefs.load().maps["FP_MAP_CT"], compiled)
    assert (layout.key_size, layout.value_size) == (16, 32)
    assert layout.matches(16, 32)
    assert not layout.matches(16, 24)
    with pytest.raises(ValueError, match="layout needs"):
        decode.from_bytes("struct fp_ct4", b"\0" * 8, compiled)


def test_tables_show_labels_and_flag_names_not_codes(compiled):
    e = ct_entry(compiled, "10.0.0.1", "192.168.1.1", 40000, 80, 17, "reply", "10.0.0.9", 8080)
    flat = flatten(e["key"])
    assert flat["proto"] == "UDP" and flat["dir"] == "reply" and "proto_label" not in flat
    text = entries_table([e])
    head, row = text.splitlines()
    assert head.split()[:6] == ["SADDR", "DADDR", "SPORT", "DPORT", "PROTO", "DIR"]
    assert row.split()[:6] == ["10.0.0.1", "192.168.1.1", "40000", "80", "UDP", "reply"]
    assert entries_table([]) == "(no entries)"
    t = table([{"a": 1, "b": None, "c": True, "d": ["x", "y"]}], ["a", "b", "c", ("dee", "d")])
    assert t.splitlines()[1].split() == ["1", "-", "yes", "x,y"]
