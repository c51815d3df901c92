"""fastpath-cni without root: config and environment parsing, the CNI error
JSON, and every command against a stub agent served by the real ApiServer
(so the plugin's own framing is checked against agent/api/wire.py)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import threading
import time

import pytest

from agent.api import wire
from agent.api.server import ApiError, ApiServer
from chainer import install, plugin

PREV_040 = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "c1"}],
            "ips": [{"version": "4", "address": "10.241.1.100/16", "interface": 0}]}


class StubAgent:
    """Answers like agent/daemon/agent.py's rpc_ methods and records the calls."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.fail: tuple[str, str] | None = None
        self.ready = True
        self.endpoints: dict[tuple[str, str], dict] = {}
        self.ip = "10.241.1.100"

    def _maybe_fail(self):
        if self.fail:
            raise ApiError(*self.fail)

    def rpc_EndpointAdd(self, netns, ifname="eth0", container_id="", pod_namespace="",
                        pod_name="", require_eni=False, **extra):
        self.calls.append(("EndpointAdd", dict(netns=netns, ifname=ifname,
                                               container_id=container_id,
                                               pod_namespace=pod_namespace, pod_name=pod_name,
                                               require_eni=require_eni, **extra)))
        self._maybe_fail()
        ep = {"ip": self.ip, "host_ifname": "cali0123456789a", "eni": "eth1",
              "container_id": container_id, "ifname": ifname,
              "timing_ms": {"discover": 1.0, "attach": 2.0, "total": 3.0}}
        self.endpoints[(container_id, ifname)] = ep
        return ep

    def rpc_EndpointDel(self, container_id, ifname="eth0"):
        self.calls.append(("EndpointDel", dict(container_id=container_id, ifname=ifname)))
        self._maybe_fail()
        ep = self.endpoints.pop((container_id, ifname), None)
        return {"deleted": ep is not None, **({"ip": ep["ip"]} if ep else {})}

    def rpc_EndpointCheck(self, container_id, ifname="eth0"):
        self.calls.append(("EndpointCheck", dict(container_id=container_id, ifname=ifname)))
        self._maybe_fail()
        return {"ok": True, "endpoint": {"ip": self.ip}}

    def rpc_EndpointList(self):
        self.calls.append(("EndpointList", {}))
        return list(self.endpoints.values())

    def rpc_Status(self):
        self.calls.append(("Status", {}))
        return {"ready": self.ready}


@pytest.fixture
def paths():
    # unix socket paths are short: not pytest's deep tmp_path
    root = tempfile.mkdtemp(prefix="fpcni-")
    yield {"root": root, "socket": f"{root}/agent.sock", "state": f"{root}/state",
           "log": f"{root}/cni.log"}
    subprocess.run(["rm", "-rf", root], check=False)


class _Current:
    """The server's handler: forwards to the stub of the running test."""
    stub: StubAgent | None = None

    def __getattr__(self, name):
        return getattr(self.stub, name)


@pytest.fixture(scope="module")
def agent_server():
    # one server for the module: stopping one takes half a second
    root = tempfile.mkdtemp(prefix="fpcni-srv-")
    current = _Current()
    server = ApiServer(f"{root}/agent.sock", current)
    server.start()
    yield server.path, current
    server.stop()
    subprocess.run(["rm", "-rf", root], check=False)


@pytest.fixture
def agent(paths, agent_server):
    path, current = agent_server
    current.stub = StubAgent()
    paths["socket"] = path
    yield current.stub
    current.stub = None


def conf(paths, version="0.4.0", prev=PREV_040, **over):
    c = {"cniVersion": version, "name": "terway-chainer", "type": "fastpath-cni",
         "agent_socket": paths["socket"], "state_dir": paths["state"], "log_file": paths["log"],
         "timeout_seconds": 2}
    if prev is not None:
        c["prevResult"] = prev
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def env(command="ADD", cid="c1", netns="/var/run/netns/pod", ifname="eth0",
        args="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
             "K8S_POD_INFRA_CONTAINER_ID=c1"):
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
            "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": "/opt/cni/bin"}


def run(environ, data):
    if not isinstance(data, (bytes, str)):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    rc, out = plugin.run(environ, data)
    return rc, (json.loads(out) if out else None)


def assert_error(rc, out, code, *words):
    assert rc == 1, out
    assert set(out) >= {"cniVersion", "code", "msg"} and out["code"] == code, out
    for w in words:
        assert w in out["msg"], (w, out["msg"])


