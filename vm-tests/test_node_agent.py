"""The agent run as a node agent: its HTTP endpoints, restarts and upgrades
under real traffic, and a clean uninstall.

    pod a ─ cali ┐                    ┌ eth1 ─ node n2 (no fastpath) ─ cali ─ pod c
    pod b ─ cali ┴ node n1 ─ eth1 ═ vpc

Load clients (socket_clients.Load) hold one TCP connection and one UDP socket
each, send a numbered message every 20 ms and check every echo; a broken
connection or a lost datagram is theirs to report. Bounded: they stop after a fixed time,
and the echo servers (bench/tools/fprr.c) exit on their own after a minute.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.daemon.agent import Agent
from agent.api import wire
from agent.datapath import libbpf, tc
from agent.datapath.maps import MAP
from agent.sim import manifests as mf
from agent.sim.agent import FASTPATH, AgentProcess, _detach_node, private_paths
from agent.sim.cgroups import private_mount as private_cgroup
from bench.harness import build_fprr
from socket_clients import Load, hold
from fastpath_helpers import forwarded_by_stack, inject_truncated, serve_reply, wait_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# The CLI as a process in a node's netns, from this source tree.
TCP_PORT, UDP_PORT = 7300, 7301
# Echo servers outlive any load: clients stop at a stop file or after
# LOAD_MAX_SECONDS, whichever comes first.
SERVER_SECONDS, LOAD_MAX_SECONDS = 150, 120

CT_MAP = MAP["FP_MAP_CT"]


def echo_servers(pods) -> None:
    """TCP and UDP echo servers in each pod (they exit on their own after a minute)."""
    fprr = str(build_fprr())
    for dst in pods:
        for extra, port in (([], TCP_PORT), (["-u"], UDP_PORT)):
            dst.popen([fprr, "server", "-H", dst.ip, "-p", str(port), "-t", str(SERVER_SECONDS),
                       *extra])
        dst.wait_port(TCP_PORT)
        dst.wait_port(UDP_PORT, udp=True)


def load_to(src, dsts) -> Load:
    """Echo servers in each of `dsts` and a load client from `src` to each."""
    echo_servers(dsts)
    load = Load(LOAD_MAX_SECONDS)
    for dst in dsts:
        load.add(dst.name, src, dst.ip, TCP_PORT, UDP_PORT)
    return load


def assert_unbroken(results: dict[str, dict], min_seconds: float) -> None:
    print("load clients:", json.dumps(results, sort_keys=True))
    for name, r in results.items():
        assert r["tcp_error"] == "", (name, r)
        assert r["udp_lost"] == 0, (name, r)
        # ran through everything the test did, and was stopped, not timed out
        assert min_seconds <= r["seconds"] < LOAD_MAX_SECONDS, (name, r)
        # a message every 20 ms plus the round trip: well over 10 a second
        assert r["tcp_ok"] >= 10 * r["seconds"] and r["udp_ok"] >= 10 * r["seconds"], (name, r)


def http_in(node, url: str) -> tuple[int, str]:
    """GET from inside the node's netns, where the agent listens."""
    out = node.run(["curl", "-s", "-m", "5", "-w", "\n%{http_code}", url], check=False).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, suffix: str = "", **labels) -> float:
    for s in fams[family].samples:
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise LookupError(f"{family}{suffix} {labels}")


def exposed_names(fams: dict) -> set[str]:
    """Every series name the exposition declares, with or without samples."""
    out = set()
    for f in fams.values():
        out.add(f.name)
        out |= {s.name for s in f.samples}
        if f.type == "counter":
            out.add(f.name + "_total")
        elif f.type == "histogram":
            out |= {f.name + s for s in ("_bucket", "_sum", "_count")}
    return out


def names_used_in_deploy() -> set[str]:
    from tests.unit.test_deploy import dashboard_metric_names, rule_metric_names
    return dashboard_metric_names() | rule_metric_names()


@contextlib.contextmanager
def serving_agent(node, paths, **overrides):
    """The agent in this process with its API and HTTP endpoints on
    127.0.0.1, ephemeral ports: only this test's own loopback."""
    cfg = paths.config(metrics_address="127.0.0.1:0", health_address="127.0.0.1:0", **overrides)
    agent = Agent(cfg, netns=node.netns)
    try:
        yield agent.start()
    finally:
        agent.stop()
        _detach_node(node, cfg.tc_priority)


def readme_metric_names() -> set[str]:
    """Metric names docs/operations.md's metrics table lists (wildcards left out)."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text[text.index("## Health and metrics"):text.index("## Upgrade, restart")]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `fastpath_"):
            names |= set(re.findall(r"`(fastpath_[a-z0-9_]+)`", line.split(" | ")[0]))
    return names


def family_names(fams: dict) -> set[str]:
    """Exposed families as the README names them (counters with _total);
    the client's `_created` timestamps come as families of their own."""
    return {f.name + "_total" if f.type == "counter" else f.name for f in fams.values()
            if not f.name.endswith("_created")}


SVC_VIP = "192.168.9.10"


