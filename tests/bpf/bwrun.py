"""The bandwidth manager's test machinery, for test_bandwidth.py (IPv4) and
test_bandwidth_ipv6.py (both families against one budget): limits written
exactly as the agent writes them (agent.bandwidth.plan ->
BandwidthMaps.write), runs that read the verdict and the skb's departure
time and priority, and the pod's counters. Each test file keeps its own
packets and assertions.
"""
from __future__ import annotations

import contextlib

from agent.bandwidth import Limits, plan
from agent.config import Config
from agent.datapath import Datapath
from agent.datapath.libbpf import prog_test_run
from agent.datapath.nsenter import in_netns
from agent.model.endpoint import Endpoint
from tests.bpf.conftest import POD_A


@contextlib.contextmanager
def bandwidth_on(dp, gen, *, clear_counters: bool = False):
    """The manager switched on (EDT off until a test turns it on), yielding
    limit(ip, Limits, htb=False); limits cleared after (and the interface
    counters before and after, with `clear_counters`)."""
    def limit(ip: str, lim: Limits, *, htb: bool = False) -> None:
        p = plan({ip: (lim, f"test-{ip}")}, dp.bandwidth.entries(), htb=htb,
                 new_gen=lambda: next(gen))
        for addr, entry in p.writes.items():
            dp.bandwidth.write(addr, entry, addr in p.fresh)
    if clear_counters:
        dp.maps.counters_clear()
    dp.settings.set_bandwidth(True, edt=False)
    try:
        yield limit
    finally:
        dp.settings.set_bandwidth(False)
        dp.bandwidth.clear()
        if clear_counters:
            dp.maps.counters_clear()


class Out:
    def __init__(self, res):
        self.verdict = res.retval
        self.tstamp = res.ctx.tstamp
        self.priority = res.ctx.priority


def run(dp, net, prog: str, packet, dev: str, **ctx) -> Out:
    with in_netns(net.ns):
        return Out(prog_test_run(dp.prog_fd(prog), bytes(packet),
                                 ifindex=getattr(net, dev).ifindex, **ctx))


def pad(pkt, size):
    return pkt / (b"x" * max(size - len(pkt), 0))


def counts(dp, ip: str) -> dict[tuple[str, str], int]:
    return {(r["direction"], r["reason"]): r["packets"] for r in dp.bandwidth.counters()
            if r["ip"] == ip}


def conns(dp, ip, d="egress"):
    """The pod's open connections in direction `d`, as the limit counts them."""
    st, e = dp.bandwidth.states()[ip], dp.bandwidth.entries()[ip]
    return st[f"{d}_conns_opened"] - st[f"{d}_conns_closed"] - getattr(e, f"{d}_reaped")


FLOWS_SMALL = 1024      # the tracked-connections maps of small_flows' datapath


@contextlib.contextmanager
def small_flows(bpffs, n, name: str, ip6: str = ""):
    """A datapath of its own whose tracked-connections maps hold
    FLOWS_SMALL entries, pod A registered (with `ip6`, dual stack) under a
    connection limit far above that; closed on the way out."""
    cfg = Config.defaults().replace(bpffs_root=f"{bpffs}/{name}",
                                    bandwidth_flows_map_size=FLOWS_SMALL)
    small = Datapath(cfg, netns=n.ns, test_build=True).load()
    try:
        small.maps.endpoint_put(Endpoint(POD_A, "caliA", n.cali_a.ifindex, n.cali_a.mac,
                                         n.pod_a_mac, "eth1", n.eth1.ifindex, ip6=ip6))
        small.settings.set_bandwidth(True)
        p = plan({POD_A: (Limits(egress_max_conns=4000), "a")}, {}, htb=False,
                 new_gen=lambda: 1)
        small.bandwidth.write(POD_A, p.writes[POD_A], True)
        yield small
    finally:
        small.close()