# -- configuration and environment ----------------------------------------------------

CONFIG_ERRORS = [
    ("an unknown key is named with its value and a suggestion",
     {"agent_sock": "/x.sock"}, 2, ["'agent_sock'", '"/x.sock"', "did you mean 'agent_socket'"]),
    ("an unknown cniVersion lists the supported ones",
     {"cniVersion": "0.2.0"}, 1, ["'0.2.0'", "0.4.0", "1.0.0"]),
    ("a missing cniVersion is an incompatible one", {"cniVersion": None}, 1, ["''"]),
    ("log_level must be a known level", {"log_level": "verbose"}, 7, ["log_level", "verbose"]),
    ("timeout_seconds must be positive", {"timeout_seconds": 0}, 7, ["timeout_seconds"]),
    ("timeout_seconds must be a number", {"timeout_seconds": "10"}, 7, ["timeout_seconds"]),
    ("timeout_seconds is not a boolean", {"timeout_seconds": True}, 7, ["timeout_seconds"]),
    ("agent_socket must be absolute", {"agent_socket": "agent.sock"}, 7, ["absolute"]),
    ("agent_socket must fit a sockaddr_un", {"agent_socket": "/" + "s" * 120}, 7, ["107"]),
    ("state_dir must be a string", {"state_dir": 5}, 7, ["state_dir"]),
    ("require_eni must be a boolean", {"require_eni": "yes"}, 7, ["require_eni"]),
    ("the network needs a name", {"name": None}, 7, ["'name'"]),
    ("a name of the wrong type is named as such", {"name": ["a"]}, 7,
     ["name must be a string, not array"]),
    ("so is a type of the wrong type", {"type": {"t": 1}}, 7, ["type must be a string, not object"]),
    ("cniVersion must be a string", {"cniVersion": 1.0}, 7, ["cniVersion must be a string"]),
    ("prevResult must be an object", {"prevResult": [1]}, 6, ["prevResult", "not array"]),
    ("nesting is bounded", {"runtimeConfig": json.loads("[" * 40 + "]" * 40)}, 6, ["nests deeper"]),
    ("runtimeConfig must be an object", {"runtimeConfig": "x"}, 6, ["runtimeConfig"]),
    ("portMappings must be a list", {"runtimeConfig": {"portMappings": {"hostPort": 80}}}, 7,
     ["runtimeConfig.portMappings must be a list"]),
]


@pytest.mark.parametrize("description,override,code,words", CONFIG_ERRORS,
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors(paths, description, override, code, words):
    c = conf(paths)
    for k, v in override.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    assert_error(*run(env(), c), code, *words)


def test_defaults_apply_when_keys_are_absent():
    c = plugin.parse_config(json.dumps({"cniVersion": "1.0.0", "name": "n",
                                        "type": "fastpath-cni"}).encode(), "ADD")
    assert (c.agent_socket, c.state_dir, c.log_file, c.log_level, c.timeout, c.require_eni) == \
        ("/var/run/fastpath/agent.sock", "/var/run/fastpath", "", "info", 10.0, True)
    assert c.prev_result is None


@pytest.mark.parametrize("data,words", [
    (b"{", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b"\xff\xfe{}", ["not valid JSON"]),
    (b'{"cniVersion": "1.0.0"} trailing', ["not valid JSON"]),
    # the C scanner's recursion limit, met at any depth the interpreter allows
    (b"[" * 100_000 + b"]" * 100_000, ["nested deeper than the decoder can follow"]),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, ["nested deeper than the decoder can follow"]),
    (b'{"cniVersion": "1.0.0", "pad": "' + b"x" * (1 << 20) + b'"}', ["larger than"]),
])
def test_stdin_that_is_not_a_json_object_is_a_decode_error(data, words):
    assert_error(*run(env(), data), 6, *words)


