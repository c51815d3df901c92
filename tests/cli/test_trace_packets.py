"""`fastpath trace` packets: the first packet of a flow of each protocol."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkInit

from agent.cli.trace import build_packet


def test_tcp_is_a_syn_udp_a_datagram_and_sctp_an_init_with_a_valid_crc():
    args = ("10.0.0.1", "02:00:00:00:00:01", "02:00:00:00:00:02", "10.0.0.2", 2905)
    tcp = Ether(build_packet(*args, "tcp"))
    assert tcp[TCP].flags == "S" and tcp[TCP].dport == 2905
    assert Ether(build_packet(*args, "udp"))[UDP].dport == 2905
    raw = build_packet(*args, "sctp", sport=40000)
    p = Ether(raw)
    assert (p[IP].proto, p[SCTP].sport, p[SCTP].dport, p[SCTP].tag) == (132, 40000, 2905, 0)
    assert SCTPChunkInit in p
    fresh = Ether(raw)
    del fresh[SCTP].chksum
    assert Ether(bytes(fresh))[SCTP].chksum == p[SCTP].chksum != 0
