"""Names and codes of the datapath, read from bpf/include/fastpath.h.

The C header is the single source of truth for reason codes, directions,
redirect kinds, endpoint flags and pinned map names. This module reads its
#defines and X-macro lists (no bcc, no kernel) so the CLI, metrics and
tests can name what the programs count without restating a single number.
Struct layouts are not read here: they come from the BTF of the compiled
programs and pinned maps (agent/datapath/btf.py, tables.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER = BPF_DIR / "include" / "fastpath.h"


@dataclass(frozen=True)
class Code:
    name: str     # C enumerator, e.g. FP_DROP_INVALID
    value: int
    label: str    # metric/CLI label, e.g. dropped-invalid-packet


@dataclass(frozen=True)
class Defs:
    reasons: dict[int, Code]
    dirs: dict[int, Code]
    redirect_kinds: dict[int, Code]
    maps: dict[str, str]          # FP_MAP_ENDPOINTS -> fp_ep4_v1
    defines: dict[str, int]       # numeric #defines (flags, limits)
    drop_min: int
    event_types: dict[int, Code] = None   # FP_EVENT_TYPES (monitor events), if declared
    ct_states: dict[int, Code] = None     # FP_CT_STATES (conntrack flow states)
    ct_events: dict[int, Code] = None     # FP_CT_EVENTS (conntrack event counters)
    families: dict[int, Code] = None      # FP_FAMILIES (counter key's address family)

    def reason(self, value: int) -> str:
        code = self.reasons.get(value)
        return code.label if code else f"reason-{value}"

    def is_drop(self, value: int) -> bool:
        return value >= self.drop_min

    def dir(self, value: int) -> str:
        code = self.dirs.get(value)
        return code.label if code else f"dir-{value}"

    def family(self, value: int) -> str:
        code = (self.families or {}).get(value)
        return code.label if code else f"family-{value}"

    def reason_value(self, name_or_label: str) -> int:
        for code in self.reasons.values():
            if name_or_label in (code.name, code.label):
                return code.value
        raise KeyError(name_or_label)


def _xmacro(text: str, list_name: str) -> dict[int, Code]:
    m = re.search(rf"#define {list_name}\(X\)(.*?)(?:\n\s*\n|\n#)", text, re.S)
    if not m:
        raise ValueError(f"{HEADER}: X-macro list {list_name} not found")
    out: dict[int, Code] = {}
    for name, val, label in re.findall(r'X\((\w+),\s*(\d+),\s*"([^"]+)"\)', m.group(1)):
        out[int(val)] = Code(name, int(val), label)
    return out


def _eval_int(expr: str) -> int | None:
    expr = expr.strip().rstrip("U").replace("U)", ")").replace("U <<", " <<")
    if not re.fullmatch(r"[\d\sx()<|a-fA-F]+", expr):
        return None
    try:
        return int(eval(expr, {"__builtins__": {}}))  # digits and shifts only
    except Exception:
        return None


def map_lineage(pin_name: str) -> str:
    """A pinned map's lineage, its name without the layout version:
    fp_ct4_v2 -> fp_ct4 (also for a pin the loader set aside, fp_ct4_v2_old)."""
    m = re.fullmatch(r"(fp_\w+?)_v\d+(_old\d*)?", pin_name)
    if not m:
        raise ValueError(f"{pin_name!r} is not a fastpath map name")
    return m.group(1)


@lru_cache(maxsize=None)
def load(header: Path = HEADER) -> Defs:
    text = header.read_text()
    maps = dict(re.findall(r"#define (FP_MAP_\w+)\s+(\w+)", text))
    defines: dict[str, int] = {}
    for name, expr in re.findall(r"#define (FP_\w+)\s+(\(?[^\n/]+)", text):
        val = _eval_int(expr)
        if val is not None:
            defines[name] = val
    return Defs(
        reasons=_xmacro(text, "FP_REASONS"),
        dirs=_xmacro(text, "FP_DIRS"),
        redirect_kinds=_xmacro(text, "FP_REDIRECT_KINDS"),
        maps=maps,
        defines=defines,
        drop_min=defines["FP_REASON_DROP_MIN"],
        event_types=_xmacro(text, "FP_EVENT_TYPES") if "FP_EVENT_TYPES(X)" in text else {},
        ct_states=_xmacro(text, "FP_CT_STATES") if "FP_CT_STATES(X)" in text else {},
        ct_events=_xmacro(text, "FP_CT_EVENTS") if "FP_CT_EVENTS(X)" in text else {},
        families=_xmacro(text, "FP_FAMILIES") if "FP_FAMILIES(X)" in text else {},
    )
