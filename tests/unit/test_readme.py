"""The README stays a landing page that is true: short, the two commands,
and a configuration table whose rows are the schema's own (the full
reference is docs/configuration.md, checked by tests/unit/test_docs.py)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_is_a_landing_page_under_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README has {len(lines)} lines; move detail into docs/"


def test_readme_configuration_rows_are_the_schemas_own():
    from agent.config.schema import docs_rows
    text = README.read_text()
    rows = [line for line in text.splitlines() if re.match(r"^\| `[a-z0-9_]+` \| `", line)]
    assert len(rows) >= 5, "README keeps a short table of the most used keys"
    stale = [row for row in rows if row not in docs_rows()]
    assert stale == [], "copy these rows again from docs_rows():\n" + "\n".join(stale)
    assert "](docs/configuration.md)" in text


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
