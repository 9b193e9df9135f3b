"""README's configuration table is generated from the settings table: they must agree."""

from pathlib import Path

from flux.config import settings_table_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_configuration_table_is_current() -> None:
    text = README.read_text()
    start = text.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == settings_table_markdown().strip(), (
        "README's configuration table is out of date: paste flux.config.settings_table_markdown()"
    )


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text and "make test" in text