@pytest.mark.parametrize("environ,words", [
    ({}, ["CNI_COMMAND=''"]),
    ({"CNI_COMMAND": "UPDATE"}, ["'UPDATE'"]),
    (env(netns=""), ["CNI_NETNS"]),
    (env(cid=""), ["CNI_CONTAINERID"]),
    (env(cid="-bad"), ["'-bad'"]),
    (env(cid="a/b"), ["'a/b'"]),
    (env(ifname="eth0:1"), ["'eth0:1'"]),
    (env(ifname="x" * 16), ["CNI_IFNAME", "1 to 15 bytes"]),
    (env(ifname="\u00e9" * 8), ["CNI_IFNAME", "not 16"]),
    (env(ifname=".."), ["CNI_IFNAME", "'..'"]),
    (env(ifname="eth\t0"), ["CNI_IFNAME", "whitespace"]),
    (env(command="CHECK", netns=""), ["CNI_NETNS"]),
    (env(cid="c" * 4096), ["CNI_CONTAINERID", "4096 characters", "at most 200"]),
    (env(cid="c" * 4096, command="DEL"), ["CNI_CONTAINERID", "at most 200"]),
    (env(cid="\u0661\u0662"), ["CNI_CONTAINERID", "start with a letter or digit"]),
    (env(netns="var/run/netns/pod"), ["CNI_NETNS='var/run/netns/pod'", "absolute path"]),
    (env(netns="."), ["CNI_NETNS='.'", "absolute path"]),
    (env(netns="/" + "n" * 5000), ["CNI_NETNS", "longer than a path"]),
    (env(args="K8S_POD_NAMESPACE=Shop;K8S_POD_NAME=web-0"), ["K8S_POD_NAMESPACE='Shop'"]),
    (env(args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=" + "w" * 254), ["K8S_POD_NAME", "254"]),
    (env(args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web_0"), ["K8S_POD_NAME='web_0'"]),
])
def test_invalid_environment(paths, environ, words):
    assert_error(*run(environ, conf(paths)), 4, *words)


def test_identity_rules_accept_what_runtimes_really_send():
    for cid in ("0" * 64, "k8s.io-" + "f" * 64, "fpcni-" + "a" * 76 + "-" + "b" * 70, "c1",
                "c" * plugin.MAX_CONTAINER_ID):
        assert plugin.container_id_problem(cid) == "", cid
    for name in ("eth0", "net1", "e" * 15, "veth_x-1.2"):
        assert plugin.ifname_problem(name) == "", name
    assert plugin.netns_path_problem("/var/run/netns/cni-1234") == ""
    assert plugin.netns_path_problem("/proc/4242/ns/net") == ""
    # a DEL without a netns (the runtime lost it) is still a DEL, and one
    # whose netns names nothing usable is a DEL without one
    e = plugin.parse_env(env("DEL", netns=""))
    assert (e.command, e.netns) == ("DEL", "")
    e = plugin.parse_env(env("DEL", netns="pod"))
    assert (e.netns, e.ignored_netns) == ("", "pod")


def test_wrong_types_in_gc_attachments_are_named(paths, agent):
    c = conf(paths, version="1.1.0", prev=None)
    c["cni.dev/valid-attachments"] = [{"containerID": ["x"], "ifname": "eth0"}]
    assert_error(*run(env("GC", cid="", netns="", ifname=""), c), 6,
                 "valid-attachments[0].containerID must be a string, not array")
    assert agent.calls == []


def test_cni_args_parsing():
    assert plugin.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a=b;junk;;K8S_POD_NAMESPACE=ns") \
        == {"IgnoreUnknown": "1", "K8S_POD_NAME": "a=b", "K8S_POD_NAMESPACE": "ns"}


# -- ADD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_registers_with_the_agent_and_prints_prev_result_in_the_conflist_version(
        paths, agent, version):
    prev = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "c1"}],
            "ips": [{"version": "4", "address": "10.241.1.100/16", "interface": 0}],
            "dns": {"nameservers": ["10.0.0.10"]}}
    rc, out = run(env(), conf(paths, version=version, prev=prev))
    assert rc == 0, out
    assert agent.calls == [("EndpointAdd", {
        "netns": "/var/run/netns/pod", "ifname": "eth0", "container_id": "c1",
        "pod_namespace": "shop", "pod_name": "web-0", "require_eni": True})]
    expected_ip = {"address": "10.241.1.100/16", "interface": 0}
    if version < "1.0.0":
        expected_ip["version"] = "4"
    assert out == {"cniVersion": version, "interfaces": prev["interfaces"],
                   "ips": [expected_ip], "dns": prev["dns"]}


def test_add_without_prev_result_is_refused_before_asking_the_agent(paths, agent):
    assert_error(*run(env(), conf(paths, prev=None)), 7, "prevResult", "chained after")
    assert agent.calls == []


