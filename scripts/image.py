"""The broker's container image: built reproducibly from locked inputs, signed, with a
signed provenance statement and an SBOM, and verified.

    python -m scripts.image build   [--out build/image]          # make image
    python -m scripts.image keygen  --home DIR                    # a throwaway signing key
    python -m scripts.image sign    --home DIR --key FINGERPRINT  # make sign-image
    python -m scripts.image verify  --pubkey-dir DIR              # make verify-image
    python -m scripts.image pin                                   # deploy/ by digest

``build`` makes an OCI image with buildah from ``scratch``: a Debian root filesystem by
``debootstrap --variant=minbase`` with Debian's own Python and the CA certificates; a
virtual environment without pip at /opt/broker, into which pip (run from its locked wheel,
then gone) installs ``requirements/runtime.txt`` and the broker's wheel with
``--require-hashes`` from wheels downloaded with their hashes checked; the SBOM of that
environment (cyclonedx-bom, installed beside it for the purpose and removed); then apt and
dpkg are purged, so no package manager is left (minbase has no compiler), the user
``broker`` (65532) is added, and everything that differs from one build to the next is
made not to: timestamps clamped to the source commit's time, byte code compiled by content
hash, logs, caches and backup files removed. Two builds of the same commit and locks give
the same digest. Only PyPI and Debian's archive are reached, for the locked wheels and
Debian's packages.

``sign`` copies the image to a ``dir:`` layout with a signature made by skopeo (GPG,
"simple signing") and writes the policy.json that requires that key, and an in-toto
statement (SLSA provenance v1) naming the image digest, the source commit, the lock's and
the SBOM's digests, in a DSSE envelope signed with the same key. ``verify`` checks all
three: the signature under the policy, the provenance's signature and every digest it
names against the image and the tree, and the SBOM against the image's installed
distributions and the lock's hashes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.sbom import (
    PROJECT,
    ROOT,
    RUNTIME_LOCK,
    SupplyChainError,
    add_hashes,
    build_wheel,
    canonical,
    install_requirements,
    lock_hashes,
    run,
    sha256_file,
    source_date_epoch,
    write_json,
)

NAME = "ghcr.io/example/ephemeral-broker"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IDENTITY = f"{NAME}:{VERSION}"  # the reference a signature vouches for
UID = 65532
SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3", "ca-certificates")
VENV = "/opt/broker"
SITE = f"{VENV}/lib/python3.11/site-packages"
STAGE = "/tmp/build"  # noqa: S108 — inside the build root, removed before the commit
LOCKS = ROOT / "requirements"
STATEMENT = "application/vnd.in-toto+json"
LABEL_LOCK = "io.ephemeral-broker.lock.sha256"
LABEL_SBOM = "io.ephemeral-broker.sbom.sha256"
LABEL_REVISION = "org.opencontainers.image.revision"
# What the build leaves behind and a container never needs, or that differs per build.
SCRUB = ("tmp/build", "var/cache/apt", "var/lib/apt", "var/cache/debconf",
         "var/cache/ldconfig/aux-cache", "usr/share/man", "usr/share/info",
         "usr/share/lintian", "etc/resolv.conf", "etc/hostname", "etc/hosts")


def revision() -> str:
    """The source commit, marked when the tree has changes the commit does not hold."""
    commit = run("git", "rev-parse", "HEAD", cwd=ROOT).strip()
    dirty = run("git", "status", "--porcelain", "--untracked-files=no", cwd=ROOT).strip()
    return f"{commit}-dirty" if dirty else commit


def storage(out: Path) -> list[str]:
    """buildah's, skopeo's and podman's storage of their own under ``out`` (vfs: works as
    root without overlay support), so a build touches no system-wide image store."""
    return ["--root", str(out / "storage"), "--runroot", str(out / "runroot"),
            "--storage-driver", "vfs"]


def chroot(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """A command inside the build root, with an environment of only what is given."""
    base = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": STAGE, "LC_ALL": "C.UTF-8",
            "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONHASHSEED": "0"}
    return run("chroot", root, "/usr/bin/env", "-i",
               *(f"{k}={v}" for k, v in {**base, **(env or {})}.items()), *args)


def download_wheels(dest: Path) -> Path:
    """Every wheel the locks name for the image's platform (CPython 3.11, glibc x86_64),
    checked against their hashes; the pip wheel that installs them. Kept between builds."""
    dest.mkdir(parents=True, exist_ok=True)
    # this machine's platform (Debian 12, x86_64) is the image's; the interpreter's version
    # and ABI are named, so another Python running the build still fetches 3.11's wheels
    platform = ["--only-binary", ":all:", "--implementation", "cp", "--python-version", "3.11",
                "--abi", "cp311"]
    for lock in ("runtime", "bootstrap", "sbom"):
        run(sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
            *platform, "-r", LOCKS / f"{lock}.txt", "--dest", dest)
    pips = sorted(dest.glob("pip-*.whl"))
    if len(pips) != 1:
        raise SupplyChainError(f"expected one pip wheel in {dest}, found {pips}")
    return pips[0]


def stage(root: Path, wheels: Path, pip: Path, wheel: Path) -> None:
    """What the installs inside the root need, under /tmp/build (removed before commit)."""
    build = root / "tmp" / "build"
    shutil.copytree(wheels, build / "wheels")
    shutil.copy(wheel, build / wheel.name)
    shutil.copy(ROOT / "pyproject.toml", build / "pyproject.toml")
    shutil.copy(LOCKS / "sbom.txt", build / "sbom.txt")
    install_requirements(wheel, build / "requirements.txt", f"file://{STAGE}/{wheel.name}")
    # cyclonedx-py asks this interpreter for its sys.path: the environment's own, without
    # the SBOM tool's PYTHONPATH
    python = build / "python"
    python.write_text(f'#!/bin/sh\nunset PYTHONPATH\nexec {VENV}/bin/python "$@"\n')
    python.chmod(0o755)
    (build / "pip").symlink_to(f"wheels/{pip.name}")


def install(root: Path, epoch: int) -> dict[str, Any]:
    """The broker's environment and its SBOM (with the installed files' hashes)."""
    pip = [f"{STAGE}/pip/pip", "install", "--quiet", "--no-index", "--find-links",
           f"{STAGE}/wheels", "--require-hashes", "--no-compile"]
    chroot(root, "/usr/bin/python3", "-m", "venv", "--without-pip", VENV)
    chroot(root, f"{VENV}/bin/python", *pip, "-r", f"{STAGE}/requirements.txt",
           "--report", f"{STAGE}/report.json")
    chroot(root, f"{VENV}/bin/python", *pip, "--target", f"{STAGE}/sbomtool",
           "-r", f"{STAGE}/sbom.txt")
    chroot(root, f"{VENV}/bin/python", "-m", "cyclonedx_py", "environment", f"{STAGE}/python",
           "--pyproject", f"{STAGE}/pyproject.toml", "--output-reproducible",
           "-o", f"{STAGE}/environment.cdx.json",
           env={"PYTHONPATH": f"{STAGE}/sbomtool", "SOURCE_DATE_EPOCH": str(epoch)})
    build = root / "tmp" / "build"
    wheel = next(build.glob("*.whl"))
    allowed = {**lock_hashes(), canonical(PROJECT): {sha256_file(wheel)}}
    return add_hashes(json.loads((build / "environment.cdx.json").read_text()),
                      json.loads((build / "report.json").read_text()), allowed)


def add_user(root: Path, epoch: int) -> None:
    """The unprivileged user the image runs as; every account's password-change day is
    the source commit's, not the build's."""
    with open(root / "etc/passwd", "a") as f:
        f.write(f"broker:x:{UID}:{UID}:ephemeral broker:/nonexistent:/usr/sbin/nologin\n")
    with open(root / "etc/group", "a") as f:
        f.write(f"broker:x:{UID}:\n")
    day = str(epoch // 86400)
    lines = (root / "etc/shadow").read_text().splitlines() + ["broker:!:::::::"]
    fixed = [":".join([*p[:2], day, *p[3:]]) for p in (line.split(":") for line in lines)]
    (root / "etc/shadow").write_text("\n".join(fixed) + "\n")


def strip(root: Path) -> None:
    """No package manager; nothing a build leaves that differs between builds."""
    chroot(root, "dpkg", "--purge", "--force-remove-essential", "--force-depends", "apt")
    chroot(root, "dpkg", "--purge", "--force-remove-essential", "--force-depends", "dpkg")
    for part in SCRUB:
        path = root / part
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for pattern in ("var/log/*", "var/lib/dpkg/*-old", "etc/*-", "dev/*", "run/*", "tmp/*",
                    "var/tmp/*"):
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for translations in (root / "usr/share/locale").glob("*/"):
        shutil.rmtree(translations)  # messages in other languages; the image runs C.UTF-8
    # Debian's copyright files stay (the licences' notices); the rest of the docs go
    for doc in (root / "usr/share/doc").glob("*/*"):
        if doc.name != "copyright":
            shutil.rmtree(doc) if doc.is_dir() and not doc.is_symlink() else doc.unlink()
    for cache in list(root.rglob("__pycache__")):
        shutil.rmtree(cache)


def compile_bytecode(root: Path, epoch: int) -> None:
    """Byte code checked by nothing but its content (the root is read-only, so sources
    never change), written in one process: the same bytes every build."""
    compile_ = [f"{VENV}/bin/python", "-m", "compileall", "-q", "-j", "1",
                "--invalidation-mode", "unchecked-hash"]
    env = {"SOURCE_DATE_EPOCH": str(epoch)}
    chroot(root, *compile_, f"{VENV}/lib", env=env)
    try:  # the standard library holds a few test files that are not Python 3 on purpose
        chroot(root, *compile_, "/usr/lib/python3.11", env=env)
    except SupplyChainError:
        pass


def clamp_times(root: Path, epoch: int) -> None:
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(directory, name)
            if os.lstat(path).st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


@dataclass(frozen=True)
class Built:
    archive: Path
    digest: str  # sha256:<hex> of the image manifest
    revision: str
    lock_sha256: str
    sbom_sha256: str


def build(out: Path, cache: Path) -> Built:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    epoch, rev = source_date_epoch(), revision()
    pip = download_wheels(cache / "wheels")
    wheel = build_wheel(out / "dist", epoch)
    buildah = ["buildah", *storage(out)]
    container = run(*buildah, "from", "--quiet", "scratch").strip()
    try:
        root = Path(run(*buildah, "mount", container).strip())
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive"}
        (cache / "debs").mkdir(parents=True, exist_ok=True)
        run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            f"--cache-dir={cache / 'debs'}", SUITE, root, MIRROR, env=env)
        stage(root, cache / "wheels", pip, wheel)
        sbom = install(root, epoch)
        sbom_path = out / "sbom.cdx.json"
        write_json(sbom_path, sbom)
        add_user(root, epoch)
        strip(root)
        compile_bytecode(root, epoch)
        clamp_times(root, epoch)
        lock_sha, sbom_sha = sha256_file(RUNTIME_LOCK), sha256_file(sbom_path)
        created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()
        labels = {
            LABEL_REVISION: rev, "org.opencontainers.image.version": VERSION,
            "org.opencontainers.image.title": PROJECT, "org.opencontainers.image.created": created,
            LABEL_LOCK: lock_sha, LABEL_SBOM: sbom_sha,
        }
        run(*buildah, "config", f"--user={UID}:{UID}", "--workingdir=/",
            '--entrypoint=["/opt/broker/bin/broker", "serve"]',
            '--cmd=["--config", "/etc/broker/config.yaml"]',
            f"--env=PATH={VENV}/bin:/usr/bin:/bin", "--env=PYTHONDONTWRITEBYTECODE=1",
            "--env=PYTHONUNBUFFERED=1", "--env=LANG=C.UTF-8", "--os=linux", "--arch=amd64",
            "--created-by=make image", *(f"--label={k}={v}" for k, v in labels.items()),
            container)
        archive = out / "image.oci.tar"
        archive.unlink(missing_ok=True)
        run(*buildah, "commit", "--quiet", "--format=oci", "--squash", f"--timestamp={epoch}",
            "--disable-compression=false",
            "--identity-label=false", "--rm", container, f"oci-archive:{archive}:{IDENTITY}")
        container = ""
    finally:
        if container:
            subprocess.run([*buildah, "rm", container], capture_output=True, check=False)
        shutil.rmtree(out / "storage", ignore_errors=True)
        shutil.rmtree(out / "runroot", ignore_errors=True)
    digest = manifest_digest(f"oci-archive:{archive}")
    built = Built(archive, digest, rev, lock_sha, sbom_sha)
    write_json(out / "image.json", {
        "reference": f"{NAME}@{digest}", "digest": digest, "revision": rev,
        "lock_sha256": lock_sha, "sbom_sha256": sbom_sha, "archive_bytes": archive.stat().st_size,
        "build_seconds": round(time.monotonic() - started, 1)})
    return built


def manifest_digest(image: str, *extra: str) -> str:
    raw = subprocess.run(["skopeo", *extra, "inspect", "--raw", image], capture_output=True,
                         check=False)
    if raw.returncode != 0:
        raise SupplyChainError(f"skopeo inspect {image}: {raw.stderr.decode().strip()}")
    return "sha256:" + hashlib.sha256(raw.stdout).hexdigest()


# -- keys, signatures, provenance -----------------------------------------------------------

def keygen(home: Path) -> str:
    """A throwaway GPG signing key (ed25519, no passphrase) in ``home``; its fingerprint."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    run("gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
        "--quick-gen-key", "ephemeral-broker image signing (test key)", "ed25519", "sign", "never")
    return fingerprints(home)[0]


