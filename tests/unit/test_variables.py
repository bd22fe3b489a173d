from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstack.config.variables import (
    Declared,
    apply_overrides,
    as_env_value,
    declared_variables,
    load_variables,
    parse_cli_args,
    parse_cli_value,
    references,
    substitute,
    variables_as_args,
)
from dstack.config.yaml_positions import load_text
from dstack.core.errors import ConfigError

# --- command-line overrides ---


def test_cli_args_keep_numbers_as_numbers():
    assert parse_cli_args(["--gpu", "4"]) == {"gpu": 4}
    assert parse_cli_args(["--gpu=4", "--lr", "0.01", "--fast", "true", "--name", "x"]) == {
        "gpu": 4,
        "lr": 0.01,
        "fast": True,
        "name": "x",
    }
    assert parse_cli_args([]) == {}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", 4),
        ("-3", -3),
        ("0.5", 0.5),
        ("True", True),
        ("false", False),
        ("3.10", "3.10"),  # a version, not 3.1
        ("007", "007"),
        ("yes", "yes"),  # YAML 1.1 would say True
        ("12:30", "12:30"),  # YAML 1.1 would say 750
        ("0x1F", "0x1F"),
        ("1_000", "1_000"),
        ("inf", "inf"),
        ("nan", "nan"),
        ("null", "null"),
        ("a b", "a b"),
        ("", ""),
    ],
)
def test_cli_value_is_a_number_only_when_it_reads_back_as_written(text, value):
    parsed = parse_cli_value(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["gpu", "4"], "unexpected argument 'gpu'"), (["--gpu"], "--gpu needs a value"), (["--a", "--b", "1"], "--a")],
)
def test_malformed_cli_args_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"gpu": 1, "a": 1, "b": 1}, parse_cli_args(args), "train")


def test_a_flag_without_value_that_is_no_variable_is_named_as_such():
    # `--unknown` is a mistake of name first: "needs a value" would send the user the wrong way
    with pytest.raises(ConfigError, match="'train' has no variable 'unknown'"):
        apply_overrides({"gpu": 1}, parse_cli_args(["--unknown"]), "train")


def test_override_of_an_undeclared_variable_lists_the_declared_ones():
    with pytest.raises(ConfigError, match="'train' has no variable 'gpus'") as info:
        apply_overrides({"gpu": 1, "epochs": 3}, {"gpus": 2}, "train")
    assert info.value.hint == ("did you mean 'gpu'? declared variables: --gpu, --epochs "
                               "(`dstack run train --help` lists them)")
    assert info.value.exit_code == 2


def test_override_when_nothing_is_declared_says_where_to_declare():
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, {"gpu": 2}, "train")
    assert "none" in info.value.hint and ".dstack/variables.yaml" in info.value.hint


def test_override_of_a_variable_the_workflow_needs_and_no_file_declares_is_taken():
    # what `dstack run WORKFLOW --help` lists as required, and the undefined-variable error offers
    assert apply_overrides({"epochs": 3}, {"gpu": 2}, "train", required=("gpu",)) == {"epochs": 3, "gpu": 2}
    with pytest.raises(ConfigError) as info:
        apply_overrides({"epochs": 3}, {"gpus": 2}, "train", required=("gpu",))
    assert info.value.hint == ("did you mean 'gpu'? declared variables: --epochs; needed by the workflow, declared "
                               "nowhere: --gpu (`dstack run train --help` lists them)")


def test_references_are_read_as_substitution_reads_them():
    raw = {"name": "a", "image": "$image", "help": "costs $$5",
           "commands": ["echo $HOME ${{ lr }} $run_name ${{ run.name }}"], "environment": {"A": "$B"}}
    found = [(r.name, r.path, r.required) for r in references(raw, ("workflows", 0))]
    assert found == [("image", ("workflows", 0, "image"), True),
                     ("HOME", ("workflows", 0, "commands", 0), False),  # the shell's, unless declared
                     ("lr", ("workflows", 0, "commands", 0), True),
                     ("B", ("workflows", 0, "environment", "A"), False)]


def test_declared_variables_say_where_each_comes_from(project):
    project.variables("""
        variables:
          global:
            gpu: 1
            seed: 7
          train:
            gpu: 2
    """)
    assert declared_variables(project.files(), "train", ["train"]) == {
        "gpu": Declared(2, "train", (6, 5)), "seed": Declared(7, "global", (4, 5))}
    assert declared_variables(project.files(), "train", ["train", "eval"])["gpu"].section == "train"
    project.variables("variables: {}\n")
    assert declared_variables(project.files(), "train", ["train"]) == {}


def test_override_replaces_the_declared_value_and_accepts_dashes_for_underscores():
    assert apply_overrides({"gpu": 1, "batch_size": 8}, {"gpu": 4, "batch-size": 16}, "t") == {
        "gpu": 4,
        "batch_size": 16,
    }


# --- variables.yaml ---