def web_service(backends: list[str], port: int = 8080, name: str = "web") -> str:
    """A ClusterIP Service (TCP 80 and UDP 53 -> `port`) and its EndpointSlice."""
    return mf.dump([
        mf.service("default", name, SVC_VIP, 80, port, "tcp", "TCP",
                   more_ports=[("udp", 53, port + 1, "UDP")]),
        mf.endpoint_slice("default", name, port, [(ip, "ready", None) for ip in backends],
                          "tcp", "TCP", more_ports=[("udp", port + 1, "UDP")])])


def test_metrics_and_health_endpoints_report_the_real_datapath(world, capsys):
    node = world.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    with private_paths() as paths:
        Path(paths.manifests, "bad.yaml").write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\n"
            "spec: {clusterIP: 192.168.9.9, ports: [{port: 70000}]}\n")
        Path(paths.manifests, "web.yaml").write_text(web_service([b.ip]))
        with serving_agent(node, paths) as agent:
            for p in (a, b):
                wire.call(paths.socket, "EndpointAdd", {
                    "netns": p.netns_path, "ifname": "eth0", "container_id": f"c-{p.name}",
                    "pod_namespace": "default", "pod_name": p.name})
            # one translated TCP connection through the Service
            serve_reply(b, 8080, "from-b")
            b.wait_port(8080)
            assert wait_for(lambda: a.run(["sh", "-c", f"printf hi | nc -N -w 2 {SVC_VIP} 80"],
                                          check=False, timeout=10).stdout == "from-b")
            # a completed close leaves no entries: one connection the client
            # keeps half-open (the server has closed its end) stays tracked
            holder, answer = hold(a, SVC_VIP, 80)
            assert answer == "from-b"
            assert wait_for(lambda: any(r.proto == "TCP" and r.state == "fin-wait"
                                        for r in agent.datapath.lb.conntrack()))
            try:
                wire.call(paths.socket, "EndpointAdd", {"netns": "/var/run/netns/absent-0",
                                                        "container_id": "c-x"})
                raise AssertionError("an ADD for a netns that does not exist succeeded")
            except wire.RemoteError as exc:
                assert exc.code == "discovery"
            assert wire.call(paths.socket, "EndpointDel", {"container_id": "never"}) == {
                "deleted": False}
            a.ping(b.ip, count=3)
            inject_truncated(a)
            time.sleep(0.2)
            addr = wire.call(paths.socket, "Status")["http"]
            assert re.fullmatch(r"127\.0\.0\.1:\d+", addr["metrics"]), addr
            # `fastpath config show` asks the running agent what is in force
            from agent.cli.main import main
            assert main(["config", "show", "--socket", paths.socket, "--json"]) == 0
            shown = {r["key"]: r for r in json.loads(capsys.readouterr().out)["keys"]}
            assert (shown["metrics_address"]["value"], shown["metrics_address"]["source"]) == (
                "127.0.0.1:0", "override")
            assert shown["state_dir"]["value"] == paths.state_dir

            code, text = http(f"http://{addr['metrics']}/metrics")
            assert code == 200
            fams = families(text)
            cnt = {(r.ifindex, r.direction, r.reason): r for r in agent.datapath.maps.counters()}
            fwd = cnt[(a.host_ifindex, "from-pod", "redirected-local")]
            assert sample(fams, "fastpath_forwarded_packets", "_total", interface=a.host_ifname,
                          direction="from-pod", reason="redirected-local") == fwd.packets >= 3
            assert sample(fams, "fastpath_forwarded_bytes", "_total", interface=a.host_ifname,
                          direction="from-pod", reason="redirected-local") == fwd.bytes
            assert sample(fams, "fastpath_dropped_packets", "_total", interface=a.host_ifname,
                          direction="from-pod", reason="dropped-invalid-packet") == 5
            assert sample(fams, "fastpath_map_entries", map="fp_ep4_v1") == 2
            assert sample(fams, "fastpath_map_max_entries", map="fp_ep4_v1") == 16384
            assert sample(fams, "fastpath_map_pressure_ratio", map="fp_ep4_v1") == 2 / 16384
            assert sample(fams, "fastpath_endpoints") == 2
            assert sample(fams, "fastpath_cni_requests", "_total", command="ADD", result="ok") == 2
            assert sample(fams, "fastpath_cni_requests", "_total", command="ADD",
                          result="discovery") == 1
            assert sample(fams, "fastpath_cni_requests", "_total", command="DEL",
                          result="unknown") == 1
            assert sample(fams, "fastpath_cni_request_duration_seconds", "_count",
                          command="ADD") == 3
            assert sample(fams, "fastpath_agent_starts", "_total") == 1
            assert sample(fams, "fastpath_agent_ready") == 1
            assert sample(fams, "fastpath_k8s_synced") == 1
            assert sample(fams, "fastpath_k8s_rejected_objects", "_total", source="directory",
                          kind="Service") >= 1
            assert sample(fams, "fastpath_services") == 2          # TCP 80 and UDP 53
            assert sample(fams, "fastpath_service_backends") == 2
            assert sample(fams, "fastpath_sync_duration_seconds", "_count", kind="Service") >= 1
            assert sample(fams, "fastpath_sync_map_operations", "_total", kind="Service") >= 6
            assert sample(fams, "fastpath_sync_errors", "_total", kind="Service") == 0
            ct_rows = agent.datapath.lb.conntrack()
            for direction in ("forward", "reply"):
                n = sum(1 for r in ct_rows if r.proto == "TCP" and r.direction == direction)
                assert sample(fams, "fastpath_conntrack_entries", protocol="TCP",
                              direction=direction) == n >= 1
            holder.kill()
            holder.wait()
            # a flow is in one tier at a time (a reset one in the LRU);
            # flows NetworkPolicy admitted have their own map
            assert sum(sample(fams, "fastpath_map_entries", map=MAP[m]) for m in (
                "FP_MAP_CT", "FP_MAP_CT_NEW", "FP_MAP_CT_POLICY")) == len(ct_rows)
            # the datapath's conntrack events: one flow created, then established
            assert sample(fams, "fastpath_conntrack_events", "_total", event="created") >= 1
            assert sample(fams, "fastpath_conntrack_events", "_total", event="promoted") >= 1
            assert sample(fams, "fastpath_agent_restored_services") == 0   # a first start
            # every pinned hash map is listed, the conntrack map included
            from agent.datapath.loader import pinned_map_names
            listed = {s.labels["map"] for s in fams["fastpath_map_entries"].samples}
            assert {"fp_ep4_v1", MAP["FP_MAP_SERVICES"], "fp_be4_v1", "fp_slot4_v1", CT_MAP,
                    MAP["FP_MAP_CT_NEW"], MAP["FP_MAP_CT_POLICY"], MAP["FP_MAP_FRAG"],
                    "fp_aff4_v1", "fp_sockrev4_v1", "fp_bypass4_v1"} <= listed <= set(
                        pinned_map_names())
            # what the dashboard and the alert rules query exists, by name
            missing = names_used_in_deploy() - exposed_names(fams)
            assert not missing, missing
            # policy enforcement is off (the default): nothing enforced
            assert (sample(fams, "fastpath_policies"), sample(fams, "fastpath_policy_rules"),
                    sample(fams, "fastpath_policy_refused")) == (0, 0, 0)
            # docs/operations.md's table and the exposition name the same families
            exposed = {n for n in family_names(fams)
                       if n.startswith("fastpath_") and not n.startswith("fastpath_k8s_")}
            listed = readme_metric_names()
            assert listed - exposed - {"fastpath_k8s_api_reconnects_total"} == set()
            assert "fastpath_k8s_api_reconnects_total" in family_names(fams)
            assert exposed - listed == set()

            code, text = http(f"http://{addr['health']}/healthz")
            assert code == 200 and "ok api" in text and "ok agent-lock" in text, text
            code, text = http(f"http://{addr['health']}/readyz")
            assert code == 200, text
            # two veths, the ENI, the primary NIC and lo
            assert "ok programs-attached: 5 devices" in text and "ok maps-writable" in text
            assert http(f"http://{addr['health']}/nothing")[0] == 404

            # someone removes fastpath's filters from b's veth: not ready,
            # with the reason; still alive (a restart would not help)
            tc.detach(b.host_ifname, agent.config.tc_priority, node.netns)
            time.sleep(1.1)
            code, text = http(f"http://{addr['health']}/readyz")
            assert code == 503, text
            assert (f"fail programs-attached: missing: fp_to_pod on {b.host_ifname} egress, "
                    f"fp_from_pod on {b.host_ifname} ingress\n") in text
            assert http(f"http://{addr['health']}/healthz")[0] == 200


