"""The datapath machinery against the real kernel: tc attach semantics,
pinned maps across agent restarts, layout migration, and the errors an
operator sees."""
from __future__ import annotations

import ctypes as ct
import os
import subprocess

import pytest

from agent.config import Config
from agent.datapath import ATTACH, Datapath, libbpf, loader, tc
from agent.datapath.errors import (DatapathError, InterfaceNotFound, MissingKernelHeaders,
                                   NotPrivileged, VerifierRejected)
from agent.datapath.libbpf import lib, map_info
from agent.datapath.maps import MAP
from agent.datapath.netlink import link_names
from agent.model.endpoint import Endpoint


def _veth(netns, name="caliT"):
    ns = netns("tc")
    subprocess.run(f"ip -n {ns} link add {name} type veth peer name peerT", shell=True, check=True)
    subprocess.run(f"ip -n {ns} link set {name} up", shell=True, check=True)
    return ns


def _foreign_filter(ns, dev: str, prio: int):
    """A tc program that is not fastpath's (other_prog, TC_ACT_UNSPEC) on
    `dev`'s ingress at `prio`; returns it (keep it alive while it matters)."""
    from bcc import BPF
    other = BPF(text="int other_prog(struct __sk_buff *skb) { return -1; }")
    fn = other.load_func("other_prog", BPF.SCHED_CLS)
    tc.attach(dev, "ingress", fn.fd, "other_prog", prio, ns)
    return other, fn


def test_attaching_twice_leaves_exactly_one_filter_per_direction(dp, netns):
    ns = _veth(netns)
    dp.netns, saved = ns, dp.netns
    try:
        dp.attach("caliT", "pod")
        dp.attach("caliT", "pod")
        fl = tc.list_filters("caliT", ns)
        assert sorted((f.direction, f.name, f.prio) for f in fl) == [
            ("egress", "fp_to_pod", 25000), ("ingress", "fp_from_pod", 25000)]
    finally:
        dp.netns = saved


def test_detach_removes_only_fastpaths_filters_and_keeps_a_busy_clsact(dp, netns):
    ns = _veth(netns)
    other, fn = _foreign_filter(ns, "caliT", 100)
    tc.attach("caliT", "ingress", dp.prog_fd("fp_from_pod"), "fp_from_pod", 25000, ns)
    removed = tc.detach("caliT", 25000, ns)
    assert [f.name for f in removed] == ["fp_from_pod"]
    assert [f.name for f in tc.list_filters("caliT", ns)] == ["other_prog"]
    qdiscs = subprocess.run(f"tc -n {ns} qdisc show dev caliT", shell=True,
                            capture_output=True, text=True).stdout
    assert "clsact" in qdiscs


def test_a_foreign_filter_at_our_priority_is_an_error_not_overwritten(dp, netns):
    ns = _veth(netns)
    other, fn = _foreign_filter(ns, "caliT", 25000)
    with pytest.raises(DatapathError, match="priority 25000 is taken by a foreign filter"):
        tc.attach("caliT", "ingress", dp.prog_fd("fp_from_pod"), "fp_from_pod", 25000, ns)
    assert [f.name for f in tc.list_filters("caliT", ns)] == ["other_prog"]


def test_attaching_to_a_missing_interface_names_it(dp, netns):
    ns = netns("tc")
    with pytest.raises(InterfaceNotFound, match="'cali404' not found in netns"):
        tc.attach("cali404", "ingress", dp.prog_fd("fp_from_pod"), "fp_from_pod", 25000, ns)


def test_the_raw_filter_reader_sees_what_pyroute2_sees(dp, netns):
    ns = _veth(netns)
    other, fn = _foreign_filter(ns, "caliT", 100)
    tc.attach("caliT", "egress", dp.prog_fd("fp_to_pod"), "fp_to_pod", 25000, ns)
    idx = {n: i for i, n in link_names(ns).items()}["caliT"]
    reader = tc.FilterReader(ns)
    try:
        got = reader.filters(idx, "caliT")
        # pyroute2 leaves the program id out (TCA_BPF_ID undecoded): the rest agrees
        plain = lambda fl: sorted((f.ifname, f.ifindex, f.direction, f.prio, f.handle, f.name)
                                  for f in fl)
        assert plain(got) == plain(tc.list_filters("caliT", ns))
        assert {(f.direction, f.name, f.prio, f.prog_id) for f in got} == {
            ("ingress", "other_prog", 100, libbpf.prog_info(fn.fd).id),
            ("egress", "fp_to_pod", 25000, libbpf.prog_info(dp.prog_fd("fp_to_pod")).id)}
        assert reader.filters(999999, "gone") == [], "a missing device has no filters"
    finally:
        reader.close()


