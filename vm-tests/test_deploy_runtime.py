"""deploy/'s containers run as the manifests say, under a real runtime, and
still do their work.

A private containerd (vm-tests/containerd_harness.py) on a simulated node
runs fastpath's three containers from deploy/daemonset.yaml and
deploy/uninstall.yaml with each container's securityContext translated
to `ctr run` flags: exactly its capabilities (every other one dropped), no
privilege escalation, a read-only root filesystem, the runtime's default
seccomp profile (`--seccomp`: containerd's own, made for the container's
capabilities), host networking, and only the mounts the manifest lists, each
host path replaced by this test's stand-in for it. The root filesystem is
this machine's /usr and the repository (read-only), in place of the image.

  install-cni  writes fastpath-cni (compiled by the "node's" python3 in
               the chroot of the narrowed /host) and the conflist;
  policy       the agent: starts, attaches to the ENI and to a cgroup of
               this test's (socket-LB), serves CNI ADDs through the
               installed plugin (setns into the pods, tc, maps), forwards
               pod traffic, answers health and metrics;
  uninstall    removes it all again.

Pods' network namespaces live in the harness's mount namespace (where the
runtime's /run is), so the CNI plugins run there too, as a runtime would.
A second test runs the agent with each capability the policy container
keeps removed in turn, to show that each is needed (setpriv).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from agent.api import wire
from agent.datapath.cgroup import SOCK_PROGRAMS
from agent.sim.agent import AgentProcess, private_paths, register_pod
from agent.sim.cgroups import private_mount as private_cgroup
from chainer.testing import STANDIN, CniRuntime, terway_conflist
from containerd_harness import Containerd
from tests.unit.test_config_node import mount_as_volume, terway_configmap

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# ctr's default set (containerd's oci.populateDefaultUnixSpec): dropped one
# by one, since ctr has no "drop ALL".
CTR_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                    "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                    "AUDIT_WRITE")
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4,
            "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10,
            "NET_RAW": 13, "NET_ADMIN": 12, "SYS_CHROOT": 18, "SYS_ADMIN": 21,
            "SYS_RESOURCE": 24, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31, "PERFMON": 38,
            "BPF": 39}


def workload(name: str) -> dict:
    for f in ("daemonset.yaml", "uninstall.yaml"):
        for d in yaml.safe_load_all((DEPLOY / f).read_text()):
            if d and d["kind"] == "DaemonSet" and d["metadata"]["name"] == name:
                return d["spec"]["template"]["spec"]
    raise LookupError(name)


def shipped(kind: str, name: str) -> dict:
    for d in yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text()):
        if d and d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise LookupError(name)


class Node:
    """What the containers' host paths and volumes are, for this test."""

    def __init__(self, root: Path, paths, cgroup: str):
        self.root = root
        self.bin_dir, self.conf_dir = root / "opt-cni-bin", root / "etc-cni-net.d"
        for d in (self.bin_dir, self.conf_dir):
            d.mkdir()
        self.host_paths = {
            "/sys/fs/bpf": paths.bpffs, "/sys/fs/cgroup": cgroup,
            "/var/run/fastpath": paths.state_dir, "/var/run/netns": "/run/netns",
            "/opt/cni/bin": str(self.bin_dir), "/etc/cni/net.d": str(self.conf_dir),
            # the machine's own system directories, always read-only in the manifests
            "/usr": "/usr", "/lib": "/lib", "/lib64": "/lib64", "/lib/modules": "/lib/modules",
            "/usr/src": "/usr/src"}
        os.makedirs(paths.state_dir, exist_ok=True)
        # the ConfigMaps as volumes: fastpath-config (pointed at a manifest
        # directory inside it, as no API server runs here) and Terway's eni-config
        cm = shipped("ConfigMap", "fastpath-config")
        conf = root / "fastpath-config"
        (conf / "manifests").mkdir(parents=True)
        config = yaml.safe_load(cm["data"]["config.yaml"])
        config["source"] = "/etc/fastpath/manifests"
        (conf / "config.yaml").write_text(yaml.safe_dump(config))
        (conf / "10-terway.conflist").write_text(cm["data"]["10-terway.conflist"])
        self.configmaps = {"fastpath-config": str(conf),
                           "eni-config": str(mount_as_volume(terway_configmap("datapathv2"),
                                                             root / "eni-config"))}

    def source(self, volume: dict, name: str) -> str:
        if "hostPath" in volume:
            return self.host_paths[volume["hostPath"]["path"]]
        if "configMap" in volume:
            return self.configmaps[volume["configMap"]["name"]]
        if "emptyDir" in volume:
            d = self.root / "emptydir" / name
            d.mkdir(parents=True, exist_ok=True)
            return str(d)
        raise AssertionError(f"volume {name}: kind not expected in deploy/")


