"""The broker's container image: built reproducibly from locked inputs, signed, with a
signed provenance statement and an SBOM, and verified.

    python -m scripts.image build   [--out build/image]          # make image
    python -m scripts.image keygen  --home DIR                    # a throwaway signing key
    python -m scripts.image sign    --home DIR --key FINGERPRINT  # make sign-image
    python -m scripts.image verify  --pubkey KEY.asc [--commit C] # make verify-image
    python -m scripts.image policy  --pubkey KEY.asc              # containers-policy.json
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

``build`` works from the commit (``git archive HEAD``), never the working tree, so the
commit it names is exactly what went in. Debian's point-release and security updates are
applied (apt checks the archives' signatures against Debian's keyring; debootstrap is run
with ``--force-check-gpg``) before apt is purged.

``sign`` copies the image to a ``dir:`` layout with a signature made by skopeo (GPG,
"simple signing"), and writes an in-toto statement (SLSA provenance v1) naming the image
digest, the source commit, the lock's, the SBOM's and the Debian package list's digests,
in a DSSE envelope signed with the same key. ``verify`` takes the signer's public key from
the verifier (never from beside the image) and the commit the image must come from, and
checks all three: the signature under a policy.json that requires that key, the
provenance's signature by the same key and every digest it names against the verified
image and that commit, and the SBOM against the image's installed distributions and the
commit's lock.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import json
import os
import re
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
    SupplyChainError,
    add_hashes,
    build_wheel,
    canonical,
    install_requirements,
    lock_hashes,
    lock_pins,
    run,
    sha256_file,
    source_date_epoch,
    write_json,
)

NAME = "ghcr.io/example/ephemeral-broker"
def version_of(pyproject: str) -> str:
    return str(tomllib.loads(pyproject)["project"]["version"])


def identity(version: str) -> str:
    """The reference a signature vouches for: the name and the broker's version."""
    return f"{NAME}:{version}"


IDENTITY = identity(version_of((ROOT / "pyproject.toml").read_text()))  # this tree's
UID = 65532
SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = ("python3", "ca-certificates")
VENV = "/opt/broker"
SITE = f"{VENV}/lib/python3.11/site-packages"
STATUS = "var/lib/dpkg/status"
STAGE = "/tmp/build"  # noqa: S108 — inside the build root, removed before the commit
LOCKS = ROOT / "requirements"
STATEMENT = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
LABEL_LOCK = "io.ephemeral-broker.lock.sha256"
LABEL_SBOM = "io.ephemeral-broker.sbom.sha256"
LABEL_REVISION = "org.opencontainers.image.revision"
LABEL_DEBS = "io.ephemeral-broker.debian-packages.sha256"
# What the build leaves behind and a container never needs, or that differs per build.
SCRUB = ("tmp/build", "var/cache/apt", "var/lib/apt", "var/cache/debconf",
         "var/cache/ldconfig/aux-cache", "usr/share/man", "usr/share/info",
         "usr/share/lintian", "etc/resolv.conf", "etc/hostname", "etc/hosts")


def head() -> str:
    return run("git", "rev-parse", "HEAD", cwd=ROOT).strip()


