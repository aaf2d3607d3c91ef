"""``make sbom``: a CycloneDX SBOM of the broker's runtime environment.

The environment is made for the purpose, as the image makes its own: a virtual
environment without pip, into which pip installs ``requirements/runtime.txt`` and the
broker's wheel (built from this tree, reproducibly) with ``--require-hashes``, recording
what it installed (``--report``). ``cyclonedx-py environment`` lists the installed
distributions; each component then gets the SHA-256 of the very file pip installed, from
that report, checked against the lock's hashes (the broker's: its wheel's). The two lists
must agree both ways: a distribution installed but missing from the SBOM, or listed but not
installed, fails the build.

    python -m scripts.sbom --out build/sbom      # build/sbom/sbom.cdx.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
PROJECT = "ephemeral-credential-broker"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


class SupplyChainError(Exception):
    """A build, SBOM or verification step found something wrong: the message says what."""


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command; its stdout, or a SupplyChainError with the end of what it said."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                          cwd=cwd, check=False)
    if done.returncode != 0:
        said = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise SupplyChainError(f"{' '.join(map(str, args[:4]))} ... exited "
                               f"{done.returncode}:\n{said}")
    return done.stdout


def source_date_epoch() -> int:
    """The source commit's time: every timestamp the build writes."""
    return int(run("git", "log", "-1", "--format=%ct", "HEAD", cwd=ROOT).strip())


def lock_pins(text: str) -> dict[str, dict[str, set[str]]]:
    """Each locked distribution's versions (a universal lock may pin several, under
    exclusive markers), each with its allowed file hashes."""
    pins: dict[str, dict[str, set[str]]] = {}
    hashes: set[str] | None = None
    for line in text.splitlines():
        pin = _PIN.match(line)
        if pin:
            version = line[pin.end():].split(";")[0].split("\\")[0].strip()
            hashes = pins.setdefault(canonical(pin.group(1)), {}).setdefault(version, set())
        elif hashes is not None:
            hashes.update(_HASH.findall(line))
    return pins


def lock_hashes(lock: Path = RUNTIME_LOCK) -> dict[str, set[str]]:
    """Each locked distribution's allowed file hashes, whatever the version."""
    return {name: set().union(*versions.values())
            for name, versions in lock_pins(lock.read_text()).items()}


def build_wheel(dest: Path, epoch: int, source: Path = ROOT) -> Path:
    """The broker's wheel from ``source`` (this tree, or a commit's), the same bytes for
    the same tree: timestamps from ``epoch``, no stale ``build/lib`` from an earlier build."""
    for stale in (source / "build" / "lib", *source.glob("build/bdist.*")):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", dest, source, env=env)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SupplyChainError(f"expected one wheel in {dest}, found {wheels}")
    return wheels[0]


def install_requirements(wheel: Path, dest: Path, wheel_url: str,
                         lock: Path = RUNTIME_LOCK) -> Path:
    """The runtime lock plus the broker's wheel (at ``wheel_url``, as the installer sees
    it) pinned by its hash: one requirements file for one ``--require-hashes`` install."""
    line = f"{PROJECT} @ {wheel_url} --hash=sha256:{sha256_file(wheel)}\n"
    dest.write_text(lock.read_text() + line)
    return dest


def add_hashes(bom: dict[str, Any], report: dict[str, Any],
               allowed: dict[str, set[str]]) -> dict[str, Any]:
    """``bom`` (cyclonedx-py's) with each component's SHA-256 from pip's installation
    report, the root component (the broker) included. Raises unless the SBOM and the
    report name the same distributions at the same versions, and each file's hash is one
    the lock (or, for the broker, its wheel) allows."""
    installed: dict[str, tuple[str, str]] = {}
    for item in report["install"]:
        name = canonical(item["metadata"]["name"])
        archive = item.get("download_info", {}).get("archive_info", {})
        sha = archive.get("hashes", {}).get("sha256")
        if sha is None:
            raise SupplyChainError(f"pip's report has no SHA-256 for {name}")
        installed[name] = (item["metadata"]["version"], sha)
    components = [bom["metadata"]["component"], *bom.get("components", [])]
    listed: set[str] = set()
    for component in components:
        name = canonical(component["name"])
        if name not in installed:
            raise SupplyChainError(f"the SBOM lists {name}, which pip did not install")
        version, sha = installed[name]
        if component.get("version") != version:
            raise SupplyChainError(
                f"the SBOM lists {name} {component.get('version')}, pip installed {version}")
        if sha not in allowed.get(name, set()):
            raise SupplyChainError(f"{name} {version}: installed file sha256:{sha} is not "
                                   "one the lock allows")
        component["hashes"] = [{"alg": "SHA-256", "content": sha}]
        listed.add(name)
    missing = sorted(set(installed) - listed)
    if missing:
        raise SupplyChainError(f"installed but not in the SBOM: {', '.join(missing)}")
    return bom


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_sbom(out: Path, wheels: Path | None = None) -> Path:
    """Build the runtime environment under ``out`` and write ``out/sbom.cdx.json``; with
    ``wheels``, from that directory alone (the image build's download), not the index."""
    epoch = source_date_epoch()
    wheel = build_wheel(out / "dist", epoch)
    venv = out / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    requirements = install_requirements(wheel, out / "requirements.txt", wheel.as_uri())
    report = out / "install-report.json"
    offline = [] if wheels is None else ["--no-index", "--find-links", str(wheels)]
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", *offline,
        "--quiet", "--require-hashes", "--only-binary", ":all:", "--no-compile",
        "-r", requirements, "--report", report)
    raw = out / "environment.cdx.json"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    run(Path(sys.executable).parent / "cyclonedx-py", "environment", venv,
        "--pyproject", ROOT / "pyproject.toml", "--output-reproducible", "-o", raw, env=env)
    allowed = {**lock_hashes(), canonical(PROJECT): {sha256_file(wheel)}}
    bom = add_hashes(json.loads(raw.read_text()), json.loads(report.read_text()), allowed)
    sbom = out / "sbom.cdx.json"
    write_json(sbom, bom)
    return sbom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "sbom")
    parser.add_argument("--wheels", type=Path, help="install from these wheels, not the index")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        sbom = make_sbom(args.out.resolve(), args.wheels and args.wheels.resolve())
    except SupplyChainError as exc:
        print(f"sbom: {exc}", file=sys.stderr)
        return 1
    count = len(json.loads(sbom.read_text())["components"]) + 1
    print(f"{sbom}: {count} distributions, each with the SHA-256 of the file installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
