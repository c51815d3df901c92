"""The agent's state records read back defensively (no root needed): an
endpoint record names the wrong field, a stray entry is refused without
being followed, opened for long or read whole."""
from __future__ import annotations

import json
import os

import pytest

from agent.daemon.agent import MAX_RECORD_BYTES, StrayEntry, _restrict, read_record
from agent.model.endpoint import Endpoint

GOOD = {"ip": "10.241.1.100", "host_ifname": "cali1", "host_ifindex": 7,
        "host_mac": "02:00:00:00:00:01", "pod_mac": "02:00:00:00:00:02",
        "container_id": "c1", "ifname": "eth0", "added_at": 1700000000.5}


def test_an_endpoint_record_round_trips_with_its_registration_time():
    ep = Endpoint.from_json(json.dumps(GOOD))
    assert ep.added_at == 1700000000.5
    assert Endpoint.from_json(ep.to_json()) == ep
    old = {k: v for k, v in GOOD.items() if k != "added_at"}     # an older release's record
    assert Endpoint.from_json(json.dumps(old)).added_at == 0.0
    hp = Endpoint.from_json(json.dumps(dict(GOOD, port_mappings=[[8080, 80, "TCP", ""]])))
    assert hp.port_mappings == ((8080, 80, "TCP", ""),)
    assert Endpoint.from_json(hp.to_json()) == hp


@pytest.mark.parametrize("change,words", [
    ({"host_ifindex": "7"}, "host_ifindex must be an integer"),
    ({"host_ifindex": True}, "host_ifindex must be an integer"),
    ({"ip": ["10.0.0.1"]}, "ip must be a string"),
    ({"ip": "10.0.0.300"}, "is not an IPv4 address"),
    ({"ip6": "10.0.0.1"}, "ip6 '10.0.0.1' is not an IPv6 address"),
    ({"ip6": "fd00::zz"}, "ip6 'fd00::zz' is not an IPv6 address"),
    ({"added_at": "yesterday"}, "added_at must be a number"),
    ({"endpoint_key": "127.255.0.1"}, "endpoint_key .* is set on an endpoint with an IPv4"),
    ({"ip": "127.255.0.9"}, "in the endpoint key range"),
    ({"ip": ""}, "neither ip nor ip6"),
    ({"ip": "", "ip6": "fd00::1"}, "an IPv6-only endpoint needs one"),
    ({"ip": "", "ip6": "fd00::1", "endpoint_key": "10.0.0.1"},
     "endpoint_key '10.0.0.1' is not in the endpoint key range"),
    ({"port_mappings": {"8080": 80}}, "port_mappings must be a list of"),
    ({"port_mappings": [[8080, 80, "TCP"]]}, "port_mappings must be a list of"),
    ({"port_mappings": [["8080", 80, "TCP", ""]]}, "port_mappings must be a list of"),
    ({"port_mappings": [[8080, True, "TCP", ""]]}, "port_mappings must be a list of"),
])
def test_a_damaged_endpoint_record_names_the_field(change, words):
    with pytest.raises(ValueError, match=words):
        Endpoint.from_json(json.dumps(dict(GOOD, **change)))
    with pytest.raises(ValueError, match="not a JSON object"):
        Endpoint.from_json("[1]")


def test_an_ipv6_only_endpoint_round_trips_with_its_key():
    rec = dict(GOOD, ip="", ip6="fd00:10::5", endpoint_key="127.255.0.3")
    ep = Endpoint.from_json(json.dumps(rec))
    assert (ep.pod_key, ep.ip, ep.ip6) == ("127.255.0.3", "", "fd00:10::5")
    assert Endpoint.from_json(ep.to_json()) == ep
    assert Endpoint.from_json(json.dumps(GOOD)).pod_key == GOOD["ip"]


def test_endpoint_keys_are_allocated_lowest_free_and_run_out():
    from agent.model import endpoint as m
    assert m.allocate_endpoint_key(()) == "127.255.0.1"
    assert m.allocate_endpoint_key({"127.255.0.1", "127.255.0.3"}) == "127.255.0.2"
    every = {str(m.ipaddress.IPv4Address(n)) for n in range(
        int(m.ENDPOINT_KEYS.network_address) + 1, int(m.ENDPOINT_KEYS.broadcast_address))}
    with pytest.raises(ValueError, match="every endpoint key"):
        m.allocate_endpoint_key(every)


def test_read_record_refuses_what_cannot_be_a_record(tmp_path):
    (tmp_path / "ok.json").write_text("{}")
    assert read_record(tmp_path / "ok.json") == b"{}"
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")             # opened without blocking
    (tmp_path / "link.json").symlink_to(tmp_path / "ok.json")
    (tmp_path / "big.json").write_bytes(b" " * (MAX_RECORD_BYTES + 1))
    for name, words in (("dir.json", "not a regular file"), ("fifo.json", "not a regular file"),
                        ("link.json", "symbolic link"), ("big.json", "far more than a record")):
        with pytest.raises(StrayEntry, match=words):
            read_record(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "gone.json")


def test_restrict_only_takes_access_away(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    for before, after in ((0o644, 0o600), (0o600, 0o600), (0o400, 0o400), (0o000, 0o000),
                          (0o666, 0o600)):
        f.chmod(before)
        changed = _restrict(f, 0o600)
        assert os.stat(f).st_mode & 0o777 == after
        assert bool(changed) == (before != after)
    (tmp_path / "l").symlink_to(f)
    assert _restrict(tmp_path / "l", 0o600) == []


def test_an_ipv6_only_pods_host_ports_are_restored_with_its_ipv6_address():
    # the record keeps an IPv6 hostIP as given; the restore hands the
    # service sync the pod's IPv6 address, which IPv6 frontends translate to
    import types
    from agent.daemon.agent import Agent
    from agent.lb.hostport import PortMapping
    rec = dict(GOOD, ip="", ip6="fd00:10::5", endpoint_key="127.255.0.3",
               port_mappings=[[9090, 80, "TCP", "fd00::11"], [8080, 80, "TCP", ""]])
    ep = Endpoint.from_json(Endpoint.from_json(json.dumps(rec)).to_json())
    calls = []

    class Sync:
        def set_host_ports(self, owner, pod_ip, mappings, pod_ip6=""):
            calls.append((owner, pod_ip, tuple(mappings), pod_ip6))

    Agent._restore_host_ports(types.SimpleNamespace(endpoints={ep.key: ep}, services=Sync()))
    assert calls == [(ep.owner, "", (PortMapping(9090, 80, "TCP", "fd00::11"),
                                     PortMapping(8080, 80, "TCP", "")), "fd00:10::5")]
