"""kube-proxy's rules for a set of ClusterIP Services, for the benchmarks' baselines.

fastpath is compared with what operators would otherwise run: kube-proxy in
iptables mode or in nftables mode. These generators write the rules those
modes program for ClusterIP Services, in the text each mode feeds its loader
(`iptables-restore --noflush`, `nft -f`), so a benchmark can load them into a
simulated node's netns and measure the same traffic through them. Written
from kube-proxy's documented and observable output (iptables-save / nft list
ruleset of a node), not from its source.

iptables mode (nat table; filter table for the FORWARD/INPUT/OUTPUT checks):

    PREROUTING, OUTPUT  -> KUBE-SERVICES: one rule per Service port, matched
                           one after another (this linear walk is what makes
                           new connections slower as Services grow)
    KUBE-SVC-<hash>     -> masquerade mark for traffic from outside the
                           cluster CIDR, then one rule per endpoint (random
                           choice through `statistic --probability`)
    KUBE-SEP-<hash>     -> hairpin masquerade mark, then DNAT
    POSTROUTING         -> KUBE-POSTROUTING (MASQUERADE of marked traffic)

nftables mode (one table `ip kube-proxy`): one verdict-map lookup on
(daddr . l4proto . dport) in chain `services` replaces the linear walk; each
Service port has a `service-*` chain choosing an `endpoint-*` chain with
`numgen random mod n vmap`, which DNATs.

NodePorts (a Service port with `node_port`, externalTrafficPolicy Cluster):

    iptables: KUBE-SERVICES' last rule sends traffic for the node's
              NodePort addresses (`-d <ip>` each, or `--dst-type LOCAL`
              without a list) to KUBE-NODEPORTS, one rule per NodePort
              -> KUBE-EXT-<hash>: masquerade mark, then the Service's
              KUBE-SVC chain
    nftables: the `nodeport-ips` set and the `service-nodeports` verdict map
              (l4proto . port) -> `external-*` chain: masquerade mark,
              then `goto` the Service's `service-*` chain

Only what Services with endpoints produce is generated (no external IPs,
load balancers, affinity, or no-endpoint rejects); the base chains and the
always-present checks are included because every packet or new connection
on a kube-proxy node passes them.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

MASQ_MARK = "0x4000"


@dataclass(frozen=True)
class ServicePort:
    """One Service port and its endpoints, as kube-proxy sees them."""
    namespace: str
    name: str
    port_name: str
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]
    protocol: str = "tcp"
    node_port: int = 0            # 0: not a NodePort

    @property
    def svc_port_name(self) -> str:
        """kube-proxy's `ns/name:port` identity of a Service port."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def _hash(text: str, n: int) -> str:
    # Chain names carry a base32 digest so they stay short, unique and stable
    # for a given Service port (and endpoint), as kube-proxy's do.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:n]


def svc_chain(sp: ServicePort) -> str:
    return "KUBE-SVC-" + _hash(sp.svc_port_name + sp.protocol, 16)


def sep_chain(sp: ServicePort, ip: str, port: int) -> str:
    return "KUBE-SEP-" + _hash(f"{sp.svc_port_name}{sp.protocol}{ip}:{port}", 16)


def ext_chain(sp: ServicePort) -> str:
    return "KUBE-EXT-" + _hash(sp.svc_port_name + sp.protocol, 16)


# -- iptables mode -------------------------------------------------------------

