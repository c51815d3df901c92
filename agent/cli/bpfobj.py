"""`fastpath prog show`, `net show`, `map list`, `map dump`: fastpath's BPF
objects, in the spirit of bpftool, from the kernel and the pins alone."""
from __future__ import annotations

import time

from agent.model import bpfdefs
from agent.cli.common import EXIT_FAIL, CliExit, run
from agent.inspect import table as tbl


def aliases() -> dict[str, str]:
    """Short names: FP_MAP_ENDPOINTS -> endpoints (and conntrack for ct)."""
    out = {}
    for macro, name in bpfdefs.load().maps.items():
        out[macro[len("FP_MAP_"):].lower()] = name
    if "ct" in out:
        out.setdefault("conntrack", out["ct"])
    return out


def resolve_map(name: str) -> str:
    return aliases().get(name.lower(), name)


def alias_of(pin: str) -> str:
    for a, n in aliases().items():
        if n == pin and a != "conntrack":
            return a
    return ""


def _attachments(ctx, include_foreign: bool = False):
    from agent.datapath import pinned
    from agent.datapath.cgroup import resolve_root
    maps = ctx.maps()
    progs = {p.id: p for p in pinned.our_programs(maps)}
    att = pinned.tc_attachments()
    try:
        cg = resolve_root(ctx.cfg.cgroup_root)
        att += pinned.cgroup_attachments(cg)
    except (FileNotFoundError, OSError):
        pass
    # A program without maps (fp_to_vpc passes everything) is still ours
    # when one of our program names is attached in this netns or cgroup.
    from agent.datapath.loader import PROGRAMS
    for a in att:
        if a.prog_id not in progs:
            p = pinned.prog_by_id(a.prog_id)
            if p is not None and p.name in PROGRAMS and not p.map_ids:
                progs[p.id] = p
    if not include_foreign:
        att = [a for a in att if a.prog_id in progs]
    return progs, att


def attachment_rows(progs, att) -> list[dict]:
    return [{"kind": a.kind, "target": a.target, "ifindex": a.ifindex, "hook": a.hook,
             "priority": a.priority, "handle": a.handle, "prog_id": a.prog_id,
             "prog_name": a.prog_name or (progs[a.prog_id].name if a.prog_id in progs else ""),
             "fastpath": a.prog_id in progs}
            for a in sorted(att, key=lambda a: (a.kind != "tc", a.target, a.hook, a.priority))]


@run
def cmd_prog(ctx, args) -> int:
    progs, att = _attachments(ctx)
    rows = []
    for p in sorted(progs.values(), key=lambda p: p.id):
        where = [f"{a.target}/{a.hook}" for a in att if a.prog_id == p.id]
        rows.append({"id": p.id, "name": p.name, "type": p.type, "tag": p.tag,
                     "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.loaded_at)),
                     "xlated_bytes": p.xlated_bytes, "jited_bytes": p.jited_bytes,
                     "verified_insns": p.verified_insns, "maps": p.maps,
                     "run_cnt": p.run_cnt, "run_time_ns": p.run_time_ns,
                     "attached": len(where), "attached_to": where})
    if not rows:
        raise CliExit(EXIT_FAIL, f"no loaded program uses the maps pinned under {ctx.bpffs_root} "
                                 "(the agent never started, or everything was detached)")

    def render(rows):
        return tbl.table(rows, ["id", "name", "type", "tag", "loaded_at", "attached",
                                ("jited", "jited_bytes"), ("runs", "run_cnt"),
                                ("maps", lambda r: len(r["maps"]))])
    ctx.emit(rows, render)
    return 0


@run
def cmd_net(ctx, args) -> int:
    progs, att = _attachments(ctx, include_foreign=args.all)
    rows = attachment_rows(progs, att)

    def render(rows):
        return tbl.table(rows, [("attach", "kind"), ("target", "target"), "ifindex", "hook",
                                ("prio", "priority"), ("prog_id", "prog_id"),
                                ("name", "prog_name")]
                         + ([("fastpath", "fastpath")] if args.all else []))
    ctx.emit(rows, render)
    return 0


def map_rows(ctx) -> list[dict]:
    from agent.datapath import btf
    rows = []
    for name, m in sorted(ctx.maps().items()):
        ringbuf = m.type_name == "ringbuf"
        entries = None if ringbuf else m.count()
        # an array always holds max_entries (a prog array's slots are filled
        # once at start): no fill, no pressure
        array = m.type_name in ("array", "percpu_array", "prog_array")
        # `map dump` decodes a map from its own BTF (a ring buffer's records
        # from the programs')
        info = btf.map_info(m.fd)
        rows.append({"name": name, "alias": alias_of(name), "id": m.id, "type": m.type_name,
                     "key_size": m.key_size, "value_size": m.value_size,
                     "max_entries": m.max_entries, "entries": entries,
                     "fill": (round(entries / m.max_entries, 4)
                              if entries is not None and m.max_entries and not array else None),
                     "decoded": bool(ringbuf or (info.btf_id and info.btf_value_type_id))})
    return rows


@run
def cmd_map_list(ctx, args) -> int:
    rows = map_rows(ctx)

    def render(rows):
        return tbl.table(rows, ["name", "alias", "type", ("key", "key_size"),
                                ("value", "value_size"), ("max", "max_entries"), "entries",
                                ("fill", lambda r: "-" if r["fill"] is None
                                 else f"{r['fill'] * 100:.1f}%"), "id"])
    ctx.emit(rows, render)
    return 0


@run
def cmd_map_dump(ctx, args) -> int:
    name = resolve_map(args.name)
    m = ctx.maps().get(name)
    if m is None:
        known = ", ".join(sorted(ctx.maps()))
        raise CliExit(EXIT_FAIL, f"no pinned map {args.name!r} under {ctx.bpffs_root} "
                                 f"(pinned: {known}; aliases: {', '.join(sorted(aliases()))})")
    if m.type_name == "ringbuf":
        raise CliExit(EXIT_FAIL, f"{name} is a ring buffer of events: read it with "
                                 "`fastpath monitor`")
    entries = ctx.entries(name)
    entries.sort(key=lambda e: repr(e["key"]))
    data = {"map": name, "type": m.type_name, "max_entries": m.max_entries,
            "percpu_summed": m.percpu, "entries": entries}
    ctx.emit(data, lambda d: tbl.entries_table(d["entries"]))
    return 0
