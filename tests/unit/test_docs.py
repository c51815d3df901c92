"""The docs stay true: README.md and docs/*.md are checked against the code.

Each check is a function from the documents' texts (and what it checks them
against) to a list of problems, so that the same function runs on the real
docs and, below, on small broken samples that prove it can fail:

- every relative link between README and docs resolves (file and #anchor);
- configuration keys named in the docs exist in the schema, and
  docs/configuration.md holds the schema's own generated table;
- every repository path named (tests/..., vm-tests/..., agent/..., ...) exists;
- every `fastpath ...` command named exists in the CLI's parser;
- every reason and direction of fastpath.h is in docs/datapath.md with its
  code, and every reason or pinned map named anywhere exists;
- every feature section (`## ` of a docs page) names the tests that prove it,
  or says why it has none (`<!-- no test: why -->`).
- the `--json` fields docs/cli.md gives the endpoint, service, ct and
  metrics views are exactly what those views print (run by the CLI's own
  code over sample maps decoded by its own decoder).
- every method of the gRPC inspection service is in docs/cli.md, every error
  code of the agent's framed API in docs/cni.md.
- docs/cni.md gives the plugin's conflist keys with their defaults, its
  error codes and its CNI versions, as chainer/plugin.py has them.

Unprivileged and fast: it reads files, builds the CLI's argument parser and
runs its views over sample maps in memory.
"""
from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "include" / "fastpath.h"
# where code lives: a token of the docs that is no config key must be a word of these
SOURCE_DIRS = ("agent", "bpf", "chainer", "deploy", "bench", "tests", "vm-tests", "scripts")
PATH_ROOTS = SOURCE_DIRS + ("docs",)


# ---- reading ---------------------------------------------------------------

def load_docs(root: Path = ROOT) -> dict[str, str]:
    """README.md and every docs/*.md, by path relative to the repository."""
    docs = {"README.md": (root / "README.md").read_text()}
    for p in sorted((root / "docs").glob("*.md")):
        docs[f"docs/{p.name}"] = p.read_text()
    return docs


FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The text without fenced code blocks (recorded output, commands) and
    without indented code blocks."""
    out, fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fence = not fence
            out.append("")
            continue
        out.append("" if fence or line.startswith("    ") and not line.strip().startswith(("-", "|")) and
                   _in_indented_block(out) else line)
    return "\n".join(out)


def _in_indented_block(previous: list[str]) -> bool:
    """An indented line is code when a blank line or code precedes it (not a
    continued list item)."""
    for line in reversed(previous):
        if line == "":
            return True
        return False
    return True


def code_spans(text: str) -> list[str]:
    """Contents of inline `code` spans."""
    return re.findall(r"`([^`\n]+)`", text)


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every Markdown heading outside code blocks."""
    found = []
    for line in prose(text).splitlines():
        m = re.match(r"^(#{1,6}) +(.+?) *#*$", line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def slug(title: str) -> str:
    """The anchor GitHub gives a heading."""
    s = title.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        s = slug(title)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    out |= set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    return out


# ---- the checks ------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def check_links(docs: dict[str, str], root: Path = ROOT) -> list[str]:
    bad = []
    for name, text in docs.items():
        for target in LINK.findall(prose(text)):
            if re.match(r"^[a-z]+:", target):
                continue                      # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            base = Path(name).parent
            rel = (base / path).as_posix() if path else name
            rel = str(Path(rel).as_posix())
            rel = _normalise(rel)
            if path and rel not in docs and not (root / rel).exists():
                bad.append(f"{name}: link to {target}: no file {rel}")
                continue
            if anchor:
                if not rel.endswith(".md"):
                    continue
                text_there = docs.get(rel) or (root / rel).read_text()
                if anchor not in anchors(text_there):
                    bad.append(f"{name}: link to {target}: {rel} has no heading #{anchor}")
    return bad


def _normalise(path: str) -> str:
    parts: list[str] = []
    for p in path.split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


def docs_table_rows() -> list[str]:
    from agent.config.schema import docs_rows
    return docs_rows()


def check_configuration_table(text: str, keys, rows: list[str]) -> list[str]:
    """docs/configuration.md holds every key with its default, and the table
    is the generated one, row for row."""
    bad = []
    for k in keys:
        default = ", ".join(k.default) if isinstance(k.default, tuple) else k.default
        if f"| `{k.name}` | `{default}` |" not in text:
            bad.append(f"docs/configuration.md: key {k.name} (default {default!r}) is not documented")
    table = "\n".join(rows)
    if table not in text:
        bad.append("docs/configuration.md: the key table is not the schema's; paste this:\n"
                   "| key | default | meaning |\n|---|---|---|\n" + table)
    return bad


SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9*]+)+$")
ASSIGN = re.compile(r"^([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?::\s|=)\S")


