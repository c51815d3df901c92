"""The simulated VPC's address plan and naming rules (pure: no kernel calls).

Every address below exists only inside the network namespaces a `World` makes;
none is ever assigned in, or routed from, the machine's own namespace. They sit
in 10.239.0.0/16 .. 10.255.0.0/16, ranges no Alibaba Cloud default VPC uses, so
they read as test addresses in any trace.

    10.240.0.0/24          node vSwitch (every node's eth0)
      10.240.0.253           its gateway (held by the vpc netns)
      10.240.0.(10+k)/24     eth0 of node k (k = 1..MAX_NODES, in add order)
    10.(240+j).0.0/16      vSwitch of ENI j (j = 1..MAX_ENIS); pods draw from it
      10.(240+j).255.253     its gateway (held by the vpc netns)
      10.(240+j).k.1/32      ENI j (ethj) of node k
      10.(240+j).k.10-250    pod IPs of node k on ENI j, each a /32 in its pod
    10.239.i.1, 10.239.i.2 the two ends of direct pair i (no node in between)
    10.250.0.0/24          outside the cluster: external clients (a user, a
                           cloud load balancer's probe) reach the VPC here
      10.250.0.253           its gateway (held by the vpc netns)
      10.250.0.(10+c)/24     external client c (c = 1..MAX_CLIENTS)
    169.254.1.1            pods' default gateway; never assigned, only a
                           permanent neighbour entry in each pod (as Terway)

In a dual-stack world (World(dual_stack=True)) every ENI and pod also has an
IPv6 address, from the IPv6 half of its vSwitch:

    fd00:a:(f0+j)::/64     IPv6 vSwitch of ENI j; pods draw from it
      fd00:a:(f0+j)::k:1/128     ENI j of node k
      fd00:a:(f0+j)::k:(a-fa)    pod IPv6 addresses of node k on ENI j (the
                                 same slot numbers as the IPv4 ones), a /128
    fe80::253              the vSwitch's link-local gateway on every ENI link
    fe80::1                pods' IPv6 default gateway; never assigned, only a
                           permanent neighbour entry in each pod (as Terway)
    fd00:a:ef:i::1, ::2    the two ends of direct pair i

Terway names a pod's policy-routing table 1000 + ifindex of its ENI (the seed
node shows table 1004 for an eth1 with ifindex 4, and 1003 for ifindex 3);
`eni_table` keeps that rule.

Names. Everything a world creates carries its tag (PREFIX + 4 hex chars), so
parallel worlds never collide and leftovers of dead ones can be found:

    fpw<tag>-vpc           the vpc netns
    fpw<tag>-n-<node>      a node netns
    fpw<tag>-p-<pod>       a pod netns (pod names are unique per world, as in
                           a Kubernetes namespace)
    fpw<tag>-d<i>a/b       the ends of direct pair i
    fpw<tag>-c-<name>      an external client netns
    fpw<tag>c<c>           vpc-side veth of external client c
    fpw<tag>n<k>e<j>       vpc-side veth of node k's eth<j> (eth0 = primary)
    cali<11 hex>           host side of a pod's veth: sha1(world tag + pod name),
                           the shape Terway gives it
Names fixed by the product's environment (eth0..ethN on a node, eth0 in a pod)
are used verbatim inside their own netns.
"""
from __future__ import annotations

import hashlib
import re

from agent.config.schema import KEYS_BY_NAME

PREFIX = "fpw"
TAG_RE = re.compile(r"^[0-9a-f]{4}$")


def world_name_re(prefix: str = PREFIX) -> re.Pattern:
    """Matches a netns or link name of some world and captures its tag: prefix +
    4 hex, then "-" (netns) or "n<digit>" (vpc-side veth)."""
    return re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{4}})(-|n\d|c\d)")


WORLD_NAME_RE = world_name_re()

NODE_VSWITCH = "10.240.0.0/24"
NODE_PREFIXLEN = 24
NODE_GATEWAY = "10.240.0.253"
POD_GATEWAY = "169.254.1.1"
# local_router_ipv6's default; World(local_router_ipv6=...) lays pods out with another
POD_GATEWAY6 = KEYS_BY_NAME["local_router_ipv6"].default
ENI_GATEWAY6 = "fe80::253"
MAX_NODES = 200
MAX_ENIS = 15
POD_FIRST_HOST = 10
POD_LAST_HOST = 250
MAX_PODS_PER_ENI = POD_LAST_HOST - POD_FIRST_HOST + 1
MAX_DIRECT_PAIRS = 250
CLIENT_NET = "10.250.0.0/24"
CLIENT_PREFIXLEN = 24
CLIENT_GATEWAY = "10.250.0.253"
MAX_CLIENTS = 200

