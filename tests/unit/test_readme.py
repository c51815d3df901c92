"""The README stays true: its configuration table is the schema's."""
from pathlib import Path

from agent.config import KEYS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_configuration_key_with_its_default():
    text = README.read_text()
    for k in KEYS:
        default = ", ".join(k.default) if isinstance(k.default, tuple) else k.default
        assert f"| `{k.name}` | `{default}` |" in text, f"README lacks {k.name} = {default}"


def test_readme_configuration_table_is_the_schemas_own():
    from agent.config import readme_rows
    text = README.read_text()
    assert "\n".join(readme_rows()) in text, "regenerate the README table from readme_rows()"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
