"""hostPort through a real runtime: containerd's `ctr run --cni`, the
conflist's portMappings capability, fastpath-cni, the agent, the datapath.

    client (outside) ── vpc ══ eth0 n1 10.240.0.11:8080 ──> pod web :80

The kubelet's CRI hands the runtime a pod's hostPorts, and go-cni/libcni put
them in `runtimeConfig.portMappings` of the plugins whose conflist entry
declares the capability (deploy/10-terway.conflist's fastpath-cni entry
does). `ctr` has no flag for port mappings, so the test's conflist carries
the `runtimeConfig` the CRI would inject: libcni passes a plugin's entry on
unchanged when the runtime gives no capability arguments, so fastpath-cni
receives exactly what it receives under the kubelet.
"""
from __future__ import annotations

import copy

from cni_helpers import cni_node
from containerd_harness import Containerd
from fastpath_helpers import wait_for

MAPPING = {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}
SERVER = ["/bin/sh", "-c", "while true; do echo from-web | /bin/busybox nc -l -p 80; done"]


def with_mappings(conflist: dict, mappings: list[dict]) -> dict:
    out = copy.deepcopy(conflist)
    ours = out["plugins"][1]
    assert ours["type"] == "fastpath-cni" and ours["capabilities"]["portMappings"] is True
    ours["runtimeConfig"] = {"portMappings": mappings}
    return out


def ask(src, ip: str, port: int) -> str:
    return src.run(["sh", "-c", f"printf hi | nc -N -w 2 {ip} {port}"], check=False,
                   timeout=10).stdout.strip()


def test_a_pods_host_port_from_a_runtime_is_served_refused_when_taken_and_gone_with_the_pod(
        world):
    client = world.add_client("ext")
    with cni_node(world) as cn, Containerd(cn.node.netns, cn.bin_dir, world.tag) as ctrd:
        node = cn.node
        ctrd.write_conflist(with_mappings(cn.runtime.conflist, [MAPPING]))
        ctrd.run_pod("web", *SERVER)
        key = f"{ctrd.cni_container_id('web')}-eth0"
        wait_for(lambda: cn.endpoints().get(key), "the pod's endpoint")
        # from outside the cluster, to the node's address: the pod answers
        assert wait_for(lambda: ask(client, node.ip, 8080), "the hostPort to answer") == \
            "from-web"
        # fastpath-cni logs what the agent programmed
        log = open(cn.log_file).read()
        assert "hostPorts=*:8080/TCP->80" in log, log[-2000:]

        # a second pod asking for the same port is refused, and says why
        ctrd.write_conflist(with_mappings(cn.runtime.conflist, [MAPPING]))
        proc = ctrd.run_pod("copy", *SERVER)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "hostPort 10.240.0.11:8080/TCP" in err and "is taken by pod" in err, err
        assert f"{ctrd.cni_container_id('copy')}-eth0" not in cn.endpoints()
        ctrd.runs.pop("copy", None)
        # the first pod still has it
        assert ask(client, node.ip, 8080) == "from-web"

        # the runtime's DEL removes the mapping with the pod
        ctrd.stop_pod("web")
        assert key not in cn.endpoints()
        assert ask(client, node.ip, 8080) == ""