def test_ensure_attaches_once_and_then_leaves_the_same_programs_alone(dp, netns):
    """A restart's restore: veths already running the very programs are not
    rewritten; a foreign filter at our priority is reported, not replaced;
    a device that is gone is reported by name."""
    ns = _veth(netns)
    subprocess.run(f"ip -n {ns} link add caliU type veth peer name peerU", shell=True, check=True)
    other, fn = _foreign_filter(ns, "caliU", 25000)
    links = {n: i for i, n in link_names(ns).items()}
    progs = {d: (dp.prog_fd(p), p) for d, p in ATTACH["pod"].items()}
    devices = [(links["caliT"], "caliT", progs), (links["caliU"], "caliU", progs),
               (999999, "caliGone", progs)]
    written, failed = tc.ensure(devices, 25000, ns)
    assert written == 2
    assert [(i, type(e).__name__) for i, e in failed] == [
        (links["caliU"], "DatapathError"), (999999, "InterfaceNotFound")]
    assert "taken by a foreign filter" in str(failed[0][1]) and "caliGone" in str(failed[1][1])
    ids = {f.direction: f.prog_id for f in tc.list_filters("caliT", ns)}
    written, _ = tc.ensure(devices[:1], 25000, ns)
    assert written == 0, "the same programs are left as they are"
    assert {f.direction: f.prog_id for f in tc.list_filters("caliT", ns)} == ids
    assert [f.name for f in tc.list_filters("caliU", ns)] == ["other_prog"]


def _cfg(root, **kw):
    return Config.defaults().replace(bpffs_root=root, **kw)


def test_a_restarted_datapath_reuses_pinned_maps_and_their_entries(bpffs):
    root = f"{bpffs}/restart"
    ep = Endpoint("10.9.0.1", "caliX", 7, "02:00:00:00:00:01", "02:00:00:00:00:02", "eth1", 3)
    first = Datapath(_cfg(root)).load()
    first.maps.endpoint_put(ep)
    first.close()
    second = Datapath(_cfg(root)).load()
    try:
        assert [e.ip for e in second.maps.endpoints()] == ["10.9.0.1"]
        assert second.migration_notes == []
    finally:
        second.close()


def test_a_resized_map_is_migrated_with_its_entries(bpffs):
    root = f"{bpffs}/resize"
    ep = Endpoint("10.9.0.2", "caliY", 8, "02:00:00:00:00:03", "02:00:00:00:00:04")
    first = Datapath(_cfg(root)).load()
    first.maps.endpoint_put(ep)
    first.close()
    second = Datapath(_cfg(root, endpoints_map_size=32768)).load()
    try:
        note = [n for n in second.migration_notes if "fp_ep4_v1" in n]
        assert len(note) == 1 and "max 16384 (compiled 32768)" in note[0], note
        assert "migrated 1 entries field by field" in note[0]
        info = map_info(second.module.table("fp_ep4_v1").map_fd)
        assert info.max_entries == 32768
        assert [e.ip for e in second.maps.endpoints()] == ["10.9.0.2"]
        assert sorted(os.listdir(root)) == sorted(loader.pinned_map_names() + [loader.PROG_DIR]), \
            "the map set aside is gone once migrated"
    finally:
        second.close()


def test_a_pinned_map_with_another_layout_is_replaced_never_reused(bpffs):
    root = f"{bpffs}/layout"
    os.makedirs(root)
    # an impostor: same name, a value 4 bytes shorter than struct fp_endpoint,
    # and no BTF: its layout cannot be known, so nothing is carried over
    lb = lib()
    lb.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                  ct.c_uint32, ct.c_void_p]
    lb.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    fd = lb.bpf_map_create(1, b"fp_ep4_v1", 4, 24, 16, None)
    assert fd >= 0
    assert lb.bpf_obj_pin(fd, f"{root}/fp_ep4_v1".encode()) == 0
    os.close(fd)
    # and a pin of an older layout version, and one of a lineage gone
    fd = lb.bpf_map_create(1, b"fp_ep4_v0", 4, 24, 16, None)
    assert lb.bpf_obj_pin(fd, f"{root}/fp_ep4_v0".encode()) == 0
    assert lb.bpf_obj_pin(fd, f"{root}/fp_gone_v3".encode()) == 0
    os.close(fd)
    d = Datapath(_cfg(root)).load()
    try:
        notes = d.migration_notes
        assert any("fp_ep4_v1_old" in n and "layout unknown (no BTF)" in n and
                   "rebuilt from agent state" in n for n in notes), notes
        assert any("fp_ep4_v0: superseded by fp_ep4_v1" in n for n in notes), notes
        assert any("removed stale pinned map fp_gone_v3" in n for n in notes), notes
        assert map_info(d.module.table("fp_ep4_v1").map_fd).value_size == 28
        assert sorted(os.listdir(root)) == sorted(loader.pinned_map_names() + [loader.PROG_DIR])
    finally:
        d.close()


