"""A missing capability (root, namespaces, iptables, a compiler, a tool) skips a test on a
developer's machine but fails it under CI (env CI=true), which must provide everything:
a CI machine without namespaces would otherwise pass silently."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(why: str) -> NoReturn:
    """Skip because of `why`, or under CI fail with it."""
    if in_ci():
        pytest.fail(f"CI=true and a capability this test needs is missing: {why} "
                    "(CI must provide it: see .ci/run)", pytrace=False)
    pytest.skip(why)
