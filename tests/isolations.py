"""Run a module's Docker tests under every isolation: import ``every_isolation`` there.

It overrides the ``isolation`` fixture of conftest (always ``container``) for that
module, so the ``executor`` fixture and whatever else asks for ``isolation`` run once
per isolation: the same tests, not a copy.
"""

from __future__ import annotations

import pytest

from execbox.engine.base import ISOLATIONS


@pytest.fixture(scope="module", params=ISOLATIONS, name="isolation")
def every_isolation(request: pytest.FixtureRequest) -> str:
    return str(request.param)