# names of the kernel and of other software the docs quote
EXTERNAL_NAMES = {"bpf_sock_destroy", "udp_abort", "route_localnet"}


def source_words(root: Path = ROOT) -> set[str]:
    """Every identifier of the source tree, the CLI's map aliases, and the
    outside names the docs quote."""
    from agent.cli.bpfobj import aliases
    words: set[str] = set(aliases()) | EXTERNAL_NAMES
    for d in SOURCE_DIRS:
        for p in (root / d).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".c", ".h", ".yaml", ".json", ".sh", ".conflist",
                                            ".toml", ""):
                try:
                    words |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", p.read_text(errors="replace")))
                except OSError:
                    pass
    return words


def check_config_keys(docs: dict[str, str], key_names: set[str], words: set[str],
                      foreign: set[str] = frozenset()) -> list[str]:
    """Configuration keys named in the docs exist.

    - `key: value` and `key=value` spans are settings: the key must be one of
      the schema's (`foreign` lists the few settings of other files the docs
      quote: Terway's eni-config, the conflist);
    - a wildcard (`conntrack_*_timeout`) must match at least one key;
    - `*_map_size` keys are always configuration keys;
    - any other snake_case span must be a key or a word of the source tree,
      so a misspelt or removed key cannot hide as "some identifier".
    """
    bad = []
    for name, text in docs.items():
        for span in code_spans(text):
            m = ASSIGN.match(span)
            if m and m.group(1) not in key_names and m.group(1) not in foreign:
                bad.append(f"{name}: `{span}` sets {m.group(1)}, which is no configuration key")
                continue
            for tok in re.split(r"[\s,()\[\]=:]+", span):
                if not SNAKE.match(tok):
                    continue
                if "*" in tok:
                    rx = re.compile("^" + tok.replace("*", "[a-z0-9_]+") + "$")
                    if (tok.startswith(("fastpath_", "fp_", "process_")) or
                            any(rx.match(k) for k in key_names)):
                        continue
                    bad.append(f"{name}: `{tok}` matches no configuration key")
                elif tok.endswith("_map_size") and tok not in key_names:
                    bad.append(f"{name}: `{tok}` is no configuration key")
                elif tok not in key_names and tok not in words and tok.removesuffix("_total") not in words:
                    bad.append(f"{name}: `{tok}` is neither a configuration key nor a name in the code")
    return bad


PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(re.escape(r) for r in PATH_ROOTS))


def check_paths(docs: dict[str, str], root: Path = ROOT) -> list[str]:
    bad = []
    for name, text in docs.items():
        for path in sorted(set(PATH.findall(text))):
            if "*" in path or "<" in path:
                continue
            if not (root / path.rstrip("/.")).exists():
                bad.append(f"{name}: names {path}, which does not exist")
    return bad