def test_add_passes_the_runtimes_port_mappings_to_the_agent(paths, agent):
    # what containerd's CRI puts in runtimeConfig for a pod with hostPorts,
    # when the conflist entry declares the portMappings capability
    mappings = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}]
    rc, _ = run(env(), conf(paths, capabilities={"portMappings": True},
                            runtimeConfig={"portMappings": mappings}))
    assert rc == 0
    assert agent.calls[0][1]["port_mappings"] == mappings
    # none: nothing extra is sent (an older agent would refuse an unknown keyword)
    agent.calls.clear()
    rc, _ = run(env(), conf(paths, runtimeConfig={"portMappings": []}))
    assert rc == 0 and "port_mappings" not in agent.calls[0][1]


def test_add_passes_require_eni_false_through(paths, agent):
    rc, _ = run(env(args=""), conf(paths, require_eni=False))
    assert rc == 0
    assert agent.calls[0][1]["require_eni"] is False
    assert agent.calls[0][1]["pod_name"] == ""


def test_add_warns_when_the_sandbox_ids_disagree(paths, agent):
    rc, _ = run(env(args="K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=other"), conf(paths))
    assert rc == 0
    assert "differs from K8S_POD_INFRA_CONTAINER_ID other" in open(paths["log"]).read()


AGENT_ERRORS = [
    ("discovery", "interface eth0 not found in pod netns /x", 101),
    ("eni-unresolved", "no ENI found for pod IP 10.241.1.100", 102),
    ("datapath", "cannot attach fp_from_pod", 103),
    ("internal", "KeyError: 'x'", 100),
    ("hostport-refused", "hostPort 10.240.0.11:30080/TCP of pod shop/web-0 is taken by "
     "Service shop/np", 105),
    ("invalid-port-mappings", "runtimeConfig.portMappings[0].protocol: 'icmp' is not tcp", 7),
    ("bad-request", "unexpected keyword argument 'require_eni'", 100),
]


@pytest.mark.parametrize("agent_code,message,cni_code", AGENT_ERRORS,
                         ids=[e[0] for e in AGENT_ERRORS])
def test_agent_errors_become_cni_codes_with_the_agents_words(paths, agent, agent_code,
                                                            message, cni_code):
    agent.fail = (agent_code, message)
    assert_error(*run(env(), conf(paths)), cni_code, message)


def test_add_with_no_agent_says_where_it_looked(paths):
    t = time.monotonic()
    rc, out = run(env(), conf(paths, timeout_seconds=0.3))
    assert_error(rc, out, 11, paths["socket"], "agent_socket")
    assert 0.25 <= time.monotonic() - t < 5, "ADD waits up to timeout_seconds for the agent"


def test_add_waits_for_an_agent_that_is_starting(paths):
    stub = StubAgent()
    server = ApiServer(paths["socket"], stub)
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        rc, out = run(env(), conf(paths, timeout_seconds=5))
    finally:
        starter.join()
        server.stop()
    assert rc == 0, out
    assert [c[0] for c in stub.calls] == ["EndpointAdd"]


def test_add_reply_cut_short_is_try_again(paths):
    """An agent that dies mid-request: the plugin reports, never hangs."""
    import socket as socketmod
    srv = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    srv.bind(paths["socket"])
    srv.listen(1)

    def accept_and_drop():
        conn, _ = srv.accept()
        wire.recv_frame(conn)
        conn.sendall(b"\x00\x00\x01\x00{")      # promises 256 bytes, sends 1
        conn.close()

    t = threading.Thread(target=accept_and_drop)
    t.start()
    try:
        assert_error(*run(env(), conf(paths)), 11, "broke during ADD")
    finally:
        t.join()
        srv.close()


# -- DEL ---------------------------------------------------------------------------------

def test_del_asks_the_agent(paths, agent):
    run(env(), conf(paths))
    rc, out = run(env("DEL", netns=""), conf(paths))
    assert (rc, out) == (0, None)
    assert agent.calls[-1] == ("EndpointDel", {"container_id": "c1", "ifname": "eth0"})
    assert agent.endpoints == {}
    rc, out = run(env("DEL", netns=""), conf(paths, prev=None))
    assert (rc, out) == (0, None), "a second DEL, without prevResult, succeeds too"