def iptables_restore(services: list[ServicePort], cluster_cidr: str,
                     nodeport_ips: tuple[str, ...] = ()) -> str:
    """The filter and nat tables kube-proxy's full sync writes, for
    `iptables-restore --noflush`. The jumps from the built-in chains are in
    `iptables_jumps()` (kube-proxy adds those with separate commands).
    nodeport_ips: --nodeport-addresses resolved (empty: every local address)."""
    filt = [
        "*filter",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    heads = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    rules = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]
    for sp in services:
        svc = svc_chain(sp)
        heads.append(f":{svc} - [0:0]")
        p, name = sp.protocol, sp.svc_port_name
        rules.append(f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" '
                     f"-m {p} -p {p} -d {sp.vip} --dport {sp.port} -j {svc}")
        rules.append(f'-A {svc} -m comment --comment "{name} cluster IP" '
                     f"-m {p} -p {p} -d {sp.vip} --dport {sp.port} ! -s {cluster_cidr} "
                     f"-j KUBE-MARK-MASQ")
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            sep = sep_chain(sp, ip, port)
            heads.append(f":{sep} - [0:0]")
            # Endpoint i is taken with probability 1/(n-i) of what is left:
            # a uniform choice overall; the last one takes the remainder.
            stat = (f"-m statistic --mode random --probability {1 / (n - i):.10f} "
                    if i < n - 1 else "")
            rules.append(f'-A {svc} -m comment --comment "{name} -> {ip}:{port}" {stat}-j {sep}')
            rules.append(f"-A {sep} -m comment --comment {name} -s {ip} -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -m comment --comment {name} -m {p} -p {p} "
                         f"-j DNAT --to-destination {ip}:{port}")
        if sp.node_port:
            ext = ext_chain(sp)
            heads.append(f":{ext} - [0:0]")
            rules.append(f'-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} '
                         f"--dport {sp.node_port} -j {ext}")
            rules.append(f'-A {ext} -m comment --comment "masquerade traffic for {name} '
                         f'external destinations" -j KUBE-MARK-MASQ')
            rules.append(f"-A {ext} -j {svc}")
    note = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
            'this must be the last rule in this chain"')
    if nodeport_ips:
        rules += [f"{note} -d {ip} -j KUBE-NODEPORTS" for ip in nodeport_ips]
    else:
        rules.append(f"{note} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    return "\n".join(filt + heads + rules + ["COMMIT", ""])


def iptables_jumps() -> list[tuple[str, str, str]]:
    """(table, built-in chain, rule) that hook kube-proxy's chains in."""
    new = "-m conntrack --ctstate NEW"
    return [
        ("filter", "INPUT", f'{new} -m comment --comment "kubernetes load balancer firewall" '
                            "-j KUBE-PROXY-FIREWALL"),
        ("filter", "INPUT", '-m comment --comment "kubernetes health check service ports" '
                            "-j KUBE-NODEPORTS"),
        ("filter", "INPUT", f'{new} -m comment --comment "kubernetes externally-visible service '
                            'portals" -j KUBE-EXTERNAL-SERVICES'),
        ("filter", "FORWARD", f'{new} -m comment --comment "kubernetes load balancer firewall" '
                              "-j KUBE-PROXY-FIREWALL"),
        ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
        ("filter", "FORWARD", f'{new} -m comment --comment "kubernetes service portals" '
                              "-j KUBE-SERVICES"),
        ("filter", "FORWARD", f'{new} -m comment --comment "kubernetes externally-visible '
                              'service portals" -j KUBE-EXTERNAL-SERVICES'),
        ("filter", "OUTPUT", f'{new} -m comment --comment "kubernetes load balancer firewall" '
                             "-j KUBE-PROXY-FIREWALL"),
        ("filter", "OUTPUT", f'{new} -m comment --comment "kubernetes service portals" '
                             "-j KUBE-SERVICES"),
        ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
        ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
        ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" '
                               "-j KUBE-POSTROUTING"),
    ]


