"""Names of runs (adjective-animal-N), runners and jobs (12 hex characters), and the rules for the names people
give: one line of printable text, of a bounded length."""

from __future__ import annotations

import random
import re
import secrets
import unicodedata

from dstack.core.errors import ConfigError

DEFAULT_JOB_USER = "dstack-job"  # a root runner's host job's own user (a uid of its own), unless told (runner/job_user.py)

ADJECTIVES = """able brave bright busy calm clever cool cosy crisp curly daring eager fancy fast fluffy
fresh funny gentle giant glad grumpy happy hardy honest hungry jolly keen kind lazy lively lucky merry
mighty modest neat nice noble odd plain polite proud quick quiet rapid ready rich shiny shy silly sleepy
smart snappy soft solid spicy steady strong sunny swift tall tame tidy tiny tough vivid warm wild wise
witty young zesty""".split()

ANIMALS = """ant ape bat bear beaver bee bison boar bobcat bug camel cat cheetah chicken cobra cod cow crab
crane crow deer dingo dodo dog dolphin donkey dove duck eagle eel elk emu falcon ferret fish fly fox frog
gecko goat goose gopher hawk hen heron horse husky ibis jackal jaguar kangaroo kitten koala lamb lemur
lion lizard llama lobster lynx mole mongoose monkey moose mouse mule newt octopus otter owl panda parrot
penguin pig pony puma quail rabbit rat raven rhino robin seal shark sheep shrimp skunk sloth snail snake
sparrow squid starfish swan tiger toad trout turkey turtle walrus wasp whale wolf wombat yak zebra""".split()


def random_base() -> str:
    return f"{random.choice(ADJECTIVES)}-{random.choice(ANIMALS)}"


def job_id() -> str:
    return secrets.token_hex(6)


def token() -> str:
    return secrets.token_urlsafe(32)


# The rules for names that people give (workflows, tags, runners) and for artifact paths: what tables and
# messages show, each on one line as itself. Lengths are those of the database's columns.
MAX_RUN_NAME = 100
MAX_RUNNER_NAME = 100
MAX_WORKFLOW_NAME = 200
MAX_TAG = 200
MAX_JOB_ID = 32
MAX_REPO_ID = 500
MAX_PATH = 4096
# a dependency as written, when it names a run that exists: at longest `workflow:tag`
MAX_DEPENDENCY_REF = MAX_WORKFLOW_NAME + 1 + MAX_TAG
# ints as SQLite keeps them (8 bytes, signed)
MAX_INT64 = 2**63 - 1

_CONTROL = {"Cc", "Cf", "Zl", "Zp"}  # controls (newline, ESC), formats (bidi overrides), line separators
RUNNER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class BadName(ConfigError, ValueError):
    """A name that breaks the rules: a ConfigError to users, a ValueError to the models that validate it
    (the API answers it as a ConfigError all the same)."""


def control_character(text: str) -> str | None:
    """The first character of `text` that a terminal does not print as itself: a control character (a newline,
    ESC), a format character (a bidi override), a line or paragraph separator. (A lone surrogate is not text at
    all, and refused as such elsewhere.)"""
    if text.isprintable():
        return None
    return next((c for c in text if unicodedata.category(c) in _CONTROL), None)


def printable(text: str) -> str:
    """`text` with each control or format character escaped as Python writes it (`\\n`, `\\x1b`, `\\u202e`): it
    prints on one line, as itself, and cannot move the cursor or forge a table's row."""
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _CONTROL else c
                   for c in text)


def check_text(text: str, what: str, max_length: int | None = None) -> str:
    """`text`, or BadName when it holds a control character or is longer than `max_length`."""
    c = control_character(text)
    if c is not None:
        raise BadName(f"{what} '{printable(text)}' holds a control character ({printable(c)})",
                      hint="names and paths are one line of printable text: no newlines, tabs or escape sequences")
    if max_length is not None and len(text) > max_length:
        raise BadName(f"{what} '{text[:40]}...' is longer than {max_length} characters")
    return text


def check_runner_name(name: str) -> str:
    check_text(name, "the runner name", MAX_RUNNER_NAME)
    if not RUNNER_NAME.fullmatch(name):
        raise BadName(f"'{name}' is not a runner name",
                      hint="use letters, digits, '-', '_' and '.', starting with a letter or a digit")
    return name


def check_tag(tag: str) -> str:
    check_text(tag, "the tag name", MAX_TAG)
    if not tag or ":" in tag or any(c.isspace() for c in tag):
        raise BadName(f"'{tag}' is not a tag name", hint="use letters, digits, '-', '_' or '.'")
    return tag


def parse_labels(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`("gpu-vendor=nvidia", "zone=a")` -> a dict; a pair without `=` or a key is a ValueError that says how."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--labels {pair}: write it as KEY=VALUE, e.g. --labels gpu-vendor=nvidia")
        out[key] = value
    return out