def fingerprints(home: Path) -> list[str]:
    listing = run("gpg", "--homedir", home, "--batch", "--with-colons", "--list-keys")
    return [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]


def export_public(home: Path, key: str, dest: Path) -> None:
    """The public half, for whoever verifies: the armoured key (skopeo's policy) and
    securesystemslib's form of it (the provenance)."""
    from securesystemslib.signer import GPGSigner

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "signing-key.asc").write_text(
        run("gpg", "--homedir", home, "--batch", "--armor", "--export", key))
    _, public = GPGSigner.import_(key.lower(), str(home))
    write_json(dest / "signing-key.json", {"keyid": public.keyid, **public.to_dict()})


def policy(pubkey: Path) -> dict[str, Any]:
    """A containers-policy.json that admits nothing but this image signed by this key."""
    signed_by = [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(pubkey),
                  "signedIdentity": {"type": "exactReference", "dockerReference": IDENTITY}}]
    return {"default": [{"type": "reject"}],
            "transports": {"dir": {"": signed_by}, "docker": {NAME: signed_by}}}


def statement(built: Built, out: Path) -> dict[str, Any]:
    """The in-toto statement: SLSA provenance v1 for the image."""
    source = {"uri": f"git+file://{ROOT}", "digest": {"gitCommit": built.revision}}
    info = json.loads((out / "image.json").read_text())
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": NAME, "digest": {"sha256": built.digest.split(":", 1)[1]}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "https://ephemeral-broker.example/build-types/make-image/v1",
                "externalParameters": {"source": source, "lock": "requirements/runtime.txt",
                                       "debian": {"suite": SUITE, "mirror": MIRROR,
                                                  "packages": list(PACKAGES)}},
                "internalParameters": {"SOURCE_DATE_EPOCH": source_date_epoch()},
                "resolvedDependencies": [
                    source,
                    {"name": "requirements/runtime.txt", "digest": {"sha256": built.lock_sha256}},
                    {"name": "sbom.cdx.json", "digest": {"sha256": built.sbom_sha256},
                     "mediaType": "application/vnd.cyclonedx+json"},
                ],
            },
            "runDetails": {
                "builder": {"id": "https://ephemeral-broker.example/builders/make-image"},
                "metadata": {"invocationId": str(uuid.uuid4()),
                             "finishedOn": datetime.datetime.now(datetime.UTC).isoformat(),
                             "buildSeconds": info.get("build_seconds")},
            },
        },
    }