@contextlib.contextmanager
def agent_process(node, paths, args: list[str] | None = None):
    """`fastpath agent` in the node's netns; killed on the way out, whatever
    happened (its filters and pins go with the world and private_paths)."""
    holder = [AgentProcess(node, paths, args).start()]
    try:
        yield holder
    finally:
        holder[0].kill(9)


def pinned_entries(paths, *macros: str) -> list[list[dict]]:
    """Decoded entries of the node's pinned maps (FP_MAP_* names), read from
    this process through the pins, the way the CLI reads them: nothing is
    compiled, nothing attached."""
    from agent.datapath import libbpf, pinned, tables
    from agent.inspect import decode
    maps = pinned.open_maps(f"{paths.bpffs}/fastpath")
    try:
        out = []
        for macro in macros:
            m = maps[MAP[macro]]
            schema, key, value = tables.map_schema(m.fd)
            layout = decode.Layout.of_schema(m.name, key, value, schema)
            assert layout.matches(m.key_size, m.value_size), m.name
            ncpu = libbpf.possible_cpus() if m.percpu else 1
            out.append([decode.decode_entry(layout, k, v, m.percpu, ncpu) for k, v in m.items()])
        return out
    finally:
        pinned.close_all(maps)


def datapath_view(paths, client_ip: str, vip: str) -> dict:
    """What a restart must not change: the endpoints map entries (identity
    included) and the translated flows of `client_ip` to `vip` (backend per
    flow), plus the per-packet translation counters and flow timestamps."""
    from agent.model.bpfdefs import load
    translated = load().reason_value("service-translated")
    eps, ct, ct_new, counters = pinned_entries(paths, "FP_MAP_ENDPOINTS", "FP_MAP_CT",
                                               "FP_MAP_CT_NEW", "FP_MAP_COUNTERS")
    flows = {}
    # a flow lives in one conntrack tier at a time (bpf/lib/ct.h): the
    # established hash, or the LRU it is kept in while the hash is replaced
    for e in ct + ct_new:
        k, v = e["key"], e["value"]
        if k["dir_label"] == "forward" and k["saddr"] == client_ip and k["daddr"] == vip:
            flows[(k["sport"], k["dport"], k["proto_label"])] = v
    return {"endpoints": sorted(eps, key=lambda e: e["key"]["ip4"]),
            "flows": {f: (v["backend_id"], v["nat_addr"], v["nat_port"]) for f, v in flows.items()},
            "last_seen": {f: v["last_seen"] for f, v in flows.items()},
            "translated": sum(c["value"]["packets"] for c in counters
                              if c["key"]["reason"] == translated)}


