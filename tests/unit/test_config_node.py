"""The node agent's configuration: DataPath V2's settings, their validation,
the precedence of sources, and Terway's eni-config in its three modes."""
from __future__ import annotations

import contextlib
import json
import logging
import re

import pytest
import yaml

from agent import config as C
from agent.config import KEYS, KEYS_BY_NAME, Config, ConfigError

# DataPath V2's policy-container flags (the seed's cilium-agent command line)
# and the key that mirrors each, with the value both must have by default.
DATAPATH_V2 = {
    "routing-mode=native": ("routing_mode", "native"),
    "enable-ipv4-masquerade=false": ("masquerade", False),
    "kube-proxy-replacement=true": ("kube_proxy_replacement", True),
    "bpf-lb-sock=true": ("socket_lb", True),
    "bpf-lb-sock-hostns-only=true": ("socket_lb_hostns_only", True),
    "enable-node-port=true": ("node_port", True),
    "enable-host-port=true": ("host_port", True),
    "enable-external-ips=true": ("external_ips", True),
    "enable-endpoint-routes=true": ("endpoint_routes", True),
    "enable-session-affinity=true": ("session_affinity", True),
    "enable-service-topology=true": ("service_topology", True),
    "enable-bandwidth-manager=true": ("bandwidth_manager", True),
    "enable-in-cluster-loadbalance=true": ("in_cluster_lb", True),
    "enable-policy=never": ("policy_enforcement", "never"),
    "local-router-ipv4=169.254.10.1": ("local_router_ipv4", "169.254.10.1"),
    "terway-host-stack-cidr=169.254.20.10/32": ("host_stack_cidrs", ("169.254.20.10/32",)),
}


@pytest.mark.parametrize("flag", sorted(DATAPATH_V2))
def test_defaults_are_datapath_v2_settings(flag):
    key, value = DATAPATH_V2[flag]
    got = getattr(Config.defaults(), key)
    assert got == value and type(got) is type(value), (key, got)


def test_booleans_are_typed_and_only_true_or_false_words_are_accepted():
    cfg = Config.defaults()
    assert cfg.with_values({"socket_lb": "false"}, "flag").socket_lb is False
    assert cfg.with_values({"socket_lb": "TRUE"}, "flag").socket_lb is True
    assert cfg.with_values({"node_port": False}, "file").node_port is False
    for bad in (1, 0, "enabled", "", [True]):
        with pytest.raises(ConfigError, match=r"socket_lb: invalid value .*expected true or false"):
            cfg.with_values({"socket_lb": bad}, "flag")