def machine_capabilities() -> set[str]:
    """Capabilities this machine can hand out at all (this process's
    bounding set): a runtime cannot grant one beyond it."""
    with open("/proc/self/status") as f:
        bnd = int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
    return {name for name, bit in CAP_BITS.items() if bnd >> bit & 1}


def granted(c: dict) -> set[str]:
    """What container c gets here: its capabilities, less any this machine
    cannot give (it lacks SYS_RESOURCE, which only kernels before 5.11 need)."""
    want = set(c["securityContext"]["capabilities"].get("add") or [])
    missing = want - machine_capabilities()
    assert missing <= {"SYS_RESOURCE"}, f"this machine cannot grant {missing}"
    return want - missing


def ctr_flags(spec: dict, c: dict, node: Node) -> list[str]:
    """`ctr run` flags for container c of pod spec `spec`, as the manifest
    has it; fails on anything this translation does not know."""
    sc = c.get("securityContext") or {}
    assert not sc.get("privileged")
    flags = []
    caps = sc["capabilities"]
    assert caps["drop"] == ["ALL"]
    add = granted(c)
    for cap in CTR_DEFAULT_CAPS:
        if cap not in add:                  # ctr applies its drops after its adds
            flags += ["--cap-drop", f"CAP_{cap}"]
    for cap in sorted(add):
        flags += ["--cap-add", f"CAP_{cap}"]
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    assert (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"
    flags.append("--seccomp")
    if sc.get("allowPrivilegeEscalation") is not False:
        flags.append("--allow-new-privs")         # ctr sets no_new_privs unless told
    if spec.get("hostNetwork"):
        flags.append("--net-host")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c.get("volumeMounts", []):
        opts = ["rbind", "ro" if m.get("readOnly") else "rw"]
        if m.get("mountPropagation") == "HostToContainer":
            opts.append("rslave")
        src = node.source(volumes[m["name"]], m["name"])
        flags += ["--mount", f"type=bind,src={src},dst={m['mountPath']},options={':'.join(opts)}"]
    for e in c.get("env", []):
        if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            flags += ["--env", f"{e['name']}=n1"]
    flags += ["--env", f"PATH={REPO}/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    return flags


def command(c: dict) -> list[str]:
    """The image's entrypoint, then the container's args."""
    return [str(DEPLOY / "entrypoint.sh"), *(a.replace("$(NODE_NAME)", "n1") for a in c["args"])]


def make_rootfs(ctrd: Containerd) -> str:
    """The image's stand-in: this machine's /usr and the repository,
    read-only, in the harness's mount namespace; /etc holds copies of the
    few files Python and the loader read."""
    root = f"{ctrd.root}/rootfs"
    for d in ("usr", "etc", "proc", "sys", "dev", "tmp", "var/run", REPO.as_posix().lstrip("/")):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{link}", f"{root}/{link}")
    for f in ("passwd", "group", "ld.so.cache", "nsswitch.conf"):
        if os.path.exists(f"/etc/{f}"):
            shutil.copy2(f"/etc/{f}", f"{root}/etc/{f}")
    for src in ("/usr", REPO.as_posix()):
        dst = f"{root}{src}"
        ctrd.enter("mount", "--bind", src, dst)
        ctrd.enter("mount", "-o", "remount,bind,ro", dst)
    return root


def run(ctrd: Containerd, rootfs: str, name: str, flags: list[str], cmd: list[str],
        detach: bool = False, timeout: float = 180) -> subprocess.CompletedProcess:
    args = ["run", *(["-d", "--log-uri", f"file://{ctrd.root}/{name}.log"] if detach
                     else ["--rm"]),
            "--cgroup", f"/{ctrd.cgroup_parent}/{name}", *flags, "--rootfs", rootfs, name, *cmd]
    return ctrd.ctr(*args, check=False, timeout=timeout)


def container_status(ctrd: Containerd, name: str) -> dict[str, str]:
    out = ctrd.ctr("tasks", "exec", "--exec-id", f"st{time.monotonic_ns() % 10**6}", name,
                   "/usr/bin/cat", "/proc/1/status").stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def wait_ready(node, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = node.run(["curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}",
                        "http://127.0.0.1:9099/readyz"], check=False).stdout
        if out == "200":
            return
        time.sleep(0.5)
    raise AssertionError("the agent's container did not become ready")


def test_the_daemonsets_containers_work_as_the_manifests_confine_them(world):
    node = world.add_node("n1", enis=1)
    ds, un = workload("terway-eniip"), workload("fastpath-uninstall")
    install = next(c for c in ds["initContainers"] if c["name"] == "install-cni")
    policy = next(c for c in ds["containers"] if c["name"] == "policy")
    uninstall = next(c for c in un["initContainers"] if c["name"] == "uninstall")
    with private_paths() as paths, private_cgroup() as cgroup:
        host = Node(Path(paths.root), paths, cgroup)
        with Containerd(node.netns, str(host.bin_dir), world.tag) as ctrd:
            rootfs = make_rootfs(ctrd)
            # 1. install-cni
            r = run(ctrd, rootfs, "install-cni", ctr_flags(ds, install, host), command(install))
            assert r.returncode == 0, r.stdout + r.stderr
            plugin = host.bin_dir / "fastpath-cni"
            assert plugin.read_bytes().startswith(b"#!/usr/bin/python3 -sSE\n")
            installed = json.loads((host.conf_dir / "10-terway.conflist").read_text())
            assert [p["type"] for p in installed["plugins"]] == ["terway", "fastpath-cni"]
            shutil.copy2(STANDIN, host.bin_dir / "terway")

            # 2. policy: the agent
            pods = ("a", "b")
            for p in pods:          # pods' netns where the runtime's /run is
                ctrd.enter("ip", "netns", "add", f"{world.tag}-{p}")
            r = run(ctrd, rootfs, "policy", ctr_flags(ds, policy, host), command(policy),
                    detach=True)
            assert r.returncode == 0, r.stderr
            try:
                wait_ready(node)
            except AssertionError:
                raise AssertionError(Path(f"{ctrd.root}/policy.log").read_text()[-3000:]) \
                    from None
            st = container_status(ctrd, "policy")
            want = sum(1 << CAP_BITS[c] for c in granted(policy))
            assert int(st["CapEff"], 16) == want and int(st["CapBnd"], 16) == want, st
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
            ro = ctrd.ctr("tasks", "exec", "--exec-id", "ro", "policy", "/usr/bin/touch",
                          "/etc/x", check=False)
            assert ro.returncode != 0 and "Read-only file system" in ro.stderr, ro

            # CNI ADDs through the installed plugin, run where the pods' netns are
            entry = dict(installed["plugins"][1], agent_socket=f"{paths.state_dir}/agent.sock",
                         state_dir=paths.state_dir, log_file=f"{paths.state_dir}/cni.log")
            standin = terway_conflist(agent_socket="", state_dir="", log_file="",
                                      ipam_dir=f"{paths.root}/ipam", first="10.241.1.100",
                                      last="10.241.1.120")["plugins"][0]
            conflist = dict(installed, plugins=[standin, entry])
            rt = CniRuntime(conflist, host.bin_dir, None,
                            wrapper=("nsenter", "-t", str(ctrd.anchor.pid), "-m", "-n"))
            atts = {p: rt.add(f"c-{p}", f"/var/run/netns/{world.tag}-{p}",
                              args=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={p}") for p in pods}
            eps = {e["key"]: e for e in wire.call(f"{paths.state_dir}/agent.sock",
                                                  "EndpointList")}
            assert set(eps) == {"c-a-eth0", "c-b-eth0"}
            for e in eps.values():
                progs = {f.split()[0] for f in node.run(
                    ["tc", "filter", "show", "dev", e["host_ifname"], "ingress"]).stdout.split(
                    "\n") if "fp_from_pod" in f}
                assert progs, e
            b_ip = atts["b"].result["ips"][0]["address"].split("/")[0]
            ping = subprocess.run(["nsenter", f"--net=/proc/{ctrd.anchor.pid}/root/run/netns/"
                                   f"{world.tag}-a", "busybox", "ping", "-c", "3", "-w", "3", b_ip],
                                  capture_output=True, text=True)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            rows = wire.call(f"{paths.state_dir}/agent.sock", "Counters")
            assert sum(r["packets"] for r in rows if r["reason"] == "redirected-local") >= 3
            # socket-LB on this test's cgroup; metrics on the node's IP
            attached = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup],
                                      capture_output=True, text=True, check=True).stdout
            assert {p["name"] for p in json.loads(attached)} == set(SOCK_PROGRAMS), attached
            assert node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://{node.ip}:9962/metrics"]).stdout == "200"
            assert os.stat(paths.state_dir).st_mode & 0o777 == 0o700
            for p in pods:
                assert [i.rc for i in rt.delete(f"c-{p}")] == [0, 0]
            ctrd.ctr("tasks", "kill", "-s", "SIGTERM", "policy")
            deadline = time.monotonic() + 30
            while "RUNNING" in ctrd.ctr("tasks", "ls").stdout and time.monotonic() < deadline:
                time.sleep(0.2)
            log = Path(f"{ctrd.root}/policy.log").read_text()
            assert "Traceback" not in log, log[-3000:]

            # 3. uninstall
            r = run(ctrd, rootfs, "uninstall", ctr_flags(un, uninstall, host), command(uninstall))
            assert r.returncode == 0, r.stdout + r.stderr
            print(r.stdout)
            assert not os.path.exists(f"{paths.bpffs}/fastpath"), os.listdir(paths.bpffs)
            assert json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup],
                                             capture_output=True, text=True).stdout.strip() or "[]") == []
            assert not plugin.exists() and not (host.conf_dir / "10-terway.conflist").exists()
            assert os.listdir(paths.state_dir) == []


