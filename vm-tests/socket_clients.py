"""Client programs the socket-LB and agent vm-tests run in a node's or a
pod's netns, optionally inside the test's own cgroup v2 child (socket-LB
attaches there). A cgroup is joined before `ip netns exec`, from this mount
namespace: `ip netns exec` remounts /sys, which hides cgroup2 inside it.

- `one_shot`: one TCP or UDP exchange, printing the reply and the peer the
  socket showed (a ClusterIP, if socket-LB kept it), or the errno.
- `LineClient`: a long-lived connected UDP socket driven line by line, and
  `send_until_closed`, which sends on several of them until the agent has
  closed each one (the UDP socket reaper).
- `Load`: echo load clients (one TCP connection and one connected UDP socket
  each, a numbered message every 20 ms, every echo checked), stopped by a
  stop file or their time limit, whichever comes first.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _argv(ns, cg: str | None, script: str, *args: str, python: str = sys.executable) -> list[str]:
    cmd = f'exec ip netns exec {ns.netns} {python} -c "$0" "$@"'
    if cg:
        cmd = f'echo $$ > {cg}/cgroup.procs && {cmd}'
    return ["sh", "-c", cmd, script, *args]


# family: 4 (AF_INET), 6 (AF_INET6), or mapped (AF_INET6 to ::ffff:<IPv4>).
# proto: tcp, udp (sendto/recvfrom) or udp-connected (connect/send/recv).
ONE_SHOT = r"""
import socket, sys
vip, port, proto, fam = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
af = socket.AF_INET if fam == "4" else socket.AF_INET6
if fam == "mapped":
    vip = "::ffff:" + vip
try:
    if proto == "tcp":
        s = socket.socket(af, socket.SOCK_STREAM); s.settimeout(3)
        s.connect((vip, port))
        peer = s.getpeername()
        s.sendall(b"hi"); s.shutdown(socket.SHUT_WR)
        data = s.recv(100)
    else:
        s = socket.socket(af, socket.SOCK_DGRAM); s.settimeout(3)
        if proto == "udp-connected":
            s.connect((vip, port)); s.send(b"q")
            data = s.recv(100); peer = s.getpeername()
        else:
            s.sendto(b"q", (vip, port))
            data, peer = s.recvfrom(100)
    print(data.decode(), peer[0], peer[1])
except OSError as e:
    print("ERROR", e.errno, e.strerror)