def metric(node, name: str, suffix: str = "", **labels) -> float:
    code, text = http_in(node, f"http://{node.ip}:9962/metrics")    # metrics_address node-ip
    assert code == 200, text
    return sample(families(text), name, suffix, **labels)


def test_flows_to_pods_and_services_survive_kill9_and_an_upgrade_that_resizes_maps(world):
    """Pod a talks to pods b (same node) and c (other node) directly, and to
    a ClusterIP Service backed by b and c (per packet, at a's veth); the
    node itself talks to the Service through socket-LB. The agent is killed
    with SIGKILL and restarted, then stopped and started with bigger
    endpoints and conntrack maps (an upgrade with a changed configuration).
    Two backends: a flow that lost its conntrack entry would be sent to a
    random one mid-connection and break."""
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b, c = n1.add_pod("a"), n1.add_pod("b"), n2.add_pod("c")
    resized = {"endpoints_map_size": 32768, "conntrack_map_size": 300000}
    with private_cgroup() as cgroup, private_paths() as paths:
        Path(paths.manifests, "web.yaml").write_text(web_service([b.ip, c.ip], port=TCP_PORT))
        assert UDP_PORT == TCP_PORT + 1
        args = ["--socket-lb", "true", "--cgroup-root", cgroup]
        with agent_process(n1, paths, args) as agent:
            for p in (a, b):
                wire.call(paths.socket, "EndpointAdd", {
                    "netns": p.netns_path, "container_id": f"c-{p.name}", "pod_name": p.name})
            assert wait_for(lambda: metric(n1, "fastpath_services") == 2)
            stack = forwarded_by_stack(n1)
            with load_to(a, [b, c]) as load:
                t0 = time.monotonic()
                load.add("a->svc", a, SVC_VIP, 80, 53)
                load.add("node->svc", n1, SVC_VIP, 80, 53, cgroup=cgroup)
                time.sleep(3)
                before = datapath_view(paths, a.ip, SVC_VIP)
                # a's TCP and UDP flow to the Service, each pinned to a backend
                assert {k[2] for k in before["flows"]} == {"TCP", "UDP"}, before["flows"]

                agent[0].kill(9)                # crash: pins and filters stay
                time.sleep(3)
                agent[0] = AgentProcess(n1, paths, args).start()
                assert metric(n1, "fastpath_agent_restored_services") == 2
                assert metric(n1, "fastpath_agent_restored_conntrack_entries") >= 4
                assert metric(n1, "fastpath_agent_restored_endpoints", result="restored") == 2
                time.sleep(2)
                after = datapath_view(paths, a.ip, SVC_VIP)
                # nothing was flushed or re-picked: same entries, same identities,
                # the same flows on the same backends, still carried by fastpath
                assert after["endpoints"] == before["endpoints"]
                assert after["flows"] == before["flows"]
                assert all(after["last_seen"][k] > before["last_seen"][k] for k in before["flows"])
                assert after["translated"] > before["translated"]

                agent[0].stop()                 # an upgrade: SIGTERM, new configuration
                agent[0] = AgentProcess(n1, paths, args + [
                    "--endpoints-map-size", str(resized["endpoints_map_size"]),
                    "--conntrack-map-size", str(resized["conntrack_map_size"])]).start()
                # the maps sized by those keys: endpoints (and socket-LB's
                # per-pod skip map), conntrack (and socket-LB's per-socket map)
                log = agent[0].log.read_text()
                # (a pin is set aside as <name>_old while its entries are copied)
                moved = set(re.findall(r"pinned (fp_\w+?)(?:_old)?: max \d+ \(compiled \d+\): "
                                       r"(?:resized|migrated)", log))
                assert {"fp_ep4_v1", CT_MAP, "fp_sockrev4_v1"} <= moved, log[-3000:]
                assert metric(n1, "fastpath_agent_map_migrations", action="resized") == len(moved)
                assert metric(n1, "fastpath_map_max_entries", map=CT_MAP) == 300000
                time.sleep(2)
                upgraded = datapath_view(paths, a.ip, SVC_VIP)
                assert upgraded["endpoints"] == before["endpoints"]
                assert upgraded["flows"] == before["flows"]   # carried over with the entries
                assert all(upgraded["last_seen"][k] > after["last_seen"][k]
                           for k in before["flows"])
                # every client was still sending after the last start
                time.sleep(2)            # traffic on the upgraded agent's maps
                running = load.running()
                results = load.results()
                seconds = time.monotonic() - t0
                assert len(running) == 4, f"load ended before the last restart: {results}"
    assert_unbroken(results, seconds - 3)   # less the clients' own start-up
    # the pods' packets never took the node's own stack: the path never changed
    assert forwarded_by_stack(n1) == stack


