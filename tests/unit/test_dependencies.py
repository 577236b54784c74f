"""Dependencies (issue 10, item 13): floors above advisories, installs from hash-pinned locks."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The first release without the advisories docs/security.md lists.
SAFE_FLOORS = {
    "aiohttp": "3.14.4",  # middleware memory leak, zip bomb
    "orjson": "3.9.15",  # CVE-2024-27454
    "redis": "4.5.4",  # CVE-2023-28858/9
    "pydantic": "2.4.0",  # CVE-2024-3772
}


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data


def requirements(group: str | None = None) -> dict[str, Requirement]:
    meta = project()
    listed = meta["dependencies"] if group is None else meta["optional-dependencies"][group]  # type: ignore[index]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed)}  # type: ignore[arg-type]


def lock(name: str) -> dict[str, tuple[Version, int]]:
    """A lock file's pins: name -> (version, number of hashes)."""
    text = (ROOT / name).read_text()
    pins: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        if match:
            hashes = len(re.findall(r"--hash=sha256:[0-9a-f]{64}", block))
            pins[canonicalize_name(match[1])] = (Version(match[2]), hashes)
        else:
            assert block.startswith("#") or not block.strip(), f"{name}: unpinned {block[:60]!r}"
    return pins


@pytest.mark.parametrize(("package", "safe"), SAFE_FLOORS.items())
def test_floors_exclude_releases_with_advisories(package: str, safe: str) -> None:
    specifier: SpecifierSet = requirements()[package].specifier
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{package} has no floor"
    assert min(floors) >= Version(safe), f"{package}{specifier} admits releases below {safe}"


def test_the_locks_pin_every_package_with_hashes() -> None:
    runtime, dev = lock("requirements.lock"), lock("requirements-dev.lock")
    for pins in (runtime, dev):
        for name, (_, hashes) in pins.items():
            assert hashes >= 1, f"{name} has no hash"
    for name, requirement in requirements().items():
        assert name in runtime, f"{name} is not in requirements.lock"
        assert runtime[name][0] in requirement.specifier, name
    for name in requirements("dev"):
        assert name in dev, f"{name} is not in requirements-dev.lock"
    # The image runs what the tests ran.
    for name, (version, _) in runtime.items():
        assert dev[name][0] == version, (
            f"{name}: {version} in one lock, {dev[name][0]} in the other"
        )


def test_this_environment_was_installed_from_the_lock() -> None:
    for name, (version, _) in lock("requirements.lock").items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # a marker excluded it here (uvloop on Windows)
        assert installed == version, f"{name} {installed} installed, {version} locked"


def test_make_the_image_and_ci_install_from_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*--require-hashes -r requirements-dev\.lock", makefile)
    assert re.search(r"pip install .*--no-deps -e \.", makefile)
    assert re.search(r"^lock:", makefile, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install --require-hashes -r requirements\.lock", dockerfile)
    assert re.search(r"pip install --no-deps \.", dockerfile)


# Pythons `make` accepts, at patch levels where markers differ: Debian 12's own python3
# is 3.11.2, and redis needs async-timeout below 3.11.3 (the locks are compiled on a
# later 3.11, whose resolver leaves what only older ones need out).
PYTHONS = ("3.11.0", "3.11.2", "3.11.7", "3.12.0", "3.13.0")


@pytest.mark.parametrize("lock_file", ["requirements.lock", "requirements-dev.lock"])
@pytest.mark.parametrize("python", PYTHONS)
def test_the_locks_hold_what_every_supported_python_needs(lock_file: str, python: str) -> None:
    pins = lock(lock_file)
    environment = {"python_full_version": python, "python_version": python.rsplit(".", 1)[0]}
    missing: set[str] = set()
    for name in pins:
        try:
            needs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # a marker excluded it here
        for line in needs:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and "extra" in str(marker):
                continue  # wanted only with an extra
            needed = marker is None or marker.evaluate(environment)
            if needed and canonicalize_name(requirement.name) not in pins:
                missing.add(f"{requirement.name} (for {name})")
    assert not missing, f"{lock_file} lacks, on Python {python}: {sorted(missing)}"