"""


def one_shot(ns, cg: str | None, vip: str, port: str, proto: str, fam: str = "4") -> str:
    """`<reply> <peer address> <peer port>`, or `ERROR <errno> <text>`."""
    return subprocess.run(_argv(ns, cg, ONE_SHOT, vip, port, proto, fam), capture_output=True,
                          text=True, timeout=15).stdout.strip()


# Asks once and keeps its end open: the server's close leaves the flow
# half-closed, so its conntrack entries stay to be looked at (a completed
# close retires them at once). Killed, it resets the connection: one
# packet, where a FIN of a flow a test flushed would be dropped and
# retransmitted into the next tests' counters and monitor.
HELD_CLIENT = r"""
import socket, struct, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.sendall(b"hi")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode(), flush=True)
time.sleep(60)
"""


def hold(pod, target: str, port: int) -> tuple[subprocess.Popen, str]:
    """A TCP connection `pod` keeps open after its answer: the client
    process (kill it to reset the connection) and the answer."""
    p = pod.popen([sys.executable, "-c", HELD_CLIENT, target, str(port)],
                  stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


@contextlib.contextmanager
def held(pod, target: str, port: int):
    """hold() for the block: yields the answer, resets the connection after."""
    p, answer = hold(pod, target, port)
    try:
        yield answer
    finally:
        p.kill()
        p.wait()


# connect <ip> <port> | send <tag>; answers `ok <peer ip> <peer port>`,
# `ok <first word of the reply>` or `err <errno>`.
LINE_CLIENT = r"""
import socket, sys
af = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = None
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "connect":
            s = socket.socket(af, socket.SOCK_DGRAM); s.settimeout(1)
            s.connect((args[0], int(args[1])))
            print("ok", *s.getpeername()[:2], flush=True)
        elif cmd == "send":
            s.send(args[0].encode())
            print("ok", s.recv(100).decode().split()[0], flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
"""


class LineClient:
    """A connected UDP socket kept open across the test, driven line by line."""

    def __init__(self, ns, cg: str | None, family: int = 4):
        self.p = subprocess.Popen(_argv(ns, cg, LINE_CLIENT, str(family)), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=5)


def send_until_closed(clients: dict[str, LineClient], expect: str,
                      seconds: float = 15) -> dict[str, str]:
    """Send `<tag><n>` on each client every 100 ms until its send fails; every
    answer before that must be `expect` (the change not applied yet). Returns
    tag -> the failure (`err 89`, EDESTADDRREQ, once the agent closed it)."""
    results = {}
    deadline = time.monotonic() + seconds
    for tag, say in clients.items():
        i = 0
        while time.monotonic() < deadline:
            i += 1
            out = say(f"send {tag}{i}")
            if out.startswith("err"):
                results[tag] = out
                break
            assert out == expect, (tag, out)
            time.sleep(0.1)
    return results


# One TCP connection and one connected UDP socket (either family, from the
# address), a numbered message every 20 ms, each echo checked, the peers
# getpeername showed collected; ends at the stop file or after `secs`.
LOAD = r"""
import json, os, socket, sys, time
ip, tport, uport, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
stop = sys.argv[5]          # ends early once this file exists
af = socket.AF_INET6 if ":" in ip else socket.AF_INET
res = {"tcp_ok": 0, "tcp_error": "", "udp_ok": 0, "udp_lost": 0, "udp_late": 0}
unanswered = set()          # datagrams whose echo did not come within the timeout
peers = set()
t0 = time.monotonic()
tcp = socket.create_connection((ip, tport), timeout=5)
tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
udp = socket.socket(af, socket.SOCK_DGRAM)
udp.connect((ip, uport))
udp.settimeout(1.0)
end, seq = time.monotonic() + secs, 0
while time.monotonic() < end and not os.path.exists(stop):
    seq += 1
    msg = b"%08d" % seq
    try:
        tcp.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = tcp.recv(len(msg) - len(got))
            if not chunk:
                raise ConnectionError("closed by the peer")
            got += chunk
        if got != msg:
            raise ValueError(f"echo {got!r} for {msg!r}")
        res["tcp_ok"] += 1
        peers.add(tcp.getpeername()[0])
    except (OSError, ValueError) as e:
        res["tcp_error"] = f"{type(e).__name__}: {e}"
        break
    udp.send(msg)
    try:
        while True:
            got = udp.recv(64)
            if got == msg:
                break
            if got in unanswered:       # a late echo: delayed (a busy CPU), not lost
                unanswered.discard(got)
                res["udp_late"] += 1
        res["udp_ok"] += 1
        peers.add(udp.getpeername()[0])
    except socket.timeout:
        unanswered.add(msg)
    time.sleep(0.02)
res["seconds"] = round(time.monotonic() - t0, 2)
udp.settimeout(0.5)
deadline = time.monotonic() + 3
while unanswered and time.monotonic() < deadline:
    try:
        got = udp.recv(64)
    except socket.timeout:
        continue
    if got in unanswered:
        unanswered.discard(got)
        res["udp_late"] += 1
res["udp_lost"] = len(unanswered)    # never echoed at all
res["peers"] = sorted(peers)
print(json.dumps(res))
"""


class Load:
    """Load clients (LOAD above). Used as a context manager, every client
    still running at the end is killed. Echo servers are the caller's."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.stop_file = Path(tempfile.mkdtemp(prefix="fp-load-"), "stop")
        self.clients: list[tuple[str, subprocess.Popen]] = []

    def add(self, name: str, src, ip: str, tport: int, uport: int, cgroup: str = "") -> None:
        """A client in `src`'s netns (inside `cgroup` first, if given)."""
        argv = _argv(src, cgroup or None, LOAD, ip, str(tport), str(uport), str(self.seconds),
                     str(self.stop_file), python="/usr/bin/python3")
        self.clients.append((name, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)))

    def running(self) -> list[str]:
        return [name for name, p in self.clients if p.poll() is None]

    def results(self, timeout: float = 60) -> dict[str, dict]:
        """Stop the clients and collect what each saw."""
        self.stop_file.touch()
        out = {}
        for name, p in self.clients:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, (name, stderr)
            out[name] = json.loads(stdout)
        return out

    def __enter__(self) -> "Load":
        return self

    def __exit__(self, *exc) -> None:
        for _, p in self.clients:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(self.stop_file.parent, ignore_errors=True)


# The node-to-itself tests (test_node_self.py, test_node_self6.py): a server
# that reads until the client's half-close and answers with what it saw (its
# name, the peer address, the byte count), either family by its address ...
NODE_SELF_SERVER = r"""
import socket, sys, threading
host, port, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128)
def answer(c, addr):
    n = 0
    while True:
        data = c.recv(65536)
        if not data:
            break
        n += len(data)
    c.sendall(f"{reply} {addr[0]} {n}".encode())
    c.close()
while True:
    c, addr = s.accept()
    threading.Thread(target=answer, args=(c, addr), daemon=True).start()
"""

# ... and its client, which prints that answer and the peer its socket showed
NODE_SELF_CLIENT = r"""
import socket, sys
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 3
try:
    s = socket.create_connection((ip, port), timeout=timeout)
    peer = s.getpeername()[0]
    s.sendall(b"x" * size)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        data = s.recv(4096)
        if not data:
            break
        out += data
    print(out.decode() or "EMPTY", peer)
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print(f"ERROR {e.errno}")
"""

# TSO/GSO off on a device (ETHTOOL_STSO / ETHTOOL_SGSO with data 0, no ethtool
# binary needed), then ETHTOOL_GTSO / ETHTOOL_GGSO read back
OFFLOADS_OFF = r"""
import ctypes, fcntl, socket, struct
s = socket.socket()
def ethtool(cmd, data=0):
    val = ctypes.create_string_buffer(struct.pack("II", cmd, data))
    fcntl.ioctl(s, 0x8946, struct.pack("16sP16x", b"lo", ctypes.addressof(val)))
    return struct.unpack("II", val.raw[:8])[1]
ethtool(0x1f); ethtool(0x24)
print(ethtool(0x1e), ethtool(0x23))
"""
