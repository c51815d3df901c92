"""A private containerd on a simulated node, driven with `ctr run --cni`.

`ctr run --cni` runs the CNI plugins itself (go-cni, libcni) with the
default paths: the first conflist in /etc/cni/net.d, plugins from
/opt/cni/bin, results cached under /var/lib/cni; containerd, its shims and
runc keep sockets and state under /run/containerd. None of those may be
the machine's, so everything runs inside one private mount namespace in the
node's network namespace, held by an anchor process:

    nsenter --net=<node netns> unshare --mount --propagation private sh -c ...

where /etc, /opt, /run and /var/lib are overlays whose writes land in this
harness's temp dir, and /etc/cni/net.d and /opt/cni/bin are bind mounts of
the test's own directories. containerd and every ctr command join it with
`nsenter -t <anchor> -m -n`. (`ip netns exec` would not do: it remounts
/sys, which hides the cgroup mounts runc needs.) Container cgroups go under
/fastpath-cni-<tag>/ and are removed at the end.

The image is built here from /bin/busybox (busybox-static) as an OCI
layout tarball and imported: no registry is ever contacted.

Leaving the `with` block kills the tasks, containerd and its shims (each
by pid), the anchor (its mount namespace goes with it) and removes the temp
dir and cgroups, whatever happened in the block.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

IMAGE = "localhost/fastpath/busybox:test"
NAMESPACE = "fpcni"
BUSYBOX = "/bin/busybox"
OVERLAID = ("/etc", "/opt", "/run", "/var/lib")


def build_busybox_image(path: str, busybox: str = BUSYBOX, name: str = IMAGE) -> str:
    """Write an OCI image layout tarball (layer, config, manifest, index)
    holding one static busybox; returns the image name."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(ti)
        data = Path(busybox).read_bytes()
        ti = tarfile.TarInfo("bin/busybox")
        ti.size, ti.mode = len(data), 0o755
        layer.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("bin/sh")
        ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
        layer.addfile(ti)
    blobs = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer_desc = blob(layer_buf.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = blob(json.dumps(manifest).encode(),
                         "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    with tarfile.open(path, "w") as tar:
        def add(member: str, data: bytes) -> None:
            ti = tarfile.TarInfo(member)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest}", data)
    return name


def _anchor_script(root: str, conf_dir: str, bin_dir: str) -> str:
    lines = ["set -e"]
    for i, d in enumerate(OVERLAID):
        upper, work = f"{root}/ovl/{i}/upper", f"{root}/ovl/{i}/work"
        lines += [f"mkdir -p {upper} {work}",
                  f"mount -t overlay overlay -o lowerdir={d},upperdir={upper},workdir={work} {d}"]
    lines += ["mkdir -p /etc/cni/net.d /opt/cni/bin",
              f"mount --bind {conf_dir} /etc/cni/net.d",
              f"mount --bind {bin_dir} /opt/cni/bin",
              "echo ready",
              # bounded: a harness that dies uncleanly leaves nothing for long
              "exec sleep 900"]
    return "\n".join(lines)


class Containerd:
    def __init__(self, node_netns: str, bin_dir: str, tag: str):
        self.node_netns = node_netns
        self.bin_dir = bin_dir
        self.root = tempfile.mkdtemp(prefix="fp-ctrd-")
        self.conf_dir = f"{self.root}/net.d"
        self.socket = f"{self.root}/containerd.sock"
        self.cgroup_parent = f"fastpath-cni-{tag}"
        self.anchor: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.runs: dict[str, subprocess.Popen] = {}
        os.makedirs(self.conf_dir)

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> "Containerd":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.anchor = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.node_netns}", "unshare", "--mount",
             "--propagation", "private", "sh", "-c",
             _anchor_script(self.root, self.conf_dir, self.bin_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.anchor.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"mount namespace set-up failed: {self.anchor.stderr.read()}")
        Path(f"{self.root}/config.toml").write_text(f"""\
version = 2
root = "{self.root}/lib"
state = "{self.root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
        self.log = open(f"{self.root}/containerd.log", "wb")
        self.daemon = subprocess.Popen(self._enter("containerd", "--config",
                                                   f"{self.root}/config.toml"),
                                       stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not start:\n" + self.log_tail())
            time.sleep(0.1)
        tar = f"{self.root}/busybox-oci.tar"
        build_busybox_image(tar)
        self.ctr("images", "import", tar)

    def close(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for proc in self.runs.values():
            _wait_or_kill(proc, 15)
        if self.daemon and self.daemon.poll() is None:
            for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "delete", "-f", cid, check=False)
                self.ctr("containers", "delete", cid, check=False)
        if self.daemon:
            self.daemon.send_signal(signal.SIGTERM)
            _wait_or_kill(self.daemon, 10)
        for pid in self._our_pids():      # shims, and anything else that names our root
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.anchor:
            _wait_or_kill(self.anchor, 0)
        for d in sorted(glob.glob(f"/sys/fs/cgroup/*/{self.cgroup_parent}/**/", recursive=True),
                        key=len, reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass
        subprocess.run(["rm", "-rf", self.root], check=False)

    def _our_pids(self) -> list[int]:
        me = str(self.root).encode()
        pids = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if me in f.read():
                        pids.append(int(p))
            except OSError:
                continue
        return [p for p in pids if p != os.getpid()]

    def log_tail(self, n: int = 3000) -> str:
        try:
            return Path(f"{self.root}/containerd.log").read_text()[-n:]
        except OSError:
            return ""

    # -- commands ---------------------------------------------------------------
    def _enter(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.anchor.pid), "-m", "-n", *cmd]

    def enter(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the harness's mount and network namespaces."""
        r = subprocess.run(self._enter(*cmd), capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def _ctr(self, *args: str) -> list[str]:
        return self._enter("ctr", "--address", self.socket, "--namespace", NAMESPACE, *args)

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(self._ctr(*args), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def write_conflist(self, conflist: dict, name: str = "10-terway.conflist") -> None:
        for old in os.listdir(self.conf_dir):
            os.unlink(os.path.join(self.conf_dir, old))
        Path(self.conf_dir, name).write_text(json.dumps(conflist, indent=2))

    def run_pod(self, name: str, *cmd: str) -> subprocess.Popen:
        """`ctr run --rm --cni` in the foreground, as its own process: it
        runs CNI ADD before the task starts and CNI DEL after it exits."""
        proc = subprocess.Popen(self._ctr("run", "--rm", "--cni", "--null-io",
                                          "--cgroup", f"/{self.cgroup_parent}/{name}",
                                          IMAGE, name, *(cmd or ("/bin/busybox", "sleep", "300"))),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.runs[name] = proc
        return proc

    def cni_container_id(self, name: str) -> str:
        """The CNI_CONTAINERID ctr gives a container: "<namespace>-<id>"."""
        return f"{NAMESPACE}-{name}"

    def exec(self, name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        exec_id = f"x{time.monotonic_ns() % 10**9}"
        return self.ctr("tasks", "exec", "--exec-id", exec_id, name, *cmd, timeout=timeout)

    def stop_pod(self, name: str, timeout: float = 30) -> tuple[int, str]:
        """Kill the task; the foreground `ctr run` then deletes the network
        (DEL with an empty CNI_NETNS) and the container. Returns its exit
        status and stderr."""
        self.ctr("tasks", "kill", "-s", "SIGKILL", name)
        proc = self.runs.pop(name)
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err


def _wait_or_kill(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
