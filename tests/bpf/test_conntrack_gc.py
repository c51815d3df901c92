"""Conntrack garbage collection (agent/conntrack.py) on entries the
programs really wrote: a flow goes only when both of its entries are idle
for longer than its protocol's timeout; hairpinned flows pair up through
the router address; an orphan reply entry goes on its own timeout."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from agent.conntrack import sweep
from agent.datapath.maps import be16, be32
from tests.bpf.conftest import POD_A, POD_B, run_prog

VIP = "192.168.51.10"
SEC = 10**9
TCP_IDLE, OTHER_IDLE = 3600 * SEC, 60 * SEC


def send(dp, net, proto, sport, dport=80, src=POD_A, dst=VIP, iface=None, mac=None):
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == "TCP" else UDP(sport=sport, dport=dport)
    iface = iface or net.cali_a
    pkt = Ether(src=mac or net.pod_a_mac, dst=iface.mac) / IP(src=src, dst=dst) / l4 / b"x"
    return run_prog(dp, net.ns, "fp_from_pod", bytes(pkt), iface.ifindex)


def flows(lb) -> dict:
    return {(c.direction, c.saddr, c.sport, c.daddr, c.dport, c.proto): c for c in lb.conntrack()}


def set_last_seen(lb, row, value: int) -> None:
    t = lb.conntrack_table()
    from agent.datapath.maps import DEFS
    d = DEFS.defines["FP_CT_REPLY"] if row.direction == "reply" else DEFS.defines["FP_CT_FORWARD"]
    k = t.Key(be32(row.saddr), be32(row.daddr), be16(row.sport), be16(row.dport),
              {"TCP": 6, "UDP": 17}[row.proto], d)
    v = t[k]
    v.last_seen = value
    t[k] = v


def test_idle_flows_are_removed_whole_and_live_ones_kept(dp, bpfnet):
    lb = dp.lb
    lb.conntrack_flush()
    lb.put_backend(41, POD_B, 8080, "TCP")
    lb.put_backend(42, POD_B, 5353, "UDP")
    lb.put_backend(43, POD_A, 8080, "TCP")
    lb.put_slots(41, [41])
    lb.put_service(VIP, 80, "TCP", 41, 1)
    lb.put_slots(42, [42])
    lb.put_service(VIP, 53, "UDP", 42, 1)
    lb.put_slots(43, [43])
    lb.put_service(VIP, 81, "TCP", 43, 1)
    hairpin = dp.config.local_router_ipv4
    try:
        send(dp, bpfnet, "TCP", 41000)
        send(dp, bpfnet, "UDP", 41001, dport=53)
        send(dp, bpfnet, "TCP", 41002)            # a flow kept alive by its replies
        send(dp, bpfnet, "TCP", 41003, dport=81)  # a pod reaching itself
        ct = flows(lb)
        assert len(ct) == 8, sorted(ct)
        assert ("reply", POD_A, 8080, hairpin, 41003, "TCP") in ct
        t0 = max(r.last_seen_ns for r in ct.values())
        table = lb.conntrack_table()

        # within every timeout: nothing goes
        assert sweep(table, t0 + OTHER_IDLE - SEC, TCP_IDLE, OTHER_IDLE, hairpin) == 0
        # past the UDP timeout only: the UDP flow's two entries go
        assert sweep(table, t0 + OTHER_IDLE + SEC, TCP_IDLE, OTHER_IDLE, hairpin) == 2
        assert not any(k[5] == "UDP" for k in flows(lb))

        # 41002's backend keeps answering: its reply entry is fresh
        rep = flows(lb)[("reply", POD_B, 8080, POD_A, 41002, "TCP")]
        set_last_seen(lb, rep, t0 + TCP_IDLE)
        removed = sweep(table, t0 + TCP_IDLE + SEC, TCP_IDLE, OTHER_IDLE, hairpin)
        left = flows(lb)
        # 41000 and the hairpinned 41003 (paired through the router address) went
        assert removed == 4, sorted(left)
        assert set(left) == {("forward", POD_A, 41002, VIP, 80, "TCP"),
                             ("reply", POD_B, 8080, POD_A, 41002, "TCP")}

        # an orphan reply entry (its forward one evicted) goes on its own age
        fwd = left[("forward", POD_A, 41002, VIP, 80, "TCP")]
        t = lb.conntrack_table()
        del t[t.Key(be32(fwd.saddr), be32(fwd.daddr), be16(fwd.sport), be16(fwd.dport), 6, 0)]
        assert sweep(table, t0 + TCP_IDLE + SEC, TCP_IDLE, OTHER_IDLE, hairpin) == 0
        assert sweep(table, t0 + 2 * TCP_IDLE + 2 * SEC, TCP_IDLE, OTHER_IDLE, hairpin) == 1
        assert flows(lb) == {}
    finally:
        for port, proto in ((80, "TCP"), (53, "UDP"), (81, "TCP")):
            lb.delete_service(VIP, port, proto)
        for svc in (41, 42, 43):
            lb.delete_slots(svc, 1, 1)
            lb.delete_backend(svc)
        lb.conntrack_flush()


def test_an_entry_refreshed_during_the_sweep_is_kept(dp, bpfnet):
    """The sweep reads each entry again before deleting it."""
    lb = dp.lb
    lb.conntrack_flush()
    lb.put_backend(44, POD_B, 5353, "UDP")
    lb.put_slots(44, [44])
    lb.put_service(VIP, 54, "UDP", 44, 1)
    try:
        send(dp, bpfnet, "UDP", 42000, dport=54)
        table = lb.conntrack_table()

        from agent.conntrack import read_entries
        last = max(r.last_seen_ns for r in lb.conntrack())
        walked = read_entries(table)
        assert len(walked) == 2
        send(dp, bpfnet, "UDP", 42000, dport=54)      # a packet right after the walk
        assert sweep(table, last + OTHER_IDLE + SEC, TCP_IDLE, OTHER_IDLE, "169.254.10.1",
                     entries=walked) == 0
        # the forward entry was refreshed under the sweep: the flow lives,
        # with both entries (its replies still need theirs)
        assert sorted(r.direction for r in lb.conntrack()) == ["forward", "reply"]
        # once idle again, both go
        now = max(r.last_seen_ns for r in lb.conntrack())
        assert sweep(table, now + OTHER_IDLE + SEC, TCP_IDLE, OTHER_IDLE, "169.254.10.1") == 2
    finally:
        lb.delete_service(VIP, 54, "UDP")
        lb.delete_slots(44, 1, 1)
        lb.delete_backend(44)
        lb.conntrack_flush()
