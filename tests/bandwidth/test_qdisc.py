"""The ENIs' root qdisc, with tc replaced by a recorder: which commands
install EDT (fq, or mq with one fq per queue) and HTB, that an operator's
qdisc is never replaced, that ours is kept across restarts and removed on
restore, and which egress mode the probe's findings give. (The HTB branch
runs for real in vm-tests/test_bandwidth.py; this kernel has no fq.)"""
from __future__ import annotations

import json
import subprocess

import pytest

from agent.datapath import qdisc


class FakeTc:
    def __init__(self, root_kind="noqueue", root_handle="0:", queues=1):
        self.root = (root_kind, root_handle)
        self.queues = queues
        self.calls: list[list[str]] = []

    def __call__(self, args, netns=None, check=True):
        if args[:4] == ["-j", "qdisc", "show", "dev"]:
            kind, handle = self.root
            out = [] if kind == "noqueue" and handle == "0:" else [{"kind": kind, "handle": handle,
                                                                    "root": True}]
            return subprocess.CompletedProcess(args, 0, json.dumps(out), "")
        self.calls.append(args)
        if args[:2] == ["qdisc", "replace"] and "root" in args:
            i = args.index("handle")
            self.root = (args[i + 2], args[i + 1])
        if args[:2] == ["qdisc", "del"]:
            self.root = ("noqueue", "0:")
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.fixture
def fake(monkeypatch):
    def make(**kw):
        t = FakeTc(**kw)
        monkeypatch.setattr(qdisc, "tc", t)
        monkeypatch.setattr(qdisc, "tx_queues", lambda dev, netns=None: t.queues)
        return t
    return make


def test_edt_on_a_single_queue_eni_is_fq_with_the_programs_horizon_as_root(fake):
    t = fake()
    before = qdisc.install("eth1", qdisc.EDT)
    assert before.default and before.kind == "noqueue"
    assert t.calls == [["qdisc", "replace", "dev", "eth1", "root", "handle", "fa57:", "fq",
                        "horizon", "2s", "horizon_drop"]]


def test_edt_on_a_multi_queue_eni_is_mq_with_an_fq_per_queue(fake):
    t = fake(root_kind="mq", queues=4)
    qdisc.install("eth1", qdisc.EDT)
    assert t.calls[0] == ["qdisc", "replace", "dev", "eth1", "root", "handle", "fa57:", "mq"]
    assert [c[5] for c in t.calls[1:]] == ["fa57:1", "fa57:2", "fa57:3", "fa57:4"]
    assert all(c[6:] == ["fq", "horizon", "2s", "horizon_drop"] for c in t.calls[1:])


def test_htb_root_sends_unclassified_traffic_straight_through(fake):
    t = fake()
    qdisc.install("eth1", qdisc.HTB)
    assert t.calls == [["qdisc", "replace", "dev", "eth1", "root", "handle", "fa57:", "htb"]]


def test_an_operators_root_qdisc_is_never_replaced(fake):
    t = fake(root_kind="fq_codel", root_handle="8001:")
    with pytest.raises(qdisc.QdiscError, match="configured root qdisc .*fq_codel 8001:"):
        qdisc.install("eth1", qdisc.HTB)
    assert t.calls == []


def test_a_restarted_agent_keeps_its_own_root_and_classes(fake):
    t = fake(root_kind="htb", root_handle="fa57:")
    assert qdisc.install("eth1", qdisc.HTB).ours
    assert t.calls == [], "replacing the root would drop every class: limits would lapse"
    qdisc.install("eth1", qdisc.EDT)       # the mode changed between starts: replaced
    assert t.calls[0][-4:] == ["fq", "horizon", "2s", "horizon_drop"]


def test_restore_deletes_only_fastpaths_root(fake):
    t = fake(root_kind="fq_codel", root_handle="8001:")
    assert qdisc.restore("eth1") is None and t.calls == []
    t = fake(root_kind="htb", root_handle="fa57:")
    now = qdisc.restore("eth1")
    assert t.calls == [["qdisc", "del", "dev", "eth1", "root"]] and now.default


@pytest.mark.parametrize("fq, htb, wanted, mode", [
    (True, True, "auto", "edt"), (False, True, "auto", "htb"), (True, True, "htb", "htb"),
    (False, True, "edt", None), (False, False, "auto", None), (True, False, "htb", None),
])
def test_the_probe_picks_the_egress_mode_or_says_why_it_is_off(fq, htb, wanted, mode):
    got, why = qdisc.Probe(fq, htb, "fq: unknown").mode(wanted)
    assert got == mode
    if mode is None:
        assert "fq" in why or "htb" in why


def test_htb_classes_are_read_from_tcs_text(monkeypatch):
    text = ("class htb fa57:1 root prio 0 rate 50Mbit ceil 50Mbit burst 1600b cburst 1600b \n"
            "class htb fa57:1f root prio 0 rate 12346Kbit ceil 12346Kbit burst 1600b \n"
            "class htb 1:10 root prio 0 rate 1Gbit ceil 1Gbit burst 1375b \n")
    monkeypatch.setattr(qdisc, "tc", lambda args, netns=None, check=True:
                        subprocess.CompletedProcess(args, 0, text, ""))
    assert qdisc.classes("eth1") == {1: 50_000_000, 0x1f: 12_346_000}
    assert qdisc.same_rate(12_346_000, 12_345_678) and not qdisc.same_rate(50_000_000, 20_000_000)
    assert qdisc.quantum(10**9) == 200_000 and qdisc.quantum(1000) == 1514
    assert qdisc.burst(10**9) == 1_250_000 and qdisc.burst(10**7) == 131072
