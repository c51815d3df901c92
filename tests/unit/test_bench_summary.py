"""The benchmark tables of README.md and docs/benchmarks.md are rendered
from bench/results.json (bench/results.py): they must say exactly what the
record says, and a table naming a figure the record lacks is an error."""
from __future__ import annotations

import json

import pytest

from bench import results


def _records() -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(results.RESULTS_JSON.read_text())}


@pytest.mark.parametrize("doc", results.SUMMARY_DOCS, ids=lambda p: p.name)
def test_each_summary_table_is_what_the_record_renders(doc):
    text = doc.read_text()
    assert results.SUMMARY_BEGIN in text, f"{doc.name} has no bench summary"
    names = results.summary_names(text.split(results.SUMMARY_BEGIN, 1)[1]
                                  .split(results.SUMMARY_END, 1)[0])
    assert names, f"{doc.name}'s bench summary lists no figure"
    fresh = results.render_summaries(text, _records(), doc.name)
    assert fresh == text, (f"{doc.name}'s bench summary differs from bench/results.json: "
                           "run `python -m bench.results`")


def test_a_stale_value_is_rendered_again_from_the_record():
    recs = _records()
    name = next(iter(recs))
    stale = (f"x\n{results.SUMMARY_BEGIN}\n| figure |\n|---|\n| `{name}` | 1 nonsense | | | | |\n"
             f"{results.SUMMARY_END}\ny\n")
    fresh = results.render_summaries(stale, recs, "doc")
    assert results.summary_row(recs[name]) in fresh
    assert "nonsense" not in fresh
    assert fresh.startswith("x\n") and fresh.endswith(f"{results.SUMMARY_END}\ny\n")


def test_a_figure_the_record_lacks_is_named_with_its_document():
    text = f"{results.SUMMARY_BEGIN}\n| `no.such.figure` |\n{results.SUMMARY_END}\n"
    with pytest.raises(ValueError, match=r"README\.md.*no\.such\.figure"):
        results.render_summaries(text, _records(), "README.md")


def test_an_unclosed_summary_is_an_error():
    with pytest.raises(ValueError, match="never closed"):
        results.render_summaries(f"{results.SUMMARY_BEGIN}\n| `x` |\n", {}, "doc")


def test_the_nodeport_bench_records_the_floor_beside_fastpath(tmp_path, monkeypatch):
    """What bench/nodeport_bench.py records from a run's figures: the
    floor's rows beside fastpath's, under the names the summaries list."""
    from bench import nodeport_bench
    monkeypatch.setattr(results, "RESULTS_JSON", tmp_path / "results.json")
    monkeypatch.setattr(results, "RESULTS_MD", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results, "SUMMARY_DOCS", ())
    raw = {a: {"crr": [v, v], "rr": [v * 5, v * 5]}
           for a, v in (("fastpath", 24.0), ("direct", 26.0), ("floor", 26.5),
                        ("floor-direct", 28.0))}
    res = {"raw": raw, "medians": {a: {m: x[0] for m, x in ms.items()} for a, ms in raw.items()},
           "rounds": 2, "crr_s": 2.0, "rr_s": 1.0, "services_in_maps": 1000, "errors": {},
           "loads": {}, "cost": {a: {"ns_per_conn": n, "programs": {}} for a, n in (
               ("fastpath", 6600.0), ("direct", 4000.0), ("floor", 3650.0),
               ("floor-direct", 1900.0))}}
    nodeport_bench.record_all(res, [])
    got = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(got) == {"lb.nodeport_vs_direct", "lb.nodeport_vs_direct.rr",
                        "lb.nodeport_floor_vs_direct", "lb.nodeport_floor_vs_direct.rr"}
    assert got["lb.nodeport_floor_vs_direct"]["ratio"] == round(26.5 / 28.0, 4)
    assert got["lb.nodeport_floor_vs_direct"]["baseline"] == 28.0
    assert "3650 ns to the NodePort" in got["lb.nodeport_floor_vs_direct"]["notes"]