def test_errors_say_what_is_wrong_and_how_to_fix_it(bpffs, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NotPrivileged, match="needs root"):
        loader.preflight(f"{bpffs}/x")
    monkeypatch.undo()
    import platform
    monkeypatch.setattr(platform, "release", lambda: "0.0.0-no-such-kernel")
    with pytest.raises(MissingKernelHeaders, match="make setup"):
        loader.preflight(f"{bpffs}/x")
    monkeypatch.undo()
    with pytest.raises(DatapathError, match="not on a bpf filesystem"):
        loader.preflight(str(tmp_path / "fastpath"))


def test_a_verifier_rejection_names_the_program_and_shows_the_log(bpffs, monkeypatch):
    from bcc import BPF
    bad = BPF(text="""
        int fp_bad(struct __sk_buff *skb) {
            char *p = (char *)(long)skb->data;
            return p[100];    /* unchecked packet access */
        }""")
    monkeypatch.setattr(loader, "PROGRAMS", {"fp_bad": ("bad.c", loader.SCHED_CLS, -1)})
    module = loader.Loaded(bad, None)
    with pytest.raises(VerifierRejected) as exc:
        module.load_programs()
    assert exc.value.program == "fp_bad"
    assert "invalid access to packet" in exc.value.log_tail


def test_a_resized_per_cpu_map_is_migrated_with_its_counts(bpffs):
    """Per-CPU values are one slot per possible CPU: the migration must read
    and write all of them (a one-slot buffer would be overrun)."""
    root = f"{bpffs}/resize-percpu"
    first = Datapath(_cfg(root)).load()
    t = first.module.table(MAP["FP_MAP_COUNTERS"])
    key = t.Key(ifindex=7, reason=0, dir=0)
    vals = t.Leaf()
    for i in range(len(vals)):
        vals[i].packets, vals[i].bytes = i + 1, 100 * (i + 1)
    t[key] = vals
    first.close()
    second = Datapath(_cfg(root, counters_map_size=32768)).load()
    try:
        rows = [r for r in second.maps.counters() if r.ifindex == 7]
        n = len(vals)
        assert [(r.packets, r.bytes) for r in rows] == [(n * (n + 1) // 2, 100 * n * (n + 1) // 2)]
    finally:
        second.close()


def test_lo_accept_local_is_set_by_rtnetlink_where_proc_sys_is_read_only(netns):
    """The agent's container has /proc/sys read-only; the one setting the
    agent owns (bpf/lib/lo.h) is set by rtnetlink, and nothing else of the
    device changes."""
    import sys
    ns = netns("lo")

    def lo_conf() -> dict[str, str]:
        out = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-a", "-r",
                              r"^net\.ipv4\.conf\.lo\."], capture_output=True, text=True,
                             check=True).stdout
        return dict(line.split(" = ", 1) for line in out.splitlines())

    before = lo_conf()
    assert before["net.ipv4.conf.lo.accept_local"] == "0"
    setter = (
        "import errno\n"
        "from agent.datapath.nsenter import in_netns\n"
        "from agent.datapath.node import LOOPBACK_IFINDEX, LO_ACCEPT_LOCAL\n"
        "from agent.datapath.netlink import set_ipv4_devconf\n"
        f"with in_netns({ns!r}):\n"
        "    try:\n"
        "        open('/proc/sys/net/ipv4/conf/lo/accept_local', 'w').write('1')\n"
        "        raise SystemExit('/proc/sys is writable: the test proves nothing')\n"
        "    except OSError as exc:\n"
        "        assert exc.errno == errno.EROFS, exc\n"
        f"set_ipv4_devconf(LOOPBACK_IFINDEX, LO_ACCEPT_LOCAL, 1, {ns!r})\n")
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        "mount --make-rprivate / && mount --bind /proc/sys /proc/sys && "
                        "mount -o remount,bind,ro /proc/sys && exec \"$0\" -c \"$1\"",
                        sys.executable, setter], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 0, r.stdout + r.stderr
    after = lo_conf()
    assert after.pop("net.ipv4.conf.lo.accept_local") == "1"
    before.pop("net.ipv4.conf.lo.accept_local")
    assert after == before
