"""fastpath-cni run directly with the CNI environment, as a runtime runs it,
on a simulated Terway node with the real agent process.

The chain is deploy/10-terway.conflist: the Terway stand-in (vm-tests/cni)
builds the pod's veth and policy routing, then fastpath-cni (installed as a
node gets it) registers the pod. Each test then reads the kernel: tc filters
on the host veth and the pinned endpoints map.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from agent.api import wire
from agent.sim.netns import Netns, sh
from agent.sim.traffic import tcp_exchange
from chainer.testing import CniRuntime, ptp_conflist
from cni_helpers import OUR_PROGRAMS, TC_PRIORITY, cni_node
from fastpath_helpers import counters_by, forwarded_by_stack


def pod_args(name: str, namespace: str = "default") -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};" \
           f"K8S_POD_INFRA_CONTAINER_ID=c-{name}"


def add_pod(cn, name: str, cid: str | None = None):
    return cn.runtime.add(cid or f"c-{name}", cn.pod_netns(name), args=pod_args(name))


def test_add_attaches_and_registers_then_del_removes_only_fastpaths_part(world):
    with cni_node(world) as cn:
        a, b = add_pod(cn, "a"), add_pod(cn, "b")
        terway_out, ours = a.invocations[0].output, a.invocations[1]
        # the prevResult comes back unchanged, in the conflist's version
        assert ours.output == terway_out and ours.output["cniVersion"] == "0.4.0"
        assert ours.output["interfaces"] == [{"name": "eth0", "sandbox": "c-a"}]
        eps = cn.endpoints()
        assert set(eps) == {"c-a-eth0", "c-b-eth0"}
        ep = eps["c-a-eth0"]
        assert ep["eni"] == "eth1" and ep["pod"] == "default/a"
        assert ep["ip"] == terway_out["ips"][0]["address"].split("/")[0]
        veth, ifindex = ep["host_ifname"], ep["host_ifindex"]
        assert veth.startswith("cali") and cn.programs(veth) == OUR_PROGRAMS
        assert cn.endpoint_map() == {ep["ip"]: ifindex,
                                     eps["c-b-eth0"]["ip"]: eps["c-b-eth0"]["host_ifindex"]}
        assert [i.rc for i in cn.runtime.check("c-a")] == [0, 0]

        cn.add_foreign_filter(veth)
        inv = cn.fastpath("DEL", cn.conf(1, a.result), "c-a", a.netns, args=pod_args("a"))
        assert (inv.rc, inv.stdout) == (0, "")
        assert cn.filters(veth) == {("ingress", "", 30000)}, "the foreign filter stays"
        assert set(cn.endpoints()) == {"c-b-eth0"}
        assert set(cn.endpoint_map()) == {eps["c-b-eth0"]["ip"]}
        assert cn.programs(eps["c-b-eth0"]["host_ifname"]) == OUR_PROGRAMS
        cn.runtime.delete("c-b")
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        assert cn.leftover_pod_programs() == {}


def test_a_retried_add_changes_nothing(world):
    with cni_node(world) as cn:
        att = add_pod(cn, "a")
        before = (cn.endpoints(), cn.endpoint_map())
        veth = before[0]["c-a-eth0"]["host_ifname"]
        for _ in range(2):
            inv = cn.fastpath("ADD", cn.conf(1, att.invocations[0].output), "c-a", att.netns,
                              args=pod_args("a"))
            assert inv.rc == 0 and inv.output == att.result
        assert (cn.endpoints(), cn.endpoint_map()) == before
        assert sorted(cn.filters(veth)) == sorted((d, n, TC_PRIORITY) for d, n in OUR_PROGRAMS)


def test_del_with_a_vanished_or_empty_netns_succeeds(world):
    with cni_node(world) as cn:
        a, b = add_pod(cn, "a"), add_pod(cn, "b")
        sh(["ip", "netns", "del", a.netns.rsplit("/", 1)[1]])     # the runtime lost it
        assert [i.rc for i in cn.runtime.delete("c-a")] == [0, 0]
        assert [i.rc for i in cn.runtime.delete("c-b", netns="")] == [0, 0]
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        assert cn.leftover_pod_programs() == {}
        # and once more, as runtimes do: DEL is idempotent
        assert [i.rc for i in cn.runtime.delete("c-b", netns="")] == [0, 0]


def test_del_while_the_agent_is_down_is_replayed_when_it_starts(world):
    with cni_node(world) as cn:
        a, b = add_pod(cn, "a"), add_pod(cn, "b")
        veth_b, _ = cn.host_veth("c-b-eth0")
        cn.agent.kill(9)
        # a: the whole chain (Terway's DEL removes the veth too)
        assert [i.rc for i in cn.runtime.delete("c-a")] == [0, 0]
        # b: only fastpath's DEL, its veth stays (as if Terway's DEL came later)
        inv = cn.fastpath("DEL", cn.conf(1, b.result), "c-b", b.netns, args=pod_args("b"))
        assert (inv.rc, inv.stdout) == (0, "")
        assert cn.queued_deletions() == ["c-a-eth0.json", "c-b-eth0.json"]
        assert cn.programs(veth_b) == OUR_PROGRAMS, "nobody detached while the agent was down"
        cn.restart_agent()
        assert cn.queued_deletions() == []
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        assert cn.programs(veth_b) == set()


ERRORS = [
    # description, how to run, expected code, words the message must contain
    ("no prevResult", "no-prev", 7, ["prevResult", "chained after"]),
    ("unknown cniVersion", "version", 1, ["'9.9.9'"]),
    ("malformed JSON", "json", 6, ["not valid JSON"]),
    ("agent unreachable", "no-agent", 11, ["unreachable at", "/nowhere/agent.sock"]),
    ("no such interface in the netns", "empty-netns", 101, ["eth0", "not found"]),
    ("no ENI in the node's policy routing", "no-eni", 102, ["no ENI", "from "]),
    ("unknown config key", "bad-key", 2, ["'agent_sockett'", "did you mean"]),
]


def test_add_errors_are_cni_json_a_person_can_act_on(world):
    """Each case on its own pod of one node (an agent start per case would
    cost seconds); a failed ADD must register nothing."""
    with cni_node(world) as cn:
        problems = []
        for i, (description, case, code, words) in enumerate(ERRORS):
            att = add_pod(cn, f"e{i}")
            prev = att.invocations[0].output
            netns, cid = att.netns, f"c-e{i}"
            conf = cn.conf(1, prev)
            if case == "no-prev":
                conf.pop("prevResult")
            elif case == "version":
                conf["cniVersion"] = "9.9.9"
            elif case == "json":
                conf = '{"cniVersion": "0.4.0", "name": "terway-chainer", "type": '
            elif case == "no-agent":
                conf.update(agent_socket="/nowhere/agent.sock", timeout_seconds=0.2)
            elif case == "empty-netns":
                netns, cid = cn.pod_netns(f"empty{i}"), f"c-empty{i}"
            elif case == "no-eni":
                ip = prev["ips"][0]["address"].split("/")[0]
                table = 1000 + cn.node.link("eth1")["ifindex"]
                sh(["ip", "-n", cn.node.netns, "rule", "del", "from", ip, "lookup", str(table)])
                # unregister it, so that the ADD below is the one to judge
                cn.fastpath("DEL", cn.conf(1, att.result), cid, netns)
            elif case == "bad-key":
                conf["agent_sockett"] = conf.pop("agent_socket")
            before = set(cn.endpoints())
            inv = cn.fastpath("ADD", conf, cid, netns, args=pod_args(f"e{i}"))
            out = inv.output if inv.stdout.startswith("{") else {}
            if inv.rc != 1 or out.get("code") != code or \
                    not all(w in out.get("msg", "") for w in words):
                problems.append((description, inv.rc, inv.stdout))
            if set(cn.endpoints()) != before:
                problems.append((description, "registered something", cn.endpoints()))
        assert problems == []


def test_check_names_what_is_broken(world):
    with cni_node(world, enis=2) as cn:
        eni2 = dict(cn.runtime.conflist["plugins"][0]["standin"], eni="eth2",
                    first="10.242.1.100", last="10.242.1.120",
                    data_dir=cn.ipam_dir + "-eth2")
        conflist = dict(cn.runtime.conflist)
        conflist["plugins"] = [dict(conflist["plugins"][0], standin=eni2), conflist["plugins"][1]]
        rt2 = CniRuntime(conflist, cn.bin_dir, cn.node.netns)
        att = rt2.add("c-a", cn.pod_netns("a"), args=pod_args("a"))
        ep = cn.endpoints()["c-a-eth0"]
        assert ep["eni"] == "eth2"

        def check_fails(*words):
            inv = cn.fastpath("CHECK", cn.conf(1, att.result), "c-a", att.netns)
            assert inv.rc == 1 and inv.output["code"] == 104, inv
            for w in words:
                assert w in inv.output["msg"], (w, inv.output["msg"])

        sh(["tc", "-n", cn.node.netns, "filter", "del", "dev", ep["host_ifname"], "ingress",
            "prio", str(TC_PRIORITY)])
        check_fails("fp_from_pod is not attached", ep["host_ifname"], "ingress")
        # a retried ADD repairs it
        assert cn.fastpath("ADD", cn.conf(1, att.invocations[0].output), "c-a", att.netns).rc == 0
        assert cn.fastpath("CHECK", cn.conf(1, att.result), "c-a", att.netns).rc == 0
        key = " ".join(f"0x{int(b):02x}" for b in ep["ip"].split("."))
        sh(["bpftool", "map", "delete", "pinned",
            f"{cn.paths.bpffs}/fastpath/fp_ep4_v1", "key", *key.split()])
        check_fails(f"no endpoints map entry for {ep['ip']}")
        assert cn.fastpath("ADD", cn.conf(1, att.invocations[0].output), "c-a", att.netns).rc == 0
        sh(["ip", "-n", cn.node.netns, "link", "del", "eth2"])
        check_fails("ENI eth2 no longer exists")
        inv = cn.fastpath("CHECK", cn.conf(1, att.result), "c-other", att.netns)
        assert inv.rc == 1 and inv.output["code"] == 104 and "c-other" in inv.output["msg"]


def test_a_late_del_of_a_recreated_pod_leaves_the_new_one_alone(world):
    """StatefulSet pod web-0 is re-created while the old sandbox's DEL is
    still being retried: the new veth has the old one's name."""
    with cni_node(world) as cn:
        old = add_pod(cn, "web-0", cid="c-old")
        old_veth, old_index = cn.host_veth("c-old-eth0")
        sh(["ip", "-n", cn.node.netns, "link", "del", old_veth])     # Terway's part of the DEL
        new = cn.runtime.add("c-new", cn.pod_netns("web-0-new"), args=pod_args("web-0"))
        new_veth, new_index = cn.host_veth("c-new-eth0")
        assert new_veth == old_veth and new_index != old_index
        inv = cn.fastpath("DEL", cn.conf(1, old.result), "c-old", "", args=pod_args("web-0"))
        assert inv.rc == 0
        assert cn.programs(new_veth) == OUR_PROGRAMS
        new_ip = new.result["ips"][0]["address"].split("/")[0]
        assert cn.endpoint_map() == {new_ip: new_index}
        assert set(cn.endpoints()) == {"c-new-eth0"}
        assert [i.rc for i in cn.runtime.check("c-new")] == [0, 0]


