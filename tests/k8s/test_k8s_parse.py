"""Parsing and validation of every field fastpath reads, good and bad."""
from __future__ import annotations

import pytest

from agent.k8s.model import (
    ContainerPort, Endpoint, EndpointPort, FrozenMap, IPBlock, Kind, LabelRequirement,
    LabelSelector, LoadBalancerIngress, NodeAddress, PolicyPort, ServicePort,
)
from agent.k8s.parse import UnsupportedKind, ValidationError, parse_bandwidth, parse_object
from tests.k8s.k8sdata import NAMESPACE, NODE, POD, POLICY, SERVICE, SLICE, clone


def test_namespace_keeps_name_and_labels():
    ns = parse_object(NAMESPACE)
    assert ns.kind == Kind.NAMESPACE and ns.key == ("", "shop")
    assert ns.labels == {"team": "payments"}


def test_pod_fields_are_all_read():
    p = parse_object(POD)
    assert p.key == ("shop", "web-1") and p.uid == "u-1" and p.resource_version == "7"
    assert p.node_name == "node-1" and p.phase == "Running" and not p.deleting
    # IPv6 is canonicalised so that equal addresses compare equal.
    assert p.ips == ("10.0.1.5", "fd00::5")
    assert p.ports == (
        ContainerPort(8080, "TCP", "http", 0, ""),
        ContainerPort(53, "UDP", "dns", 5353, "192.168.0.10"),
        ContainerPort(9000, "TCP", "", 0, ""),
    )
    assert p.host_ports == (ContainerPort(53, "UDP", "dns", 5353, "192.168.0.10"),)
    assert p.named_port("http") == 8080 and p.named_port("dns", "UDP") == 53
    assert p.named_port("dns", "TCP") is None
    # limits are read from the annotations by agent.bandwidth, not here
    assert p.annotations["kubernetes.io/egress-bandwidth"] == "10M"
    assert p.annotations["kubernetes.io/ingress-bandwidth"] == "1Gi"


