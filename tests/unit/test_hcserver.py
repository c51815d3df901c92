"""The healthCheckNodePort server answers like kube-proxy's, in a netns of
its own (never on the machine's addresses)."""
from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time

import pytest

from agent.datapath.nsenter import in_netns
from agent.daemon.hcserver import HealthCheckServer
from agent.lb.compile import HealthCheck


@pytest.fixture
def netns():
    ns = f"fpt-hc-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.99.0.1/32", "dev", "lo"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def get(ns: str, ip: str, port: int, path: str = "/healthz") -> tuple[int, dict, dict]:
    with in_netns(ns):
        s = socket.create_connection((ip, port), timeout=5)
    with s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nUser-Agent: slb-probe\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, json.loads(body)


def refused(ns: str, ip: str, port: int) -> bool:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    with s:
        s.settimeout(2)
        try:
            s.connect((ip, port))
        except ConnectionRefusedError:
            return True
    return False


def test_a_node_with_local_endpoints_answers_200_and_one_without_503(netns):
    healthy = {"v": True}
    srv = HealthCheckServer(lambda: ("10.99.0.1", "127.0.0.1"), netns=netns,
                            healthy_fn=lambda: healthy["v"])
    try:
        srv.sync({("shop", "web"): HealthCheck(("shop", "web"), 32000, 2)})
        for ip in ("10.99.0.1", "127.0.0.1"):
            status, headers, body = get(netns, ip, 32000, "/any/path")
            assert status == 200
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
            assert body == {"service": {"namespace": "shop", "name": "web"},
                            "localEndpoints": 2, "serviceProxyHealthy": True}
        srv.sync({("shop", "web"): HealthCheck(("shop", "web"), 32000, 0)})
        status, headers, body = get(netns, "10.99.0.1", 32000)
        assert status == 503 and body["localEndpoints"] == 0
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
        # endpoints, but the proxy is not healthy (a failed write pending)
        srv.sync({("shop", "web"): HealthCheck(("shop", "web"), 32000, 3)})
        healthy["v"] = False
        status, _, body = get(netns, "10.99.0.1", 32000)
        assert status == 503 and body["serviceProxyHealthy"] is False
    finally:
        srv.stop()


def test_the_ipv6_nodeport_addresses_answer_the_same(netns):
    # kube-proxy answers on the NodePort addresses of each family
    subprocess.run(["ip", "-n", netns, "addr", "add", "fd99::1/128", "dev", "lo", "nodad"],
                   check=True)
    addrs = {"v": ("10.99.0.1", "fd99::1")}
    srv = HealthCheckServer(lambda: addrs["v"], netns=netns)
    try:
        srv.sync({("shop", "web"): HealthCheck(("shop", "web"), 32010, 2)})
        assert srv.failed == {}
        v4, v6 = get(netns, "10.99.0.1", 32010), get(netns, "fd99::1", 32010)
        assert v6[0] == v4[0] == 200 and v6[2] == v4[2]
        assert v6[1]["X-Load-Balancing-Endpoint-Weight"] == "2"
        # not on IPv6 addresses it was not given (loopback ::1)
        assert refused(netns, "::1", 32010)
        # the IPv6 wildcard serves IPv6 only: 10.99.0.1 is the IPv4 list's
        addrs["v"] = ("::",)
        srv.sync({("shop", "web"): HealthCheck(("shop", "web"), 32010, 1)})
        assert get(netns, "fd99::1", 32010)[2]["localEndpoints"] == 1
        assert refused(netns, "10.99.0.1", 32010)
    finally:
        srv.stop()


def test_ports_open_close_and_move_with_the_services(netns):
    srv = HealthCheckServer(lambda: ("10.99.0.1",), netns=netns)
    try:
        srv.sync({("a", "x"): HealthCheck(("a", "x"), 32001, 1),
                  ("a", "y"): HealthCheck(("a", "y"), 32002, 1)})
        assert get(netns, "10.99.0.1", 32002)[2]["service"] == {"namespace": "a", "name": "y"}
        srv.sync({("a", "x"): HealthCheck(("a", "x"), 32003, 1)})
        assert refused(netns, "10.99.0.1", 32001) and refused(netns, "10.99.0.1", 32002)
        assert get(netns, "10.99.0.1", 32003)[0] == 200
        # not on an address it was not asked to serve
        assert refused(netns, "127.0.0.1", 32003)
        srv.sync({})
        assert srv.ports() == {} and refused(netns, "10.99.0.1", 32003)
    finally:
        srv.stop()


def test_a_port_in_use_is_reported_and_taken_once_free(netns):
    with in_netns(netns):
        squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("10.99.0.1", 32004))
    squatter.listen()
    srv = HealthCheckServer(lambda: ("10.99.0.1",), netns=netns)
    try:
        srv.sync({("a", "x"): HealthCheck(("a", "x"), 32004, 1)})
        assert srv.failed == {("10.99.0.1", 32004): "Address already in use"}
        squatter.close()
        srv.sync({("a", "x"): HealthCheck(("a", "x"), 32004, 1)})
        assert srv.failed == {} and get(netns, "10.99.0.1", 32004)[0] == 200
    finally:
        srv.stop()


def test_a_slow_or_silent_client_does_not_hold_up_the_others(netns):
    srv = HealthCheckServer(lambda: ("10.99.0.1",), netns=netns)
    try:
        srv.sync({("a", "x"): HealthCheck(("a", "x"), 32005, 1)})
        with in_netns(netns):
            silent = [socket.create_connection(("10.99.0.1", 32005), timeout=5)
                      for _ in range(20)]
        t = time.monotonic()
        assert get(netns, "10.99.0.1", 32005)[0] == 200
        assert time.monotonic() - t < 2
        for s in silent:
            s.close()
        assert srv.answered >= 1
    finally:
        srv.stop()
