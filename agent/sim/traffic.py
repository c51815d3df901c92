"""Real traffic between simulated endpoints, with the tools the machine has.

Each helper starts a one-shot server in the destination netns, waits until it
listens, runs one client in the source netns and returns what each side
received, so a test asserts on delivered bytes rather than on exit codes.
Servers bind the destination address only; clients send only to it.
"""
from __future__ import annotations

import json
import subprocess
import time

from .netns import Netns


def tcp_exchange(client: Netns, server: Netns, ip: str | None = None, port: int = 7000,
                 request: str = "ping", reply: str = "pong",
                 timeout: float = 5.0) -> tuple[str, str]:
    """One TCP connection: client sends `request`, server answers `reply`.

    Returns (bytes the server received, bytes the client received).
    """
    ip = ip or getattr(server, "ip")
    # -N on both ends: each side half-closes after its message, so both exit
    # as soon as the exchange is complete instead of waiting for -w.
    srv = server.popen(["sh", "-c", f"printf %s '{reply}' | nc -l -N -w {int(timeout)} {ip} {port}"],
                       stdout=subprocess.PIPE, text=True)
    try:
        server.wait_port(port, timeout=timeout)
        got = client.run(["sh", "-c", f"printf %s '{request}' | nc -N -w {int(timeout)} {ip} {port}"],
                         check=False, timeout=timeout + 2).stdout
        out, _ = srv.communicate(timeout=timeout + 2)
        return out, got
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def udp_send(client: Netns, server: Netns, ip: str | None = None, port: int = 7001,
             payload: str = "dgram", timeout: float = 5.0) -> str:
    """One UDP datagram from client to server; returns what the server received."""
    ip = ip or getattr(server, "ip")
    srv = server.popen(["nc", "-u", "-l", "-W", "1", "-w", str(int(timeout)), ip, str(port)],
                       stdout=subprocess.PIPE, text=True)
    try:
        server.wait_port(port, udp=True, timeout=timeout)
        client.run(["sh", "-c", f"printf %s '{payload}' | nc -u -q 0 -w 1 {ip} {port}"],
                   timeout=timeout + 2)
        out, _ = srv.communicate(timeout=timeout + 2)
        return out
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def forwarded_datagrams(ns: Netns) -> int:
    """IPv4 datagrams `ns` has routed (Ip: ForwDatagrams in /proc/net/snmp).
    Packets a datapath redirects past the stack never count here, so this
    number staying put proves the stack was not on the path."""
    lines = [l.split() for l in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if l.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def forwarded_datagrams6(ns: Netns) -> int:
    """IPv6 datagrams `ns` has routed (Ip6OutForwDatagrams in
    /proc/net/snmp6): forwarded_datagrams' twin for IPv6."""
    for line in ns.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
        name, _, value = line.partition(" ")
        if name == "Ip6OutForwDatagrams":
            return int(value.strip())
    raise RuntimeError(f"no Ip6OutForwDatagrams in {ns.netns}'s /proc/net/snmp6")


# A TCP server that answers every connection with a fixed text and never
# stops listening: a `while true; do nc -l; done` loop has a gap between
# connections in which a client is refused, which would make tests flaky.
REPLY_SERVER = r"""
import socket, sys, threading
host, port, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128)
def answer(c):
    with c:
        c.settimeout(3)
        try:
            c.recv(100)
            c.sendall(reply)
        except OSError:
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=answer, args=(c,), daemon=True).start()
"""


def serve_reply(pod, port: int, reply: str, *, peer: bool = False, udp: bool = False,
                host: str | None = None):
    """Start the reply server in `pod` and wait until it listens. With
    `peer`, each answer is `reply` followed by " <address:port>" of the
    client as the server saw it: what proves whether a source address was
    kept or translated on the way. `udp`: answer datagrams instead (always
    with the peer). `host`: the address to listen on (the pod's IPv4 one by
    default), of either family."""
    script = PEER_SERVER if (peer or udp) else REPLY_SERVER
    args = [host or pod.ip, str(port), reply] + (["udp"] if udp else [])
    p = pod.popen(["python3", "-c", script, *args])
    pod.wait_port(port, udp=udp)
    return p


PEER_SERVER = r"""
import socket, sys, threading
host, port, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if sys.argv[4:] == ["udp"]:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((host, port))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(f"{reply} {addr[0]}:{addr[1]}".encode(), addr)
s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128)
def answer(c, addr):
    with c:
        c.settimeout(3)
        try:
            c.recv(100)
            c.sendall(f"{reply} {addr[0]}:{addr[1]}".encode())
        except OSError:
            pass
while True:
    c, addr = s.accept()
    threading.Thread(target=answer, args=(c, addr), daemon=True).start()
"""


def iperf3(client: Netns, bind: str, server_ip: str, port: int, args: list[str],
           timeout: float, prefix: list[str] | tuple = ()) -> dict:
    """One iperf3 client run (`args`: its test options) from `bind` in
    `client` to the iperf3 server at server_ip:port; returns its JSON report.
    The server serves one test at a time and, right after a previous client,
    can briefly refuse ("server is busy"): a few tries before giving up.
    `prefix`: what the command runs under (a CPU pin)."""
    cmd = [*prefix, "iperf3", "-c", server_ip, "-B", bind, "-p", str(port), *args, "-J"]
    last = None
    for _ in range(5):
        r = client.run(cmd, check=False, timeout=timeout)
        try:
            out = json.loads(r.stdout)
        except json.JSONDecodeError:
            out = {"error": r.stderr or r.stdout}
        if "error" not in out:
            return out
        last = out["error"]
        time.sleep(0.3)
    raise RuntimeError(f"iperf3 {bind} -> {server_ip}:{port} failed: {last}")