# Every key, with a value it must refuse and the words the error must contain.
BAD = {
    "bpffs_root": (5, "expected a string"),
    "state_dir": (["/a"], "expected a string"),
    "api_socket": (7, "expected a string"),
    "tc_priority": ("70000", "above the maximum 65535"),
    "host_stack_cidrs": ("169.254.20.10/33", "host_stack_cidrs: invalid value"),
    "service_cidrs": ("10.0.0.1/8", "host bits set"),
    "eni_pattern": (3, "expected a string"),
    "primary_device": (False, "expected a string"),
    "pod_device_pattern": (1.5, "expected a string"),
    "endpoints_map_size": ("8", "below the minimum 16"),
    "counters_map_size": (True, "a boolean is not an integer"),
    "bypass_map_size": ("0", "below the minimum 1"),
    "services_map_size": ("many", "invalid value"),
    "backends_map_size": (1 << 30, "above the maximum"),
    "slots_map_size": ("1", "below the minimum"),
    "conntrack_map_size": ("100", "below the minimum 1024"),
    "affinity_map_size": ("-1", "below the minimum"),
    "conntrack_gc_interval": ("-5", "below the minimum 0"),
    "conntrack_tcp_idle_timeout": ("5", "below the minimum 10"),
    "conntrack_idle_timeout": ("2m", "invalid value"),
    "conntrack_new_map_size": ("512", "below the minimum 1024"),
    "conntrack_policy_map_size": (1 << 25, "above the maximum"),
    "conntrack_tcp_syn_timeout": ("1", "below the minimum 5"),
    "conntrack_tcp_fin_timeout": ("forever", "invalid value"),
    "conntrack_tcp_close_timeout": ("0", "below the minimum 1"),
    "source": (["kubernetes"], "expected a string"),
    "source_watch": ("inotify", "expected true or false"),
    "node_name": (1, "expected a string"),
    "log_level": ("trace", "not one of debug, info, warning, error"),
    "routing_mode": ("tunnel", "'tunnel' is not one of native (pods hold VPC-routable"),
    "masquerade": ("true", "'true' is not one of false (pod IPs are routable"),
    "endpoint_routes": (False, "'false' is not one of true"),
    "kube_proxy_replacement": ("partial", "expected true or false"),
    "socket_lb": ("yes please", "expected true or false"),
    "socket_lb_hostns_only": (2, "expected true or false"),
    "node_port": ("on-ish", "expected true or false"),
    "host_port": ({}, "expected true or false"),
    "external_ips": ("1.2.3.4", "expected true or false"),
    "session_affinity": ("ClientIP", "expected true or false"),
    "service_topology": ("auto", "expected true or false"),
    "bandwidth_manager": ("edt", "expected true or false"),
    "bandwidth_egress": ("tbf", "'tbf' is not one of auto, edt, htb"),
    "bandwidth_bbr": ("cubic", "expected true or false"),
    "bandwidth_flows_map_size": ("100", "below the minimum 1024"),
    "in_cluster_lb": ("maybe", "expected true or false"),
    "nodeport_addresses": ("primary", "nodeport_addresses: invalid value"),
    "lb_external_algorithm": ("hash", "'hash' is not one of random, maglev"),
    "maglev_table_size": ("1000", "1000' is not one of 251, 509"),
    "source_ranges_map_size": ("8", "below the minimum 16"),
    "policy_enforcement": ("strict", "'strict' is not one of never, default, always"),
    "local_router_ipv4": ("169.254.10", "local_router_ipv4: invalid value"),
    "local_router_ipv6": ("fd00::1", "expected a link-local IPv6 address"),
    "hairpin_source_ipv6": ("fe80::1", "hairpin_source_ipv6: invalid value"),
    "policy_map_size": ("4", "below the minimum 16"),
    "ipcache_map_size": ("8", "below the minimum 16"),
    "policy_pod_lookup_timeout_ms": ("60001", "above the maximum 60000"),
    "policy_unknown_pod": ("deny", "'deny' is not one of deny-ingress, open"),
    "cgroup_root": ("sys/fs/cgroup", "expected an absolute path"),
    "metrics_address": ("localhost:9962", "'localhost' is not an IP address or node-ip"),
    "http_max_connections": (0, "below the minimum 1"),
    "http_timeout": (3600, "above the maximum 300"),
    "health_address": ("127.0.0.1:99999", "port 0-65535"),
    "eni_config": ("etc/eni", "expected an absolute path"),
    "grpc_socket": ("run/grpc.sock", "expected an absolute path"),
}


def test_every_key_has_a_rejection_case():
    assert set(BAD) == {k.name for k in KEYS}


@pytest.mark.parametrize("key", sorted(BAD))
def test_every_key_rejects_a_bad_value_naming_the_key_and_what_is_allowed(key):
    value, words = BAD[key]
    with pytest.raises(ConfigError) as exc:
        Config.defaults().with_values({key: value}, "flag")
    msg = str(exc.value)
    assert msg.startswith(f"{key}: "), msg
    assert words in msg, msg


def test_addresses_accept_ipv4_ipv6_ephemeral_and_off():
    cfg = Config.defaults()
    for v in ("0.0.0.0:9962", "127.0.0.1:0", "[::1]:9099", "", "node-ip:9962", "node-ip:0"):
        assert cfg.with_values({"metrics_address": v}, "flag").metrics_address == v
    assert C.parse_address("[::1]:9099") == ("::1", 9099)
    assert C.parse_address("node-ip:9962") == (C.NODE_IP, 9962)
    # metrics face the node's own address by default, never every address
    assert cfg.metrics_address == "node-ip:9962" and cfg.health_address == "127.0.0.1:9099"


def test_flags_win_over_the_file_which_wins_over_eni_config_over_defaults(tmp_path):
    eni = tmp_path / "eni"
    eni.mkdir()
    (eni / "disable_network_policy").write_text("false")
    f = tmp_path / "config.yaml"
    f.write_text(f"eni_config: {eni}\ntc_priority: 26000\nlog_level: debug\n")
    cfg = C.load(f, {"log_level": "warning", "tc_priority": None})
    assert (cfg.log_level, cfg.origin["log_level"]) == ("warning", "flag")
    assert (cfg.tc_priority, cfg.origin["tc_priority"]) == (26000, f"file {f}")
    assert (cfg.policy_enforcement, cfg.origin["policy_enforcement"]) == (
        "default", f"eni-config {eni}")
    assert cfg.origin["socket_lb"] == "default"
    f.write_text(f"eni_config: {eni}\npolicy_enforcement: never\n")
    cfg = C.load(f, {})
    assert (cfg.policy_enforcement, cfg.origin["policy_enforcement"]) == ("never", f"file {f}")
    cfg = C.load(f, {"policy_enforcement": "always"})
    assert (cfg.policy_enforcement, cfg.origin["policy_enforcement"]) == ("always", "flag")
    # the eni_config path itself may come from a flag
    cfg = C.load(None, {"eni_config": str(eni)})
    assert cfg.policy_enforcement == "default" and cfg.origin["eni_config"] == "flag"