def test_pins_of_older_map_versions_are_carried_over_field_by_field(world):
    """A release that versions the endpoints and conntrack maps anew (made
    here by renaming this agent's pins to the previous version numbers, as
    an older release would have left them): their entries are carried over
    by field name from the layouts the kernel holds, the superseded pins
    removed. The flows keep their backends; nothing is rebuilt."""
    n1 = world.add_node("n1", enis=1)
    a, b = n1.add_pod("a"), n1.add_pod("b")
    with private_paths() as paths:
        Path(paths.manifests, "web.yaml").write_text(web_service([b.ip], port=TCP_PORT))
        pins = Path(paths.bpffs, "fastpath")
        with agent_process(n1, paths) as agent:
            for p in (a, b):
                wire.call(paths.socket, "EndpointAdd", {
                    "netns": p.netns_path, "container_id": f"c-{p.name}", "pod_name": p.name})
            assert wait_for(lambda: metric(n1, "fastpath_services") == 2)
            with load_to(a, [b]) as load:
                load.add("a->svc", a, SVC_VIP, 80, 53)
                t0 = time.monotonic()
                time.sleep(2)
                before = datapath_view(paths, a.ip, SVC_VIP)
                assert len(before["flows"]) == 2
                agent[0].stop()
                for name in ("fp_ep4_v1", CT_MAP):
                    os.rename(pins / name, pins / f"{name.rsplit('_v', 1)[0]}_v0")
                agent[0] = AgentProcess(n1, paths).start()
                assert metric(n1, "fastpath_agent_map_migrations", action="migrated") == 2
                assert not (pins / "fp_ep4_v0").exists() and not (pins / "fp_ct4_v0").exists()
                log = agent[0].log.read_text()
                assert re.search(r"pinned fp_ct4_v0: superseded by .*: migrated \d+ entries", log)
                assert re.search(r"pinned fp_ep4_v0: superseded by .*: migrated 2 entries", log)
                assert metric(n1, "fastpath_agent_restored_conntrack_entries") >= 4
                time.sleep(2)
                after = datapath_view(paths, a.ip, SVC_VIP)
                assert after["endpoints"] == before["endpoints"]
                # the Service flows keep their conntrack entries, on the only backend
                assert after["flows"] == before["flows"]
                running = load.running()
                results = load.results()
                seconds = time.monotonic() - t0
                assert len(running) == 2, results
    assert_unbroken(results, seconds - 3)


# The last release before conntrack was split over several maps: one LRU
# map fp_ct4_v1 for translated and admitted flows, a 24-byte value with a
# __u16 `flags` and no TCP state (the same size as the v2 value: only
# the layout tells them apart).
OLD_RELEASE = "a32bfcfbfb5051b990ebd8547eda201df261dd5b"


@contextlib.contextmanager
def release_tree(commit: str):
    """That release's source, from this repository's history."""
    import tempfile
    d = tempfile.mkdtemp(prefix="fp-release-")
    try:
        subprocess.run(f"git -C {REPO} archive {commit} | tar -x -C {d}", shell=True,
                       check=True)
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def flows_in_pin(path: str, client_ip: str) -> dict:
    """Forward flows of `client_ip` in a pinned conntrack map of any layout,
    decoded from the layout the kernel holds for it (BTF): the same reader
    the migration uses, so this works for the older release's map too."""
    from agent.datapath import btf, libbpf, mapio
    from agent.datapath.maps import be32, ip_from_be32, port_from_be16
    fd = libbpf.obj_get(path)
    try:
        info = libbpf.map_info(fd)
        klay, vlay = btf.map_layouts(fd)
        out = {}
        for k, v in mapio.items(fd, info.key_size, info.value_size):
            kf, vf = btf.read_fields(klay, k), btf.read_fields(vlay, v)
            if kf["dir"] == 0 and kf["saddr"] == be32(client_ip):
                out[(port_from_be16(kf["sport"]), kf["proto"])] = (
                    ip_from_be32(vf["nat_addr"]), port_from_be16(vf["nat_port"]))
        return out
    finally:
        os.close(fd)


