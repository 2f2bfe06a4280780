"""configs/default.yaml and docs/config.md are generated from the schema and up to date."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from pipeline.core import config_docs, schema
from pipeline.core.config import CONFIG_DIR, default_dict

REPO = Path(__file__).resolve().parents[3]


def test_the_generated_files_are_up_to_date():
    stale = config_docs.stale_files(REPO)
    assert not stale, (
        f"{[str(p.relative_to(REPO)) for p in stale]} differ from pipeline/core/schema.py: "
        f"run `{config_docs.REGENERATE}` and commit the result"
    )


def test_default_yaml_is_the_schema_defaults_with_a_meaning_per_key():
    text = config_docs.render_default_yaml()
    assert yaml.safe_load(text) == default_dict()
    assert yaml.safe_load((CONFIG_DIR / "default.yaml").read_text()) == default_dict()
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^ {0,2}[a-z_0-9]+:", line)]
    assert len(keys) == len(default_dict()) + sum(
        len(v) for v in default_dict().values() if isinstance(v, dict)
    )
    for i in keys:
        assert "  # " in lines[i] or lines[i - 1].lstrip().startswith("# "), lines[i]


def test_the_reference_has_a_row_per_key():
    doc = config_docs.render_config_doc()
    for section, values in default_dict().items():
        if isinstance(values, dict):
            for key in values:
                assert f"| `{section}.{key}` |" in doc, f"{section}.{key}"
        else:
            assert f"| `{section}` |" in doc
    assert "| `train.batch_size` | integer | `16` | >= 1 | images per batch |" in doc
    assert "runs/&lt;experiment>" in doc  # kept visible, not read as an HTML tag


def test_a_key_without_a_meaning_is_refused():
    class Section(schema.Section):
        described: int = Field(1, description="one")
        silent: int = 2

    class Root(schema.Section):
        part: Section = Field(default_factory=Section, description="a section")

    with pytest.raises(ValueError, match=r"config key 'part.silent' has no meaning"):
        config_docs.render_default_yaml(Root)
    with pytest.raises(ValueError, match=r"config key 'part.silent' has no meaning"):
        config_docs.render_config_doc(Root)


def test_the_check_names_the_command(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("experiment: x\n")
    assert config_docs.main(["--check", "--repo", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "default.yaml" in out and "config.md" in out and config_docs.REGENERATE in out
    assert config_docs.main(["--repo", str(tmp_path)]) == 0
    assert config_docs.main(["--check", "--repo", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-6, "0.000001"), (1e-7, "0.0000001"), (0.5, "0.5"), (None, "null"), (True, "true"),
     ([352, 544], "[352, 544]"), ({"p": 0.5}, "{p: 0.5}"), ("a: b", "'a: b'")],
)  # fmt: skip
def test_values_are_written_as_yaml_reads_them(value, text):
    assert config_docs.render_value(value) == text
    assert yaml.safe_load(text) == value
