"""Names and codes of the datapath, read from bpf/include/fastpath.h.

The C header is the single source of truth for reason codes, directions,
redirect kinds, endpoint flags and pinned map names. This module parses it
(no bcc, no kernel) so the CLI, metrics and tests can name what the
programs count without restating a single number.
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

    def reason(self, value: int) -> str:
        code = self.reasons.get(value)
        return code.label if code else f"reason-{value}"

    def is_drop(self, value: int) -> bool:
        return value >= self.drop_min

    def dir(self, value: int) -> str:
        code = self.dirs.get(value)
        return code.label if code else f"dir-{value}"

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
    )


# --- struct layouts and map declarations ----------------------------------
#
# The CLI reads pinned maps without compiling anything, so it needs the C
# layouts as ctypes. They are built here from the header's struct
# definitions (and the map declarations from bpf/maps.c), never written out
# by hand; the header's _Static_asserts are checked against the result.

import ctypes as _ct

MAPS_C = BPF_DIR / "maps.c"

SCALARS = {
    "__u8": _ct.c_uint8, "__u16": _ct.c_uint16, "__u32": _ct.c_uint32, "__u64": _ct.c_uint64,
    "__s8": _ct.c_int8, "__s16": _ct.c_int16, "__s32": _ct.c_int32, "__s64": _ct.c_int64,
    "__be16": _ct.c_uint16, "__be32": _ct.c_uint32, "__be64": _ct.c_uint64,
    "__le16": _ct.c_uint16, "__le32": _ct.c_uint32, "__le64": _ct.c_uint64,
    "__sum16": _ct.c_uint16, "__wsum": _ct.c_uint32,
    "char": _ct.c_char, "int": _ct.c_int32, "unsigned int": _ct.c_uint32,
}


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str            # "__be32", "struct fp_tuple4", ...
    count: int = 0        # array length, 0 = not an array
    comment: str = ""     # the field's trailing comment (byte order, meaning)


@dataclass(frozen=True)
class StructDef:
    name: str             # without "struct "
    fields: tuple[Field, ...]


@dataclass(frozen=True)
class MapDecl:
    name: str             # pinned name, e.g. fp_ep4_v1
    macro: str            # FP_MAP_ENDPOINTS
    kind: str             # bcc table type: hash, percpu_hash, lpm_trie, lru_hash, array, ringbuf
    key: str              # C type of the key ("struct fp_endpoint_key", "__u32"), "" for ringbuf
    value: str            # C type of the value; for a ring buffer: its record type, if declared


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


_FIELD = re.compile(r"^\s*((?:struct|union)\s+\w+|unsigned\s+int|\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?\s*$")


@lru_cache(maxsize=None)
def structs(header: Path = HEADER) -> dict[str, StructDef]:
    """Every `struct fp_* { ... };` of the header, in declaration order."""
    text = header.read_text()
    defines = load(header).defines
    out: dict[str, StructDef] = {}
    for m in re.finditer(r"^struct\s+(\w+)\s*\{(.*?)^\}[^;]*;", text, re.S | re.M):
        name, body = m.group(1), m.group(2)
        fields = []
        for raw_line in body.splitlines():
            comment = ""
            cm = re.search(r"/\*(.*?)\*/", raw_line)
            if cm:
                comment = cm.group(1).strip()
            line = re.sub(r"/\*.*?\*/|//.*", "", raw_line).strip()
            if not line:
                continue
            for decl in filter(None, (d.strip() for d in line.split(";"))):
                fm = _FIELD.match(decl)
                if not fm:
                    raise ValueError(f"{header}: struct {name}: cannot parse field {decl!r}")
                ctype, fname, count = fm.groups()
                n = 0
                if count is not None:
                    n = int(count, 0) if count[0].isdigit() else defines[count]
                fields.append(Field(fname, re.sub(r"\s+", " ", ctype), n, comment))
        out[name] = StructDef(name, tuple(fields))
    return out


@lru_cache(maxsize=None)
def static_sizes(header: Path = HEADER) -> dict[str, int]:
    """sizeof(struct X) == N from the header's _Static_asserts."""
    return {name: int(n) for name, n in re.findall(
        r"_Static_assert\(\s*sizeof\(struct\s+(\w+)\)\s*==\s*(\d+)", header.read_text())}


_CTYPES: dict[tuple[str, Path], type] = {}


def ctype(type_name: str, header: Path = HEADER):
    """The ctypes class of a C type named as in the header ("struct
    fp_endpoint", "fp_endpoint", "__u32")."""
    t = type_name.strip()
    if t in SCALARS:
        return SCALARS[t]
    sname = t[len("struct "):].strip() if t.startswith("struct ") else t
    key = (sname, header)
    if key in _CTYPES:
        return _CTYPES[key]
    defs = structs(header)
    if sname not in defs:
        raise KeyError(f"{header}: no struct {sname}")
    fields = []
    for f in defs[sname].fields:
        base = ctype(f.ctype, header)
        fields.append((f.name, base * f.count if f.count else base))
    cls = type(sname, (_ct.Structure,), {"_fields_": fields, "__doc__": f"struct {sname}"})
    _CTYPES[key] = cls
    return cls


def field_defs(type_name: str, header: Path = HEADER) -> tuple[Field, ...]:
    t = type_name.strip()
    sname = t[len("struct "):].strip() if t.startswith("struct ") else t
    return structs(header)[sname].fields


@lru_cache(maxsize=None)
def map_decls(maps_c: Path = MAPS_C, header: Path = HEADER) -> dict[str, MapDecl]:
    """Pinned map name -> its declaration in bpf/maps.c (BPF_TABLE_PINNED,
    and the pinned ring buffer declaration if any)."""
    text = _strip_comments(maps_c.read_text())
    names = load(header).maps
    out: dict[str, MapDecl] = {}
    for m in re.finditer(r"BPF_TABLE_PINNED\s*\(\s*\"(\w+)\"\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,"
                         r"\s*(\w+)\s*,", text):
        kind, key, value, macro = m.groups()
        out[names.get(macro, macro)] = MapDecl(names.get(macro, macro), macro, kind, key, value)
    # Pinned ring buffers are declared by their section, "maps/ringbuf:"
    # plus the pin path; their record is the struct the programs reserve.
    for macro, name in names.items():
        if name in out:
            continue
        if re.search(rf"section\(\s*\"maps/ringbuf:\"\s*FP_PIN\(\s*{macro}\s*\)", text):
            rec = re.search(rf"\b{macro}\.ringbuf_reserve\(\s*sizeof\(\s*(struct\s+\w+)\s*\)",
                            text)
            out[name] = MapDecl(name, macro, "ringbuf", "", rec.group(1) if rec else "")
    return out
