"""Joined views (services, conntrack, endpoints, counters) and the CLI's
exit codes when there is nothing to read."""
from __future__ import annotations

import json

from agent.model import bpfdefs
from agent.cli.main import main
from agent.inspect import views
from tests.cli.test_decode import ct_entry

D = bpfdefs.load()


def svc(vip, port, proto, svc_id, count, flags=(), timeout=0):
    bits = 0
    for f in flags:
        bits |= D.defines[f"FP_SVC_F_{f.upper()}"]
    return {"key": {"vip": vip, "port": port, "proto": 6 if proto == "TCP" else 17,
                    "proto_label": proto},
            "value": {"svc_id": svc_id, "count": count, "flags": bits, "flags_names": list(flags),
                      "affinity_timeout": timeout}}


def slot(svc_id, n, bid):
    return {"key": {"svc_id": svc_id, "slot": n}, "value": {"backend_id": bid}}


def backend(bid, ip, port):
    return {"key": bid, "value": {"ip": ip, "port": port, "proto": 6, "proto_label": "TCP",
                                  "flags": 0}}


def test_services_join_frontends_slots_and_backends_with_and_without_the_agent():
    entries = ([svc("192.168.0.10", 80, "TCP", 1, 2, ["affinity", "local"], 60),
                svc("192.168.0.11", 53, "UDP", 2, 0, ["reject"])],
               [slot(1, 1, 10), slot(1, 2, 11)], [backend(10, "10.0.0.1", 8080)])
    rows = views.services(*entries)
    web, dns = rows
    assert web["frontend"] == "192.168.0.10:80/TCP" and web["service"] == ""
    assert (web["affinity"], web["affinity_timeout"], web["traffic_policy"]) == (
        "ClientIP", 60, "Local")
    assert [(b["slot"], b["backend_id"], b["ip"], b["state"]) for b in web["backends"]] == [
        (1, 10, "10.0.0.1", "active"), (2, 11, "", "missing")]
    assert dns["reject"] and dns["backends"] == [] and dns["traffic_policy"] == "Cluster"
    assert views.backends_text(dns) == "(none: rejected)"
    names = [{"vip": "192.168.0.10", "port": 80, "proto": "TCP", "service": "shop/web",
              "port_name": "http", "kind": "ClusterIP",
              "backends": [{"ip": "10.0.0.1", "port": 8080, "state": "terminating",
                            "node": "n1", "zone": "z"}]}]
    web = views.services(*entries, names)[0]
    assert web["service"] == "shop/web" and web["port_name"] == "http"
    assert web["backends"][0]["state"] == "terminating" and web["backends"][0]["node"] == "n1"
    for q in ("shop/web", "web", "192.168.0.10", "192.168.0.10:80", "192.168.0.10:80/TCP"):
        assert views.find_service(views.services(*entries, names), q) == [web], q
    assert views.find_service(views.services(*entries, names), "192.168.0.10:81") == []


def test_conntrack_rows_speak_of_client_frontend_backend_in_both_directions(compiled):
    fwd = ct_entry(compiled, "10.0.0.1", "192.168.1.1", 40000, 80, 6, "forward", "10.0.0.9", 8080,
                   last_seen=1_000_000_000)
    rep = ct_entry(compiled, "10.0.0.9", "10.0.0.1", 8080, 40000, 6, "reply", "192.168.1.1", 80,
                   last_seen=2_000_000_000)
    other = ct_entry(compiled, "10.0.0.2", "192.168.1.2", 1000, 53, 17, "forward", "10.0.0.8", 5353)
    rows = views.ct_rows([rep, fwd, other], now_ns=3_000_000_000)
    flows = {(r["client"], r["client_port"], r["frontend"], r["frontend_port"], r["backend"],
              r["backend_port"]) for r in rows[:2]}
    assert flows == {("10.0.0.1", 40000, "192.168.1.1", 80, "10.0.0.9", 8080)}
    ages = {r["dir"]: r["age_seconds"] for r in rows if r["client"] == "10.0.0.1"}
    assert ages == {"forward": 2.0, "reply": 1.0}
    by = lambda **f: {(r["client"], r["dir"]) for r in rows if views.ct_match(r, **f)}
    assert by(src="10.0.0.1") == {("10.0.0.1", "forward"), ("10.0.0.1", "reply")}
    assert by(dst="10.0.0.9") == by(dst="192.168.1.1") == by(src="10.0.0.0/31")
    assert by(proto="udp") == {("10.0.0.2", "forward")}
    assert by(port=5353) == {("10.0.0.2", "forward")} and by(port=53) == by(port=5353)
    assert by(src="10.0.0.1", proto="UDP") == set()
    top = views.ct_top(rows, [{"ip": "10.0.0.1", "pod": "default/a"}], max_entries=100, n=2)
    assert (top["entries"], top["fill"]) == (3, 0.03)
    assert [(t["ip"], t["entries"], t["pod"]) for t in top["top"]] == [
        ("10.0.0.1", 2, "default/a"), ("10.0.0.9", 2, "")]
    assert top["top"][0]["as_client"] == 2 and top["top"][1]["as_backend"] == 2


