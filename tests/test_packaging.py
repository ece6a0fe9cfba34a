"""The install promises agree with each other: the lock lies inside the declared ranges, and
CI's oldest leg installs exactly the ranges' lower bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
HOOKED = ("transformers", "peft", "lightning")  # libraries whose internals atp touches


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return {r.name.lower(): r for r in requirements}


def pins(text: str) -> dict[str, Version]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", text, flags=re.MULTILINE)
    return {name.lower().replace("_", "-"): Version(version) for name, version in found}


def test_the_lock_pins_every_declared_dependency_inside_its_range():
    lock = pins((ROOT / "constraints.txt").read_text())
    for name, requirement in declared().items():
        assert name in lock, f"constraints.txt has no pin for {name}: run make lock"
        assert requirement.specifier.contains(lock[name], prereleases=True), (name, str(requirement), lock[name])


def test_hooked_libraries_have_a_tested_upper_bound():
    for name in HOOKED:
        assert any(spec.operator == "<" for spec in declared()[name].specifier), name


def test_the_oldest_ci_leg_installs_the_lower_bounds():
    makefile = (ROOT / "Makefile").read_text()
    oldest = pins(re.search(r"^OLDEST \?= (.*)$", makefile, flags=re.MULTILINE).group(1).replace(" ", "\n"))
    assert sorted(oldest) == sorted(HOOKED)
    for name in HOOKED:
        lower = [Version(spec.version) for spec in declared()[name].specifier if spec.operator == ">="]
        assert lower == [oldest[name]], (name, lower, oldest[name])