def test_an_upgrade_that_changes_the_conntrack_layout_breaks_nothing_under_load(world):
    """The previous release runs the node, with TCP and UDP load through a
    ClusterIP with two backends (one on this node, one on another); this
    release replaces it. Its conntrack layout is another (several maps, TCP
    state): every flow is carried over field by field before the new
    programs attach, and again after; a flow that lost its entry would be
    dropped mid-stream (or, before, sent to either backend at random).
    0 broken connections, 0 lost datagrams."""
    n1, n2 = world.add_node("n1", enis=1), world.add_node("n2", enis=1)
    a, b, c = n1.add_pod("a"), n1.add_pod("b"), n2.add_pod("c")
    with release_tree(OLD_RELEASE) as old, private_paths() as paths:
        Path(paths.manifests, "web.yaml").write_text(web_service([b.ip, c.ip], port=TCP_PORT))
        pins = Path(paths.bpffs, "fastpath")
        holder = [AgentProcess(n1, paths, repo=old).start()]
        try:
            for p in (a, b):
                wire.call(paths.socket, "EndpointAdd", {
                    "netns": p.netns_path, "container_id": f"c-{p.name}", "pod_name": p.name})
            assert wait_for(lambda: metric(n1, "fastpath_services") == 2)
            assert (pins / "fp_ct4_v1").exists() and not (pins / CT_MAP).exists()
            stack = forwarded_by_stack(n1)
            with load_to(a, [b, c]) as load:
                t0 = time.monotonic()
                # four clients, more while every flow sits on one backend
                # (1 run in 128 with four): with flows on both, an entry
                # lost and balanced again would be noticed
                clients = 0
                while True:
                    while clients < 4:
                        load.add(f"a->svc-{clients}", a, SVC_VIP, 80, 53)
                        clients += 1
                    time.sleep(3)
                    before = flows_in_pin(str(pins / "fp_ct4_v1"), a.ip)
                    on = {ip for ip, _ in before.values()}
                    if on == {b.ip, c.ip} or clients >= 8:
                        break
                    load.add(f"a->svc-{clients}", a, SVC_VIP, 80, 53)
                    clients += 1
                assert {proto for _, proto in before} == {6, 17}, before
                assert on == {b.ip, c.ip}, "flows on both backends: a lost entry would be noticed"

                holder[0].stop()                     # the DaemonSet's rolling update
                holder[0] = AgentProcess(n1, paths).start()
                assert metric(n1, "fastpath_agent_map_migrations", action="migrated") >= 1
                assert not (pins / "fp_ct4_v1").exists(), "the old pin is gone once carried"
                assert metric(n1, "fastpath_agent_restored_conntrack_entries") >= 2 * len(before)
                time.sleep(3)
                # (either tier of today's conntrack: the established hash or the LRU)
                after = {**flows_in_pin(str(pins / MAP["FP_MAP_CT_NEW"]), a.ip),
                         **flows_in_pin(str(pins / CT_MAP), a.ip)}
                for flow, backend in before.items():
                    assert after.get(flow) == backend, (flow, backend, after.get(flow))
                running = load.running()
                results = load.results()
                seconds = time.monotonic() - t0
                # a to b and c directly, and the clients through the Service
                assert len(running) == 2 + clients, results
        finally:
            holder[0].kill(9)
    assert_unbroken(results, seconds - 3)
    assert forwarded_by_stack(n1) == stack


# -- the Kubernetes API goes away ------------------------------------------

@contextlib.contextmanager
def fake_api_in(node):
    """The fake Kubernetes API server (agent/k8s/testing) listening on the
    node's own loopback, where the agent's process looks for it; driven from
    this process. Yields (server, start-listening-again function)."""
    from agent.datapath.nsenter import in_netns
    from agent.k8s.testing.fakeapi import FakeAPIServer
    fake = FakeAPIServer()

    def listen():
        with in_netns(node.netns):      # the listening socket belongs to the node's netns
            fake.up()

    with in_netns(node.netns):
        fake.start()
    try:
        yield fake, listen
    finally:
        fake.stop()


def kubeconfig_for(path: Path, port: int) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: agent, user: {{token: unused}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]
current-context: fake
""")
    return path


def service_backends(paths, vip: str) -> set[str]:
    """Backend IPs the pinned service maps give `vip`'s TCP frontend."""
    svc, slots, backends = pinned_entries(paths, "FP_MAP_SERVICES", "FP_MAP_SLOTS",
                                          "FP_MAP_BACKENDS")
    ids = [e["value"]["svc_id"] for e in svc
           if e["key"]["vip"] == vip and e["key"]["proto_label"] == "TCP"]
    if not ids:
        return set()
    be = {e["key"]["value"] if isinstance(e["key"], dict) else e["key"]: e["value"]["ip"]
          for e in backends}
    return {be[e["value"]["backend_id"]] for e in slots if e["key"]["svc_id"] == ids[0]}


def echo_once(client, ip: str, port: int = 80) -> bool:
    """A new TCP connection through `ip:port` to an echo server."""
    return client.run(["sh", "-c", f"printf ping | nc -N -w 2 {ip} {port}"], check=False,
                      timeout=10).stdout == "ping"


