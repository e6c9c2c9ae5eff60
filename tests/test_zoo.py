"""Zoo coverage (torchvision models through structured pruning): `make zoo`, never `make test`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet1_0"])
def test_zoo_model_prunes_and_keeps_the_invariant(name: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import zoo

    zoo.OUT.mkdir(parents=True, exist_ok=True)
    row = zoo.one(name)
    assert row["status"] == "pruned", row.get("trace")
    assert row["macs"][1] < row["macs"][0]
    assert row["invariant_rel_err"] < 1e-5
