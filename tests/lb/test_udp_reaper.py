"""Which connected UDP sockets the agent closes when a UDP frontend loses
backends: only those socket-LB sent from that frontend to a lost backend."""
from __future__ import annotations

from agent.datapath.sockdiag import DiagSocket
from agent.lb.compile import Frontend
from agent.daemon.services import UdpSocketReaper

DNS = Frontend("10.96.0.10", 53, "UDP")
OTHER = Frontend("10.96.0.11", 53, "UDP")


def sock(cookie, dst, dport):
    return DiagSocket("10.0.0.9", 40000 + cookie, dst, dport, 0, cookie, 1, 0, b"")


class FakeDiag:
    def __init__(self, per_ns):
        self.per_ns = per_ns
        self.destroyed = []

    def udp_connected(self, ns):
        if ns == "gone":
            raise FileNotFoundError(2, "No such file or directory")
        return self.per_ns.get(ns, [])

    def destroy_udp(self, s, ns):
        self.destroyed.append((ns, s.cookie))
        return True


class FakeLb:
    def __init__(self, rev):
        self.rev = rev

    def sockrev_get(self, cookie, addr, port):
        return self.rev.get((cookie, addr, port))


def test_only_sockets_translated_from_the_frontend_that_lost_the_backend():
    diag = FakeDiag({
        None: [sock(1, "10.0.1.1", 5353),      # DNS -> lost backend: closed
               sock(2, "10.0.1.1", 5353),      # connected to the backend by the app itself
               sock(3, "10.0.1.2", 5353)],     # DNS -> a backend it still has
        "/run/netns/a": [sock(4, "10.0.1.1", 5353),   # OTHER -> same address, not lost there
                         sock(5, "10.0.1.1", 5353)],  # DNS, in a pod: closed
    })
    lb = FakeLb({(1, "10.0.1.1", 5353): ("10.96.0.10", 53),
                 (3, "10.0.1.2", 5353): ("10.96.0.10", 53),
                 (4, "10.0.1.1", 5353): ("10.96.0.11", 53),
                 (5, "10.0.1.1", 5353): ("10.96.0.10", 53)})
    reaper = UdpSocketReaper(lb, lambda: [None, "gone", "/run/netns/a"], diag=diag)
    assert reaper.reap({DNS: {("10.0.1.1", 5353)}}) == 2
    assert diag.destroyed == [(None, 1), ("/run/netns/a", 5)]
    diag.destroyed.clear()
    assert reaper.reap({OTHER: {("10.0.1.1", 5353)}}) == 1
    assert diag.destroyed == [("/run/netns/a", 4)]
    assert reaper.closed == 3
