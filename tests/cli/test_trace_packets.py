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


def test_ipv6_packets_of_each_protocol_and_echo_requests_of_both_families():
    import pytest
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from agent.cli.common import CliExit
    from agent.cli.trace import parse_target
    args = ("fd00:10::1:a", "02:00:00:00:00:01", "02:00:00:00:00:02", "fd00:10::1:b", 8080)
    tcp = Ether(build_packet(*args, "tcp"))
    assert (tcp[IPv6].src, tcp[IPv6].dst, tcp[IPv6].hlim, tcp[TCP].flags, tcp[TCP].dport) == (
        "fd00:10::1:a", "fd00:10::1:b", 64, "S", 8080)
    assert IP not in tcp
    udp = Ether(build_packet(*args, "udp"))
    fresh = Ether(bytes(udp))
    del fresh[UDP].chksum
    assert Ether(bytes(fresh))[UDP].chksum == udp[UDP].chksum != 0, "IPv6 UDP needs its checksum"
    echo6 = Ether(build_packet(*args, "icmpv6"))
    assert ICMPv6EchoRequest in echo6 and echo6[IPv6].nh == 58
    echo4 = Ether(build_packet("10.0.0.1", *args[1:3], "10.0.0.2", 0, "icmp"))
    assert echo4[ICMP].type == 8
    # --to: [IPv6]:PORT, IPv4:PORT, the address alone for echo requests
    assert parse_target("[fd00::10]:80") == ("fd00::10", 80)
    assert parse_target("10.0.0.2:80") == ("10.0.0.2", 80)
    assert parse_target("fd00::10", "icmpv6") == ("fd00::10", 0)
    assert parse_target("10.0.0.2", "icmp") == ("10.0.0.2", 0)
    for bad in ("fd00::10:80", "[10.0.0.2]:80", "[fd00::10]", "[fd00::10]:0", "10.0.0.2"):
        with pytest.raises(CliExit) as e:
            parse_target(bad)
        assert e.value.code == 2 and "[IPv6]:PORT" in str(e.value), bad
