"""Plain-text tables for the CLI (the default output; `--json` prints the
rows themselves)."""
from __future__ import annotations

from typing import Callable, Iterable, Union

Col = Union[str, tuple[str, Union[str, Callable[[dict], object]]]]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) or "-"
    return str(v)


def table(rows: Iterable[dict], cols: list[Col]) -> str:
    rows = list(rows)
    heads, getters = [], []
    for c in cols:
        if isinstance(c, tuple):
            head, get = c
        else:
            head, get = c, c
        heads.append(head.upper())
        getters.append(get if callable(get) else (lambda r, k=get: r.get(k, "")))
    cells = [[_cell(g(r)) for g in getters] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    for c in cells:
        out.append("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
    return "\n".join(out)


def flatten(value, prefix: str = "") -> dict:
    """A decoded key or value as flat columns: nested structs dotted, an
    enum shown by its label, a flag word by its names."""
    if not isinstance(value, dict):
        return {prefix or "value": value}
    out = {}
    for k, v in value.items():
        if k.endswith("_label") or k.endswith("_names"):
            continue
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, name))
        elif f"{k}_label" in value:
            out[name] = value[f"{k}_label"]
        elif f"{k}_names" in value:
            out[name] = "|".join(value[f"{k}_names"]) or (hex(v) if v else "0")
        else:
            out[name] = v
    return out


def entries_table(entries: list[dict]) -> str:
    """`map dump` rows: key columns, then value columns."""
    if not entries:
        return "(no entries)"
    rows, cols = [], []
    for e in entries:
        k = flatten(e["key"], "")
        v = flatten(e["value"], "")
        row = {}
        for name, val in k.items():
            col = name if name != "value" else "key"
            row[("key", col)] = val
        for name, val in v.items():
            row[("value", name)] = val
        for c in row:
            if c not in cols:
                cols.append(c)
        rows.append(row)
    keycols = [c for c in cols if c[0] == "key"]
    valcols = [c for c in cols if c[0] == "value"]
    spec = [(c[1] if c[1] not in {x[1] for x in valcols} else f"key.{c[1]}",
             (lambda r, c=c: r.get(c))) for c in keycols]
    spec += [(c[1] if c[1] not in {x[1] for x in keycols} else f"value.{c[1]}",
              (lambda r, c=c: r.get(c))) for c in valcols]
    return table(rows, spec)
