"""The shipped pruning profiles (JSON data, see README.md), installed as `moe_runtime.profiles`."""

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