def test_del_with_the_agent_down_is_queued_for_replay(paths):
    rc, out = run(env("DEL", netns=""), conf(paths))
    assert (rc, out) == (0, None)
    qfile = os.path.join(paths["state"], plugin.DEL_QUEUE, "c1-eth0.json")
    # the plugin made the state dir: root's alone, as the agent keeps it
    for path, mode in ((paths["state"], 0o700), (os.path.dirname(qfile), 0o700),
                       (qfile, 0o600), (paths["log"], 0o600)):
        assert os.stat(path).st_mode & 0o777 == mode, path
    queued = json.loads(open(qfile).read())
    assert (queued["container_id"], queued["ifname"]) == ("c1", "eth0")
    rc, _ = run(env("DEL", netns=""), conf(paths))
    assert rc == 0
    assert os.listdir(os.path.dirname(qfile)) == ["c1-eth0.json"], "a repeated DEL queues once"
    assert "queued" in open(paths["log"]).read()


def test_a_del_with_an_unusable_netns_still_deletes_by_container_id(paths):
    rc, out = run(env("DEL", netns="var/run/netns/pod"), conf(paths))
    assert (rc, out) == (0, None)
    qfile = os.path.join(paths["state"], plugin.DEL_QUEUE, "c1-eth0.json")
    assert json.loads(open(qfile).read())["netns"] == ""
    assert "is not an absolute path: deleting by container id" in open(paths["log"]).read()


def test_del_queue_is_bounded_and_del_still_succeeds(paths, monkeypatch):
    monkeypatch.setattr(plugin, "DEL_QUEUE_MAX", 5)
    qdir = os.path.join(paths["state"], plugin.DEL_QUEUE)
    os.makedirs(qdir)
    for i in range(5):
        open(os.path.join(qdir, f"old{i}-eth0.json"), "w").write("{}")
    rc, out = run(env("DEL", cid="c9"), conf(paths))
    assert (rc, out) == (0, None)
    assert not os.path.exists(os.path.join(qdir, "c9-eth0.json"))
    assert "queue" in open(paths["log"]).read() and "full" in open(paths["log"]).read()


def test_del_error_from_a_live_agent_is_reported(paths, agent):
    agent.fail = ("internal", "maps unavailable")
    assert_error(*run(env("DEL"), conf(paths)), 100, "maps unavailable")


# -- CHECK -------------------------------------------------------------------------------

def test_check_passes_when_the_agent_finds_the_datapath_intact(paths, agent):
    rc, out = run(env("CHECK"), conf(paths))
    assert (rc, out) == (0, None)
    assert agent.calls == [("EndpointCheck", {"container_id": "c1", "ifname": "eth0"})]


@pytest.mark.parametrize("fail,words", [
    (("check-failed", "fp_from_pod is not attached to cali0123456789a ingress"),
     ["fp_from_pod is not attached"]),
    (("not-found", "endpoint c1-eth0 is not known to the agent"), ["no endpoint", "c1"]),
])
def test_check_names_what_is_wrong(paths, agent, fail, words):
    agent.fail = fail
    assert_error(*run(env("CHECK"), conf(paths)), 104, *words)


def test_check_compares_the_agents_ip_with_the_add_result(paths, agent):
    agent.ip = "10.241.1.111"
    assert_error(*run(env("CHECK"), conf(paths)), 104, "10.241.1.111", "10.241.1.100")


def test_check_needs_prev_result_and_a_version_that_has_check(paths, agent):
    assert_error(*run(env("CHECK"), conf(paths, prev=None)), 7, "prevResult")
    assert_error(*run(env("CHECK"), conf(paths, version="0.3.1")), 1, "CHECK", "0.3.1")
    assert agent.calls == []


# -- VERSION, STATUS, GC ---------------------------------------------------------------------