def test_endpoint_rows_take_names_from_the_agent_and_interfaces_from_links():
    ent = [{"key": {"ip4": "10.0.0.2"},
            "value": {"host_ifindex": 7, "eni_ifindex": 3, "pod_mac": "m", "host_mac": "h",
                      "flags": 1, "flags_names": ["registered"], "ep_id": 1}},
           {"key": {"ip4": "10.0.0.10"},
            "value": {"host_ifindex": 8, "eni_ifindex": 0, "pod_mac": "m", "host_mac": "h",
                      "flags": 0, "flags_names": [], "ep_id": 2}}]
    rows = views.endpoints(ent, {7: "cali7", 3: "eth1", 8: "cali8"},
                           [{"ip": "10.0.0.2", "pod": "ns/a", "container_id": "c1"}],
                           {"10.0.0.2": {"ingress": "enforced"}})
    assert [(r["ip"], r["pod"], r["host_ifname"], r["eni"], r["registered"]) for r in rows] == [
        ("10.0.0.2", "ns/a", "cali7", "eth1", True), ("10.0.0.10", "", "cali8", "", False)]
    assert views.policy_state_text(rows[0]["policy"]) == "ingress:enforced"
    assert views.policy_state_text(rows[1]["policy"]) == "not-isolated"
    assert views.endpoints(ent, {}, None, None)[0]["policy"] == {"state": "unknown"}


def test_counters_name_interfaces_and_mark_drops():
    drop = D.reason_value("dropped-source-spoofed")
    rows = views.counters([
        {"key": {"ifindex": 4, "reason": drop, "reason_label": D.reason(drop), "dir": 0,
                 "dir_label": "from-pod"}, "value": {"packets": 3, "bytes": 300}},
        {"key": {"ifindex": 3, "reason": 0, "reason_label": D.reason(0), "dir": 2,
                 "dir_label": "from-vpc"}, "value": {"packets": 1, "bytes": 60}}],
        {4: "cali4"})
    assert [(r["ifindex"], r["ifname"], r["reason"], r["drop"]) for r in rows] == [
        (3, "", "redirected-local", False), (4, "cali4", "dropped-source-spoofed", True)]


def test_exit_codes_without_maps_without_agent_and_without_root(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "bpffs")
    sock = str(tmp_path / "agent.sock")
    assert main(["map", "list", "--bpffs-root", root, "--socket", sock]) == 1
    assert "no fastpath maps are pinned" in capsys.readouterr().err
    assert main(["service", "list", "--bpffs-root", root, "--socket", sock]) == 1
    assert main(["status", "--bpffs-root", root, "--socket", sock, "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["agent"]["reachable"] is False and "no agent socket" in out["agent"]["error"]
    assert out["maps"] == [] and "no fastpath maps" in out["maps_error"]
    assert out["kernel"]["map_types"]["lpm_trie"] is True
    assert main(["ct", "flush", "--bpffs-root", root, "--socket", sock]) == 2
    assert "--all" in capsys.readouterr().err
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["map", "list", "--bpffs-root", root, "--socket", sock]) == 4
    assert "needs root" in capsys.readouterr().err