# The eni-config ConfigMap as Terway's three modes have it (seed: ACK's
# default, DataPath V2, DataPath V2 + NetworkPolicy).
def terway_configmap(mode: str) -> dict:
    eni_conf = {"version": "1", "max_pool_size": 5, "min_pool_size": 0,
                "credential_path": "/var/addon/token-config",
                "vswitches": {"cn-hangzhou-k": ["vsw-0001"]},
                "security_group": "sg-0001", "service_cidr": "192.168.0.0/16"}
    cni = {"cniVersion": "0.4.0", "name": "terway", "type": "terway"}
    if mode != "default":
        cni.update({"eniip_virtual_type": "datapathv2", "network_policy_provider": "ebpf",
                    "host_stack_cidrs": ["169.254.20.10/32"]})
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "eni-config", "namespace": "kube-system"},
            "data": {"eni_conf": json.dumps(eni_conf, indent=2),
                     "10-terway.conf": json.dumps(cni, indent=2),
                     "disable_network_policy": "false" if mode == "networkpolicy" else "true"}}


def mount_as_volume(cm: dict, root) -> str:
    """What the kubelet makes of a ConfigMap volume: one file per key, reached
    through the ..data symlink of an atomic update."""
    stamp = root / "..2025_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for k, v in cm["data"].items():
        (stamp / k).write_text(v)
    (root / "..data").symlink_to(stamp.name)
    for k in cm["data"]:
        (root / k).symlink_to(f"..data/{k}")
    return str(root)


MODES = {"default": ("never", "default"), "datapathv2": ("never", "datapathv2"),
         "networkpolicy": ("default", "datapathv2")}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", ["mounted directory", "manifest file", "eni_conf only"])
def test_terway_modes_select_policy_enforcement(tmp_path, mode, shape):
    cm = terway_configmap(mode)
    policy, terway_mode = MODES[mode]
    if shape == "mounted directory":
        path = mount_as_volume(cm, tmp_path / "eni")
    elif shape == "manifest file":
        path = str(tmp_path / "eni-config.yaml")
        (tmp_path / "eni-config.yaml").write_text(yaml.safe_dump(cm))
    else:
        # terwayd's own file, /etc/eni/eni_conf, with the flag inside it
        conf = json.loads(cm["data"]["eni_conf"])
        conf["disable_network_policy"] = cm["data"]["disable_network_policy"] == "true"
        path = str(tmp_path / "eni_conf")
        (tmp_path / "eni_conf").write_text(json.dumps(conf))
        terway_mode = "unknown"
    cfg = C.load(None, {"eni_config": path})
    assert cfg.policy_enforcement == policy
    assert cfg.origin["policy_enforcement"] == f"eni-config {path}"
    assert f"eni-config {path}: Terway mode {terway_mode}" in cfg.notes
    if terway_mode == "datapathv2":
        assert cfg.origin["host_stack_cidrs"] == f"eni-config {path}"
    if terway_mode == "default":
        assert any("default mode" in n for n in cfg.notes)


def test_eni_config_that_contradicts_itself_or_is_malformed_is_rejected(tmp_path):
    d = tmp_path / "eni"
    d.mkdir()
    (d / "disable_network_policy").write_text("true")
    (d / "eni_conf").write_text(json.dumps({"disable_network_policy": "false"}))
    with pytest.raises(ConfigError, match=r"^eni_config: .*disable_network_policy disagrees"):
        C.load(None, {"eni_config": str(d)})
    (d / "eni_conf").write_text("{not json")
    with pytest.raises(ConfigError, match=r"eni_conf: not valid JSON"):
        C.load(None, {"eni_config": str(d)})
    (d / "eni_conf").unlink()
    (d / "disable_network_policy").write_text("sometimes")
    with pytest.raises(ConfigError, match=re.escape("'sometimes' is not true or false")):
        C.load(None, {"eni_config": str(d)})
    with pytest.raises(ConfigError, match="no such file"):
        C.load(None, {"eni_config": str(tmp_path / "absent")})


def test_describe_says_which_keys_are_not_in_effect_yet():
    rows = {r["key"]: r for r in C.describe(Config.defaults())}
    assert set(rows) == set(KEYS_BY_NAME)
    for name in ("tc_priority", "host_stack_cidrs", "metrics_address", "routing_mode",
                 "socket_lb", "kube_proxy_replacement", "policy_enforcement", "policy_map_size",
                 "node_port", "host_port", "external_ips", "in_cluster_lb", "session_affinity",
                 "service_topology", "nodeport_addresses", "lb_external_algorithm",
                 "bandwidth_manager", "bandwidth_egress", "bandwidth_bbr"):
        assert rows[name]["in_effect"] and not rows[name]["pending"], name
    assert rows["host_stack_cidrs"]["value"] == ["169.254.20.10/32"]