def test_version():
    rc, out = run({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert rc == 0 and out == {"cniVersion": "0.4.0",
                               "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    rc, out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and out["cniVersion"] == "1.0.0"


def test_status(paths, agent):
    c = conf(paths, version="1.1.0", prev=None)
    assert run(env("STATUS", cid="", netns="", ifname=""), c) == (0, None)
    agent.ready = False
    assert_error(*run(env("STATUS"), c), 50, "starting")
    assert_error(*run(env("STATUS"), conf(paths, version="1.0.0", prev=None)), 1, "1.1.0")


def test_status_without_agent(paths):
    assert_error(*run(env("STATUS"), conf(paths, version="1.1.0", prev=None)), 50,
                 paths["socket"])


def test_gc_deletes_only_attachments_the_runtime_no_longer_has(paths, agent):
    for cid in ("keep", "stale"):
        run(env(cid=cid), conf(paths))
    agent.endpoints[("", "eth0")] = {"ip": "10.0.0.9", "container_id": "", "ifname": "eth0"}
    c = conf(paths, version="1.1.0", prev=None)
    c["cni.dev/valid-attachments"] = [{"containerID": "keep", "ifname": "eth0"}]
    rc, out = run(env("GC", cid="", netns="", ifname=""), c)
    assert (rc, out) == (0, None)
    assert sorted(agent.endpoints) == [("", "eth0"), ("keep", "eth0")]


# -- the pieces the plugin restates, and its own JSON --------------------------------------

def test_protocol_and_queue_constants_match_the_agent():
    from agent.daemon import agent as agent_mod
    assert (plugin.MAX_FRAME, plugin.PROTOCOL_VERSION) == (wire.MAX_FRAME, wire.PROTOCOL_VERSION)
    assert plugin.DEL_QUEUE == agent_mod.DEL_QUEUE


JSON_VALUES = [
    {}, [], "", "é\u2028\"\\\n\t", 0, -17, 2 ** 70, 1.5, -0.0, 1e300, True, False, None,
    {"a": [1, {"b": None}], "c": "d"}, [[[]]], {"cniVersion": "1.0.0", "ips": PREV_040["ips"]},
]


@pytest.mark.parametrize("value", JSON_VALUES, ids=range(len(JSON_VALUES)))
def test_json_round_trips_and_agrees_with_the_json_module(value):
    text = plugin.dumps(value)
    assert json.loads(text) == value
    assert plugin.loads(text) == value
    assert plugin.loads(json.dumps(value, indent=2)) == value
    assert plugin.loads(text.encode()) == value


@pytest.mark.parametrize("bad", ["", "  ", "{", "[1,]", "nul", "{} {}", '"\\x"', "{'a': 1}"])
def test_json_rejects_invalid_text(bad):
    with pytest.raises(ValueError):
        plugin.loads(bad)


def test_json_refuses_what_has_no_json_form():
    for value in (math.nan, math.inf, {1: 2}, {"a": object()}):
        with pytest.raises((TypeError, ValueError)):
            plugin.dumps(value)
    assert plugin.dumps((1, "x")) == '[1,"x"]'


# -- log -------------------------------------------------------------------------------------

def test_log_lines_rotate(paths, agent, monkeypatch):
    monkeypatch.setattr(plugin, "LOG_ROTATE_BYTES", 200)
    for i in range(4):
        assert run(env(cid=f"c{i}"), conf(paths, log_level="debug"))[0] == 0
    current, older = open(paths["log"]).read(), open(paths["log"] + ".1").read()
    assert "ADD c3/eth0" in current and "timing" in current
    assert "ADD c" in older


# -- the executables -------------------------------------------------------------------------

def test_installed_plugin_and_source_launcher_behave_alike(paths):
    installed = install.install(paths["root"] + "/bin")
    launcher = install.REPO / "chainer" / "fastpath-cni"
    bad = paths["root"] + "/other-python"
    # a node whose interpreter changed since the install compiles the source
    text = installed.read_bytes().replace(b"#:code cpython-", b"#:code other-")
    open(bad, "wb").write(text)
    os.chmod(bad, 0o755)
    for exe in (str(installed), str(launcher), bad):
        r = subprocess.run([exe], input=b'{"cniVersion": "0.4.0"}', capture_output=True,
                           env={"CNI_COMMAND": "VERSION"}, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["supportedVersions"][-1] == "1.1.0"
        r = subprocess.run([exe], input=b"{oops", capture_output=True,
                           env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                                "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}, timeout=30)
        assert r.returncode == 1 and json.loads(r.stdout)["code"] == 6, (exe, r.stdout, r.stderr)


def test_install_refuses_an_interpreter_too_old(paths):
    fake = paths["root"] + "/python3.6"
    open(fake, "w").write("#!/bin/sh\necho 3 6\n")
    os.chmod(fake, 0o755)
    with pytest.raises(install.InstallError, match="3.8 or later"):
        install.install(paths["root"] + "/bin", python=fake)
    assert not os.path.exists(paths["root"] + "/bin/fastpath-cni")
