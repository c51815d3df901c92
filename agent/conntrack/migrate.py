"""Where conntrack entries of an older map go when the layout changes.

The loader (agent/datapath/loader.py) carries every superseded pinned map
over into the map that replaces it, field by field by name
(agent/datapath/btf.convert). For most maps the target is simply the map
of the same lineage (the pinned name without its version). Conntrack is
split over several maps, and older releases kept everything in one, so its
entries are routed one by one:

- an entry of an older `fp_ct4` (the release before the split kept NAT and
  policy entries together) goes by its key's `dir`: policy entries to the
  policy map, translated flows to the established map, or, when that is
  full, to the LRU map of new flows;
- an entry of an older `fp_ctnew4` or `fp_ctpol4` goes to its successor.

Fields a newer layout adds take a stated default: a flow that lived
through an upgrade is taken as established (`state`), whatever its
protocol; its TCP FINs, if any, are seen again when they come.

Pure: lineages and key fields in, target map macros out.
"""
from __future__ import annotations

from agent.model import bpfdefs
from agent.model.conntrack import ESTABLISHED, POLICY

MAPS = bpfdefs.load().maps
NAT, NAT_NEW, POLICY_MAP = "FP_MAP_CT", "FP_MAP_CT_NEW", "FP_MAP_CT_POLICY"
DEFAULTS = {"state": ESTABLISHED}
lineage = bpfdefs.map_lineage
CONNTRACK = {lineage(MAPS[m]): m for m in (NAT, NAT_NEW, POLICY_MAP)}


def is_conntrack(lineage_name: str) -> bool:
    return lineage_name in CONNTRACK


def targets(lineage_name: str, key_fields: dict[str, int]) -> tuple[str, ...]:
    """The maps (FP_MAP_* macros) an entry of a superseded conntrack map of
    this lineage goes to, in order of preference (the next one when a map
    is full)."""
    own = CONNTRACK[lineage_name]
    if key_fields.get("dir") == POLICY or own == POLICY_MAP:
        return (POLICY_MAP,)
    if own == NAT_NEW:
        return (NAT_NEW,)
    return (NAT, NAT_NEW)


class Rules:
    """The loader's migration rules (agent/datapath/loader.Migration): where
    an entry of a superseded pinned map goes and which defaults new fields
    take. Maps that are not conntrack's go to the map of their lineage."""

    def targets(self, source_pin: str, key_fields: dict[str, int]) -> list[str] | None:
        lin = lineage(source_pin)
        if not is_conntrack(lin):
            return None
        return [MAPS[m] for m in targets(lin, key_fields)]

    def defaults(self, target_pin: str) -> dict[str, int]:
        return dict(DEFAULTS) if is_conntrack(lineage(target_pin)) else {}


RULES = Rules()
