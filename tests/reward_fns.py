"""Reward functions for tests (a module of their own, light to import in worker processes)."""

from __future__ import annotations

import time


def always_one(problem, response):
    return 1.0


def never_returns(problem, response):
    time.sleep(600)
    return 1.0


def raises(problem, response):
    raise ValueError("broken on purpose")
