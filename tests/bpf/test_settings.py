"""The programs' runtime settings (fp_config) and the monitor's event bits
(fp_monitor): several writers, none may lose another's change."""
import sys
import threading

from agent.cli.monitor import EventBits
from agent.model.bpfdefs import load as load_defs

DEFS = load_defs()
F = DEFS.defines


def test_concurrent_writers_of_the_settings_keep_each_others_fields(dp):
    """Socket-LB (the main thread at start), the node's address (the
    service thread), policy and bandwidth (their own threads) each
    read-modify-write the one entry. Threads switching as often as the
    interpreter allows, every round must end with every writer's field."""
    before = dp.settings.get()
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    lost = []
    try:
        for rnd in range(60):
            dp.settings.set(socket_lb=False, hostns_only=False, host_netns_cookie=0)
            dp.settings.set_node("", 0)
            dp.settings.set_policy(False)
            dp.settings.set_bandwidth(False)
            go = threading.Barrier(4)

            def run(fn, *a, **kw):
                go.wait()
                for _ in range(20):
                    fn(*a, **kw)
            writers = [
                threading.Thread(target=run, args=(dp.settings.set,),
                                 kwargs=dict(socket_lb=True, hostns_only=True,
                                             host_netns_cookie=4242)),
                threading.Thread(target=run, args=(dp.settings.set_node, "10.1.2.3", 7, "2001:db8::3")),
                threading.Thread(target=run, args=(dp.settings.set_policy, True)),
                threading.Thread(target=run, args=(dp.settings.set_bandwidth, True),
                                 kwargs=dict(edt=True)),
            ]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            got = dp.settings.get()
            want_flags = (F["FP_CFG_F_SOCKLB"] | F["FP_CFG_F_SOCKLB_HOSTNS"] | F["FP_CFG_F_POLICY"]
                          | F["FP_CFG_F_BW"] | F["FP_CFG_F_BW_EDT"])
            if (got["flags"] != want_flags or got["host_netns_cookie"] != 4242
                    or got["node_ip4"] != "10.1.2.3" or got["primary_ifindex"] != 7
                    or got["node_ip6"] != "2001:db8::3"):
                lost.append((rnd, got))
    finally:
        sys.setswitchinterval(old_switch)
        dp.settings.set(socket_lb=bool(before["flags"] & F["FP_CFG_F_SOCKLB"]),
                        hostns_only=bool(before["flags"] & F["FP_CFG_F_SOCKLB_HOSTNS"]),
                        host_netns_cookie=before["host_netns_cookie"])
        dp.settings.set_node(before["node_ip4"], before["primary_ifindex"], before["node_ip6"])
        dp.settings.set_policy(bool(before["flags"] & F["FP_CFG_F_POLICY"]))
        dp.settings.set_bandwidth(bool(before["flags"] & F["FP_CFG_F_BW"]),
                                  edt=bool(before["flags"] & F["FP_CFG_F_BW_EDT"]))
    assert not lost, f"{len(lost)} of 60 rounds lost a writer's change, first: {lost[0]}"


def test_the_monitor_writes_its_own_map_and_never_the_agents_settings(dp):
    """`fastpath monitor` runs in another process, so a lock cannot order
    it with the agent: it must not touch fp_config at all, and the agent's
    writes must not touch the monitor's bits. The monitor's map is opened
    through the pins, as the CLI opens it."""
    from agent.datapath import pinned, tables
    from agent.datapath.maps import MAP
    from agent.inspect import decode
    cfg = dp.tables[MAP["FP_MAP_CONFIG"]]
    raw = lambda: bytes(cfg[cfg.Key(0)])             # noqa: E731
    maps = pinned.open_maps(dp.config.bpffs_root)
    dp.settings.set_policy(True)
    try:
        before = raw()
        bits = F["FP_MON_EV_TRACE"] | F["FP_MON_EV_POLICY"]
        mon = maps[MAP["FP_MAP_MONITOR"]]
        schema, key, value = tables.map_schema(mon.fd)     # as the CLI: the map's own BTF
        with EventBits(mon, decode.Layout.of_schema(mon.name, key, value, schema), bits):
            assert dp.monitor.events() == bits
            assert raw() == before
            dp.settings.set_policy(False)            # the agent, meanwhile
            assert dp.monitor.events() == bits
            dp.settings.set_policy(True)
        assert dp.monitor.events() == 0
        assert raw() == before
    finally:
        dp.settings.set_policy(False)
        for m in maps.values():
            m.close()
