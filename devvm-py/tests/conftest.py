"""Fixtures of the devvm binding's tests.

* ``memory_config``: a config of devvm-core's in-memory reference backends (state in JSON
  files in a temp dir, so another process sees the same state), as in the workspace's
  ``tests/support``: users alice and bob (mallory may not own VMs), two hosts, the subnet
  10.20.0.0/28.
* ``lab``, ``lab_config``: the lab's real services (``scripts/lab-config``). Outside the
  lab these tests skip, unless ``DEVVM_REQUIRE_LAB=1`` (as ``scripts/test-python`` sets),
  where an absent lab is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

ZONE = "lab.example"
TEMPLATE = "debian-12"


def memory_toml(state: Path, custom: tuple[str, ...] = ()) -> str:
    """The reference-backend config (``devvm_core::testkit::REFERENCE_CONFIG``, shared
    with the Rust and C tests); each section named in ``custom`` is ``backend = "custom"``
    instead."""
    toml = (REPO / "devvm-core" / "src" / "testkit" / "reference.toml").read_text()
    for name in custom:
        toml = replace_section(toml, name, 'backend = "custom"')
    return toml


def write_memory_config(dir: Path, custom: tuple[str, ...] = ()) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / "devvm.toml"
    path.write_text(memory_toml(dir, custom))
    return path


@pytest.fixture
def memory_config(tmp_path: Path) -> Path:
    return write_memory_config(tmp_path)


def replace_section(toml: str, section: str, body: str) -> str:
    """Replaces the body of ``[section]`` (up to the next header) with ``body``."""
    pattern = re.compile(r"^\[" + re.escape(section) + r"\]\n(?:(?!\[).*\n?)*", re.M)
    assert pattern.search(toml), f"no [{section}] in the config"
    return pattern.sub(f"[{section}]\n{body}\n\n", toml, count=1)


@pytest.fixture(scope="session")
def lab() -> dict[str, str]:
    if os.environ.get("DEVVM_LAB") != "1":
        why = "the lab is not up (run inside scripts/lab exec)"
        if os.environ.get("DEVVM_REQUIRE_LAB") == "1":
            pytest.fail(f"DEVVM_REQUIRE_LAB=1 but {why}")
        pytest.skip(why)
    return {k[len("DEVVM_LAB_"):].lower(): v for k, v in os.environ.items() if k.startswith("DEVVM_LAB_")}


def lab_toml(state: Path) -> str:
    return subprocess.run(
        [str(REPO / "scripts" / "lab-config"), str(state)],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout


@pytest.fixture
def lab_config(lab: dict[str, str], tmp_path: Path) -> Path:
    path = tmp_path / "devvm.toml"
    path.write_text(lab_toml(tmp_path / "state"))
    return path
