"""fastpath's files on a node: the init step installs fastpath-cni and the
conflist with a record of what was there; uninstall puts back exactly that
and removes only what fastpath wrote. A node is a temporary directory here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.daemon.nodeinstall import (RECORD, FileReport, InstallError, install_cni, uninstall_cni,
                               uninstall_state)

DEPLOY_CONFLIST = Path(__file__).resolve().parents[2] / "deploy" / "10-terway.conflist"

# What Terway writes for DataPath V2 before fastpath replaces its agent.
TERWAY_CONFLIST = json.dumps({
    "cniVersion": "0.4.0", "name": "terway-chainer",
    "plugins": [{"type": "terway", "eniip_virtual_type": "datapathv2",
                 "host_stack_cidrs": ["169.254.20.10/32"]},
                {"type": "cilium-cni", "enable-debug": False}]}, indent=4) + "\n"


def digest_tree(root: Path) -> dict[str, str]:
    """Every file under root with its content hash (and symlinks' targets)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def node(tmp_path):
    """A node's CNI directories with Terway's conflist, another network's
    conflist and another plugin."""
    bin_dir, conf_dir = tmp_path / "opt/cni/bin", tmp_path / "etc/cni/net.d"
    bin_dir.mkdir(parents=True)
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-terway.conflist").write_text(TERWAY_CONFLIST)
    (conf_dir / "99-other.conflist").write_text('{"cniVersion":"1.0.0","name":"x","plugins":[]}')
    (bin_dir / "terway").write_bytes(b"\x7fELF not really")
    (bin_dir / "terway").chmod(0o755)
    return tmp_path


def install(node: Path, conflist: Path = DEPLOY_CONFLIST) -> list[str]:
    return install_cni(str(conflist), bin_dir=str(node / "opt/cni/bin"),
                       conf_dir=str(node / "etc/cni/net.d"))


def uninstall(node: Path) -> FileReport:
    report = FileReport()
    uninstall_cni(conf_dir=str(node / "etc/cni/net.d"), report=report)
    return report


def test_install_then_uninstall_leaves_the_node_exactly_as_before(node):
    before = digest_tree(node)
    install(node)
    conf = node / "etc/cni/net.d/10-terway.conflist"
    assert json.loads(conf.read_text()) == json.loads(DEPLOY_CONFLIST.read_text())
    plugin = node / "opt/cni/bin/fastpath-cni"
    assert plugin.stat().st_mode & 0o111
    record = json.loads((node / "etc/cni/net.d" / RECORD).read_text())
    assert record["previous"] == TERWAY_CONFLIST
    report = uninstall(node)
    assert digest_tree(node) == before
    assert report.restored == [str(conf)]
    assert str(plugin) in report.removed and not report.kept


def test_an_upgrade_keeps_the_original_to_restore(node, tmp_path):
    install(node)
    newer = tmp_path / "newer" / "10-terway.conflist"
    newer.parent.mkdir()
    data = json.loads(DEPLOY_CONFLIST.read_text())
    data["plugins"][1]["log_level"] = "debug"
    newer.write_text(json.dumps(data))
    install(node, newer)                          # the next release's init step
    install(node, newer)                          # and a restart of it
    assert json.loads((node / "etc/cni/net.d/10-terway.conflist").read_text()) == data
    uninstall(node)
    assert (node / "etc/cni/net.d/10-terway.conflist").read_text() == TERWAY_CONFLIST


def test_a_conflist_rewritten_after_install_loses_only_the_fastpath_entry(node):
    install(node)
    conf = node / "etc/cni/net.d/10-terway.conflist"
    data = json.loads(conf.read_text())
    data["plugins"].append({"type": "portmap", "capabilities": {"portMappings": True}})
    conf.write_text(json.dumps(data))             # an operator added a plugin
    report = uninstall(node)
    left = json.loads(conf.read_text())
    assert [p["type"] for p in left["plugins"]] == ["terway", "portmap"]
    assert report.edited and not report.restored


def test_a_node_without_a_previous_conflist_gets_it_removed(node):
    (node / "etc/cni/net.d/10-terway.conflist").unlink()
    install(node)
    uninstall(node)
    assert not (node / "etc/cni/net.d/10-terway.conflist").exists()
    assert (node / "etc/cni/net.d/99-other.conflist").exists()


def test_without_an_install_record_nothing_is_touched(node):
    install(node)
    (node / "etc/cni/net.d" / RECORD).unlink()    # installed by hand, say
    before = digest_tree(node)
    report = uninstall(node)
    assert digest_tree(node) == before
    assert report.kept and "no .fastpath-install record" in report.kept[0]


def test_a_replaced_plugin_binary_is_not_deleted(node):
    install(node)
    plugin = node / "opt/cni/bin/fastpath-cni"
    plugin.write_bytes(b"#!/bin/sh\n# someone else's fastpath-cni\n")
    report = uninstall(node)
    assert plugin.exists()
    assert any("not the file fastpath's installer writes" in k for k in report.kept)


def test_install_refuses_a_conflist_without_fastpath(node, tmp_path):
    bad = tmp_path / "bad.conflist"
    bad.write_text(TERWAY_CONFLIST)
    with pytest.raises(InstallError, match="fastpath-cni plugin entry"):
        install(node, bad)
    assert not (node / "etc/cni/net.d" / RECORD).exists()


def test_state_dir_loses_fastpaths_files_and_keeps_others(tmp_path):
    sd = tmp_path / "run/fastpath"
    (sd / "endpoints").mkdir(parents=True)
    (sd / "endpoints" / "c1-eth0.json").write_text("{}")
    (sd / "cni-del-queue").mkdir()
    (sd / "agent-starts").write_text("3\n")
    (sd / "cni.log").write_text("x\n")
    report = FileReport()
    uninstall_state(str(sd), str(sd / "agent.sock"), report=report)
    assert not sd.exists()
    (sd / "endpoints").mkdir(parents=True)
    (sd / "notes.txt").write_text("an operator's file")
    report = FileReport()
    uninstall_state(str(sd), str(sd / "agent.sock"), report=report)
    assert sorted(p.name for p in sd.iterdir()) == ["notes.txt"]
    assert report.kept == [f"{sd}: not fastpath's, left: notes.txt"]
