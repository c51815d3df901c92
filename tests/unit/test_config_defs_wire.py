"""Pure pieces: configuration schema, the C header's codes, the agent wire."""
from __future__ import annotations

import os
import socket
import tempfile
import threading

import pytest

from agent.model import bpfdefs
from agent.api import wire
from agent.api.server import ApiError, ApiServer
from agent.config import KEYS, Config, ConfigError


def test_every_key_has_a_default_and_defaults_validate():
    cfg = Config.defaults()
    for k in KEYS:
        assert getattr(cfg, k.name) == k.default
        assert cfg.origin[k.name] == "default"
    assert cfg.tc_priority >= 25000, "fastpath's filters sit behind typical foreign ones"
    assert cfg.host_stack_cidrs == ("169.254.20.10/32",)


def test_flags_override_file_override_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tc_priority: 26000\nlog_level: debug\n")
    cfg = Config.defaults().with_file(f).with_values({"tc_priority": "27000"}, "flag")
    assert cfg.tc_priority == 27000 and cfg.origin["tc_priority"] == "flag"
    assert cfg.log_level == "debug" and cfg.origin["log_level"] == f"file {f}"


@pytest.mark.parametrize("key,value,msg", [
    ("tc_priority", "0", "below the minimum 1"),
    ("tc_priority", "high", "tc_priority: invalid value"),
    ("log_level", "loud", "not one of debug, info, warning, error"),
    ("host_stack_cidrs", "169.254.20.10/33", "host_stack_cidrs: invalid value"),
    ("host_stack_cidrs", "10.0.0.1/8", "host bits set"),
    ("tc_prio", "1", "unknown configuration key 'tc_prio' (did you mean tc_priority?)"),
])
def test_bad_values_are_rejected_naming_the_key(key, value, msg):
    import re
    with pytest.raises(ConfigError, match=re.escape(msg)):
        Config.defaults().with_values({key: value}, "flag")


def test_a_bad_file_is_rejected_whole_with_its_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tc_priority: 26000\nlog_level: loud\n")
    with pytest.raises(ConfigError, match=f"{f}: log_level"):
        Config.defaults().with_file(f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        Config.defaults().with_file(f)


def test_reason_codes_come_from_the_c_header():
    d = bpfdefs.load()
    labels = {c.label for c in d.reasons.values()}
    assert {"redirected-local", "redirected-eni", "to-stack", "dropped-invalid-packet"} <= labels
    assert all(d.is_drop(v) == c.label.startswith("dropped-") for v, c in d.reasons.items())
    assert d.maps["FP_MAP_ENDPOINTS"].endswith("_v1")
    assert all(len(name) <= 15 for name in d.maps.values()), "kernel map names are 15 chars"
    assert d.reason(9999) == "reason-9999"



def test_every_tail_call_slot_is_filled_by_one_loaded_program():
    """A slot no program fills drops what reaches it (FP_DROP_NO_TAIL_CALL):
    every FP_TAIL_* slot below FP_TAIL_MAX has exactly one program, which
    the loader loads."""
    from agent.datapath.loader import PROGRAMS, TAIL_CALLS
    d = bpfdefs.load()
    slots = {name: int(d.defines[slot]) for name, slot in TAIL_CALLS.items()}
    assert set(TAIL_CALLS) <= set(PROGRAMS)
    assert sorted(slots.values()) == list(range(int(d.defines["FP_TAIL_MAX"])))
    assert slots["fp_vpc6_sctp"] == int(d.defines["FP_TAIL_FROM_VPC6_SCTP"])


class Handler:
    def rpc_Echo(self, text: str) -> dict:
        return {"text": text}

    def rpc_Fail(self) -> None:
        raise ApiError("nope", "it failed on purpose")

    def rpc_Crash(self) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def server():
    path = os.path.join(tempfile.mkdtemp(), "a.sock")
    srv = ApiServer(path, Handler())
    srv.start()
    yield path
    srv.stop()


def test_wire_round_trip_and_errors(server):
    assert wire.call(server, "Echo", {"text": "hi"}) == {"text": "hi"}
    with pytest.raises(wire.RemoteError) as e:
        wire.call(server, "Fail")
    assert (e.value.code, e.value.message) == ("nope", "it failed on purpose")
    with pytest.raises(wire.RemoteError) as e:
        wire.call(server, "Crash")
    assert e.value.code == "internal" and "boom" in e.value.message
    with pytest.raises(wire.RemoteError) as e:
        wire.call(server, "Nope")
    assert e.value.code == "unknown-method"
    with pytest.raises(wire.RemoteError) as e:
        wire.call(server, "Echo", {"wrong": 1})
    assert e.value.code == "bad-request"


def test_a_garbage_client_does_not_hurt_the_server(server):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server)
        s.sendall(b"\x00\x00\x00\x05{bad}")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server)
        s.sendall(b"\xff\xff\xff\xff")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        wire.call(server, "Echo", {"text": str(i)})["text"])) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=int) == [str(i) for i in range(20)]


def test_an_absent_agent_is_an_oserror_the_caller_can_name():
    with pytest.raises(FileNotFoundError):
        wire.call("/nonexistent/agent.sock", "Status")
