"""How much work one review may cost: the number of keys under the prefix and the bytes of
all annotations are bounded before any key is read, and "did you mean" is worked out for
the first few unknown keys only. (1000 credentials and 1000 misspelt keys used to keep the
decision busy for half a minute.) Counted where it can be (comparisons made), and timed
only against a bound far above what a decision takes."""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.injector import annotations as annotations_module
from broker.injector.annotations import (
    GLOBAL_KEYS,
    MAX_ANNOTATION_BYTES,
    MAX_CREDENTIALS,
    MAX_HINTS,
    MAX_KEYS,
    PER_CREDENTIAL,
)
from broker.injector.model import Patch, Refusal
from broker.injector.mutate import mutate
from tests.unit.injector.podkit import CONFIG, P, container, pod

# A decision takes milliseconds; a second of CPU is a bound no busy machine reaches, and
# the quadratic case this guards against took 30.
CPU_BOUND_S = 1.0


@pytest.fixture
def comparisons(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many known keys each "did you mean" compared an unknown key with."""
    calls: list[int] = []
    real: Callable[..., list[str]] = difflib.get_close_matches

    def counting(word: str, possibilities: list[str], *args: Any, **kwargs: Any) -> list[str]:
        calls.append(len(possibilities))
        return real(word, possibilities, *args, **kwargs)

    monkeypatch.setattr(annotations_module.difflib, "get_close_matches", counting)
    return calls


def decide(annotations: dict[str, str], **spec: Any) -> tuple[object, float]:
    obj = pod({"containers": [container("app")], **spec}, annotations)
    # This thread's CPU only: the process's includes other threads (earlier tests' pools).
    started = time.thread_time()
    outcome = mutate(obj, "shop", CONFIG)
    return outcome, time.thread_time() - started


def misspelt(credentials: int, unknown: int) -> dict[str, str]:
    """The report's pod: credentials, and as many keys one letter off a real one."""
    out = {f"{P}credential-c{i:05d}": "r" for i in range(credentials)}
    out.update({f"{P}credentiak-c{i:05d}": "r" for i in range(unknown)})
    return out


def test_the_bound_is_what_a_pod_can_use() -> None:
    assert MAX_KEYS == len(GLOBAL_KEYS) + len(PER_CREDENTIAL) * MAX_CREDENTIALS


def test_more_keys_than_any_pod_can_use_are_refused_before_any_is_read(
        comparisons: list[int]) -> None:
    outcome, cpu = decide(misspelt(1000, 1000))
    assert isinstance(outcome, Refusal) and outcome.code == 400
    assert outcome.message == (
        f"{P}*: 2001 annotations under the prefix, more than a pod can use (at most "
        f"{MAX_KEYS}: 9 for the pod and 9 per credential, 32 credentials at most)")
    assert comparisons == [] and cpu < CPU_BOUND_S


def test_more_bytes_than_kubernetes_allows_are_refused_before_any_key_is_read(
        comparisons: list[int]) -> None:
    big = {f"{P}credentiak-x": "é" * (MAX_ANNOTATION_BYTES // 2), "other/x": "y"}
    outcome, _ = decide(big)
    size = MAX_ANNOTATION_BYTES + len(f"{P}credentiak-x" "other/x" "y" f"{P}inject" "true")
    assert isinstance(outcome, Refusal)
    assert outcome.message == (
        f"metadata.annotations: {size} bytes in all, more than Kubernetes allows "
        f"({MAX_ANNOTATION_BYTES})")
    assert comparisons == []


def test_only_the_first_unknown_keys_get_a_did_you_mean(comparisons: list[int]) -> None:
    n = (MAX_KEYS - 1) // 2
    outcome, cpu = decide(misspelt(n, n))
    assert isinstance(outcome, Refusal)
    assert outcome.message.count("did you mean") == MAX_HINTS
    assert outcome.message.count("unknown annotation") == n
    assert len(comparisons) == MAX_HINTS
    assert sum(comparisons) <= MAX_HINTS * (len(GLOBAL_KEYS) + len(PER_CREDENTIAL) * MAX_KEYS)
    assert cpu < CPU_BOUND_S


def worst_admissible() -> dict[str, str]:
    """Every key a pod can use, each option as long as the rest of the annotation budget
    allows: the most work an admitted pod asks of the parser and the agent-argument check."""
    command = json.dumps(["/usr/local/bin/reload", *["--flag=" + "v" * 40] * 63])
    out = {P + "mode": "native", P + "on-exit": "release", P + "containers": "app",
           P + "agent-cpu-request": "10m", P + "agent-cpu-limit": "100m",
           P + "agent-memory-request": "32Mi", P + "agent-memory-limit": "64Mi"}
    template = "".join(f"k{i}=${{field{i}}};" for i in range(400))[:4000]
    for i in range(MAX_CREDENTIALS):
        name = f"cred-{i:02d}"
        out.update({
            P + "credential-" + name: f"role-{i}", P + "format-" + name: "template",
            P + "template-" + name: template, P + "perms-" + name: "0440",
            P + "command-" + name: command, P + "signal-" + name: "SIGHUP:nginx",
            P + "ttl-" + name: "1h30m", P + "keygen-" + name: "ec-p256",
            P + "common-name-" + name: f"{name}.shop.svc.cluster.local"})
    return out


def test_the_worst_admissible_pod_decides_well_within_a_second(comparisons: list[int]) -> None:
    annotations = worst_admissible()
    assert len(annotations) + 1 == MAX_KEYS - 1  # every key but status
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    assert MAX_ANNOTATION_BYTES * 0.9 < size < MAX_ANNOTATION_BYTES
    outcome, cpu = decide(annotations, shareProcessNamespace=True)
    assert isinstance(outcome, Patch), outcome
    assert comparisons == [] and cpu < CPU_BOUND_S


def test_the_worst_refused_pod_decides_well_within_a_second(comparisons: list[int]) -> None:
    """As many keys as allowed, every one of them wrong."""
    n = (MAX_KEYS - 1) // 3  # and inject
    annotations = {f"{P}credential-c{i:03d}": "Bad Role" for i in range(n)}
    annotations.update({f"{P}credentiak-c{i:03d}": "x" for i in range(n)})
    annotations.update({f"{P}command-c{i:03d}": "[" * 800 for i in range(n)})
    outcome, cpu = decide(annotations)
    assert isinstance(outcome, Refusal)
    assert len(comparisons) == MAX_HINTS and cpu < CPU_BOUND_S
