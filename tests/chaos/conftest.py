"""Every test under tests/chaos carries the ``chaos`` marker (``-m chaos`` runs only them,
``-m "not chaos"`` skips them); the normal test command runs them."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.chaos)
