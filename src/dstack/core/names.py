"""Names of runs (adjective-animal-N), runners and jobs (12 hex characters)."""

from __future__ import annotations

import random
import secrets

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