def test_pod_deletion_state_and_host_network():
    d = clone(POD)
    d["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    d["spec"]["hostNetwork"] = True
    p = parse_object(d)
    assert p.deleting and p.host_network


def test_pod_ip_falls_back_to_status_pod_ip_then_annotation_only_when_allowed():
    d = clone(POD)
    del d["status"]["podIPs"]
    assert parse_object(d).ips == ("10.0.1.5",)
    d["status"] = {}
    d["metadata"]["annotations"]["fastpath.io/pod-ips"] = "10.9.0.1, fd00::9"
    assert parse_object(d).ips == ()
    assert parse_object(d, pod_ip_annotation=True).ips == ("10.9.0.1", "fd00::9")


def test_last_applied_configuration_annotation_is_dropped():
    d = clone(POD)
    d["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{}" * 1000
    assert "kubectl.kubernetes.io/last-applied-configuration" not in parse_object(d).annotations


@pytest.mark.parametrize("text,bps", [
    ("10M", 10**7), ("1Gi", 2**30), ("1k", 1000), ("1.5M", 1_500_000), ("1e6", 10**6),
    ("100000", 100000), ("1P", 10**15),
])
def test_bandwidth_quantities(text, bps):
    assert parse_bandwidth(text, "x") == bps


@pytest.mark.parametrize("value", ["fast", "10", "2E", "-5M"])
def test_a_bad_bandwidth_annotation_never_rejects_the_pod(value):
    """A typo in a limit must not take the Pod out of cluster state (its
    policy, its Services): agent.bandwidth reports it and leaves the pod
    unlimited (tests/bandwidth)."""
    d = clone(POD)
    d["metadata"]["annotations"]["kubernetes.io/egress-bandwidth"] = value
    p = parse_object(d)
    assert p.key == ("shop", "web-1") and p.ips == ("10.0.1.5", "fd00::5")
    assert p.annotations["kubernetes.io/egress-bandwidth"] == value


def test_node_fields():
    n = parse_object(NODE)
    assert n.key == ("", "node-1") and n.zone == "cn-hangzhou-h"
    assert n.addresses == (NodeAddress("InternalIP", "192.168.0.10"), NodeAddress("Hostname", "node-1"))
    assert n.ips() == ("192.168.0.10",) and n.pod_cidrs == ("172.20.1.0/24",)


def test_node_zone_falls_back_to_the_legacy_label():
    d = clone(NODE)
    d["metadata"]["labels"] = {"failure-domain.beta.kubernetes.io/zone": "z-old"}
    assert parse_object(d).zone == "z-old"


def test_service_fields():
    s = parse_object(SERVICE)
    assert s.type == "LoadBalancer" and not s.headless
    assert s.cluster_ips == ("172.16.0.10", "fd00:10::10")
    assert s.ports == (ServicePort(80, "TCP", "http", "http", 30080, ""),
                       ServicePort(53, "UDP", "dns", 5353, 0, ""))
    assert s.selector == {"app": "web"}
    assert s.external_ips == ("203.0.113.7",)
    assert s.load_balancer_ingress == (LoadBalancerIngress("47.0.0.1"),
                                       LoadBalancerIngress("47.0.0.2", "", "Proxy"),
                                       LoadBalancerIngress("", "lb.example.com"))
    assert s.load_balancer_ips == ("47.0.0.1", "47.0.0.2")
    # The API server accepts host bits in a source range; the model keeps the network.
    assert s.load_balancer_source_ranges == ("198.51.100.0/24",)
    assert (s.session_affinity, s.session_affinity_timeout) == ("ClientIP", 600)
    assert s.internal_traffic_policy == "Local" and s.external_traffic_policy == "Local"
    assert s.health_check_node_port == 31000 and s.traffic_distribution == "PreferClose"
    assert s.service_proxy_name == "other" and s.ip_families == ("IPv4", "IPv6")


def test_service_defaults_match_the_api_server():
    s = parse_object({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "a", "namespace": "n"},
                      "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}],
                               "sessionAffinity": "ClientIP"}})
    assert s.type == "ClusterIP" and s.ports == (ServicePort(443, "TCP", "", 443, 0, ""),)
    assert s.session_affinity_timeout == 10800
    assert s.internal_traffic_policy == "Cluster"
    assert s.external_traffic_policy == "" and s.selector is None
    np = parse_object({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "b", "namespace": "n"},
                       "spec": {"type": "NodePort", "clusterIP": "10.96.0.2",
                                "ports": [{"port": 80, "nodePort": 30001}]}})
    assert np.external_traffic_policy == "Cluster"


def test_headless_and_external_name_services():
    h = parse_object({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "h", "namespace": "n"},
                      "spec": {"clusterIP": "None", "selector": {"a": "b"}}})
    assert h.headless and h.cluster_ips == () and h.ports == ()
    e = parse_object({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "e", "namespace": "n"},
                      "spec": {"type": "ExternalName", "externalName": "db.example.com"}})
    assert e.type == "ExternalName" and e.external_name == "db.example.com"


def test_endpoint_slice_fields_and_condition_defaults():
    s = parse_object(SLICE)
    assert s.service_name == "web" and s.service_key == ("shop", "web")
    assert s.managed_by == "endpointslice-controller.k8s.io" and s.address_type == "IPv4"
    e0, e1, e2, e3 = s.endpoints
    assert e0 == Endpoint(("10.0.1.5",), True, True, False, "node-1", "cn-hangzhou-h",
                          ("cn-hangzhou-h",), ("node-1",), "")
    assert (e1.ready, e1.serving, e1.terminating) == (False, True, True)
    # Unset conditions: ready means ready, serving follows ready, not terminating.
    assert (e2.ready, e2.serving, e2.terminating) == (True, True, False)
    assert (e3.ready, e3.serving, e3.terminating) == (False, False, False)
    assert s.ports == (EndpointPort(8080, "TCP", "http", "http"), EndpointPort(5353, "UDP", "dns", ""))


def test_endpoint_slice_ipv6_and_fqdn():
    d = clone(SLICE)
    d["addressType"] = "IPv6"
    d["endpoints"] = [{"addresses": ["FD00::1"]}]
    assert parse_object(d).endpoints[0].addresses == ("fd00::1",)
    d["addressType"] = "FQDN"
    d["endpoints"] = [{"addresses": ["db.example.com"]}]
    assert parse_object(d).endpoints[0].addresses == ("db.example.com",)