def load_built(out: Path) -> Built:
    info = json.loads((out / "image.json").read_text())
    return Built(out / "image.oci.tar", info["digest"], info["revision"], info["lock_sha256"],
                 info["sbom_sha256"])


def sign(out: Path, home: Path, key: str) -> None:
    """The signed image (``out/signed``, a dir: layout), the key's public half and a policy
    requiring it (``out/trust``), the signed provenance (``out/provenance.intoto.json``)."""
    from in_toto.models.metadata import Envelope
    from securesystemslib.signer import GPGSigner

    built = load_built(out)
    signed = out / "signed"
    shutil.rmtree(signed, ignore_errors=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    run("skopeo", "copy", "--quiet", "--sign-by", key, "--sign-identity", IDENTITY,
        f"oci-archive:{built.archive}", f"dir:{signed}", env=env)
    if manifest_digest(f"dir:{signed}") != built.digest:
        raise SupplyChainError("the signed copy's manifest differs from the built image's")
    trust = out / "trust"
    export_public(home, key, trust)
    write_json(trust / "policy.json", policy(trust / "signing-key.asc"))
    _, public = GPGSigner.import_(key.lower(), str(home))
    payload = json.dumps(statement(built, out), sort_keys=True).encode()
    envelope = Envelope(payload=payload, payload_type=STATEMENT, signatures={})
    envelope.sign(GPGSigner(public, str(home)))
    write_json(out / "provenance.intoto.json", envelope.to_dict())


# -- verification ---------------------------------------------------------------------------

def verify_signature(out: Path, trust: Path, signed: Path) -> str:
    """skopeo under the policy: copies the image only if the key signed it."""
    with tempfile.TemporaryDirectory() as scratch:
        run("skopeo", "--policy", trust / "policy.json", "copy", "--quiet", f"dir:{signed}",
            f"dir:{scratch}/verified")
        return manifest_digest(f"dir:{scratch}/verified")


def verify_provenance(out: Path, trust: Path, digest: str) -> dict[str, Any]:
    from in_toto.models.metadata import Envelope
    from securesystemslib.signer import Key

    key_data = json.loads((trust / "signing-key.json").read_text())
    key = Key.from_dict(key_data.pop("keyid"), key_data)
    envelope = Envelope.from_dict(json.loads((out / "provenance.intoto.json").read_text()))
    if envelope.payload_type != STATEMENT:
        raise SupplyChainError(f"provenance: payload type {envelope.payload_type!r}")
    try:
        envelope.verify([key], 1)
    except Exception as exc:  # securesystemslib's VerificationError and its kin
        raise SupplyChainError(f"provenance: signature does not verify ({exc})") from exc
    stated = json.loads(envelope.payload)
    subjects = [s["digest"].get("sha256") for s in stated["subject"]]
    if subjects != [digest.split(":", 1)[1]]:
        raise SupplyChainError(f"provenance: its subject {subjects} is not the image {digest}")
    return stated


def image_files(signed: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The image's config and the METADATA of every distribution in its environment."""
    manifest = json.loads((signed / "manifest.json").read_text())
    config = json.loads((signed / manifest["config"]["digest"].split(":", 1)[1]).read_bytes())
    found: dict[str, bytes] = {}
    for layer in manifest["layers"]:
        blob = signed / layer["digest"].split(":", 1)[1]
        with tarfile.open(blob, "r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if (name.startswith(SITE.lstrip("/") + "/") and name.endswith(".dist-info/METADATA")
                        and member.isfile()):
                    data = tar.extractfile(member)
                    assert data is not None
                    found[name] = data.read()
    return config, found


def installed_in(metadata: dict[str, bytes]) -> dict[str, str]:
    from email.parser import BytesParser

    dists = {}
    for raw in metadata.values():
        headers = BytesParser().parse(io.BytesIO(raw), headersonly=True)
        dists[canonical(headers["Name"])] = headers["Version"]
    return dists


def verify_sbom(sbom: dict[str, Any], installed: dict[str, str]) -> None:
    listed = {canonical(c["name"]): c for c in
              [sbom["metadata"]["component"], *sbom.get("components", [])]}
    if {n: c.get("version") for n, c in listed.items()} != installed:
        extra = sorted(set(listed) - set(installed))
        missing = sorted(set(installed) - set(listed))
        raise SupplyChainError(f"SBOM and image disagree: listed only {extra}, installed only "
                               f"{missing}, or a version differs")
    allowed = lock_hashes()
    for name, component in listed.items():
        hashes = [h["content"] for h in component.get("hashes", []) if h.get("alg") == "SHA-256"]
        if len(hashes) != 1:
            raise SupplyChainError(f"SBOM: {name} has no SHA-256")
        if name != canonical(PROJECT) and hashes[0] not in allowed.get(name, set()):
            raise SupplyChainError(f"SBOM: {name}'s hash is not one the lock allows")


def verify(out: Path, trust: Path) -> str:
    """All three, or a SupplyChainError naming the first that fails."""
    built = load_built(out)
    signed = out / "signed"
    digest = verify_signature(out, trust, signed)
    if digest != built.digest:
        raise SupplyChainError(f"the signed image is {digest}, the build made {built.digest}")
    stated = verify_provenance(out, trust, digest)
    config, metadata = image_files(signed)
    labels = config.get("config", {}).get("Labels", {})
    deps = {d.get("name") or "source": d["digest"]
            for d in stated["predicate"]["buildDefinition"]["resolvedDependencies"]}
    sbom_sha = sha256_file(out / "sbom.cdx.json")
    expected = {
        "source commit": (deps["source"].get("gitCommit"), labels.get(LABEL_REVISION)),
        "lock": (deps["requirements/runtime.txt"]["sha256"], labels.get(LABEL_LOCK)),
        "lock in this tree": (deps["requirements/runtime.txt"]["sha256"],
                              sha256_file(RUNTIME_LOCK)),
        "SBOM": (deps["sbom.cdx.json"]["sha256"], labels.get(LABEL_SBOM)),
        "SBOM file": (deps["sbom.cdx.json"]["sha256"], sbom_sha),
    }
    for what, (stated_value, actual) in expected.items():
        if stated_value != actual:
            raise SupplyChainError(f"provenance: states {what} {stated_value}, found {actual}")
    verify_sbom(json.loads((out / "sbom.cdx.json").read_text()), installed_in(metadata))
    return digest


def pin(out: Path) -> list[Path]:
    """Every reference to the broker's image under deploy/ rewritten to the built digest."""
    import re

    digest = load_built(out).digest
    pattern = re.compile(re.escape(NAME) + r"(?::[\w.-]+)?(?:@sha256:[0-9a-f]{64})?")
    changed = []
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        text = path.read_text()
        new = pattern.sub(f"{NAME}@{digest}", text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.image",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "sign", "verify", "pin", "keygen"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=ROOT / "build" / "image")
        if name == "build":
            p.add_argument("--cache", type=Path, default=ROOT / "build" / "cache")
        if name in ("sign", "keygen"):
            p.add_argument("--home", type=Path, required=True, help="the GnuPG home")
        if name == "sign":
            p.add_argument("--key", required=True, help="the signing key's fingerprint")
        if name == "verify":
            p.add_argument("--trust", type=Path, help="policy.json and the public key "
                           "(default: OUT/trust, as sign wrote them)")
    args = parser.parse_args()
    out = args.out.resolve()
    try:
        if args.command == "build":
            built = build(out, args.cache.resolve())
            info = json.loads((out / "image.json").read_text())
            print(f"{built.archive}: {NAME}@{built.digest} ({info['archive_bytes'] / 1e6:.1f} "
                  f"MB, {info['build_seconds']} s)")
        elif args.command == "keygen":
            print(keygen(args.home.resolve()))
        elif args.command == "sign":
            sign(out, args.home.resolve(), args.key)
            print(f"signed: {out / 'signed'}, {out / 'provenance.intoto.json'}, "
                  f"policy {out / 'trust' / 'policy.json'}")
        elif args.command == "verify":
            digest = verify(out, (args.trust or out / "trust").resolve())
            print(f"verified {NAME}@{digest}: signature under the policy, provenance "
                  "(commit, lock, SBOM), SBOM against the image's distributions")
        else:
            for path in pin(out):
                print(f"pinned {path.relative_to(ROOT)}")
    except SupplyChainError as exc:
        print(f"image {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