# Kubernetes-like object names; also keeps netns names free of shell or
# path characters.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,38}[a-z0-9])?$")
IFNAMSIZ = 15


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r}: use 1-40 chars of [a-z0-9.-]")
    return name


def node_ip(k: int) -> str:
    _check_range("node index", k, 1, MAX_NODES)
    return f"10.240.0.{10 + k}"


def eni_vswitch(j: int) -> str:
    _check_range("ENI index", j, 1, MAX_ENIS)
    return f"10.{240 + j}.0.0/16"


def eni_gateway(j: int) -> str:
    _check_range("ENI index", j, 1, MAX_ENIS)
    return f"10.{240 + j}.255.253"


def eni_ip(k: int, j: int) -> str:
    _check_range("node index", k, 1, MAX_NODES)
    _check_range("ENI index", j, 1, MAX_ENIS)
    return f"10.{240 + j}.{k}.1"


def pod_ip(k: int, j: int, n: int) -> str:
    """The n-th (0-based) pod address of node k on ENI j."""
    _check_range("pod slot", n, 0, MAX_PODS_PER_ENI - 1)
    return f"10.{240 + j}.{k}.{POD_FIRST_HOST + n}"


def eni_ip6(k: int, j: int) -> str:
    _check_range("node index", k, 1, MAX_NODES)
    _check_range("ENI index", j, 1, MAX_ENIS)
    return f"fd00:a:{240 + j:x}::{k:x}:1"


def pod_ip6(k: int, j: int, n: int) -> str:
    """The n-th (0-based) pod IPv6 address of node k on ENI j."""
    _check_range("pod slot", n, 0, MAX_PODS_PER_ENI - 1)
    return f"fd00:a:{240 + j:x}::{k:x}:{POD_FIRST_HOST + n:x}"


def eni_table(ifindex: int) -> int:
    return 1000 + ifindex


def direct_ips(i: int) -> tuple[str, str]:
    _check_range("direct pair index", i, 1, MAX_DIRECT_PAIRS)
    return f"10.239.{i}.1", f"10.239.{i}.2"


def direct_ips6(i: int) -> tuple[str, str]:
    _check_range("direct pair index", i, 1, MAX_DIRECT_PAIRS)
    return f"fd00:a:ef:{i:x}::1", f"fd00:a:ef:{i:x}::2"


def client_ip(c: int) -> str:
    _check_range("client index", c, 1, MAX_CLIENTS)
    return f"10.250.0.{10 + c}"


def client_ns(tag: str, name: str) -> str:
    return f"{PREFIX}{tag}-c-{name}"


def vpc_client_ifname(tag: str, c: int) -> str:
    name = f"{PREFIX}{tag}c{c}"
    assert len(name) <= IFNAMSIZ, name
    return name


def vpc_ns(tag: str) -> str:
    return f"{PREFIX}{tag}-vpc"


def node_ns(tag: str, node: str) -> str:
    return f"{PREFIX}{tag}-n-{node}"


def pod_ns(tag: str, pod: str) -> str:
    return f"{PREFIX}{tag}-p-{pod}"


def direct_ns(tag: str, i: int, end: str) -> str:
    return f"{PREFIX}{tag}-d{i}{end}"


def vpc_ifname(tag: str, k: int, j: int) -> str:
    name = f"{PREFIX}{tag}n{k}e{j}"
    assert len(name) <= IFNAMSIZ, name
    return name


def cali_name(tag: str, pod: str) -> str:
    # The tag is part of the hash so two worlds' pods named alike still get
    # distinct host-side names (a BPF test may list cali* across namespaces).
    return "cali" + hashlib.sha1(f"{PREFIX}{tag}/{pod}".encode()).hexdigest()[:11]


def tag_of(name: str) -> str | None:
    """The world tag a netns/link name carries, or None if it is not ours."""
    m = WORLD_NAME_RE.match(name)
    return m.group(1) if m else None


def _check_range(what: str, v: int, lo: int, hi: int) -> None:
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v} outside {lo}..{hi} (see agent.sim.plan)")