@contextlib.contextmanager
def _agent(node, paths, caps: list[str], cgroup: str):
    wrap = ["setpriv", "--inh-caps=-all",
            "--bounding-set=-all," + ",".join(f"+{c.lower()}" for c in caps), "--"]
    agent = AgentProcess(node, paths, ["--socket-lb", "true", "--cgroup-root", cgroup],
                         wrapper=wrap)
    try:
        yield agent
    finally:
        agent.kill(9)


def test_each_capability_the_policy_container_keeps_is_needed(world):
    """The agent with the manifest's capabilities registers a pod; with any
    one of them removed, something it must do fails (and the failure says
    what), and BPF with PERFMON cannot stand in for SYS_ADMIN. SYS_RESOURCE
    only matters on kernels before 5.11 (this machine cannot grant it)."""
    node = world.add_node("n1", enis=1)
    pod = node.add_pod("a")
    kept = workload("terway-eniip")
    kept = next(c for c in kept["containers"] if c["name"] == "policy")
    kept = kept["securityContext"]["capabilities"]["add"]
    outcome = {}
    with private_cgroup() as cgroup:
        for removed in [None, *kept, "SYS_ADMIN for BPF+PERFMON"]:
            caps = [c for c in kept if c != removed]
            if removed == "SYS_ADMIN for BPF+PERFMON":
                caps = [c for c in kept if c != "SYS_ADMIN"] + ["BPF", "PERFMON"]
            with private_paths() as paths, _agent(node, paths, caps, cgroup) as agent:
                try:
                    agent.start(timeout=120)
                except RuntimeError as exc:
                    outcome[removed] = "start: " + str(exc).strip().splitlines()[-1]
                    continue
                try:
                    outcome[removed] = "ADD ok " + register_pod(paths.socket, pod)["ip"]
                except wire.RemoteError as exc:
                    outcome[removed] = f"ADD: {exc.message}"
    print(json.dumps(outcome, indent=1))
    assert outcome[None] == f"ADD ok {pod.ip}"
    assert "clsact" in outcome["NET_ADMIN"] and "Operation not permitted" in outcome["NET_ADMIN"]
    assert "bpf() is not permitted" in outcome["SYS_ADMIN"]
    # BPF and PERFMON load the programs, but can neither read map layouts
    # from the kernel (BTF, checked at every start) nor enter a pod's netns
    assert "CAP_SYS_ADMIN" in outcome["SYS_ADMIN for BPF+PERFMON"], outcome
    assert "not permitted" in outcome["SYS_ADMIN for BPF+PERFMON"]
    release = tuple(int(x) for x in platform.release().split(".")[:2])
    if release >= (5, 11):
        assert outcome["SYS_RESOURCE"] == f"ADD ok {pod.ip}"    # kept for older kernels
    else:
        assert not outcome["SYS_RESOURCE"].startswith("ADD ok")
