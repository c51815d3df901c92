"""fastpath-cni driven by a real runtime: containerd and `ctr run --cni`.

On a simulated Terway node running the agent, a private containerd
(vm-tests/containerd_harness.py) starts busybox pods with a conflist of
[Terway stand-in, fastpath-cni] (deploy/10-terway.conflist) or [Debian's
ptp + host-local, fastpath-cni]. After ADD, fastpath's programs are on each
pod's host veth and its map entry is in place; traffic between two pods,
sent by the containers themselves, takes the fast path (the node's stack
forwards nothing); after the runtime's DEL nothing of fastpath is left.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from chainer.testing import ptp_conflist
from cni_helpers import OUR_PROGRAMS, cni_node
from containerd_harness import Containerd
from fastpath_helpers import counters_by, forwarded_by_stack, wait_for


@pytest.mark.parametrize("chain", ["terway", "ptp"])
def test_pods_run_by_containerd_are_accelerated_and_cleaned_up(world, chain):
    with cni_node(world) as cn, Containerd(cn.node.netns, cn.bin_dir, world.tag) as ctrd:
        if chain == "terway":
            conflist = cn.runtime.conflist
            ipam_dir = cn.ipam_dir
        else:
            ipam_dir = cn.paths.root + "/ptp-ipam"
            conflist = ptp_conflist(agent_socket=cn.paths.socket, state_dir=cn.paths.state_dir,
                                    log_file=cn.log_file, ipam_dir=ipam_dir,
                                    subnet="10.250.9.0/24")
        ctrd.write_conflist(conflist)
        names = ("a", "b")
        for name in names:
            ctrd.run_pod(name)
        keys = {n: f"{ctrd.cni_container_id(n)}-eth0" for n in names}

        def registered():
            eps = cn.endpoints()
            for n, proc in ctrd.runs.items():
                assert proc.poll() is None, (n, proc.communicate(), ctrd.log_tail())
            return eps if all(k in eps for k in keys.values()) else None

        eps = wait_for(registered, "both pods' endpoints")
        wait_for(lambda: ctrd.ctr("tasks", "ls").stdout.count("RUNNING") == 2,
                 "both tasks running")
        ep = {n: eps[keys[n]] for n in names}
        assert cn.endpoint_map() == {e["ip"]: e["host_ifindex"] for e in ep.values()}
        for e in ep.values():
            assert cn.programs(e["host_ifname"]) == OUR_PROGRAMS, e
            assert e["eni"] == ("eth1" if chain == "terway" else ""), e

        before = forwarded_by_stack(cn.node)
        for src, dst in (("a", "b"), ("b", "a")):
            out = ctrd.exec(src, "/bin/busybox", "ping", "-c", "3", "-i", "0.2", "-w", "5",
                            ep[dst]["ip"]).stdout
            assert "3 packets received" in out, out
        assert forwarded_by_stack(cn.node) == before, "the node's stack forwarded pod traffic"
        rows = [SimpleNamespace(**r) for r in cn.api("Counters")]
        for e in ep.values():
            c = counters_by(rows, e["host_ifindex"])
            assert c[("from-pod", "redirected-local")] >= 3, c

        for name in names:
            rc, err = ctrd.stop_pod(name)
            assert "network review" not in err, err      # ctr logs a failed CNI DEL so
        assert cn.endpoints() == {} and cn.endpoint_map() == {}
        assert cn.leftover_pod_programs() == {}
        assert cn.queued_deletions() == []
        links = {link["ifname"] for link in cn.node.ip_json("link", "show")}
        assert not any(e["host_ifname"] in links for e in ep.values()), links
        if chain == "terway":
            assert os.listdir(ipam_dir) == [], "the stand-in released both addresses"
        log = open(cn.log_file).read()
        assert log.count(" ADD ") >= 2 and log.count(" DEL ") >= 2, log