def test_pods_chained_after_ptp_talk_through_the_fast_path(world):
    with cni_node(world) as cn:
        conflist = ptp_conflist(agent_socket=cn.paths.socket, state_dir=cn.paths.state_dir,
                                log_file=cn.log_file, ipam_dir=cn.paths.root + "/ptp-ipam",
                                subnet="10.250.7.0/24")
        rt = CniRuntime(conflist, cn.bin_dir, cn.node.netns)
        atts = {n: rt.add(f"c-{n}", cn.pod_netns(n), args=pod_args(n)) for n in ("a", "b")}
        eps = cn.endpoints()
        assert {e["eni"] for e in eps.values()} == {""}, "ptp pods have no ENI"

        def pod(name):
            ns = Netns(atts[name].netns.rsplit("/", 1)[1])
            ns.ip = eps[f"c-{name}-eth0"]["ip"]
            return ns

        a, b = pod("a"), pod("b")
        before = forwarded_by_stack(cn.node)
        a.ping(b.ip, count=3)
        b.ping(a.ip, count=3)
        assert tcp_exchange(a, b, request="over", reply="ptp") == ("over", "ptp")
        assert forwarded_by_stack(cn.node) == before, "the node's stack forwarded pod traffic"
        rows = cn.api("Counters")
        for name in ("a", "b"):
            idx = eps[f"c-{name}-eth0"]["host_ifindex"]
            c = counters_by([SimpleNamespace(**r) for r in rows], idx)
            assert c[("from-pod", "redirected-local")] >= 8, c
        for name in ("a", "b"):
            assert [i.rc for i in rt.delete(f"c-{name}")] == [0, 0]
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        assert cn.leftover_pod_programs() == {}