def test_the_datapath_keeps_its_state_while_the_api_is_away_and_converges_on_its_return(
        world, monkeypatch):
    """Service web (one backend, b) is programmed from the API; a's flows to
    it run. The API goes away; meanwhile web gains a backend (d) and a new
    Service (api -> d) is created. The agent is killed and started again
    while the API is still away. Then the API returns."""
    import yaml
    n1 = world.add_node("n1", enis=1)
    a, b, d = n1.add_pod("a"), n1.add_pod("b"), n1.add_pod("d")
    vip2 = "192.168.9.20"
    with fake_api_in(n1) as (fake, listen), private_paths() as paths:
        fake.apply_many([{"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "default"}},
                         {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}])
        fake.apply_many(list(yaml.safe_load_all(web_service([b.ip], port=TCP_PORT))))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig_for(Path(paths.root, "kubeconfig"),
                                                            fake.port)))
        args = ["--source", "kubernetes"]
        with agent_process(n1, paths, args) as agent:
            for p in (a, b, d):
                wire.call(paths.socket, "EndpointAdd", {
                    "netns": p.netns_path, "container_id": f"c-{p.name}", "pod_name": p.name})
            assert wait_for(lambda: metric(n1, "fastpath_services") == 2)
            assert http_in(n1, "http://127.0.0.1:9099/readyz")[0] == 200
            echo_servers([b, d])
            with Load(LOAD_MAX_SECONDS) as load:
                load.add("a->web", a, SVC_VIP, 80, 53)
                t0 = time.monotonic()
                time.sleep(2)

                fake.down()                                   # connection refused from now on
                assert wait_for(lambda: metric(n1, "fastpath_k8s_api_up", kind="Service") == 0)
                # the agent that had synced stays ready: it forwards the last
                # good state, and every node losing readiness at once over an
                # API outage would help nobody (see README)
                code, text = http_in(n1, "http://127.0.0.1:9099/readyz")
                assert code == 200, text
                assert http_in(n1, "http://127.0.0.1:9099/healthz")[0] == 200
                fake.apply_many(list(yaml.safe_load_all(web_service([b.ip, d.ip], port=TCP_PORT))))
                fake.apply_many(list(yaml.safe_load_all(
                    web_service([d.ip], port=TCP_PORT, name="api").replace(SVC_VIP, vip2))))
                assert service_backends(paths, SVC_VIP) == {b.ip}   # last good state
                assert echo_once(a, SVC_VIP)                       # new connections too

                agent[0].kill(9)                 # and the agent restarts, API still away
                time.sleep(1)
                agent[0] = AgentProcess(n1, paths, args).start()
                status = wire.call(paths.socket, "Status")
                assert wait_for(lambda: wire.call(paths.socket, "Status")["source"]["state"]
                                == "unreachable"), status
                # up from the pins: ready to serve CNI, not ready for a rollout
                code, text = http_in(n1, "http://127.0.0.1:9099/readyz")
                assert code == 503 and "fail cluster-state-synced" in text, text
                assert http_in(n1, "http://127.0.0.1:9099/healthz")[0] == 200
                assert metric(n1, "fastpath_agent_restored_services") == 2
                assert metric(n1, "fastpath_agent_restored_endpoints", result="restored") == 3
                # an empty store withdraws nothing: the maps keep what they had
                time.sleep(1)
                assert service_backends(paths, SVC_VIP) == {b.ip}
                assert echo_once(a, SVC_VIP)
                assert not echo_once(a, vip2)

                listen()                                      # the API is back
                assert wait_for(lambda: service_backends(paths, SVC_VIP) == {b.ip, d.ip},
                                timeout=60), "web's new backend was never programmed"
                assert wait_for(lambda: echo_once(a, vip2), timeout=20), "api never translated"
                assert metric(n1, "fastpath_services") == 4
                assert http_in(n1, "http://127.0.0.1:9099/readyz")[0] == 200
                assert metric(n1, "fastpath_k8s_api_reconnects", "_total", kind="Service") >= 1
                assert metric(n1, "fastpath_k8s_synced") == 1
                assert load.running() == ["a->web"]
                results = load.results()
                seconds = time.monotonic() - t0
    # the flow ran through the outage, the restart and the convergence
    assert_unbroken(results, seconds - 3)   # less the clients' own start-up


# -- uninstall -------------------------------------------------------------

