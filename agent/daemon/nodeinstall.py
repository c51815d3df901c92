"""fastpath's files on a node: the CNI plugin, its conflist, the state dir.

`install_cni` is the DaemonSet's init step; `uninstall_files` is the file
half of `fastpath uninstall` (agent/datapath/uninstall.py is the kernel half).

Only what fastpath installed is removed, and the install leaves a record to
know it by: `<cni conf dir>/.fastpath-install` (JSON; no .conf/.conflist/
.json suffix, so runtimes never read it as a network configuration). It
holds the conflist fastpath wrote (its SHA-256) and the file that was there
before, if any. Uninstall then:
  - conflist unchanged since fastpath wrote it: put the previous one back
    (or delete it if there was none);
  - conflist changed since (Terway or an operator rewrote it): only the
    fastpath-cni entry is taken out of its chain, the rest is left;
  - plugin binary: deleted if it is the file chainer/install.py writes (its
    header says so), left otherwise;
  - without a record (fastpath-cni was installed by hand): neither is touched.
State dir: the agent's endpoint records, the queued CNI deletions, the start
counter, the API socket and the CNI log are removed, then the directory if
nothing else is in it.

Paths are the node's; `host_root` is where the node's / is mounted when this
runs in a container (the init container mounts it at /host).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

RECORD = ".fastpath-install"
PLUGIN_TYPE = "fastpath-cni"
# The second line of every file chainer/install.py writes.
PLUGIN_HEADER = b"# fastpath-cni, written by `python3 -m chainer.install`"
STATE_DIRS = ("endpoints", "cni-del-queue")
STATE_FILES = ("agent-starts", "agent-starts.tmp", "cni.log", "cni.log.1")


class InstallError(RuntimeError):
    pass


@dataclass
class FileReport:
    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"removed": self.removed, "restored": self.restored, "edited": self.edited,
                "kept": self.kept}


def _on_host(host_root: str | None, path: str) -> Path:
    return Path(host_root or "/") / path.lstrip("/")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_record(conf_dir: Path) -> dict | None:
    try:
        return json.loads((conf_dir / RECORD).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise InstallError(f"{conf_dir / RECORD} is not valid JSON: fix or delete it") from None


def check_conflist(text: str, origin: str) -> dict:
    try:
        conf = json.loads(text)
    except ValueError as exc:
        raise InstallError(f"{origin}: not valid JSON: {exc}") from None
    plugins = conf.get("plugins") if isinstance(conf, dict) else None
    if not isinstance(plugins, list) or not any(
            isinstance(p, dict) and p.get("type") == PLUGIN_TYPE for p in plugins):
        raise InstallError(f"{origin}: a conflist with a {PLUGIN_TYPE} plugin entry is expected")
    return conf


def install_cni(conflist: str, *, bin_dir: str = "/opt/cni/bin", conf_dir: str = "/etc/cni/net.d",
                python: str = "/usr/bin/python3", host_root: str | None = None) -> list[str]:
    """Install fastpath-cni and the conflist; record what was there before."""
    from chainer import install as plugin_install
    text = Path(conflist).read_text()
    check_conflist(text, conflist)
    done = []
    try:
        plugin = plugin_install.install(_on_host(host_root, bin_dir), python,
                                        host_root=host_root or None)
    except plugin_install.InstallError as exc:
        raise InstallError(str(exc)) from None
    done.append(f"installed {plugin}")
    cdir = _on_host(host_root, conf_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    target = cdir / Path(conflist).name
    record = _read_record(cdir)
    current = target.read_text() if target.exists() else None
    if record and current is not None and _sha(current) == record.get("written_sha256"):
        previous = record.get("previous")      # an upgrade of our own file
    elif record and current == text:
        previous = record.get("previous")
    else:
        previous = current
    if current != text:
        _write_atomic(target, text)
        done.append(f"wrote {target}" + (" (previous content recorded)" if previous else ""))
    else:
        done.append(f"{target} already up to date")
    rec = {"version": 1, "plugin": str(Path(bin_dir) / plugin.name),
           "conflist": str(Path(conf_dir) / target.name),
           "written_sha256": _sha(text), "previous": previous}
    _write_atomic(cdir / RECORD, json.dumps(rec, indent=1) + "\n", 0o600)
    return done


def _is_installed_plugin(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.readline()
            return f.readline().startswith(PLUGIN_HEADER)
    except OSError:
        return False


def uninstall_cni(*, conf_dir: str = "/etc/cni/net.d", host_root: str | None = None,
                  report: FileReport) -> None:
    cdir = _on_host(host_root, conf_dir)
    record = _read_record(cdir)
    if record is None:
        report.kept.append(f"{cdir}: no {RECORD} record, so the CNI plugin and conflist were "
                           "not installed by fastpath's init step; left as they are")
        return
    target = _on_host(host_root, record["conflist"])
    if target.exists():
        current = target.read_text()
        if _sha(current) == record["written_sha256"]:
            if record.get("previous") is None:
                target.unlink()
                report.removed.append(str(target))
            else:
                _write_atomic(target, record["previous"])
                report.restored.append(str(target))
        else:
            try:
                conf = json.loads(current)
                plugins = conf.get("plugins", [])
                kept = [p for p in plugins if not (isinstance(p, dict)
                                                   and p.get("type") == PLUGIN_TYPE)]
            except (ValueError, AttributeError):
                conf, plugins, kept = None, [], []
            if conf is not None and len(kept) < len(plugins):
                conf["plugins"] = kept
                _write_atomic(target, json.dumps(conf, indent=2) + "\n")
                report.edited.append(f"{target}: removed the {PLUGIN_TYPE} entry (the file was "
                                     "changed after fastpath wrote it; the rest is kept)")
            else:
                report.kept.append(f"{target}: changed since fastpath wrote it and has no "
                                   f"{PLUGIN_TYPE} entry")
    plugin = _on_host(host_root, record["plugin"])
    if plugin.exists():
        if _is_installed_plugin(plugin):
            plugin.unlink()
            report.removed.append(str(plugin))
        else:
            report.kept.append(f"{plugin}: not the file fastpath's installer writes")
    (cdir / RECORD).unlink()
    report.removed.append(str(cdir / RECORD))


def uninstall_state(state_dir: str, api_socket: str, *, host_root: str | None = None,
                    report: FileReport, other_sockets: tuple[str, ...] = ()) -> None:
    """The agent's sockets (API, gRPC), then its state dir's content."""
    for path in (api_socket, *other_sockets):
        sock = _on_host(host_root, path)
        if sock.is_socket():
            sock.unlink()
            report.removed.append(str(sock))
    sdir = _on_host(host_root, state_dir)
    if not sdir.is_dir():
        return
    for name in STATE_DIRS:
        if (sdir / name).is_dir():
            shutil.rmtree(sdir / name)
            report.removed.append(str(sdir / name) + "/")
    for name in STATE_FILES:
        if (sdir / name).is_file():
            (sdir / name).unlink()
            report.removed.append(str(sdir / name))
    rest = sorted(p.name for p in sdir.iterdir())
    if rest:
        report.kept.append(f"{sdir}: not fastpath's, left: {', '.join(rest)}")
        return
    try:
        sdir.rmdir()
        report.removed.append(str(sdir) + "/")
    except OSError as exc:
        # e.g. a mount point (a hostPath of the state dir itself): emptied
        report.kept.append(f"{sdir}: emptied, not removed ({exc.strerror})")


__all__ = ["FileReport", "InstallError", "install_cni", "uninstall_cni", "uninstall_state",
           "check_conflist", "RECORD"]