def test_50_concurrent_adds_then_50_concurrent_dels(world):
    names = [f"p{i:02d}" for i in range(50)]
    with cni_node(world) as cn:
        netns = {n: cn.pod_netns(n) for n in names}
        errors: list[BaseException] = []

        def each(fn):
            threads = [threading.Thread(target=lambda n=n: _guard(errors, fn, n)) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads)

        each(lambda n: cn.runtime.add(f"c-{n}", netns[n], args=pod_args(n)))
        assert errors == []
        eps = cn.endpoints()
        assert set(eps) == {f"c-{n}-eth0" for n in names}
        ips = [e["ip"] for e in eps.values()]
        assert len(set(ips)) == 50, "no two pods share an address"
        assert cn.endpoint_map() == {e["ip"]: e["host_ifindex"] for e in eps.values()}
        for e in eps.values():
            assert cn.programs(e["host_ifname"]) == OUR_PROGRAMS, e

        each(lambda n: cn.runtime.delete(f"c-{n}"))
        assert errors == []
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        assert cn.leftover_pod_programs() == {}
        assert cn.queued_deletions() == []


def _guard(errors, fn, name):
    try:
        fn(name)
    except Exception as exc:     # reported by the test, not lost in a thread
        errors.append(exc)


def test_install_from_a_container_that_mounts_the_nodes_root(tmp_path):
    """The DaemonSet's init step: the node's / is mounted in the container,
    and the plugin must be built for the node's interpreter, not the
    image's. Here the "mount" is / itself, reached through chroot."""
    from chainer import install
    dest = tmp_path / "opt-cni-bin"
    path = install.install(dest, python="/usr/bin/python3", host_root="/")
    text = path.read_bytes()
    assert text.startswith(b"#!/usr/bin/python3 -sSE\n")
    tag = sh(["chroot", "/", "/usr/bin/python3", "-c",
              "import sys; print(sys.implementation.cache_tag)"]).stdout.strip()
    assert f"\n#:code {tag} ".encode() in text, "compiled by the node's interpreter"
    r = subprocess.run([str(path)], input=b'{"cniVersion": "1.1.0"}', capture_output=True,
                       env={"CNI_COMMAND": "VERSION"}, check=True)
    assert json.loads(r.stdout)["cniVersion"] == "1.1.0"