def cli_tree(parser: argparse.ArgumentParser) -> dict[str, dict]:
    """Subcommand name -> its own subcommands, recursively."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return {n: cli_tree(p) for n, p in a.choices.items()}
    return {}


CMD = re.compile(r"^fastpath((?: +[a-z][a-z0-9-]*)+)")


def command_lines(text: str) -> list[str]:
    """What the docs show as a `fastpath` command: a code span or a code
    line (fenced or indented) that starts with it, after a `$ ` prompt or
    after `kubectl exec ... --`."""
    found = []
    code = code_spans(text)
    fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            fence = not fence
        elif fence or line.startswith("    "):
            code.append(line.strip())
    for span in code:
        span = span.removeprefix("$ ")
        if " -- fastpath " in span:
            span = span[span.index(" -- fastpath ") + 4:]
        if span.startswith("fastpath "):
            found.append(span)
    return found


def check_cli_commands(docs: dict[str, str], tree: dict[str, dict]) -> list[str]:
    """Every `fastpath WORD [WORD]` shown as a command is one of the parser:
    the first word a command, the second one of its subcommands when it has
    any."""
    bad = []
    for name, text in docs.items():
        for line in command_lines(text):
            m = CMD.match(line)
            if not m:
                continue
            words = m.group(1).split()
            if words[0] not in tree:
                bad.append(f"{name}: `fastpath {words[0]}` is no command of the CLI")
                continue
            sub = tree[words[0]]
            if sub and len(words) > 1 and words[1] not in sub:
                bad.append(f"{name}: `fastpath {' '.join(words[:2])}`: {words[0]} has no "
                           f"subcommand {words[1]} (it has {', '.join(sorted(sub))})")
    return bad


XMACRO = r"X\((FP_[A-Z0-9_]+),\s*(\d+),\s*\"([a-z0-9-]+)\"\)"


def header_codes(header_text: str, macro: str) -> list[tuple[str, int, str]]:
    start = header_text.index(f"#define {macro}(X)")
    block = header_text[start:header_text.index("\n\n", start)]
    return [(n, int(c), label) for n, c, label in re.findall(XMACRO, block)]


def header_maps(header_text: str) -> set[str]:
    return set(re.findall(r"#define FP_MAP_[A-Z0-9_]+\s+(fp_[a-z0-9_]+)", header_text))


def check_reasons(docs: dict[str, str], header_text: str) -> list[str]:
    bad = []
    datapath = docs.get("docs/datapath.md", "")
    reasons = header_codes(header_text, "FP_REASONS")
    for _, code, label in reasons:
        if f"| {code} | `{label}` |" not in datapath:
            bad.append(f"docs/datapath.md: reason {label} ({code}) is not in the reasons table")
    for _, code, label in header_codes(header_text, "FP_DIRS"):
        if f"| `{label}` |" not in datapath:
            bad.append(f"docs/datapath.md: direction {label} is not in the directions table")
    labels = {label for _, _, label in reasons}
    for name, text in docs.items():
        for tok in set(re.findall(r"`(dropped-[a-z0-9-]+)`", text)):
            if tok not in labels:
                bad.append(f"{name}: `{tok}` is no reason of bpf/include/fastpath.h")
    return bad


def check_map_names(docs: dict[str, str], header_text: str) -> list[str]:
    """Pinned map names (with their version) named in prose are the header's
    current ones, and docs/datapath.md lists every one. An older version may
    be named in the same paragraph as the current one (an upgrade's
    account); recorded command output in code blocks may show the names of
    the run it came from."""
    bad = []
    maps = header_maps(header_text)
    for name, text in docs.items():
        for para in prose(text).split("\n\n"):
            named = set(re.findall(r"\b(fp_[a-z0-9]+_v\d+)\b", para))
            for tok in sorted(named - maps):
                base = tok.rsplit("_v", 1)[0]
                if any(m.rsplit("_v", 1)[0] == base for m in named & maps):
                    continue
                bad.append(f"{name}: map {tok} is not a map of bpf/include/fastpath.h "
                           f"(renamed or another version?)")
    datapath = docs.get("docs/datapath.md", "")
    for m in sorted(maps):
        if f"| `{m}` |" not in datapath:
            bad.append(f"docs/datapath.md: map {m} is not in the maps table")
    return bad


# ---- the agent's two APIs ----------------------------------------------------

def agent_error_codes(root: Path = ROOT) -> set[str]:
    """Error codes the agent's framed API can answer with."""
    codes = set()
    for p in list((root / "agent").rglob("*.py")):
        text = p.read_text()
        codes |= set(re.findall(r'ApiError\(\s*"([a-z-]+)"', text))
        codes |= set(re.findall(r'"error": \{"code": "([a-z-]+)"', text))
    return codes


