"""The agent's state dir (endpoint records, queued CNI DELs, sockets, the
CNI log): root's alone after a real run, a start that survives whatever
else is found in it, and queued DELs replayed without ever undoing an ADD.

The agent runs as a process with exactly the capabilities the DaemonSet
gives the policy container (read from deploy/daemonset.yaml), so a file
without read permission is unreadable to it as it would be on a node: no
CAP_DAC_OVERRIDE.
"""
from __future__ import annotations

import json
import os
import pathlib
import stat
import threading
import time
from pathlib import Path

import yaml

from agent.api import wire
from agent.sim import plan
from agent.sim.agent import AgentProcess, SimPaths, private_paths, register_pod, sim_attach
from chainer.testing import CniRuntime, install_plugins, terway_conflist

REPO = Path(__file__).resolve().parent.parent


def daemonset_capabilities(container: str = "policy") -> list[str]:
    for doc in yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()):
        if doc and doc["kind"] == "DaemonSet":
            spec = doc["spec"]["template"]["spec"]
            c = next(c for c in spec["containers"] if c["name"] == container)
            caps = c["securityContext"]["capabilities"]
            assert caps["drop"] == ["ALL"]
            return caps["add"]
    raise LookupError("daemonset")


def as_the_daemonset() -> list[str]:
    """setpriv: the bounding set is the DaemonSet's capabilities, nothing
    else (root gets exactly those at exec), no inheritable ones."""
    caps = ",".join(f"+{c.lower()}" for c in daemonset_capabilities())
    return ["setpriv", "--inh-caps=-all", f"--bounding-set=-all,{caps}", "--"]


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def seed_as_an_older_release(state: Path) -> dict[str, str]:
    """A state dir as a release before this one left it (0755 dirs, 0644
    files), plus stray entries; returns the strays by path and kind."""
    for d in (state, state / "endpoints", state / "cni-del-queue"):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    (state / "agent-starts").write_text("3\n")
    (state / "agent-starts").chmod(0o644)
    stale = {"ip": "10.241.9.9", "host_ifname": "caligone", "host_ifindex": 9999,
             "host_mac": "02:00:00:00:00:01", "pod_mac": "02:00:00:00:00:02",
             "container_id": "c-stale", "ifname": "eth0"}
    (state / "endpoints" / "c-stale-eth0.json").write_text(json.dumps(stale))
    (state / "endpoints" / "c-stale-eth0.json").chmod(0o644)
    strays = {}
    for sub in ("endpoints", "cni-del-queue"):
        d = state / sub
        (d / "dir.json").mkdir()
        (d / "dir.json" / "inside").write_text("x")
        (d / "secret.json").write_text(json.dumps(dict(stale, container_id="c-secret")))
        (d / "secret.json").chmod(0)
        os.mkfifo(d / "fifo.json")
        (d / "link.json").symlink_to("/etc/passwd")
        (d / "garbage.json").write_bytes(b"\xff\xfe not json")
        strays.update({str(d / "dir.json"): "dir", str(d / "secret.json"): "unreadable",
                       str(d / "fifo.json"): "fifo", str(d / "link.json"): "link"})
    return strays


def pod_args(name: str) -> str:
    return f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"


def test_state_dir_is_root_only_after_a_real_run_and_start_survives_stray_entries(world):
    node = world.add_node("n1", enis=1)
    with private_paths() as base:
        # the API and gRPC sockets in the state dir, as deployed
        paths = SimPaths(base.root, base.bpffs, base.state_dir, f"{base.state_dir}/agent.sock",
                         base.manifests)
        state = Path(paths.state_dir)
        strays = seed_as_an_older_release(state)
        bin_dir = str(install_plugins(f"{paths.root}/bin"))
        conflist = terway_conflist(agent_socket=paths.socket, state_dir=paths.state_dir,
                                   log_file=f"{paths.state_dir}/cni.log",
                                   ipam_dir=f"{paths.root}/ipam", first="10.241.1.100",
                                   last="10.241.1.120")
        rt = CniRuntime(conflist, bin_dir, node.netns)
        netns = {}

        def start() -> AgentProcess:
            return AgentProcess(node, paths, wrapper=as_the_daemonset()).start()

        agent = start()
        try:
            for name in ("a", "b"):
                ns = plan.pod_ns(world.tag, f"sd{name}")      # the world deletes it
                assert os.system(f"ip netns add {ns}") == 0
                netns[name] = f"/var/run/netns/{ns}"
                rt.add(f"c-{name}", netns[name], args=pod_args(name))
            eps = wire.call(paths.socket, "EndpointList")
            assert {e["key"] for e in eps} == {"c-a-eth0", "c-b-eth0"}
            assert [i.rc for i in rt.delete("c-b")] == [0, 0]
            agent.kill(9)
            # a's DEL while the agent is down: queued by the plugin
            inv = rt.exec_plugin("fastpath-cni", "DEL", json.dumps(rt.plugin_conf(1)), "c-a",
                                 netns["a"], args=pod_args("a"))
            assert inv.rc == 0, inv
            assert (state / "cni-del-queue" / "c-a-eth0.json").exists()
            agent = start()
            assert wire.call(paths.socket, "EndpointList") == []
        finally:
            agent.kill(9)
        log = agent.log.read_text()
        print("state dir after the run:")
        seen = {}
        for root, dirs, files in os.walk(state):
            for name in dirs + files:
                p = os.path.join(root, name)
                if any(p == s or p.startswith(s + "/") for s in strays):
                    continue
                seen[os.path.relpath(p, state)] = oct(mode(p))
                print(f"  {oct(mode(p))} {os.path.relpath(p, state)}")
        assert mode(str(state)) == 0o700
        wrong = {}
        for rel, m in seen.items():
            st = os.lstat(state / rel)
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if int(m, 8) != want:
                wrong[rel] = m
        assert wrong == {}, wrong
        # everything a run leaves was there to be judged
        assert {"endpoints", "cni-del-queue", "agent-starts", "cni.log"} <= set(seen), seen
        assert (state / "agent-starts").read_text() == "5\n"
        # the older release's record of a pod whose veth is gone: dropped
        assert not (state / "endpoints" / "c-stale-eth0.json").exists()
        # the strays are left as they were, each reported (once per start)
        for path, kind in strays.items():
            p = Path(path)
            assert os.path.lexists(p), path
            if kind == "unreadable":
                assert mode(path) == 0
            assert log.count(path) == 2, (path, log.count(path))
        assert "took group/other access away from" in log
        # the undecodable one is ours by name and dropped as before
        assert not (state / "endpoints" / "garbage.json").exists()


