"""`fastpath trace`: what the loaded programs would do with one packet.

Builds the packet (scapy) as the source pod would send it, IPv4 or IPv6 by
the destination's family (an IPv6 packet enters the same program, which
hands it to the IPv6 one by tail call, as real traffic), finds the
program fastpath attached to the ingress of the pod's host veth (for a
source that is not a pod of this node: as it arrives from the VPC, on the
ingress of the destination pod's ENI, or of `--via`), and runs
it with BPF_PROG_TEST_RUN against the live maps, marked FP_WHATIF_MARK:
such a run changes no state (no conntrack, affinity, counter or event) and
records its decisions in fp_decision_v1, which is read back and printed:
service translation, policy verdicts with the deciding policy, redirect
target, drop reason. Nothing is sent.
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
import os

from agent.model import bpfdefs
from agent.cli import bpfobj
from agent.cli.common import EXIT_FAIL, EXIT_USAGE, CliExit, run
from agent.datapath import libbpf, pinned
from agent.inspect import decode, events

TC_VERDICTS = {-1: "TC_ACT_UNSPEC", 0: "TC_ACT_OK", 2: "TC_ACT_SHOT", 7: "TC_ACT_REDIRECT"}
NOT_RECORDED = 0xFFFFFFFF
PROTOS = ("tcp", "udp", "sctp", "icmp", "icmpv6")
ECHO_ID = 0x6670                 # the echo request's identifier (its "port")


def build_packet(src_ip: str, src_mac: str, gw_mac: str, dst_ip: str, dport: int,
                 proto: str, sport: int = 43210) -> bytes:
    """The first packet of a flow: a TCP SYN, a UDP datagram, an SCTP INIT
    (an association's first chunk, verification tag 0, CRC32c set), or an
    echo request (`icmp` to IPv4, `icmpv6` to IPv6), so the programs treat it as opening a flow. IPv6 when
    the addresses are (hop limit 64, as IPv4's TTL)."""
    try:
        from scapy.layers.inet import ICMP, IP, TCP, UDP
        from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
        from scapy.layers.l2 import Ether
        from scapy.layers.sctp import SCTP, SCTPChunkInit
    except ImportError as exc:
        raise CliExit(EXIT_FAIL, f"fastpath trace builds packets with scapy, which is not "
                                 f"importable ({exc}): pip install scapy") from None
    six = ipaddress.ip_address(dst_ip).version == 6
    l3 = IPv6(src=src_ip, dst=dst_ip, hlim=64) if six else IP(src=src_ip, dst=dst_ip, ttl=64)
    if proto in ("icmp", "icmpv6"):
        echo = (ICMPv6EchoRequest(id=ECHO_ID, seq=1) if six else ICMP(id=ECHO_ID, seq=1))
        return bytes(Ether(src=src_mac, dst=gw_mac) / l3 / echo / b"fastpath-trace")
    if proto == "tcp":
        l4 = TCP(sport=sport, dport=dport, flags="S")
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=dport) / b"fastpath-trace"
    else:
        l4 = SCTP(sport=sport, dport=dport, tag=0) / SCTPChunkInit(
            init_tag=0x66707472, a_rwnd=65535, n_out_streams=10, n_in_streams=10,
            init_tsn=1)
    return bytes(Ether(src=src_mac, dst=gw_mac) / l3 / l4)


def test_run(prog_fd: int, packet: bytes, ifindex: int, mark: int) -> int:
    out = ct.create_string_buffer(len(packet) + 256)
    inp = ct.create_string_buffer(bytes(packet), len(packet))
    ctx = libbpf.SkBuffCtx()
    ctx.ifindex = ifindex
    ctx.ingress_ifindex = ifindex
    ctx.mark = mark
    opts = libbpf._TestRunOpts()
    opts.sz = ct.sizeof(opts)
    opts.data_in = ct.cast(inp, ct.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ct.cast(out, ct.c_void_p)
    opts.data_size_out = len(out)
    opts.ctx_in = ct.cast(ct.pointer(ctx), ct.c_void_p)
    opts.ctx_size_in = ct.sizeof(ctx)
    opts.repeat = 1
    if libbpf.lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)) != 0:
        err = ct.get_errno()
        raise CliExit(EXIT_FAIL, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return ct.c_int32(opts.retval).value


def _find(rows: list[dict], spec: str) -> dict | None:
    hit = [r for r in rows if spec in (r["ip"], r.get("ip6") or None, r["pod"],
                                       r["pod"].split("/")[-1] if r["pod"] else None,
                                       r["host_ifname"])]
    return hit[0] if hit else None


def _version(text: str) -> int | None:
    """4 or 6 for an address, None for anything else."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


def _ingress_prog(ifname: str, prog: str) -> pinned.Attachment:
    for a in pinned.tc_attachments():
        if a.target == ifname and a.hook == "ingress" and a.prog_name == prog:
            return a
    raise CliExit(EXIT_FAIL, f"no fastpath program {prog} on {ifname} ingress (is it "
                             "attached? `fastpath net show`)")


def _link(name: str) -> dict:
    import json
    import subprocess
    r = subprocess.run(["ip", "-j", "link", "show", "dev", name], capture_output=True,
                       text=True, timeout=10)
    if r.returncode != 0:
        raise CliExit(EXIT_FAIL, f"--via {name}: no such interface ({r.stderr.strip()})")
    return json.loads(r.stdout)[0]


def _origin(ctx, spec: str, dst: str, via: str | None) -> dict:
    """Where the packet enters: a local pod's veth, or (a source address
    that is no pod of this node) an ENI from the VPC. The source address is
    of the destination's family: a pod named by name or by either address
    sends from its address of that family."""
    from agent.cli import views
    rows = views.data_endpoints(ctx)
    src = _find(rows, spec)
    six = _version(dst) == 6
    if _version(spec) not in (None, _version(dst)):
        raise CliExit(EXIT_USAGE, f"--from {spec} and --to {dst}: not of one address family")
    if src is not None and not via:
        ip = src["ip"]
        if six:
            ip = src.get("ip6") or ""
            if not ip:
                raise CliExit(EXIT_FAIL, f"--from {spec}: pod {src['pod'] or src['ip']} has no "
                                         f"IPv6 address to reach {dst} from")
        elif not ip:
            raise CliExit(EXIT_FAIL, f"--from {spec}: pod {src['pod'] or src['ip6']} is IPv6 "
                                     f"only: it has no IPv4 address to reach {dst} from")
        return {"ip": ip, "pod": src["pod"], "ifname": src["host_ifname"],
                "ifindex": src["host_ifindex"], "src_mac": src["pod_mac"],
                "dst_mac": src["host_mac"], "prog": "fp_from_pod"}
    if _version(spec) is None:
        raise CliExit(EXIT_FAIL, f"--from {spec!r}: not an endpoint of this node (by IP, "
                                 "namespace/pod, pod or host veth) nor an IPv4 or IPv6 "
                                 "address; `fastpath endpoint list`")
    if via is None:
        dst_ep = _find(rows, dst)
        if dst_ep is None or not dst_ep["eni"]:
            raise CliExit(EXIT_USAGE, f"--from {spec}: not a pod of this node, so the packet "
                                      "comes from the VPC: name the ENI it arrives on with --via")
        via = dst_ep["eni"]
    link = _link(via)
    return {"ip": spec, "pod": "", "ifname": via, "ifindex": link["ifindex"],
            "src_mac": "02:00:00:00:00:01", "dst_mac": link.get("address", "00:00:00:00:00:00"),
            "prog": "fp_from_vpc"}


def parse_target(text: str, proto: str = "tcp") -> tuple[str, int]:
    """--to: IPv4:PORT or [IPv6]:PORT; for an echo request (icmp, icmpv6)
    the address alone (a port given is ignored: echo has none)."""
    usage = CliExit(EXIT_USAGE, f"--to {text!r}: expected IPv4:PORT or [IPv6]:PORT, e.g. "
                                "192.168.0.10:80 or [fd00::10]:80")
    echo = proto in ("icmp", "icmpv6")
    if echo and _version(text.strip("[]")):
        return str(ipaddress.ip_address(text.strip("[]"))), 0
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if _version(host) != 6:
            raise usage
    else:
        host, sep, port = text.rpartition(":")
        if _version(host) != 4:
            raise usage
    try:
        p = int(port)
        if not sep or not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise usage from None
    return str(ipaddress.ip_address(host)), (0 if echo else p)


@run
def cmd_trace(ctx, args) -> int:
    M = bpfobj.aliases()
    proto = args.proto.lower()
    if proto not in PROTOS:
        raise CliExit(EXIT_USAGE, f"--proto {args.proto!r}: tcp, udp, sctp, icmp or icmpv6")
    dst, dport = parse_target(args.to, proto)
    if proto in ("icmp", "icmpv6"):
        # each names its family's echo; the other family's name is a slip
        want = 6 if proto == "icmpv6" else 4
        if _version(dst) != want:
            raise CliExit(EXIT_USAGE, f"--proto {proto} to {dst}: use "
                                      f"{'icmpv6' if want == 4 else 'icmp'} for IPv{10 - want}")
    src = _origin(ctx, getattr(args, "from"), dst, args.via)
    att = _ingress_prog(src["ifname"], src["prog"])
    dmap = ctx.map(M["decision"])
    dlay = ctx.layout(M["decision"], dmap)          # struct fp_decision, from its BTF
    cls = dlay.schema.ctype(dlay.value)
    fresh = cls()
    fresh.reason = NOT_RECORDED
    pv_none = bpfdefs.load().defines.get("FP_PV_NONE", 0xFF)
    fresh.pv[0] = fresh.pv[1] = pv_none
    key = (0).to_bytes(4, "little")
    dmap.update(key, bytes(fresh))
    pkt = build_packet(src["ip"], src["src_mac"], src["dst_mac"], dst, dport, proto,
                       sport=args.sport)
    fd = pinned.prog_fd(att.prog_id)
    try:
        retval = test_run(fd, pkt, src["ifindex"], bpfdefs.load().defines["FP_WHATIF_MARK"])
    finally:
        os.close(fd)
    raw = dmap.lookup(key)
    dec = decode.decode_value(dlay.value, decode.from_bytes(dlay.value, raw, dlay.schema),
                              dlay.schema)
    if dec["reason"] == NOT_RECORDED:
        raise CliExit(EXIT_FAIL, f"{att.prog_name} (id {att.prog_id}) recorded no decision: "
                                 "its programs predate what-if runs (restart the agent)")
    names = {int(k): v for k, v in (ctx.agent("PolicyNames") or {}).items()}
    view = events.decision_view(dec, ctx.links(), names)
    if view["service"]:
        svcs = {s["svc_id"]: s for s in _services(ctx)}
        s = svcs.get(view["service"]["svc_id"])
        if s:
            view["service"]["service"] = s["service"]
            view["service"]["frontend"] = s["frontend"]
    data = {"from": {"ip": src["ip"], "pod": src["pod"], "interface": src["ifname"]},
            "to": {"ip": dst, "port": dport,
                   "proto": "ICMPv6" if proto == "icmpv6" else proto.upper()},
            "family": f"ipv{_version(dst)}",
            "program": {"name": att.prog_name, "id": att.prog_id, "hook": "ingress",
                        "interface": src["ifname"]},
            "tc_verdict": TC_VERDICTS.get(retval, str(retval)), "retval": retval, **view}

    def render(d):
        if proto in ("icmp", "icmpv6"):
            tup = f"{d['from']['ip']} -> {d['to']['ip']} (echo request)"
        else:
            tup = (f"{events._hostport(d['from']['ip'], args.sport)} -> "
                   f"{events._hostport(d['to']['ip'], d['to']['port'])}")
        head = (f"packet:   {d['to']['proto']} {tup} from "
                f"{d['from']['pod'] or 'the VPC'} ({d['from']['interface']})")
        prog = (f"program:  {d['program']['name']} (id {d['program']['id']}) on "
                f"{d['program']['interface']} ingress -> {d['tc_verdict']}")
        lines = events.decision_lines(d)
        if d["service"] and d["service"].get("service"):
            lines[0] += f" ({d['service']['service']}, {d['service']['frontend']})"
        return "\n".join([head, prog] + lines)
    ctx.emit(data, render)
    return 0


def _services(ctx) -> list[dict]:
    from agent.cli import views
    try:
        return views.data_services(ctx)
    except CliExit:
        return []
