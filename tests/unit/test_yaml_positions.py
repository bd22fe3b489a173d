from __future__ import annotations

import pytest

from dstack.config import yaml_positions
from dstack.config.files import MAX_FILE, ProjectFiles
from dstack.config.yaml_positions import load_text
from dstack.core.errors import ConfigError

TEXT = """\
workflows:
  - name: train
    commands:
      - python train.py
    resources:
      gpu: 2
"""


def test_every_value_and_key_has_its_one_based_position():
    located = load_text(TEXT, "w.yaml")
    assert located.data == {
        "workflows": [{"name": "train", "commands": ["python train.py"], "resources": {"gpu": 2}}]
    }
    assert located.positions[("workflows", 0, "name")] == (2, 11)
    assert located.key_positions[("workflows", 0, "name")] == (2, 5)
    assert located.positions[("workflows", 0, "commands", 0)] == (4, 9)
    assert located.positions[("workflows", 0, "resources", "gpu")] == (6, 12)


def test_position_of_an_unwritten_path_is_its_closest_written_ancestor():
    located = load_text(TEXT, "w.yaml")
    assert located.where(("workflows", 0, "resources", "gpu", "count")) == (6, 12)
    assert located.where(("workflows", 0, "image")) == (2, 5)  # the workflow's mapping


def test_error_points_at_the_key_when_asked():
    err = load_text(TEXT, "w.yaml").error(("workflows", 0, "resources", "gpu"), "bad", key=True)
    assert (err.file, err.line, err.column) == ("w.yaml", 6, 7)
    assert err.location == "w.yaml:6:7"


def test_values_keep_their_yaml_types():
    data = load_text("a: 4\nb: '4'\nc: true\nd: 1.5\ne: null\n", "f").data
    assert data == {"a": 4, "b": "4", "c": True, "d": 1.5, "e": None}
    assert isinstance(data["a"], int) and isinstance(data["b"], str)


def test_empty_file_is_none():
    assert load_text("", "f").data is None
    assert load_text("# only a comment\n", "f").data is None


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("a: [1, 2\nb: 3\n", 2, 2),  # unclosed flow sequence
        ("a: 1\n b: 2\n", 2, 3),  # bad indentation
        ("a: 'unterminated\n", 2, 1),
    ],
)
def test_malformed_yaml_is_a_config_error_with_file_line_column(text, line, column):
    with pytest.raises(ConfigError) as info:
        load_text(text, ".dstack/workflows.yaml")
    err = info.value
    assert err.message.startswith("malformed YAML")
    assert (err.file, err.line, err.column) == (".dstack/workflows.yaml", line, column)
    assert err.exit_code == 2


def test_tab_indentation_gets_a_hint():
    with pytest.raises(ConfigError) as info:
        load_text("a:\n\t- b\n", "f")
    assert info.value.hint == "indent with spaces, not tabs"
    assert info.value.location == "f:2:1"


def test_duplicate_key_is_rejected_at_the_second_one():
    with pytest.raises(ConfigError, match="duplicate key 'a'") as info:
        load_text("a: 1\nb: 2\na: 3\n", "f")
    assert info.value.location == "f:3:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("? [1, 2]\n: 3\n", "a key must be a plain value"),
        ("a: !!python/object:os.system x\n", "malformed YAML"),
        ("a: &x [1, *x]\n", "refers to a value that contains it"),
        ("a: &x {b: *x}\n", "refers to a value that contains it"),
    ],
)
def test_unsupported_yaml_is_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_text(text, "f")
    assert info.value.line is not None


def test_aliases_expand_to_copies():
    data = load_text("a: &x {b: 1}\nc: *x\n", "f").data
    assert data == {"a": {"b": 1}, "c": {"b": 1}}


def test_exponential_alias_expansion_is_refused(monkeypatch):
    monkeypatch.setattr(yaml_positions, "_MAX_VALUES", 1000)
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(ConfigError, match="more than"):
        load_text("\n".join(lines) + "\n", "f")


def test_unreadable_huge_and_non_utf8_files_are_config_errors(tmp_path):
    (tmp_path / ".dstack").mkdir()
    bad = tmp_path / ".dstack" / "workflows.yaml"
    bad.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        ProjectFiles.read(tmp_path)
    assert info.value.file == ".dstack/workflows.yaml"
    bad.write_bytes(b"# x\n" * (MAX_FILE // 4 + 1))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        ProjectFiles.read(tmp_path)
    bad.unlink()
    bad.mkdir()  # a folder where the file should be
    with pytest.raises(ConfigError, match="cannot read .dstack/workflows.yaml"):
        ProjectFiles.read(tmp_path)


def test_project_files_are_the_yaml_files_of_dstack_in_order(tmp_path):
    (tmp_path / ".dstack" / "workflows").mkdir(parents=True)
    for rel in ("workflows.yml", "workflows.yaml", "variables.yaml", "workflows/b.yaml", "workflows/a.yml",
                "workflows/notes.txt", "other.yaml"):
        (tmp_path / ".dstack" / rel).write_text(rel)
    files = ProjectFiles.read(tmp_path)
    assert files.workflow_files() == [".dstack/workflows.yaml", ".dstack/workflows.yml",
                                      ".dstack/workflows/a.yml", ".dstack/workflows/b.yaml"]
    assert files.texts[".dstack/variables.yaml"] == "variables.yaml" and files.root == str(tmp_path)
    assert ProjectFiles.read(tmp_path / "nowhere").texts == {}


def test_a_key_without_its_colon_is_pointed_at_where_it_starts():
    with pytest.raises(ConfigError) as info:
        load_text("workflows:\n  - name: a\n    commands\n      - echo\n", "w.yaml")
    assert info.value.location == "w.yaml:3:5" and "needs a ':'" in info.value.hint


def test_unquoted_braces_in_a_flow_list_get_a_hint_about_quotes():
    with pytest.raises(ConfigError) as info:
        load_text("workflows:\n  - name: a\n    commands: [echo ${{ x }}]\n", "w.yaml")
    assert "needs quotes" in info.value.hint


def test_merge_keys_merge_and_keys_written_win():
    located = load_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", "w.yaml")
    assert located.data["other"] == {"x": 1, "y": 3}


def test_merging_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="merges mappings only"):
        load_text("a: &s 1\nb:\n  <<: *s\n", "w.yaml")


def test_utf16_escapes_make_one_character_and_a_lone_half_is_refused_where_it_is_written():
    # JSON writers escape 😀 as a UTF-16 pair; PyYAML reads each half alone
    assert load_text('# "\\udcff" in a comment is nothing\na: "\\ud83d\\ude00"\n', "f.yaml").data == {"a": "😀"}
    with pytest.raises(ConfigError) as e:
        load_text('a: x\nb: "ok \\udcff"\n', "f.yaml")
    assert (e.value.file, e.value.line, e.value.column) == ("f.yaml", 2, 4)
    assert "half of a UTF-16 pair" in e.value.message