def iptables_jumps_restore() -> str:
    """The jumps as an `iptables-restore --noflush` input (appended to empty
    built-in chains, in kube-proxy's order)."""
    out: list[str] = []
    for table in ("filter", "nat"):
        out.append(f"*{table}")
        out += [f"-A {chain} {rule}" for t, chain, rule in iptables_jumps() if t == table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


# -- nftables mode ---------------------------------------------------------------

NFT_TABLE = "kube-proxy"


def _nft_svc(sp: ServicePort) -> str:
    return (f"service-{_hash(sp.svc_port_name + sp.protocol, 8)}-"
            f"{sp.namespace}/{sp.name}/{sp.protocol}/{sp.port_name}")


def _nft_ep(sp: ServicePort, ip: str, port: int) -> str:
    return (f"endpoint-{_hash(f'{sp.svc_port_name}{sp.protocol}{ip}:{port}', 8)}-"
            f"{sp.namespace}/{sp.name}/{sp.protocol}/{sp.port_name}__{ip}/{port}")


def nft_base(service_cidr: str) -> list[str]:
    """The table, sets, maps, base chains and fixed rules of nftables mode."""
    t = f"ip {NFT_TABLE}"
    vmap3 = "type ipv4_addr . inet_proto . inet_service : verdict"
    vmap2 = "type inet_proto . inet_service : verdict"
    return [
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f'add set {t} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}',
        f"add map {t} firewall-ips {{ {vmap3} ; }}",
        f"add map {t} no-endpoint-nodeports {{ {vmap2} ; }}",
        f"add map {t} no-endpoint-services {{ {vmap3} ; }}",
        f'add map {t} service-ips {{ {vmap3} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f"add map {t} service-nodeports {{ {vmap2} ; }}",
        f"add chain {t} cluster-ips-check",
        f"add chain {t} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}",
        f"add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}",
        f"add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}",
        f"add chain {t} filter-input {{ type filter hook input priority 0 ; }}",
        f"add chain {t} filter-output {{ type filter hook output priority 0 ; }}",
        f"add chain {t} firewall-check",
        f"add chain {t} mark-for-masquerade",
        f"add chain {t} masquerading",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {t} nodeport-endpoints-check",
        f"add chain {t} reject-chain",
        f"add chain {t} services",
        f"add chain {t} service-endpoints-check",
        f'add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
        f'add rule {t} cluster-ips-check ip daddr {{ {service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"',
        f"add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check",
        f"add rule {t} filter-forward ct state new jump service-endpoints-check",
        f"add rule {t} filter-forward ct state new jump cluster-ips-check",
        f"add rule {t} filter-input ct state new jump nodeport-endpoints-check",
        f"add rule {t} filter-input ct state new jump service-endpoints-check",
        f"add rule {t} filter-output ct state new jump service-endpoints-check",
        f"add rule {t} filter-output-pre-dnat ct state new jump firewall-check",
        f"add rule {t} filter-output ct state new jump cluster-ips-check",
        f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}",
        f"add rule {t} masquerading mark and {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add rule {t} nat-output jump services",
        f"add rule {t} nat-postrouting jump masquerading",
        f"add rule {t} nat-prerouting jump services",
        f"add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        f"add rule {t} reject-chain reject",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        f"add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    ]


def _nft_ext(sp: ServicePort) -> str:
    return (f"external-{_hash(sp.svc_port_name + sp.protocol, 8)}-"
            f"{sp.namespace}/{sp.name}/{sp.protocol}/{sp.port_name}")


def nft_script(services: list[ServicePort], cluster_cidr: str, service_cidr: str,
               nodeport_ips: tuple[str, ...] = ()) -> str:
    """What kube-proxy's full sync hands `nft -f` for these Service ports."""
    t = f"ip {NFT_TABLE}"
    lines = nft_base(service_cidr)
    # Every chain exists before any rule jumps to it (one transaction, as
    # kube-proxy's sync: chains, then rules, then map elements).
    chains, rules, elements = [], [], []
    for sp in services:
        svc, p = _nft_svc(sp), sp.protocol
        eps = [(ip, port, _nft_ep(sp, ip, port)) for ip, port in sp.endpoints]
        chains.append(f"add chain {t} {svc}")
        rules.append(f"add rule {t} {svc} ip daddr {sp.vip} {p} dport {sp.port} "
                     f"ip saddr != {cluster_cidr} jump mark-for-masquerade")
        choice = ", ".join(f"{i} : goto {name}" for i, (_, _, name) in enumerate(eps))
        rules.append(f"add rule {t} {svc} numgen random mod {len(eps)} vmap {{ {choice} }}")
        for ip, port, name in eps:
            chains.append(f"add chain {t} {name}")
            rules.append(f"add rule {t} {name} ip saddr {ip} jump mark-for-masquerade")
            rules.append(f"add rule {t} {name} meta l4proto {p} dnat to {ip}:{port}")
        elements.append(f"add element {t} cluster-ips {{ {sp.vip} }}")
        elements.append(f"add element {t} service-ips {{ {sp.vip} . {p} . {sp.port} : goto {svc} }}")
        if sp.node_port:
            ext = _nft_ext(sp)
            chains.append(f"add chain {t} {ext}")
            rules.append(f"add rule {t} {ext} jump mark-for-masquerade")
            rules.append(f"add rule {t} {ext} goto {svc}")
            elements.append(f"add element {t} service-nodeports {{ {p} . {sp.node_port} : "
                            f"goto {ext} }}")
    if nodeport_ips:
        elements.append(f"add element {t} nodeport-ips {{ {', '.join(nodeport_ips)} }}")
    return "\n".join(lines + chains + rules + elements) + "\n"