def test_a_queued_del_never_removes_an_endpoint_registered_again_since(world):
    """Compare the queued DEL with the attachment: one queued before the
    endpoint was (re-)registered is about an earlier attachment."""
    node = world.add_node("n1", enis=1)
    a = node.add_pod("a")
    with sim_attach(node, register=False) as agent:
        qdir = agent.state_dir / "cni-del-queue"
        queued_at = time.time()         # the DEL of an earlier attachment, then the ADD
        register_pod(agent, a)
        key = f"sim-{a.name}-eth0"
        (qdir / f"{key}.json").write_text(json.dumps({
            "container_id": f"sim-{a.name}", "ifname": "eth0", "netns": a.netns_path,
            "queued_at": queued_at}))
        agent.replay_deletions()
        assert key in agent.endpoints, "a DEL queued before the ADD removed the endpoint"
        assert [e.ip for e in agent.datapath.maps.endpoints()] == [a.ip]
        assert list(qdir.iterdir()) == []
        # one that names another netns is about another attachment too
        (qdir / f"{key}.json").write_text(json.dumps({
            "container_id": f"sim-{a.name}", "ifname": "eth0", "netns": "/var/run/netns/other",
            "queued_at": time.time() + 1}))
        agent.replay_deletions()
        assert key in agent.endpoints
        # a DEL queued after the ADD, for that attachment, applies
        (qdir / f"{key}.json").write_text(json.dumps({
            "container_id": f"sim-{a.name}", "ifname": "eth0", "netns": a.netns_path,
            "queued_at": time.time() + 1}))
        assert agent.replay_deletions() == 1
        assert key not in agent.endpoints and agent.datapath.maps.endpoints() == []


def test_replay_survives_queued_dels_removed_while_it_sweeps(world, monkeypatch):
    """An ADD removes the queued DEL it supersedes, possibly after the sweep
    listed it: the sweep must skip it. First exactly that (a listed file
    gone before it is read), then real ADDs racing a real sweep."""
    node = world.add_node("n1", enis=1)
    a = node.add_pod("a")
    with sim_attach(node, register=False) as agent:
        qdir = agent.state_dir / "cni-del-queue"
        (qdir / "c-1-eth0.json").write_text(json.dumps({"container_id": "c-1", "ifname": "eth0"}))
        listed = pathlib.Path.glob

        def stale_listing(self, pattern):
            found = list(listed(self, pattern))
            if self == qdir:
                found.append(qdir / "c-0-eth0.json")    # removed since it was listed
            return iter(found)

        monkeypatch.setattr(pathlib.Path, "glob", stale_listing)
        assert agent.replay_deletions() == 1
        monkeypatch.undo()
        assert list(qdir.iterdir()) == []

        # the race itself: ADDs of one pod under container ids whose DELs
        # are queued, while a sweep runs. Whatever the interleaving, the
        # sweep ends normally and never removes what an ADD registered.
        ids = [f"r{i:04d}" for i in range(2000)]
        for cid in ids:
            (qdir / f"{cid}-eth0.json").write_text(json.dumps(
                {"container_id": cid, "ifname": "eth0", "queued_at": time.time() - 1}))
        added, errors = [], []

        def adds():
            try:
                for cid in reversed(ids[-12:]):
                    agent.rpc_EndpointAdd(netns=a.netns_path, container_id=cid)
                    added.append(cid)
            except Exception as exc:        # reported below, not lost in the thread
                errors.append(exc)

        t = threading.Thread(target=adds)
        t.start()
        swept = 0
        while t.is_alive():
            swept += agent.replay_deletions()
        t.join()
        swept += agent.replay_deletions()
        assert errors == []
        assert set(agent.endpoints) == {f"{added[-1]}-eth0"}, "the last ADD's endpoint stays"
        assert [e.ip for e in agent.datapath.maps.endpoints()] == [a.ip]
        assert list(qdir.iterdir()) == []
        print(f"race: {swept} queued DELs swept while {len(added)} ADDs ran")
