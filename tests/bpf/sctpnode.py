"""The node's own SCTP association, packet by packet, for either family: what
test_sctp_node.py (IPv4) and test_sctp6_node.py (IPv6) send through the
programs and how they read what comes out. Each test file keeps its own
addresses, Services and assertions; only the packet machinery is shared.
"""
from __future__ import annotations

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit, SCTPChunkInitAck

from agent.datapath.libbpf import prog_test_run
from agent.datapath.maps import DEFS
from agent.datapath.nsenter import in_netns
from tests.bpf.conftest import NOT_RECORDED

SVC_PORT, BACKEND_PORT = 2905, 2906


class SctpNode:
    """Packets of one family between the node (`node_ip`, out of eth0 to the
    gateway `gw_mac`) and a Service's SCTP port: the node's INIT and DATA,
    the peer's INIT ACK and DATA back (tags as the two ends would pick)."""

    def __init__(self, ip_layer, node_ip: str, gw_mac: str):
        self.ip_layer, self.node_ip, self.gw_mac = ip_layer, node_ip, gw_mac

    def _ip(self, src, dst, ttl):
        if self.ip_layer is IP:
            return IP(src=src, dst=dst, ttl=ttl)
        return IPv6(src=src, dst=dst, hlim=ttl)

    def init(self, net, dst, sport, src=None, dport=SVC_PORT):
        return Ether(src=net.mac("eth0"), dst=self.gw_mac) / \
            self._ip(src or self.node_ip, dst, 64) / SCTP(sport=sport, dport=dport, tag=0) / \
            SCTPChunkInit(init_tag=7, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)

    def data(self, net, dst, sport, payload=b"ping", dport=SVC_PORT):
        return Ether(src=net.mac("eth0"), dst=self.gw_mac) / self._ip(self.node_ip, dst, 64) / \
            SCTP(sport=sport, dport=dport, tag=9) / SCTPChunkData(tsn=1, data=payload)

    def reply(self, src, dst_mac, src_mac, sport, dport, payload=None):
        """The peer's INIT ACK, or with `payload` its DATA."""
        chunk = SCTPChunkInitAck(init_tag=9, a_rwnd=65535, n_out_streams=1, n_in_streams=1,
                                 init_tsn=1) if payload is None else \
            SCTPChunkData(tsn=1, data=payload)
        return Ether(src=src_mac, dst=dst_mac) / self._ip(src, self.node_ip, 63) / \
            SCTP(sport=sport, dport=dport, tag=7) / chunk

    def crc_ok(self, out: bytes) -> bool:
        """The CRC32c (and an IPv4 header's checksum) as scapy computes them
        afresh: every rewrite updated them."""
        o, fresh = Ether(out), Ether(out)
        del fresh[SCTP].chksum
        if self.ip_layer is IP:
            del fresh[IP].chksum
        fresh = Ether(bytes(fresh))
        if self.ip_layer is IP and fresh[IP].chksum != o[IP].chksum:
            return False
        return fresh[SCTP].chksum == o[SCTP].chksum

    def tuple_of(self, out: bytes):
        o = Ether(out)
        return o[self.ip_layer].src, o[SCTP].sport, o[self.ip_layer].dst, o[SCTP].dport


def prog_run(dp, net, prog, pkt, dev, **kw):
    """prog run on pkt arriving on net's dev with prog_test_run's options
    (`mark`, `gso_size`, ...): its result and the decision it recorded."""
    dp.maps.decision_reset(NOT_RECORDED)
    with in_netns(net.ns):
        res = prog_test_run(dp.prog_fd(prog), bytes(pkt), ifindex=net.idx(dev), **kw)
    return res, dp.maps.decision()


def whatif(dp, net, pkt, dev="eth0"):
    """fp_to_vpc's what-if run of pkt (`fastpath trace`): result, decision."""
    return prog_run(dp, net, "fp_to_vpc", pkt, dev, mark=int(DEFS.defines["FP_WHATIF_MARK"]))