def check_api_names(docs: dict[str, str], grpc_methods, error_codes) -> list[str]:
    """docs/cli.md names every method of the gRPC service, docs/cni.md every
    error code of the framed API."""
    cli, cni = docs.get("docs/cli.md", ""), docs.get("docs/cni.md", "")
    bad = [f"docs/cli.md: gRPC method {m} is not named" for m in grpc_methods
           if not re.search(rf"`{m}\b", cli)]
    bad += [f"docs/cni.md: the agent's error code {c} is not named" for c in sorted(error_codes)
            if f"`{c}`" not in cni]
    return bad


# ---- the CNI plugin ----------------------------------------------------------

def check_cni(text: str, defaults: dict, codes: set[int], versions) -> list[str]:
    """docs/cni.md gives every conflist key with its default, every error
    code the plugin can exit with (and no other), and its CNI versions."""
    bad = []
    for key, value in defaults.items():
        shown = value if isinstance(value, str) and value else json.dumps(value)
        if f"| `{key}` | `{shown}` |" not in text:
            bad.append(f"docs/cni.md: conflist key {key} (default {shown}) is not in the keys table")
    listed = {int(c) for c in re.findall(r"^\| (\d+) \|", text, re.M)}
    bad += [f"docs/cni.md: error code {c} is not in the codes table" for c in sorted(codes - listed)]
    bad += [f"docs/cni.md: the codes table lists {c}, which the plugin never returns"
            for c in sorted(listed - codes)]
    if f"supported: {', '.join(versions)}." not in text:
        bad.append(f"docs/cni.md: VERSION does not say supported: {', '.join(versions)}.")
    return bad


def plugin_facts():
    from chainer import plugin
    codes = {v for k, v in vars(plugin).items() if k.startswith("E_") and isinstance(v, int)}
    return plugin.DEFAULTS, codes, plugin.SUPPORTED_VERSIONS


# ---- the CLI's --json fields ---------------------------------------------------

def documented_fields(cli_text: str, label: str) -> tuple[set[str], dict[str, set[str]]]:
    """The fields docs/cli.md's `--json` table gives the row labelled
    `label` (its first cell): top-level names, and names inside the
    parentheses after a field (its nested objects)."""
    for line in cli_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] == label:
            spec = cells[1]
            break
    else:
        raise KeyError(f"docs/cli.md: no --json row {label}")
    top: set[str] = set()
    nested: dict[str, set[str]] = {}
    depth, last, i = 0, None, 0
    for m in re.finditer(r"`([^`]+)`|(\()|(\))", spec):
        if m.group(2):
            depth += 1
        elif m.group(3):
            depth -= 1
        elif re.fullmatch(r"[a-z][a-z0-9_]*", m.group(1)):
            if depth == 0:
                top.add(m.group(1))
                last = m.group(1)
            elif depth == 1 and last:
                nested.setdefault(last, set()).add(m.group(1))
    return top, nested


def produced_fields(rows) -> tuple[set[str], dict[str, set[str]]]:
    top: set[str] = set()
    nested: dict[str, set[str]] = {}
    for r in rows if isinstance(rows, list) else [rows]:
        top |= set(r)
        for k, v in r.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                nested.setdefault(k, set()).update(*(set(x) for x in v))
    return top, nested


