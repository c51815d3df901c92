"""The vm-tests' pool of program sets (agent.sim.setpool): a set an agent
leaves behind reaches a later agent only once nothing can touch it any
more, and then as empty as a fresh build leaves it."""
from __future__ import annotations

import os
import subprocess
import sys

from agent.datapath import libbpf, loader
from agent.datapath.maps import MAP
from agent.datapath.ringbuf import RingReader
from agent.sim import setpool
from agent.sim.agent import sim_attach
from agent.sim.traffic import tcp_exchange
from agent.sim.world import World


def contents(pin_root: str) -> dict[str, int]:
    """Per pinned map: entries (hashes, LRUs, tries, filled tail-call
    slots), array slots not all zero, or unread ring records."""
    out = {}
    for name in sorted(os.listdir(pin_root)):
        if name == "progs":
            continue
        fd = libbpf.obj_get(os.path.join(pin_root, name))
        try:
            info = libbpf.map_info(fd)
            if info.type == libbpf.BPF_MAP_TYPE_RINGBUF:
                ring = RingReader(fd)
                try:
                    out[name] = len(ring.poll(0))
                finally:
                    ring.close()
                continue
            items = libbpf.map_items_raw(fd, info.key_size,
                                         libbpf.value_buffer_size(info.type, info.value_size))
            if info.type in (2, 6):          # arrays: every slot is there, zero or not
                out[name] = sum(1 for _, v in items if any(v))
            else:
                out[name] = sum(1 for _ in items)
        finally:
            os.close(fd)
    return out


def test_a_set_left_by_an_agent_goes_on_only_when_untouchable_and_empty(program_sets):
    pool = program_sets
    with World() as w:
        node = w.add_node("n1", enis=1)
        a, b = node.add_pod("a"), node.add_pod("b")
        with sim_attach(node):
            assert tcp_exchange(a, b, ip=b.ip, request="hi", reply="ho") == ("hi", "ho")
        left = [s for _, s in pool._ready if s.used_in == (node.netns,)]
        assert len(left) == 1, "the agent's set was given back"
        s = left[0]
        used = contents(s.pin_root)
        assert used[MAP["FP_MAP_ENDPOINTS"]] == 2, used
        assert used[MAP["FP_MAP_COUNTERS"]] > 0 and used[MAP["FP_MAP_TAILS"]] > 0, used
        # the node's netns still exists (its filters may run): not handed out
        assert not setpool._released(s)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, time; from agent.datapath import libbpf; "
             f"fd = libbpf.obj_get({os.path.join(s.pin_root, MAP['FP_MAP_CT'])!r}); "
             "print('open', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "open"
        # the world is gone, but a process still holds one of its maps
        assert not setpool._released(s)
    finally:
        holder.kill()
        holder.wait()
    assert setpool._released(s)
    setpool._empty(s)
    assert set(contents(s.pin_root).values()) == {0}, contents(s.pin_root)


def test_a_set_with_anything_beside_what_a_build_leaves_is_not_kept(program_sets):
    """A pin a build does not make (here a map set aside as an upgrade
    leaves it, `<name>_old`) means the set is not one a build would
    give: it goes with its paths, it is never handed on."""
    import ctypes as ct
    with World() as w:
        node = w.add_node("n1", enis=1)
        node.add_pod("a")
        with sim_attach(node) as agent:
            lib = libbpf.lib()
            lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                           ct.c_uint32, ct.c_void_p]
            fd = lib.bpf_map_create(1, b"fp_leftover", 4, 4, 1, None)
            assert fd >= 0
            try:
                loader.pin_fd(fd, os.path.join(agent.config.bpffs_root,
                                               MAP["FP_MAP_ENDPOINTS"] + "_old"))
            finally:
                os.close(fd)
        assert not [s for _, s in program_sets._ready if s.used_in == (node.netns,)]