def test_network_policy_fields():
    p = parse_object(POLICY)
    assert p.policy_types == ("Ingress", "Egress")  # defaulted: egress rules exist
    assert p.pod_selector == LabelSelector(FrozenMap({"app": "db"}), (
        LabelRequirement("tier", "In", frozenset({"a", "b"})),))
    (rule,) = p.ingress
    web, ns_sel, block = rule.peers
    assert web.pod_selector.match_labels == {"app": "web"} and web.namespace_selector is None
    assert ns_sel.namespace_selector.match_expressions[0].operator == "Exists"
    assert ns_sel.pod_selector.is_empty
    assert block.ip_block == IPBlock("10.0.0.0/8", ("10.1.0.0/16",))
    assert rule.ports == (PolicyPort("TCP", 5432, None), PolicyPort("UDP", "dns", None),
                          PolicyPort("TCP", 30000, 32767))
    # An empty egress rule: all peers, all ports.
    assert p.egress[1].peers == () and p.egress[1].ports == ()
    assert p.egress[0].peers[0].ip_block.cidr == "fd00::/8"


def test_network_policy_types_default_to_ingress_only_without_egress_rules():
    d = clone(POLICY)
    del d["spec"]["egress"]
    assert parse_object(d).policy_types == ("Ingress",)
    d["spec"]["policyTypes"] = ["Egress"]
    assert parse_object(d).policy_types == ("Egress",)


@pytest.mark.parametrize("op,values,labels,match", [
    ("In", ["a"], {"k": "a"}, True), ("In", ["a"], {"k": "b"}, False), ("In", ["a"], {}, False),
    ("NotIn", ["a"], {"k": "b"}, True), ("NotIn", ["a"], {"k": "a"}, False),
    ("NotIn", ["a"], {}, True), ("Exists", [], {"k": ""}, True), ("Exists", [], {}, False),
    ("DoesNotExist", [], {}, True), ("DoesNotExist", [], {"k": "x"}, False),
])
def test_label_selector_operators_match_like_the_api(op, values, labels, match):
    sel = LabelSelector(match_expressions=(LabelRequirement("k", op, frozenset(values)),))
    assert sel.matches(labels) is match


def test_empty_selector_matches_everything():
    assert LabelSelector().matches({}) and LabelSelector().matches({"a": "b"})


def test_default_namespace_applies_to_namespaced_kinds_only():
    d = clone(POD)
    del d["metadata"]["namespace"]
    assert parse_object(d, default_namespace="default").namespace == "default"
    with pytest.raises(ValidationError) as e:
        parse_object(d)
    assert e.value.field == "metadata.namespace"


def test_model_objects_are_immutable_and_hashable():
    p = parse_object(POD)
    with pytest.raises(AttributeError):
        p.node_name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.labels["app"] = "x"  # type: ignore[index]
    assert hash(p) == hash(parse_object(POD))
    assert {p: 1}[parse_object(POD)] == 1


def test_equality_ignores_resource_version_only():
    a = clone(POD)
    b = clone(POD)
    b["metadata"]["resourceVersion"] = "99"
    assert parse_object(a) == parse_object(b)
    b["metadata"]["labels"]["app"] = "other"
    assert parse_object(a) != parse_object(b)


def test_unsupported_kinds_are_reported_apart_from_invalid_ones():
    with pytest.raises(UnsupportedKind):
        parse_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})
    with pytest.raises(ValidationError) as e:
        parse_object({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                      "metadata": {"name": "x"}}, origin="f.yaml")
    assert e.value.field == "apiVersion" and e.value.origin == "f.yaml"


def _set(path: str, value):
    """A mutation setting a dotted/indexed path, e.g. 'spec.ports.0.port'."""
    def mutate(d):
        parts = path.split(".")
        cur = d
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
        last = parts[-1]
        if value is _DELETE:
            del cur[last]
        elif isinstance(cur, list):
            cur[int(last)] = value
        else:
            cur[last] = value
    return mutate


_DELETE = object()