def check_json_fields(label: str, documented, produced) -> list[str]:
    (dtop, dnest), (ptop, pnest) = documented, produced
    bad = [f"docs/cli.md: {label}: field {f} is not in the output" for f in sorted(dtop - ptop)]
    bad += [f"docs/cli.md: {label}: the output's field {f} is not documented"
            for f in sorted(ptop - dtop)]
    for k in sorted(set(pnest) & set(dtop)):
        bad += [f"docs/cli.md: {label}: {k}.{f} is not in the output"
                for f in sorted(dnest.get(k, set()) - pnest[k])]
        bad += [f"docs/cli.md: {label}: the output's field {k}.{f} is not documented"
                for f in sorted(pnest[k] - dnest.get(k, set()))]
    return bad


class _Map:
    def __init__(self, name: str, raw: list[tuple[bytes, bytes]]):
        self.name, self.raw, self.max_entries = name, raw, 1024
        self.percpu = False


class MapsOnly:
    """The CLI's context with pinned maps given as raw key/value bytes,
    decoded by the CLI's own decoder with the compiled programs' layouts
    (`schema`, their BTF), and no agent (as with the agent down)."""
    agent_error = "not asked (docs check)"

    def __init__(self, raw: dict[str, list[tuple[bytes, bytes]]], schema):
        from agent.cli import bpfobj
        alias = bpfobj.aliases()
        self._maps = {alias[a]: _Map(alias[a], r) for a, r in raw.items()}
        self.schema = schema

    def maps(self):
        return self._maps

    def map(self, name):
        return self._maps[name]

    def entries(self, name, missing_ok=False):
        from agent.inspect import decode
        m = self._maps.get(name)
        if m is None:
            if missing_ok:
                return []
            raise KeyError(name)
        layout = decode.Layout.compiled(name, self.schema)
        return [decode.decode_entry(layout, k, v) for k, v in m.raw]

    def agent(self, method, **req):
        return None

    def note_agent_down(self, what):
        pass

    def links(self):
        return {}


def sample_maps(sch) -> dict[str, list[tuple[bytes, bytes]]]:
    """One entry in each map the views read: a frontend with one backend
    slot, a conntrack entry of each table, a counter of each kind."""
    from agent.inspect import decode
    z = lambda alias, key=None, value=None: _raw(sch, alias, key, value)
    svc_key = decode.encode_key(sch, "struct fp_svc4_key", vip="192.168.0.1", port=80)
    return {
        "endpoints": [z("endpoints")],
        "services": [(svc_key, decode.encode_key(sch, "struct fp_svc4", svc_id=1, count=1))],
        "slots": [(decode.encode_key(sch, "struct fp_slot_key", svc_id=1, slot=1),
                   decode.encode_key(sch, "struct fp_slot", backend_id=1))],
        "backends": [(struct.pack("=I", 1),
                      decode.encode_key(sch, "struct fp_backend4", ip="10.0.0.1"))],
        "ct": [z("ct")],
        "ct_new": [z("ct_new", decode.encode_key(sch, "struct fp_ct4_key",
                                                 dir=ct_dir("FP_CT_REPLY")))],
        "ct_policy": [z("ct_policy", decode.encode_key(sch, "struct fp_ct4_key",
                                                       dir=ct_dir("FP_CT_POLICY")))],
        "counters": [z("counters")], "policy_cnt": [z("policy_cnt")],
    }


def ct_dir(name: str) -> int:
    m = re.search(rf"#define {name}\s+(\d+)", HEADER.read_text())
    return int(m.group(1))


def _raw(sch, alias, key=None, value=None):
    from agent.cli import bpfobj
    from agent.inspect import decode
    layout = decode.Layout.compiled(bpfobj.aliases()[alias], sch)
    return (key or bytes(layout.key_size), value or bytes(layout.value_size))


def json_views(schema) -> dict[str, object]:
    """What `--json` prints for the views the docs list, from sample maps."""
    from agent.cli import views
    ctx = MapsOnly(sample_maps(schema), schema)
    ct = views.data_ct(ctx)
    return {
        "`endpoint list`, `get`": views.data_endpoints(ctx),
        "`service list`, `get`": views.data_services(ctx),
        "`ct list`": ct,
        "`ct list --top`": views.views.ct_top(ct, views.data_endpoints(ctx), 1024),
        "`metrics`": views.data_metrics(ctx),
        "`metrics --policy`": views.data_policy_metrics(ctx),
    }