def checkout(commit: str, dest: Path) -> Path:
    """The commit's tree (``git archive``): what the image is built from, so no
    uncommitted change, untracked file or stale build output of the working tree gets in,
    and the modes are git's."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SupplyChainError(f"git archive {commit}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


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


# The image's platform, whatever the build host's: CPython 3.11 on glibc 2.36 (Debian 12)
# x86_64, which takes every manylinux wheel up to glibc 2.36.
PLATFORM = ["--only-binary", ":all:", "--implementation", "cp", "--python-version", "3.11",
            "--abi", "cp311", "--abi", "abi3", "--abi", "none",
            *(f"--platform=manylinux_2_{v}_x86_64" for v in range(36, 16, -1)),
            "--platform=manylinux2014_x86_64", "--platform=any"]


def download_wheels(dest: Path, locks: Path) -> Path:
    """Every wheel the locks name for the image's platform, checked against their hashes;
    the pip wheel (the locked version) that installs them. Kept between builds."""
    dest.mkdir(parents=True, exist_ok=True)
    for lock in ("runtime", "bootstrap", "sbom"):
        run(sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
            *PLATFORM, "-r", locks / f"{lock}.txt", "--dest", dest)
    pinned = re.search(r"^pip==(\S+)", (locks / "bootstrap.txt").read_text(), re.MULTILINE)
    if pinned is None:
        raise SupplyChainError("requirements/bootstrap.txt pins no pip")
    pip = dest / f"pip-{pinned.group(1)}-py3-none-any.whl"
    if not pip.exists():
        raise SupplyChainError(f"{pip.name} was not downloaded")
    return pip


def stage(root: Path, source: Path, wheels: Path, pip: Path, wheel: Path) -> None:
    """What the installs inside the root need, under /tmp/build (removed before commit)."""
    build = root / "tmp" / "build"
    shutil.copytree(wheels, build / "wheels")
    shutil.copy(wheel, build / wheel.name)
    shutil.copy(source / "pyproject.toml", build / "pyproject.toml")
    shutil.copy(source / "requirements" / "sbom.txt", build / "sbom.txt")
    install_requirements(wheel, build / "requirements.txt", f"file://{STAGE}/{wheel.name}",
                         lock=source / "requirements" / "runtime.txt")
    # cyclonedx-py asks this interpreter for its sys.path: the environment's own, without
    # the SBOM tool's PYTHONPATH
    python = build / "python"
    python.write_text(f'#!/bin/sh\nunset PYTHONPATH\nexec {VENV}/bin/python "$@"\n')
    python.chmod(0o755)
    (build / "pip").symlink_to(f"wheels/{pip.name}")


def install(root: Path, epoch: int, lock: Path) -> dict[str, Any]:
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
    allowed = {**lock_hashes(lock), canonical(PROJECT): {sha256_file(wheel)}}
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


def security_updates(root: Path, env: dict[str, str]) -> None:
    """Debian's point-release and security updates, from archives whose Release files apt
    checks against Debian's keyring, before apt goes."""
    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY} {SUITE}-security main\n")
    apt = ["apt-get", "-q", "-y", "-o", "APT::Sandbox::User=root"]
    chroot(root, *apt, "update", env={"DEBIAN_FRONTEND": "noninteractive"})
    # full-upgrade: a plain upgrade holds back (and exits 0 on) an update that needs a new
    # package; afterwards nothing may be left to upgrade
    chroot(root, *apt, "full-upgrade", "--no-install-recommends",
           env={"DEBIAN_FRONTEND": "noninteractive", "SOURCE_DATE_EPOCH": env["SOURCE_DATE_EPOCH"]})
    left = [line for line in chroot(root, *apt, "-s", "full-upgrade").splitlines()
            if line.startswith("Inst ")]
    if left:
        raise SupplyChainError(f"updates not applied: {'; '.join(left[:5])}")