FOREIGN = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int other_drop9999(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
int fp_lookalike(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
int other_conn4(struct bpf_sock_addr *ctx) { return 1; }
"""
BPF_CGROUP_INET4_CONNECT = 10
BPF_F_ALLOW_MULTI = 2


def cgroup_attachments(path: str) -> list[tuple[int, str]]:
    from agent.datapath import uninstall
    import ctypes as ct
    lib = libbpf.lib()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out = []
    try:
        for attach_type in uninstall.ATTACH_TYPES:
            ids = (ct.c_uint32 * 64)()
            cnt = ct.c_uint32(64)
            flags = ct.c_uint32(0)
            if lib.bpf_prog_query(fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) == 0:
                out += [(attach_type, uninstall.prog_identity(i)[0]) for i in ids[:cnt.value]]
    finally:
        os.close(fd)
    return sorted(out)


def node_state(node, paths, cgroup: str, cni_root: Path) -> dict:
    """Everything an install could leave behind, as comparable data."""
    from tests.unit.test_nodeinstall import digest_tree
    filters = {}
    for link in node.ip_json("link", "show"):
        name = link["ifname"]
        filters[name] = sorted((f.direction, f.prio, f.name)
                               for f in tc.list_filters(name, node.netns))
    # clsact for the filters; root qdiscs for the bandwidth manager's (fa57:)
    qdiscs = sorted((q["dev"], q["kind"], q.get("handle", "")) for q in json.loads(
        node.run(["tc", "-j", "qdisc", "show"]).stdout)
        if q["kind"] == "clsact" or q.get("root"))
    pins = sorted(str(Path(d, f).relative_to(paths.bpffs))
                  for d, dirs, files in os.walk(paths.bpffs) for f in dirs + files)
    # whatever the agent created next to the test's own files: state dir,
    # API and gRPC sockets, anything else
    own = {"bpffs", "manifests", "host", "agent.log"}
    files = sorted(set(os.listdir(paths.root)) - own)
    return {"filters": filters, "qdiscs": qdiscs, "pins": pins,
            "cgroup": cgroup_attachments(cgroup), "cni": digest_tree(cni_root), "files": files}


def test_uninstall_removes_all_fastpath_put_on_the_node_and_nothing_else(world):
    with private_cgroup() as cgroup:
        uninstall_scenario(world, cgroup)


def uninstall_scenario(world, cgroup: str) -> None:
    from bcc import BPF
    from agent.datapath import cgroup as cg
    from tests.unit.test_nodeinstall import TERWAY_CONFLIST
    node = world.add_node("n1", enis=1)
    a, b = node.add_pod("a"), node.add_pod("b")
    foreign = BPF(text=FOREIGN)
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    conn = foreign.load_func("other_conn4", BPF.CGROUP_SOCK_ADDR,
                             attach_type=BPF_CGROUP_INET4_CONNECT)
    try:
        with private_paths() as paths:
            # what was on the node before fastpath: other tools' tc filters
            # (one named like ours), cgroup program and pinned map, Terway's
            # conflist, another plugin
            tc.attach(a.host_ifname, "ingress", foreign.load_func("other_drop9999", BPF.SCHED_CLS).fd,
                      "other_drop9999", 30000, node.netns)
            tc.attach("eth1", "egress", foreign.load_func("fp_lookalike", BPF.SCHED_CLS).fd,
                      "fp_lookalike", 40000, node.netns)
            assert libbpf.lib().bpf_prog_attach(conn.fd, cg_fd, BPF_CGROUP_INET4_CONNECT,
                                             BPF_F_ALLOW_MULTI) == 0
            subprocess.run(["bpftool", "map", "create", f"{paths.bpffs}/other_map_v1", "type",
                            "hash", "key", "4", "value", "4", "entries", "8", "name", "other_map"],
                           check=True)
            cni = Path(paths.root, "host")
            (cni / "etc/cni/net.d").mkdir(parents=True)
            (cni / "opt/cni/bin").mkdir(parents=True)
            (cni / "etc/cni/net.d/10-terway.conflist").write_text(TERWAY_CONFLIST)
            (cni / "opt/cni/bin/terway").write_bytes(b"terway")
            before = node_state(node, paths, cgroup, cni)

            dirs = ["--cni-conf-dir", str(cni / "etc/cni/net.d")]
            # a pod with an egress limit: fastpath's root qdisc goes on the ENIs
            Path(paths.manifests, "a.yaml").write_text(mf.dump([
                mf.namespace("default"),
                mf.pod("default", "a", a.ip, "n1",
                       annotations={"kubernetes.io/egress-bandwidth": "100M"})]))
            node.run([*FASTPATH, "cni", "install", "--conflist", str(DEPLOY / "10-terway.conflist"),
                      "--cni-bin-dir", str(cni / "opt/cni/bin"), *dirs])
            agent = AgentProcess(node, paths, ["--socket-lb", "true", "--cgroup-root", cgroup]).start()
            try:
                for p in (a, b):
                    wire.call(paths.socket, "EndpointAdd", {
                        "netns": p.netns_path, "container_id": f"c-{p.name}", "pod_name": p.name})
                a.ping(b.ip)
                wait_for(lambda: ("eth1", "htb", "fa57:") in
                         node_state(node, paths, cgroup, cni)["qdiscs"], "a's egress limit")
                code, text = http_in(node, "http://127.0.0.1:9099/readyz")
                assert code == 200 and f"ok socket-lb-attached: {cgroup}" in text, text
                installed = node_state(node, paths, cgroup, cni)
                # fastpath is really there: its filters, socket hooks, pins, files
                assert ("ingress", 25000, "fp_from_pod") in installed["filters"][a.host_ifname]
                assert ("egress", 25000, "fp_to_vpc") in installed["filters"]["eth1"]
                assert ("egress", 25000, "fp_lo") in installed["filters"]["lo"]
                assert ("eth1", "htb", "fa57:") in installed["qdiscs"]
                assert {n for _, n in installed["cgroup"]} >= {"fp_sock_conn4", "other_conn4"}
                assert "fastpath/fp_ep4_v1" in installed["pins"]
                assert "opt/cni/bin/fastpath-cni" in installed["cni"]
                assert {"state", "agent.sock", "grpc.sock"} <= set(installed["files"])

                flags = ["--bpffs-root", f"{paths.bpffs}/fastpath", "--state-dir", paths.state_dir,
                         "--api-socket", paths.socket, "--cgroup-root", cgroup, *dirs]
                refused = node.run([*FASTPATH, "uninstall", *flags], check=False)
                assert refused.returncode == 1 and "stop it first" in refused.stderr
            finally:
                agent.kill(9)                   # a crash leaves a stale socket behind too
            assert os.path.exists(paths.socket)
            out = node.run([*FASTPATH, "uninstall", *flags, "--json"])
            report = json.loads(out.stdout)
            after = node_state(node, paths, cgroup, cni)
            assert after == before
            # two veths, the ENI and the primary NIC, both directions; lo's egress
            assert len(report["filters"]) == 9
            # the socket-LB hooks of both families (connect, sendmsg, recvmsg,
            # getpeername, each for IPv4 and IPv6)
            assert len(report["cgroup_programs"]) == 8
            assert f"{paths.bpffs}/fastpath/" in report["pins"]
            assert report["kept"] == []
            # the node still works, through its own stack now
            stack = forwarded_by_stack(node)
            a.ping(b.ip)
            assert forwarded_by_stack(node) > stack
    finally:
        libbpf.lib().bpf_prog_detach2(conn.fd, cg_fd, BPF_CGROUP_INET4_CONNECT)
        os.close(cg_fd)
        foreign.cleanup()