# (base object, mutation, field path named in the error, words in the message)
BAD = [
    (NAMESPACE, _set("metadata.name", "Shop"), "metadata.name", "DNS-1123 label"),
    (NAMESPACE, _set("metadata.name", ""), "metadata.name", "required"),
    (NAMESPACE, _set("metadata.labels", {"bad key!": "x"}), "metadata.labels", "qualified name"),
    (NAMESPACE, _set("metadata.labels", {"k": "-x"}), "metadata.labels[k]", "label value"),
    (NAMESPACE, _set("metadata.labels", {"k": 5}), "metadata.labels[k]", "string"),
    (NAMESPACE, _set("metadata", []), "metadata", "object"),
    (POD, _set("status.podIPs", [{"ip": "10.0.1.300"}]), "status.podIPs[0]", "IP address"),
    (POD, _set("status.podIPs", [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]), "status.podIPs[1]",
     "one IP per address family"),
    (POD, _set("status.podIPs", [{"ip": "fe80::1%eth0"}]), "status.podIPs[0]", "zone"),
    (POD, _set("spec.containers.0.ports.0.containerPort", 0), "spec.containers[0].ports[0].containerPort",
     "out of range"),
    (POD, _set("spec.containers.0.ports.0.containerPort", 65536),
     "spec.containers[0].ports[0].containerPort", "out of range"),
    (POD, _set("spec.containers.0.ports.0.containerPort", "8080"),
     "spec.containers[0].ports[0].containerPort", "integer"),
    (POD, _set("spec.containers.0.ports.0.containerPort", _DELETE),
     "spec.containers[0].ports[0].containerPort", "required"),
    (POD, _set("spec.containers.0.ports.0.protocol", "ICMP"), "spec.containers[0].ports[0].protocol",
     "unsupported protocol"),
    (POD, _set("spec.containers.0.ports.0.name", "http--x"), "spec.containers[0].ports[0].name",
     "IANA_SVC_NAME"),
    (POD, _set("spec.containers.0.ports.0.name", "12345"), "spec.containers[0].ports[0].name",
     "IANA_SVC_NAME"),
    (POD, _set("spec.containers.0.ports.0.name", "a-very-long-port-name"),
     "spec.containers[0].ports[0].name", "IANA_SVC_NAME"),
    (POD, _set("spec.containers.0.ports.1.hostPort", 70000), "spec.containers[0].ports[1].hostPort",
     "out of range"),
    (POD, _set("spec.containers.0.ports.1.hostIP", "nope"), "spec.containers[0].ports[1].hostIP",
     "IP address"),
    (POD, _set("spec.hostNetwork", "yes"), "spec.hostNetwork", "boolean"),
    (POD, _set("spec.containers", {"a": 1}), "spec.containers", "list"),
    (NODE, _set("status.addresses.0.address", "192.168.0"), "status.addresses[0].address", "IP address"),
    (NODE, _set("status.addresses.0.type", "Public"), "status.addresses[0].type", "address type"),
    (NODE, _set("spec.podCIDRs", ["172.20.1.0/33"]), "spec.podCIDRs[0]", "CIDR"),
    (NODE, _set("spec.podCIDRs", ["172.20.1.0"]), "spec.podCIDRs[0]", "prefix length"),
    (SERVICE, _set("metadata.name", "1web"), "metadata.name", "DNS-1035"),
    (SERVICE, _set("spec.type", "Ingress"), "spec.type", "not one of"),
    (SERVICE, _set("spec.clusterIPs", ["172.16.0.10", "172.16.0.11"]), "spec.clusterIPs[1]",
     "one IP per address family"),
    (SERVICE, _set("spec.clusterIPs", ["172.16.0.99"]), "spec.clusterIPs[0]", "must match"),
    (SERVICE, _set("spec.clusterIP", "None"), "spec.clusterIPs[0]", "must match"),
    (SERVICE, _set("spec.ports.0.port", 0), "spec.ports[0].port", "out of range"),
    (SERVICE, _set("spec.ports.0.port", 65536), "spec.ports[0].port", "out of range"),
    (SERVICE, _set("spec.ports.0.port", True), "spec.ports[0].port", "integer"),
    (SERVICE, _set("spec.ports.0.protocol", "HTTP"), "spec.ports[0].protocol", "unsupported protocol"),
    (SERVICE, _set("spec.ports.0.targetPort", 70000), "spec.ports[0].targetPort", "out of range"),
    (SERVICE, _set("spec.ports.0.targetPort", "Http"), "spec.ports[0].targetPort", "IANA_SVC_NAME"),
    (SERVICE, _set("spec.ports.0.nodePort", 65536), "spec.ports[0].nodePort", "out of range"),
    (SERVICE, _set("spec.ports.1.name", _DELETE), "spec.ports[1].name", "more than one port"),
    (SERVICE, _set("spec.ports.1.name", "http"), "spec.ports[1].name", "duplicate"),
    (SERVICE, _set("spec.ports.1", {"name": "again", "port": 80}), "spec.ports[1]", "duplicate port"),
    (SERVICE, _set("spec.ports", []), "spec.ports", "required"),
    (SERVICE, _set("spec.externalIPs", ["203.0.113"]), "spec.externalIPs[0]", "IP address"),
    (SERVICE, _set("spec.loadBalancerSourceRanges", ["10.0.0.0/40"]), "spec.loadBalancerSourceRanges[0]",
     "CIDR"),
    (SERVICE, _set("status.loadBalancer.ingress.0.ip", "x"), "status.loadBalancer.ingress[0].ip",
     "IP address"),
    (SERVICE, _set("status.loadBalancer.ingress.1.ipMode", "Direct"),
     "status.loadBalancer.ingress[1].ipMode", "not one of"),
    (SERVICE, _set("spec.sessionAffinity", "Cookie"), "spec.sessionAffinity", "not one of"),
    (SERVICE, _set("spec.sessionAffinityConfig.clientIP.timeoutSeconds", 86401),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range"),
    (SERVICE, _set("spec.internalTrafficPolicy", "Node"), "spec.internalTrafficPolicy", "not one of"),
    (SERVICE, _set("spec.externalTrafficPolicy", "Global"), "spec.externalTrafficPolicy", "not one of"),
    (SERVICE, _set("spec.ipFamilies", ["IPv5"]), "spec.ipFamilies[0]", "not one of"),
    (SERVICE, lambda d: d["spec"].update(type="NodePort", clusterIP="None", clusterIPs=["None"]),
     "spec.clusterIP", "may not be 'None'"),
    (SERVICE, lambda d: d["spec"].update(type="ClusterIP"), "spec.ports[0].nodePort", "may not be set"),
    (SERVICE, lambda d: d["spec"].update(type="ExternalName", ports=[]), "spec.externalName", "required"),
    (SLICE, _set("addressType", "IPv5"), "addressType", "not one of"),
    (SLICE, _set("addressType", _DELETE), "addressType", "required"),
    (SLICE, _set("addressType", "IPv6"), "endpoints[0].addresses[0]", "not an IPv6"),
    (SLICE, _set("endpoints.0.addresses", []), "endpoints[0].addresses", "1 to 100"),
    (SLICE, _set("endpoints.0.addresses", ["10.0.0.1"] * 101), "endpoints[0].addresses", "1 to 100"),
    (SLICE, _set("endpoints.1.addresses", ["10.0.0.256"]), "endpoints[1].addresses[0]", "IP address"),
    (SLICE, _set("endpoints.0.conditions.ready", "true"), "endpoints[0].conditions.ready", "boolean"),
    (SLICE, _set("endpoints.0.hostname", "Web_1"), "endpoints[0].hostname", "DNS-1123 label"),
    (SLICE, _set("endpoints", [{"addresses": ["10.0.0.1"]}] * 1001), "endpoints", "at most 1000"),
    (SLICE, _set("ports.0.port", 0), "ports[0].port", "out of range"),
    (SLICE, _set("ports.0.protocol", "QUIC"), "ports[0].protocol", "unsupported protocol"),
    (SLICE, _set("ports.1.name", "http"), "ports[1].name", "duplicate"),
    (POLICY, _set("spec.podSelector", _DELETE), "spec.podSelector", "required"),
    (POLICY, _set("spec.podSelector.matchExpressions.0.operator", "Has"),
     "spec.podSelector.matchExpressions[0].operator", "not a valid operator"),
    (POLICY, _set("spec.podSelector.matchExpressions.0.values", []),
     "spec.podSelector.matchExpressions[0].values", "non-empty"),
    (POLICY, _set("spec.ingress.0.from.1.namespaceSelector.matchExpressions.0.values", ["x"]),
     "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values", "must be empty"),
    (POLICY, _set("spec.podSelector.matchExpressions.0.key", ""),
     "spec.podSelector.matchExpressions[0].key", "required"),
    (POLICY, _set("spec.podSelector.matchLabels", {"app": "a b"}), "spec.podSelector.matchLabels[app]",
     "label value"),
    (POLICY, _set("spec.podSelector.selector", {}), "spec.podSelector.selector", "unknown field"),
    (POLICY, _set("spec.ingress.0.from.2.ipBlock.cidr", "10.0.0.0/99"), "spec.ingress[0].from[2].ipBlock.cidr",
     "CIDR"),
    (POLICY, _set("spec.ingress.0.from.2.ipBlock.cidr", "10.0.0.0"), "spec.ingress[0].from[2].ipBlock.cidr",
     "prefix length"),
    (POLICY, _set("spec.ingress.0.from.2.ipBlock.cidr", _DELETE), "spec.ingress[0].from[2].ipBlock.cidr",
     "required"),
    (POLICY, _set("spec.ingress.0.from.2.ipBlock.except", ["11.0.0.0/16"]),
     "spec.ingress[0].from[2].ipBlock.except[0]", "strict subset"),
    (POLICY, _set("spec.ingress.0.from.2.ipBlock.except", ["10.0.0.0/8"]),
     "spec.ingress[0].from[2].ipBlock.except[0]", "strict subset"),
    (POLICY, _set("spec.ingress.0.from.2.ipBlock.except", ["fd00::/16"]),
     "spec.ingress[0].from[2].ipBlock.except[0]", "strict subset"),
    (POLICY, _set("spec.ingress.0.from.2.podSelector", {}), "spec.ingress[0].from[2]",
     "both ipBlock and another peer"),
    (POLICY, _set("spec.ingress.0.from.0", {}), "spec.ingress[0].from[0]", "must specify a peer"),
    (POLICY, _set("spec.ingress.0.ports.0.port", 0), "spec.ingress[0].ports[0].port", "out of range"),
    (POLICY, _set("spec.ingress.0.ports.0.port", "80"), "spec.ingress[0].ports[0].port", "IANA_SVC_NAME"),
    (POLICY, _set("spec.ingress.0.ports.0.protocol", "ICMP"), "spec.ingress[0].ports[0].protocol",
     "unsupported protocol"),
    (POLICY, _set("spec.ingress.0.ports.2.endPort", 29999), "spec.ingress[0].ports[2].endPort",
     "greater than or equal"),
    (POLICY, _set("spec.ingress.0.ports.2.endPort", 65536), "spec.ingress[0].ports[2].endPort",
     "out of range"),
    (POLICY, _set("spec.ingress.0.ports.1.endPort", 100), "spec.ingress[0].ports[1].endPort", "named port"),
    (POLICY, _set("spec.ingress.0.ports.0", {"endPort": 100}), "spec.ingress[0].ports[0].endPort",
     "without port"),
    (POLICY, _set("spec.policyTypes", ["Ingress", "Ingress"]), "spec.policyTypes[1]", "duplicate"),
    (POLICY, _set("spec.policyTypes", ["Both"]), "spec.policyTypes[0]", "not one of"),
]


@pytest.mark.parametrize("base,mutate,field,words", BAD,
                         ids=[f"{b['kind']}-{f}-{w}" for b, _, f, w in BAD])
def test_invalid_input_is_rejected_naming_the_field(base, mutate, field, words):
    d = clone(base)
    mutate(d)
    with pytest.raises(ValidationError) as e:
        parse_object(d, origin="m.yaml")
    err = e.value
    assert err.field == field, str(err)
    assert words in err.message, str(err)
    assert err.kind == base["kind"] and err.origin == "m.yaml"
    # The error names the object, and carries its key when one can be read,
    # so the source can keep that object's previous version.
    if isinstance(d.get("metadata"), dict) and d["metadata"].get("name"):
        assert err.key is not None and err.name.endswith(err.key[1])
        assert err.name in str(err) and field in str(err)


def test_every_valid_fixture_parses_so_bad_cases_fail_for_their_own_reason():
    for base in (NAMESPACE, POD, NODE, SERVICE, SLICE, POLICY):
        assert parse_object(clone(base)).kind.value == base["kind"]


def test_non_object_input_is_a_validation_error():
    with pytest.raises(ValidationError):
        parse_object(["not", "an", "object"])