def test_global_variables_are_merged_under_the_workflows_own(project):
    project.variables("""
        variables:
          global: {gpu: 1, seed: 7}
          train: {gpu: 2}
    """)
    assert load_variables(project.files(), "train", ["train", "prepare"])[0] == {"gpu": 2, "seed": 7}
    assert load_variables(project.files(), "prepare", ["train", "prepare"])[0] == {"gpu": 1, "seed": 7}


def test_no_variables_file_means_no_variables(project):
    assert load_variables(project.files(), "train", ["train"]) == ({}, None)


def test_section_for_an_unknown_workflow_is_an_error_with_a_suggestion(project):
    project.variables("""
        variables:
          trian:
            gpu: 1
    """)
    with pytest.raises(ConfigError, match="unknown workflow 'trian'") as info:
        load_variables(project.files(), "prepare", ["train", "prepare"])
    assert info.value.hint == "did you mean 'train'?"
    assert info.value.location == ".dstack/variables.yaml:2:3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("varaibles: {}\n", "unknown key 'varaibles'"),
        ("- a\n", "must be a mapping"),
        ("variables: [a]\n", "'variables' must be a mapping"),
        ("variables:\n  train: 3\n", "variables of 'train' must be a mapping"),
    ],
)
def test_malformed_variables_file_is_a_config_error(project, text, message):
    project.write("variables.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_variables(project.files(), "train", ["train"])
    assert info.value.file == ".dstack/variables.yaml"


# --- substitution ---


def _sub(value, variables, shell=False):
    located = load_text("x: 1\n", "w.yaml")
    return substitute(value, variables, located, ("workflows", 0), shell=shell)


def test_whole_reference_keeps_the_variables_yaml_type():
    assert _sub("$gpu", {"gpu": 4}) == 4
    assert _sub("${{ gpu }}", {"gpu": 4}) == 4
    assert _sub("${{gpu}}", {"gpu": True}) is True
    assert _sub({"v100/gpu": "$gpu"}, {"gpu": 2}) == {"v100/gpu": 2}


def test_reference_inside_text_becomes_text():
    assert _sub("--gpu $gpu --n ${{ n }}", {"gpu": 4, "n": 1.5}) == "--gpu 4 --n 1.5"
    assert _sub("$flag", {"flag": False}) is False
    assert _sub("x$flag", {"flag": False}) == "xfalse"


def test_dollar_dollar_is_a_literal_dollar():
    assert _sub("cost: $$5", {}) == "cost: $5"


def test_dollar_dollar_in_a_command_stays_the_shells_pid():
    assert _sub("echo $$ > pid", {}, shell=True) == "echo $$ > pid"


def test_undefined_variable_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="undefined variable 'gpus'") as info:
        _sub({"resources": {"gpu": "$gpus"}}, {"gpu": 1})
    assert info.value.hint.startswith("did you mean 'gpu'? declare it in .dstack/variables.yaml")


def test_unreadable_reference_is_an_error():
    with pytest.raises(ConfigError, match="cannot read the reference"):
        _sub("${{ 1x }}", {})


def test_undefined_dollar_name_in_a_shell_field_is_left_for_the_shell():
    assert _sub("echo $HOME $gpu", {"gpu": 2}, shell=True) == "echo $HOME 2"
    assert _sub("$HOME", {}, shell=True) == "$HOME"


def test_undefined_braced_reference_in_a_shell_field_is_still_an_error():
    with pytest.raises(ConfigError, match="undefined variable 'gpu'"):
        _sub("echo ${{ gpu }}", {}, shell=True)


def test_system_variable_aliases():
    assert _sub("${{ run.name }}/${{ job.id }}", {"run_name": "r-1", "job_id": "abc"}) == "r-1/abc"


def test_variables_as_args_are_quoted_for_the_shell():
    args = variables_as_args({"gpu": 4, "name": "my model", "fast": True})
    assert args == "--gpu 4 --name 'my model' --fast true"
    assert shlex.split(args) == ["--gpu", "4", "--name", "my model", "--fast", "true"]


def test_env_values_are_text():
    assert [as_env_value(v) for v in (True, None, 4, [1], {"a": 1})] == ["true", "", "4", "[1]", '{"a": 1}']


# --- properties ---

names = st.builds(lambda a, b: a + b, st.sampled_from("abgnx_"), st.text(alphabet="abgnx_019", max_size=6))
values = st.one_of(st.integers(), st.booleans(), st.text(alphabet="abc xyz-./", max_size=10))


@given(st.dictionaries(names, values, max_size=4), st.text(alphabet="abc {}-#", max_size=20))
def test_text_without_dollars_is_never_changed(variables, text):
    assert _sub(text, variables) == text


@given(names, values)
def test_whole_reference_is_the_value_itself(name, value):
    assert _sub(f"${name}", {name: value}) == value
    assert _sub(f"${{{{ {name} }}}}", {name: value}) == value


@given(st.dictionaries(names, values, max_size=4))
def test_variables_as_args_round_trip_through_the_shell(variables):
    words = shlex.split(variables_as_args(variables))
    assert words == [w for k, v in variables.items() for w in (f"--{k}", as_env_value(v))]


@given(st.integers() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False))
def test_cli_value_of_a_printed_number_is_that_number(value):
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    assert parse_cli_value(text) == value