def remove(path: Path) -> None:
    """A file, link or directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def strip(root: Path) -> None:
    """No package manager, no setuid or setgid file; nothing a build leaves that differs
    between builds."""
    chroot(root, "dpkg", "--purge", "--force-remove-essential", "--force-depends", "apt")
    chroot(root, "dpkg", "--purge", "--force-remove-essential", "--force-depends", "dpkg")
    for part in SCRUB:
        remove(root / part)
    for pattern in ("var/log/*", "var/lib/dpkg/*-old", "etc/*-", "dev/*", "run/*", "tmp/*",
                    "var/tmp/*", "usr/share/locale/*/"):  # locales: the image runs C.UTF-8
        for path in root.glob(pattern):
            remove(path)
    # Debian's copyright files stay (the licences' notices); the rest of the docs go
    for doc in (root / "usr/share/doc").glob("*/*"):
        if doc.name != "copyright":
            remove(doc)
    for cache in list(root.rglob("__pycache__")):
        remove(cache)
    # su, mount, passwd and their kin: nothing in the image may gain privileges, even where
    # it runs without no-new-privileges
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if not os.path.islink(path) and mode & 0o6000:
                os.chmod(path, mode & 0o1777)


def debian_packages(status: str) -> str:
    """``name=version`` of every Debian package the image holds, one a line, sorted (from
    dpkg's status file, which stays in the image for scanners)."""
    found = []
    for entry in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in entry.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status") == "install ok installed":
            found.append(f"{fields['Package']}={fields['Version']}")
    return "".join(f"{p}\n" for p in sorted(found))


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
    """What ``build`` made: the archive, and its record (``image.json``)."""

    archive: Path
    record: dict[str, Any]

    @property
    def digest(self) -> str:  # sha256:<hex> of the image manifest
        return str(self.record["digest"])

    @property
    def revision(self) -> str:
        return str(self.record["revision"])


def build(out: Path, cache: Path) -> Built:
    started = time.monotonic()
    os.umask(0o022)  # the modes of what pip and the build write, whoever runs it
    out.mkdir(parents=True, exist_ok=True)
    epoch, rev = source_date_epoch(), head()
    source = checkout(rev, out / "source")
    lock = source / "requirements" / "runtime.txt"
    version = version_of((source / "pyproject.toml").read_text())
    pip = download_wheels(cache / "wheels", source / "requirements")
    wheel = build_wheel(out / "dist", epoch, source)
    buildah = ["buildah", *storage(out)]
    container = run(*buildah, "from", "--quiet", "scratch").strip()
    try:
        root = Path(run(*buildah, "mount", container).strip())
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive"}
        (cache / "debs").mkdir(parents=True, exist_ok=True)
        run("debootstrap", "--variant=minbase", "--arch=amd64", f"--keyring={KEYRING}",
            "--force-check-gpg", f"--include={','.join(PACKAGES)}",
            f"--cache-dir={cache / 'debs'}", SUITE, root, MIRROR, env=env)
        security_updates(root, env)
        stage(root, source, cache / "wheels", pip, wheel)
        sbom = install(root, epoch, lock)
        sbom_path = out / "sbom.cdx.json"
        write_json(sbom_path, sbom)
        add_user(root, epoch)
        strip(root)
        debs = out / "debian-packages.txt"
        debs.write_text(debian_packages((root / STATUS).read_text()))
        compile_bytecode(root, epoch)
        clamp_times(root, epoch)
        lock_sha, sbom_sha = sha256_file(lock), sha256_file(sbom_path)
        created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()
        labels = {
            LABEL_REVISION: rev, "org.opencontainers.image.version": version,
            "org.opencontainers.image.title": PROJECT, "org.opencontainers.image.created": created,
            LABEL_LOCK: lock_sha, LABEL_SBOM: sbom_sha, LABEL_DEBS: sha256_file(debs),
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
            "--identity-label=false", "--rm", container,
            f"oci-archive:{archive}:{identity(version)}")
        container = ""
    finally:
        if container:
            subprocess.run([*buildah, "rm", container], capture_output=True, check=False)
        shutil.rmtree(out / "storage", ignore_errors=True)
        shutil.rmtree(out / "runroot", ignore_errors=True)
        shutil.rmtree(out / "source", ignore_errors=True)
    digest = manifest_digest(f"oci-archive:{archive}")
    record = {
        "reference": f"{NAME}@{digest}", "digest": digest, "revision": rev,
        "lock_sha256": lock_sha, "sbom_sha256": sbom_sha, "archive_bytes": archive.stat().st_size,
        "source_date_epoch": epoch, "tools": tool_versions(), "identity": identity(version),
        "build_seconds": round(time.monotonic() - started, 1)}
    write_json(out / "image.json", record)
    return Built(archive, record)


def manifest_digest(image: str) -> str:
    raw = subprocess.run(["skopeo", "inspect", "--raw", image], capture_output=True,
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
    """The public half (armoured), for whoever verifies: they get it from the signer
    out of band, never from beside the image."""
    dest.write_text(run("gpg", "--homedir", home, "--batch", "--armor", "--export", key))


def policy(key: bytes, reference: str = IDENTITY) -> dict[str, Any]:
    """A containers-policy.json that admits nothing but ``reference`` signed by ``key``
    (an exported public key, inlined: the policy needs no file beside it)."""
    data = base64.b64encode(key).decode()
    signed_by = [{"type": "signedBy", "keyType": "GPGKeys", "keyData": data,
                  "signedIdentity": {"type": "exactReference", "dockerReference": reference}}]
    return {"default": [{"type": "reject"}],
            "transports": {"dir": {"": signed_by}, "docker": {NAME: signed_by}}}


def tool_versions() -> dict[str, str]:
    """The builders whose output is in the image's bytes (gzip, tar, the root's layout)."""
    versions = {}
    for tool in ("buildah", "skopeo", "debootstrap"):
        done = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        versions[tool] = done.stdout.strip().splitlines()[0] if done.stdout.strip() else "?"
    return versions


def statement(built: Built, out: Path) -> dict[str, Any]:
    """The in-toto statement: SLSA provenance v1 for the image."""
    source = {"uri": f"git+file://{ROOT}", "digest": {"gitCommit": built.revision}}
    info = built.record
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": NAME, "digest": {"sha256": built.digest.split(":", 1)[1]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": "https://ephemeral-broker.example/build-types/make-image/v1",
                "externalParameters": {"source": source, "lock": "requirements/runtime.txt",
                                       "debian": {"suite": SUITE, "mirror": MIRROR,
                                                  "security": SECURITY,
                                                  "packages": list(PACKAGES)}},
                "internalParameters": {"SOURCE_DATE_EPOCH": info["source_date_epoch"],
                                       "tools": info["tools"]},
                "resolvedDependencies": [
                    source,
                    {"name": "requirements/runtime.txt",
                     "digest": {"sha256": info["lock_sha256"]}},
                    {"name": "sbom.cdx.json", "digest": {"sha256": info["sbom_sha256"]},
                     "mediaType": "application/vnd.cyclonedx+json"},
                    # Debian's archive moves: the packages this build took, by version
                    {"name": "debian-packages.txt",
                     "digest": {"sha256": sha256_file(out / "debian-packages.txt")}},
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
    return Built(out / "image.oci.tar", json.loads((out / "image.json").read_text()))


def sign(out: Path, home: Path, key: str) -> None:
    """The signed image (``out/signed``, a dir: layout), the signed provenance
    (``out/provenance.intoto.json``) and the key's public half (``out/signing-key.asc``,
    to hand to verifiers out of band: ``verify`` refuses a key from beside the image)."""
    from in_toto.models.metadata import Envelope
    from securesystemslib.signer import GPGSigner

    built = load_built(out)
    if manifest_digest(f"oci-archive:{built.archive}") != built.digest:
        raise SupplyChainError(f"{built.archive} is not the image image.json records")
    signed = out / "signed"
    shutil.rmtree(signed, ignore_errors=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    run("skopeo", "copy", "--quiet", "--sign-by", key, "--sign-identity", built.record["identity"],
        f"oci-archive:{built.archive}", f"dir:{signed}", env=env)
    if manifest_digest(f"dir:{signed}") != built.digest:
        raise SupplyChainError("the signed copy's manifest differs from the built image's")
    export_public(home, key, out / "signing-key.asc")
    _, public = GPGSigner.import_(key.lower(), str(home))
    payload = json.dumps(statement(built, out), sort_keys=True).encode()
    envelope = Envelope(payload=payload, payload_type=STATEMENT, signatures={})
    envelope.sign(GPGSigner(public, str(home)))
    write_json(out / "provenance.intoto.json", envelope.to_dict())


# -- verification ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Trust:
    """What a verifier brings: the signer's public key (from the signer, not from beside
    the image) and the commit the image must be built from."""

    pubkey: Path
    commit: str


def verify_signature(signed: Path, key: bytes, reference: str, scratch: Path) -> Path:
    """skopeo under a policy that requires the key: copies the image only if it signed it;
    the copy is what the other checks read, so nothing can change under them."""
    policy_file = scratch / "policy.json"
    write_json(policy_file, policy(key, reference))
    verified = scratch / "verified"
    run("skopeo", "--policy", policy_file, "copy", "--quiet", f"dir:{signed}", f"dir:{verified}")
    return verified


def signer_key(pubkey: Path, scratch: Path) -> tuple[bytes, Any]:
    """The verifier's key, imported once into a keyring of its own: exactly one primary
    key, which can sign. Both checks use it: its minimal export is the policy's key, and
    securesystemslib's form of it verifies the provenance."""
    from securesystemslib.signer import GPGSigner

    home = scratch / "gnupg"
    home.mkdir(mode=0o700)
    run("gpg", "--homedir", home, "--batch", "--import", pubkey)
    listing = run("gpg", "--homedir", home, "--batch", "--with-colons", "--list-keys").splitlines()
    primaries = [i for i, line in enumerate(listing) if line.startswith("pub:")]
    if len(primaries) != 1 or "s" not in listing[primaries[0]].split(":")[11].lower():
        raise SupplyChainError(f"{pubkey}: expected one public key that can sign, found "
                               f"{len(primaries)}")
    fpr = next(line.split(":")[9] for line in listing[primaries[0]:] if line.startswith("fpr:"))
    exported = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export",
                               "--export-options", "export-minimal", fpr],
                              capture_output=True, check=True).stdout
    _, public = GPGSigner.import_(fpr.lower(), str(home))
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                   check=False)
    return exported, public


def verify_provenance(out: Path, key: Any, digest: str) -> dict[str, Any]:
    from in_toto.models.metadata import Envelope

    envelope = Envelope.from_dict(json.loads((out / "provenance.intoto.json").read_text()))
    if envelope.payload_type != STATEMENT:
        raise SupplyChainError(f"provenance: payload type {envelope.payload_type!r}")
    try:
        envelope.verify([key], 1)
    except Exception as exc:  # securesystemslib's VerificationError and its kin
        raise SupplyChainError(f"provenance: signature does not verify ({exc})") from exc
    stated: dict[str, Any] = json.loads(envelope.payload)
    if (stated.get("_type"), stated.get("predicateType")) != (STATEMENT_TYPE, PREDICATE_TYPE):
        raise SupplyChainError("provenance: not an in-toto statement of SLSA provenance v1")
    subjects = [s.get("digest", {}).get("sha256") for s in stated.get("subject", [])]
    if subjects != [digest.split(":", 1)[1]]:
        raise SupplyChainError(f"provenance: its subject {subjects} is not the image {digest}")
    return stated


def image_files(layout: Path) -> tuple[dict[str, Any], list[bytes], bytes | None]:
    """The image's config, the METADATA of every distribution in its environment, and
    dpkg's status file."""
    manifest = json.loads((layout / "manifest.json").read_text())
    config = json.loads((layout / manifest["config"]["digest"].split(":", 1)[1]).read_bytes())
    metadata: list[bytes] = []
    status = None
    for layer in manifest["layers"]:
        blob = layout / layer["digest"].split(":", 1)[1]
        with tarfile.open(blob, "r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                is_metadata = (name.startswith(SITE.lstrip("/") + "/")
                               and name.endswith(".dist-info/METADATA"))
                if member.isfile() and (is_metadata or name == STATUS):
                    data = tar.extractfile(member)
                    assert data is not None
                    if is_metadata:
                        metadata.append(data.read())
                    else:
                        status = data.read()
    return config, metadata, status


def installed_in(metadata: list[bytes]) -> dict[str, str]:
    from email.parser import BytesParser

    dists = {}
    for raw in metadata:
        headers = BytesParser().parse(io.BytesIO(raw), headersonly=True)
        dists[canonical(headers["Name"])] = headers["Version"]
    return dists


def verify_sbom(sbom: dict[str, Any], installed: dict[str, str],
                pins: dict[str, dict[str, set[str]]]) -> None:
    """The SBOM names exactly the image's distributions at their versions, each a version
    the lock pins, with one SHA-256 the lock allows for that version (the broker's own
    aside: its wheel's, which the lock cannot know)."""
    listed = {canonical(c["name"]): c for c in
              [sbom["metadata"]["component"], *sbom.get("components", [])]}
    versions = {n: c.get("version") for n, c in listed.items()}
    if versions != installed:
        differ = sorted(n for n in set(versions) | set(installed)
                        if versions.get(n) != installed.get(n))
        raise SupplyChainError(f"SBOM and image disagree on {', '.join(differ)}")
    for name, component in listed.items():
        hashes = [h["content"] for h in component.get("hashes", []) if h.get("alg") == "SHA-256"]
        if len(hashes) != 1:
            raise SupplyChainError(f"SBOM: {name} has no SHA-256")
        if name == canonical(PROJECT):
            continue
        version = component.get("version")
        if version not in pins.get(name, {}):
            raise SupplyChainError(f"SBOM: {name} {version} is not the version the lock pins")
        if hashes[0] not in pins[name][version]:
            raise SupplyChainError(f"SBOM: {name}'s hash is not one the lock allows")


def committed(commit: str, path: str) -> bytes:
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise SupplyChainError(f"{commit} has no {path}: {done.stderr.decode().strip()}")
    return done.stdout


def verify(out: Path, trust: Trust) -> str:
    """All three, or a SupplyChainError naming the first that fails. Each file beside the
    image is read once, and what is checked is what was read."""
    if trust.pubkey.resolve().is_relative_to(out.resolve()):
        raise SupplyChainError(f"{trust.pubkey} lies beside the image: a key shipped with what "
                               "it vouches for proves nothing; use the signer's key from "
                               "your own copy")
    built = load_built(out)
    lock = committed(trust.commit, "requirements/runtime.txt")
    reference = identity(version_of(committed(trust.commit, "pyproject.toml").decode()))
    sbom_raw = (out / "sbom.cdx.json").read_bytes()
    debs_raw = (out / "debian-packages.txt").read_bytes()
    archive = manifest_digest(f"oci-archive:{built.archive}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        key, public = signer_key(trust.pubkey, scratch)
        verified = verify_signature(out / "signed", key, reference, scratch)
        digest = manifest_digest(f"dir:{verified}")
        if not digest == built.digest == archive:
            raise SupplyChainError(f"the signed image is {digest}, the archive {archive}, "
                                   f"image.json says {built.digest}")
        stated = verify_provenance(out, public, digest)
        config, metadata, status = image_files(verified)
    if status is None:
        raise SupplyChainError(f"the image has no {STATUS}")
    listed_debs = debian_packages(status.decode()).encode()
    try:
        labels = config["config"]["Labels"] or {}
        deps = {d.get("name") or "source": d["digest"]
                for d in stated["predicate"]["buildDefinition"]["resolvedDependencies"]}
        expected = {
            "source commit": (deps["source"]["gitCommit"], trust.commit),
            "source commit label": (deps["source"]["gitCommit"], labels.get(LABEL_REVISION)),
            "lock": (deps["requirements/runtime.txt"]["sha256"], labels.get(LABEL_LOCK)),
            "lock of the commit": (deps["requirements/runtime.txt"]["sha256"],
                                   hashlib.sha256(lock).hexdigest()),
            "SBOM": (deps["sbom.cdx.json"]["sha256"], labels.get(LABEL_SBOM)),
            "SBOM file": (deps["sbom.cdx.json"]["sha256"], hashlib.sha256(sbom_raw).hexdigest()),
            "Debian packages": (deps["debian-packages.txt"]["sha256"], labels.get(LABEL_DEBS)),
            "Debian package list file": (deps["debian-packages.txt"]["sha256"],
                                         hashlib.sha256(debs_raw).hexdigest()),
            "Debian packages in the image": (deps["debian-packages.txt"]["sha256"],
                                             hashlib.sha256(listed_debs).hexdigest()),
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise SupplyChainError(f"provenance or image config lacks {exc}") from exc
    for what, (stated_value, actual) in expected.items():
        if stated_value != actual:
            raise SupplyChainError(f"provenance: states {what} {stated_value}, found {actual}")
    verify_sbom(json.loads(sbom_raw), installed_in(metadata), lock_pins(lock.decode()))
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
    for name in ("build", "sign", "verify", "pin", "keygen", "policy"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=ROOT / "build" / "image")
        if name == "build":
            p.add_argument("--cache", type=Path, default=ROOT / "build" / "cache")
        if name in ("sign", "keygen"):
            p.add_argument("--home", type=Path, required=True, help="the GnuPG home")
        if name == "sign":
            p.add_argument("--key", required=True, help="the signing key's fingerprint")
        if name in ("verify", "policy"):
            p.add_argument("--pubkey", type=Path, required=True,
                           help="the signer's armoured public key, from your own copy")
        if name == "verify":
            p.add_argument("--commit", default="HEAD",
                           help="the commit the image must be built from (default: HEAD)")
    args = parser.parse_args()
    out = args.out.resolve()
    try:
        if args.command == "build":
            built = build(out, args.cache.resolve())
            print(f"{built.archive}: {NAME}@{built.digest} "
                  f"({built.record['archive_bytes'] / 1e6:.1f} MB, "
                  f"{built.record['build_seconds']} s)")
        elif args.command == "keygen":
            print(keygen(args.home.resolve()))
        elif args.command == "sign":
            sign(out, args.home.resolve(), args.key)
            print(f"signed: {out / 'signed'}, {out / 'provenance.intoto.json'}; public key "
                  f"{out / 'signing-key.asc'} (give verifiers their own copy)")
        elif args.command == "policy":
            print(json.dumps(policy(args.pubkey.read_bytes()), indent=2))
        elif args.command == "verify":
            commit = run("git", "rev-parse", "--verify", f"{args.commit}^{{commit}}",
                         cwd=ROOT).strip()
            digest = verify(out, Trust(args.pubkey, commit))
            print(f"verified {NAME}@{digest}: signature under the policy, provenance (commit "
                  f"{commit[:12]}, lock, SBOM, Debian packages), SBOM against the image")
        else:
            for path in pin(out):
                print(f"pinned {path.relative_to(ROOT)}")
    except SupplyChainError as exc:
        print(f"image {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
