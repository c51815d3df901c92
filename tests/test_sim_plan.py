"""The simulated VPC's address plan and names (agent.sim.plan): pure, no root.

vm-tests and benchmarks rely on these rules to find things (a pod's ENI from
its IP, a dead world's leftovers from a name), so they are pinned here.
"""
import ipaddress

import pytest

from agent.sim import plan


def test_addresses_follow_the_documented_plan():
    assert plan.node_ip(1) == "10.240.0.11"
    assert plan.eni_ip(2, 1) == "10.241.2.1"
    assert plan.eni_gateway(3) == "10.243.255.253"
    assert plan.pod_ip(2, 1, 0) == "10.241.2.10"
    assert plan.direct_ips(1) == ("10.239.1.1", "10.239.1.2")
    assert plan.eni_table(3) == 1003          # Terway: 1000 + ENI ifindex


def test_every_pod_ip_lies_in_its_enis_vswitch_and_never_on_a_gateway_or_eni():
    for k in (1, 7, plan.MAX_NODES):
        for j in (1, plan.MAX_ENIS):
            vsw = ipaddress.ip_network(plan.eni_vswitch(j))
            ips = {plan.pod_ip(k, j, n) for n in range(plan.MAX_PODS_PER_ENI)}
            assert len(ips) == plan.MAX_PODS_PER_ENI
            assert all(ipaddress.ip_address(ip) in vsw for ip in ips)
            assert plan.eni_ip(k, j) not in ips and plan.eni_gateway(j) not in ips
            assert ipaddress.ip_address(plan.eni_gateway(j)) in vsw


def test_out_of_plan_indices_are_refused_rather_than_wrapped():
    for bad in (lambda: plan.node_ip(0), lambda: plan.node_ip(plan.MAX_NODES + 1),
                lambda: plan.eni_ip(1, plan.MAX_ENIS + 1),
                lambda: plan.pod_ip(1, 1, plan.MAX_PODS_PER_ENI)):
        with pytest.raises(ValueError):
            bad()


def test_names_fit_ifnamsiz_and_carry_the_tag():
    tag = "beef"
    longest = plan.vpc_ifname(tag, plan.MAX_NODES, plan.MAX_ENIS)
    assert len(longest) <= 15 and plan.tag_of(longest) == tag
    cali = plan.cali_name(tag, "a-very-long-pod-name-with.dots")
    assert len(cali) == 15 and cali.startswith("cali")
    for ns in (plan.vpc_ns(tag), plan.node_ns(tag, "n1"), plan.pod_ns(tag, "a"),
               plan.direct_ns(tag, 1, "a")):
        assert plan.tag_of(ns) == tag


def test_names_of_other_projects_are_never_taken_for_a_world():
    for name in ("fpprobe", "fpt-x-abc123", "fpw12-vpc", "fpwbeefx", "eth0", "cali0123456789a"):
        assert plan.tag_of(name) is None, name


def test_node_and_pod_names_are_kubernetes_like():
    plan.check_name("pod", "web-1.a")
    for bad in ("", "A", "-a", "a-", "a/b", "a b", "x" * 41):
        with pytest.raises(ValueError):
            plan.check_name("pod", bad)


def test_dual_stack_addresses_are_unique_and_in_their_enis_ipv6_vswitch():
    assert plan.pod_ip6(2, 1, 0) == "fd00:a:f1::2:a"
    assert plan.eni_ip6(2, 1) == "fd00:a:f1::2:1"
    assert plan.direct_ips6(1) == ("fd00:a:ef:1::1", "fd00:a:ef:1::2")
    for j in (1, plan.MAX_ENIS):
        vsw = ipaddress.ip_network(f"fd00:a:{240 + j:x}::/64")
        ips = {plan.pod_ip6(k, j, n) for k in (1, 7, plan.MAX_NODES)
               for n in range(plan.MAX_PODS_PER_ENI)}
        assert len(ips) == 3 * plan.MAX_PODS_PER_ENI
        assert all(ipaddress.ip_address(ip) in vsw for ip in ips)
        assert not {plan.eni_ip6(k, j) for k in (1, 7, plan.MAX_NODES)} & ips
    for g in (plan.POD_GATEWAY6, plan.ENI_GATEWAY6):
        assert ipaddress.ip_address(g).is_link_local