HOSTILE = [
    # description, what to change, expected code, words the message must contain
    ("stdin nested 100,000 levels deep", {"stdin": "deep"}, 6, ["nest"]),
    ("a relative CNI_NETNS", {"netns": "relative"}, 4, ["CNI_NETNS", "absolute path"]),
    ("CNI_NETNS '.'", {"netns": "."}, 4, ["CNI_NETNS", "absolute path"]),
    ("CNI_NETNS is the node's own network namespace", {"netns": "node"}, 4,
     ["node's own network namespace"]),
    ("CNI_NETNS is a plain file", {"netns": "/etc/hostname"}, 4,
     ["/etc/hostname", "not a network namespace"]),
    ("CNI_NETNS is a namespace of another type", {"netns": "/proc/self/ns/pid"}, 4,
     ["/proc/self/ns/pid", "not a network namespace"]),
    ("CNI_NETNS is a FIFO (must not hang the agent)", {"netns": "fifo"}, 4,
     ["not a network namespace"]),
    ("CNI_NETNS is a directory", {"netns": "/var/run/netns"}, 4, ["not a network namespace"]),
    ("a 4,096-character container id", {"cid": "c" * 4096}, 4,
     ["CNI_CONTAINERID", "4096 characters", "at most 200"]),
    ("a container id with a slash", {"cid": "c/../x"}, 4, ["CNI_CONTAINERID", "only letters"]),
    ("a container id that is not ASCII", {"cid": "c\u00e9"}, 4, ["CNI_CONTAINERID"]),
    ("an interface name of 16 bytes", {"ifname": "e" * 16}, 4, ["CNI_IFNAME", "1 to 15 bytes"]),
    ("an interface name '..'", {"ifname": ".."}, 4, ["CNI_IFNAME", "'..'"]),
    ("an interface name with a space", {"ifname": "eth 0"}, 4, ["CNI_IFNAME", "whitespace"]),
    ("name is a list", {"conf": {"name": ["a"]}}, 7, ["name must be a string, not array"]),
    ("type is a number", {"conf": {"type": 5}}, 7, ["type must be a string, not number"]),
    ("cniVersion is a number", {"conf": {"cniVersion": 1}}, 7,
     ["cniVersion must be a string"]),
    ("a pod name Kubernetes would refuse", {"args": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=Web_0"},
     4, ["K8S_POD_NAME", "lower-case"]),
    ("stdin of 2 MiB", {"stdin": "huge"}, 6, ["larger than"]),
]


def test_hostile_cni_input_gets_a_clean_error_and_changes_nothing(world):
    """Each case through the installed plugin against the real agent, on
    the pod of a case: a clean CNI error with the spec's code naming what
    is wrong, nothing registered, nothing queued, and the agent answering
    the next request. The agent is then asked directly (it checks for
    itself, whoever calls it)."""
    with cni_node(world) as cn:
        fifo = f"{cn.paths.root}/not-a-netns"
        os.mkfifo(fifo)
        node_ns = f"/var/run/netns/{cn.node.netns}"
        problems = []
        for i, (description, change, code, words) in enumerate(HOSTILE):
            netns = cn.pod_netns(f"h{i}")
            att = cn.runtime.add(f"c-h{i}", netns, args=pod_args(f"h{i}"))   # Terway's part
            cn.fastpath("DEL", cn.conf(1, att.result), f"c-h{i}", netns)
            conf = cn.conf(1, att.invocations[0].output, timeout_seconds=2)
            conf.update(change.get("conf", {}))
            stdin = json.dumps(conf)
            if change.get("stdin") == "deep":
                stdin = stdin[:-1] + ', "runtimeConfig": ' + "[" * 100_000 + "]" * 100_000 + "}"
            elif change.get("stdin") == "huge":
                stdin = stdin[:-1] + ', "runtimeConfig": {"pad": "' + "x" * (2 << 20) + '"}}'
            target = {"relative": netns.lstrip("/"), "node": node_ns, "fifo": fifo}.get(
                change.get("netns"), change.get("netns", netns))
            before = (cn.endpoints(), cn.endpoint_map(), cn.queued_deletions())
            t0 = time.monotonic()
            inv = cn.fastpath("ADD", stdin, change.get("cid", f"c-h{i}"), target,
                              ifname=change.get("ifname", "eth0"),
                              args=change.get("args", pod_args(f"h{i}")))
            took = time.monotonic() - t0
            out = inv.output if inv.stdout.startswith("{") else {}
            if inv.rc != 1 or out.get("code") != code or \
                    not all(w in out.get("msg", "") for w in words):
                problems.append((description, inv.rc, inv.stdout[:300], inv.stderr[-300:]))
            if took > 1.5:
                problems.append((description, f"took {took:.1f}s"))
            if (cn.endpoints(), cn.endpoint_map(), cn.queued_deletions()) != before:
                problems.append((description, "changed the agent's state"))
        assert problems == []
        # a DEL of an unusable id with the agent down is refused, not queued
        cn.agent.kill(9)
        inv = cn.fastpath("DEL", cn.conf(1, att.result), "c" * 4096, "")
        assert inv.rc == 1 and inv.output["code"] == 4, inv
        assert cn.queued_deletions() == []
        cn.restart_agent()
        # the agent's API checks what it is handed, whoever calls it
        for params, code, words in (
                ({"netns": "var/run/netns/x", "container_id": "c1"}, "invalid-netns",
                 "absolute path"),
                ({"netns": node_ns, "container_id": "c1"}, "invalid-netns", "node's own"),
                ({"netns": fifo, "container_id": "c1"}, "invalid-netns", "not a network"),
                ({"netns": netns, "container_id": ["c1"]}, "invalid-argument",
                 "container_id must be a string"),
                ({"netns": netns, "container_id": "c" * 300}, "invalid-argument", "at most 200"),
                ({"netns": netns, "container_id": "c1", "ifname": "../x"}, "invalid-argument",
                 "ifname"),
                ({"netns": netns, "container_id": "c1", "pod_name": 5}, "invalid-argument",
                 "pod_name must be a string")):
            with pytest.raises(wire.RemoteError) as err:
                cn.api("EndpointAdd", params)
            assert err.value.code == code and words in err.value.message, (params, err.value)
        with pytest.raises(wire.RemoteError) as err:
            cn.api("EndpointDel", {"container_id": "x/y"})
        assert err.value.code == "invalid-argument"
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        # and the one well-formed ADD of the last pod still works
        assert cn.fastpath("ADD", cn.conf(1, att.invocations[0].output), f"c-h{i}", netns,
                           args=pod_args(f"h{i}")).rc == 0
        assert set(cn.endpoints()) == {f"c-h{i}-eth0"}