TEST_PATH = re.compile(r"(?<![\w/.-])(?:tests|vm-tests)/[\w./-]*[\w/]")
NO_TEST = re.compile(r"<!-- no test: \S[^>]*-->")


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of every `## ` section, its subsections included."""
    out: list[tuple[str, list[str]]] = []
    fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            fence = not fence
        if not fence and line.startswith("## "):
            out.append((line[3:].strip(), []))
        elif out:
            out[-1][1].append(line)
    return [(t, "\n".join(b)) for t, b in out]


def check_sections_name_tests(docs: dict[str, str]) -> list[str]:
    bad = []
    for name, text in docs.items():
        if not name.startswith("docs/"):
            continue
        if not sections(text):
            bad.append(f"{name}: no `## ` sections: split the page by feature and name their tests")
        for title, body in sections(text):
            if not TEST_PATH.search(body) and not NO_TEST.search(body):
                bad.append(f"{name}: section \"{title}\" names no test that proves it "
                           f"(or `<!-- no test: why -->`)")
    return bad


# ---- the real docs ----------------------------------------------------------

@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return load_docs()


@pytest.fixture(scope="module")
def header_text() -> str:
    return HEADER.read_text()


def test_every_link_between_readme_and_docs_resolves(docs):
    assert check_links(docs) == []


def test_configuration_reference_is_the_schemas_own_table(docs):
    from agent.config import KEYS
    assert check_configuration_table(docs["docs/configuration.md"], KEYS, docs_table_rows()) == []


# settings of other files the docs quote (Terway's eni-config, the conflist)
FOREIGN_SETTINGS = {"disable_network_policy", "require_eni", "timeout_seconds", "log_file"}


def test_every_configuration_key_named_exists(docs):
    from agent.config import KEYS
    assert check_config_keys(docs, {k.name for k in KEYS}, source_words(), FOREIGN_SETTINGS) == []


def test_every_path_named_exists(docs):
    assert check_paths(docs) == []


def test_every_cli_command_named_exists(docs):
    from agent.cli.main import build_parser
    assert check_cli_commands(docs, cli_tree(build_parser())) == []


def test_every_reason_and_direction_is_documented_and_every_one_named_exists(docs, header_text):
    assert check_reasons(docs, header_text) == []


def test_every_pinned_map_is_documented_and_every_one_named_exists(docs, header_text):
    assert check_map_names(docs, header_text) == []


def test_every_feature_section_names_its_tests(docs):
    assert check_sections_name_tests(docs) == []


def test_every_docs_page_is_reachable_from_the_readme(docs):
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[^)]*)?\)", docs["README.md"]))
    assert sorted(set(n for n in docs if n.startswith("docs/")) - linked) == []


# ---- each check fails on a real mistake ----------------------------------------

def test_a_broken_link_or_anchor_is_reported(tmp_path):
    sample = {"README.md": "[ok](docs/a.md#the-part) [gone](docs/b.md) [bad](docs/a.md#nowhere)",
              "docs/a.md": "# A\n\n## The part\n\nback to [the top](../README.md)\n"}
    found = check_links(sample, tmp_path)
    assert found == ["README.md: link to docs/b.md: no file docs/b.md",
                     "README.md: link to docs/a.md#nowhere: docs/a.md has no heading #nowhere"]


def test_anchors_follow_githubs_rules():
    text = "## Upgrade, restart and failure\n## The agent's framed protocol (agent/api/wire.py)\n## X\n## X\n"
    assert anchors(text) == {"upgrade-restart-and-failure",
                             "the-agents-framed-protocol-agentapiwirepy", "x", "x-1"}


def test_a_configuration_table_missing_a_key_or_stale_is_reported():
    from agent.config import KEYS
    rows = docs_table_rows()
    good = "\n".join(rows)
    assert check_configuration_table(good, KEYS, rows) == []
    dropped = good.replace(rows[3] + "\n", "")
    found = check_configuration_table(dropped, KEYS, rows)
    assert any(f"key {KEYS[3].name} " in f for f in found) and any("paste this" in f for f in found)
    edited = good.replace(rows[0], rows[0][:-2] + " (edited by hand) |")
    assert check_configuration_table(edited, KEYS, rows) != []


def test_an_unknown_or_misspelt_configuration_key_is_reported():
    keys = {"conntrack_tcp_idle_timeout", "policy_enforcement", "services_map_size"}
    words = {"fp_from_pod", "some_field"}
    sample = {"docs/x.md": "`policy_enforcement: default`, `conntrack_*_timeout`, `fp_from_pod`, "
                           "`some_field`, `services_map_size`\n"
                           "`policy_enforcment: never` `conntrack_*_lifetime` `backend_map_size` "
                           "`conntrack_gc_period`"}
    assert check_config_keys(sample, keys, words) == [
        "docs/x.md: `policy_enforcment: never` sets policy_enforcment, which is no configuration key",
        "docs/x.md: `conntrack_*_lifetime` matches no configuration key",
        "docs/x.md: `backend_map_size` is no configuration key",
        "docs/x.md: `conntrack_gc_period` is neither a configuration key nor a name in the code",
    ]


def test_a_path_that_does_not_exist_is_reported(tmp_path):
    (tmp_path / "tests" / "bpf").mkdir(parents=True)
    (tmp_path / "tests" / "bpf" / "test_redirect.py").write_text("")
    sample = {"docs/x.md": "Tests: `tests/bpf/test_redirect.py`, vm-tests/test_gone.py, tests/bpf."}
    assert check_paths(sample, tmp_path) == [
        "docs/x.md: names vm-tests/test_gone.py, which does not exist"]


def test_a_cli_command_that_does_not_exist_is_reported():
    from agent.cli.main import build_parser
    tree = cli_tree(build_parser())
    sample = {"docs/x.md": "Run `fastpath status`, `fastpath ct flush --all`, `fastpath map dump ct`.\n"
                           "```\n$ fastpath service list\n$ fastpath conntrack list\n```\n"
                           "and `fastpath map show`."}
    assert check_cli_commands(sample, tree) == [
        "docs/x.md: `fastpath map show`: map has no subcommand show (it has dump, list)",
        "docs/x.md: `fastpath conntrack` is no command of the CLI",
    ]


def test_an_undocumented_or_unknown_reason_is_reported(header_text, docs):
    broken = dict(docs)
    broken["docs/datapath.md"] = docs["docs/datapath.md"].replace(
        "| 105 | `dropped-policy-denied` |", "| 105 | `dropped-by-policy` |")
    found = check_reasons(broken, header_text)
    assert "docs/datapath.md: reason dropped-policy-denied (105) is not in the reasons table" in found
    assert "docs/datapath.md: `dropped-by-policy` is no reason of bpf/include/fastpath.h" in found
    no_dir = dict(docs)
    no_dir["docs/datapath.md"] = docs["docs/datapath.md"].replace("| `to-vpc` |", "| to VPC |")
    assert check_reasons(no_dir, header_text) == [
        "docs/datapath.md: direction to-vpc is not in the directions table"]


def test_a_stale_map_version_is_reported_but_not_in_recorded_output(header_text, docs):
    current = next(m for m in header_maps(header_text) if m.startswith("fp_ct4_v"))
    older = current.rsplit("_v", 1)[0] + "_v" + str(int(current.rsplit("_v", 1)[1]) - 1)
    sample = dict(docs)
    sample["docs/x.md"] = (f"The map `{older}` holds...\n```\n{older}  hash\n```\n\n"
                           f"An upgrade carries `{older}` over into `{current}`.\n")
    assert check_map_names(sample, header_text) == [
        f"docs/x.md: map {older} is not a map of bpf/include/fastpath.h (renamed or another version?)"]
    sample = dict(docs)
    sample["docs/datapath.md"] = docs["docs/datapath.md"].replace("| `fp_tails_v1` |", "| tails |")
    assert check_map_names(sample, header_text) == [
        "docs/datapath.md: map fp_tails_v1 is not in the maps table"]


def test_a_section_without_tests_is_reported():
    sample = {"docs/x.md": "# X\n\n## Proven\n\nTests: `vm-tests/test_cli.py`.\n\n"
                           "## Reference\n\n<!-- no test: signatures only -->\n\n"
                           "## Claimed\n\nIt works.\n\n### Sub\n\nStill nothing.\n",
              "docs/flat.md": "# Flat\n\n**Claimed.** It works, says a bold lead.\n",
              "README.md": "## Landing\n\nno tests needed here\n"}
    assert check_sections_name_tests(sample) == [
        'docs/x.md: section "Claimed" names no test that proves it (or `<!-- no test: why -->`)',
        "docs/flat.md: no `## ` sections: split the page by feature and name their tests"]


def test_every_json_field_of_the_views_is_documented_and_exists(docs, compiled):
    views = json_views(compiled)
    bad = []
    for label, rows in views.items():
        assert rows, f"the sample maps gave {label} no row: the check would check nothing"
        bad += check_json_fields(label, documented_fields(docs["docs/cli.md"], label),
                                 produced_fields(rows))
    assert bad == []


def test_a_json_field_documented_wrongly_or_not_at_all_is_reported():
    text = ("| `service list`, `get` | `frontend`, `vip`, `gone`, `backends` (`slot`, `old`) |\n")
    produced = produced_fields([{"frontend": "", "vip": "", "new": 1,
                                 "backends": [{"slot": 1, "ip": ""}]}])
    assert check_json_fields("`service list`, `get`",
                             documented_fields(text, "`service list`, `get`"), produced) == [
        "docs/cli.md: `service list`, `get`: field gone is not in the output",
        "docs/cli.md: `service list`, `get`: the output's field new is not documented",
        "docs/cli.md: `service list`, `get`: backends.old is not in the output",
        "docs/cli.md: `service list`, `get`: the output's field backends.ip is not documented",
    ]


def test_every_grpc_method_and_agent_error_code_is_documented(docs):
    from agent.api.inspect import METHODS
    codes = agent_error_codes()
    assert {"bad-request", "internal", "eni-unresolved"} <= codes, codes   # the scan finds them
    assert check_api_names(docs, METHODS, codes) == []


def test_an_undocumented_method_or_error_code_is_reported():
    sample = {"docs/cli.md": "methods `Status`, `Policy {\"endpoint\"}`",
              "docs/cni.md": "codes `bad-request`"}
    assert check_api_names(sample, ("Status", "Policy", "Bandwidth"),
                           {"bad-request", "hostport-refused"}) == [
        "docs/cli.md: gRPC method Bandwidth is not named",
        "docs/cni.md: the agent's error code hostport-refused is not named"]


def test_cni_keys_codes_and_versions_are_the_plugins(docs):
    defaults, codes, versions = plugin_facts()
    assert check_cni(docs["docs/cni.md"], defaults, codes, versions) == []


def test_a_wrong_cni_default_missing_code_or_stale_version_is_reported():
    text = ("| `timeout_seconds` | `30` |\n| `log_file` | `\"\"` |\n| 1 | x |\n| 3 | y |\n"
            "supported: 0.4.0, 1.0.0.\n")
    assert check_cni(text, {"timeout_seconds": 10, "log_file": ""}, {1, 2},
                     ("0.4.0", "1.0.0", "1.1.0")) == [
        "docs/cni.md: conflist key timeout_seconds (default 10) is not in the keys table",
        "docs/cni.md: error code 2 is not in the codes table",
        "docs/cni.md: the codes table lists 3, which the plugin never returns",
        "docs/cni.md: VERSION does not say supported: 0.4.0, 1.0.0, 1.1.0.",
    ]