def test_config_show_prints_values_sources_and_what_is_not_in_effect(tmp_path, capsys):
    from agent.cli.main import main
    eni = mount_as_volume(terway_configmap("networkpolicy"), tmp_path / "eni")
    f = tmp_path / "config.yaml"
    f.write_text("log_level: debug\n")
    assert main(["config", "show", "--local", "--config", str(f), "--eni-config", eni,
                 "--tc-priority", "26000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in data["keys"]}
    assert (rows["policy_enforcement"]["value"], rows["policy_enforcement"]["source"]) == (
        "default", f"eni-config {eni}")
    assert (rows["log_level"]["value"], rows["log_level"]["source"]) == ("debug", f"file {f}")
    assert (rows["tc_priority"]["value"], rows["tc_priority"]["source"]) == (26000, "flag")
    assert rows["routing_mode"]["source"] == "default"
    assert f"eni-config {eni}: Terway mode datapathv2" in data["notes"]
    assert main(["config", "show", "--local", "--eni-config", eni]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("policy_enforcement "))
    assert line.split()[1:4] == ["default", "eni-config", eni] and "not yet in effect" not in line
    pending = text.split("Not yet in effect")[1]
    assert "pod_device_pattern: pods are learned from the CNI plugin" in pending
    for built in ("node_port", "bandwidth_manager", "external_ips"):
        assert built not in pending, built
    assert "policy_enforcement" not in pending
    assert main(["config", "show", "--local", "--socket-lb", "sometimes"]) == 2
    assert "socket_lb: invalid value 'sometimes'" in capsys.readouterr().err


def test_a_file_neither_json_nor_yaml_is_refused_naming_it(tmp_path):
    """The configuration file and a single-file eni-config share one JSON-or-
    YAML reader; either refuses a file neither parses, naming the file."""
    from agent.config import eniconfig
    bad = tmp_path / "broken.yaml"
    bad.write_text("tc_priority: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid YAML or JSON")):
        C.load(bad, {})
    with pytest.raises(eniconfig.EniConfigError,
                       match=re.escape(f"{bad}: neither JSON nor YAML")):
        eniconfig.read(bad)
    good = tmp_path / "good.json"
    good.write_text('{"tc_priority": 26000}')
    assert C.load(good, {}).tc_priority == 26000


def test_local_router_ipv6_takes_a_link_local_address_and_the_sim_uses_its_default():
    from agent.sim import plan
    cfg = Config.defaults()
    assert cfg.local_router_ipv6 == "fe80::1" == plan.POD_GATEWAY6
    assert cfg.with_values({"local_router_ipv6": "fe80::a:1"}, "flag").local_router_ipv6 == \
        "fe80::a:1"
    for bad in ("169.254.10.1", "fe80::1/64", "ff02::1", "::", "fe80::zz"):
        with pytest.raises(ConfigError, match=r"^local_router_ipv6: invalid value"):
            cfg.with_values({"local_router_ipv6": bad}, "flag")


# -- socket_lb off while replacing kube-proxy: said once at start, flag cleared -----

@pytest.mark.parametrize("kpr,socket_lb,said", [(True, False, True), (True, True, False),
                                                (False, False, False)])
def test_socket_lb_off_is_said_once_at_start_and_clears_the_programs_flag(caplog, kpr, socket_lb,
                                                                         said):
    from types import SimpleNamespace
    from agent.daemon import agent as agent_mod
    cfg = Config.defaults().replace(kube_proxy_replacement=kpr, socket_lb=socket_lb)
    a = agent_mod.Agent.__new__(agent_mod.Agent)
    a.config = cfg
    a.source = None
    # a datapath with settings only: the walk stops at the first other use
    # of it, after the note and the flag
    calls = []
    a.datapath = SimpleNamespace(settings=SimpleNamespace(set=lambda **kw: calls.append(kw)))
    caplog.set_level(logging.INFO, logger="fastpath.agent")
    with pytest.raises(AttributeError) if kpr else contextlib.nullcontext():
        a._start_services()
    msgs = [r.getMessage() for r in caplog.records if "socket_lb" in r.getMessage()]
    if said:
        assert len(msgs) == 1
        for words in ("socket_lb is off", "TCP and UDP", "ClusterIPs", "NodePorts",
                      "per packet"):
            assert words in msgs[0]
    else:
        assert msgs == []
    # socket-LB off: FP_CFG_F_SOCKLB cleared (a previous run's flag would
    # keep the programs from translating the node's TCP and UDP)
    assert [c["socket_lb"] for c in calls] == ([] if socket_lb else [False])
