"""Golden AdmissionReviews, one per pod shape (``tests/data/injector/*.review.json``, pods
as the API server sends them). Each is answered as the webhook answers it; the patch is
applied and the pod validated (every Kubernetes version from 1.29, strict), checked
against the injector's promises (``podkit.check_injected``), compared whole with its
``*.expected.json``, and passed through again to show that a second pass changes nothing.

The injector is given the broker's CA (``broker-ca.pem``), as the shipped deployment
is: every agent gets it as ``--ca-pem``. ``BROKER_UPDATE_GOLDEN=1`` rewrites the expected
pods (then read the diff).
"""

from __future__ import annotations

import copy
import json
import os

import pytest

from broker.injector.containers import AGENT, AGENT_INIT
from broker.injector.model import Skip
from broker.injector.mutate import mutate
from broker.injector.review import admit, answer, decode
from tests.unit.injector.podkit import (
    BROKER_CA_PEM,
    CONFIG,
    DATA,
    apply,
    check_injected,
    patch_of,
)

SHAPES = sorted(p.name.removesuffix(".review.json") for p in DATA.glob("*.review.json"))
UPDATE = os.environ.get("BROKER_UPDATE_GOLDEN") == "1"


def _mutated(shape: str) -> tuple[dict, dict, dict]:
    raw = (DATA / f"{shape}.review.json").read_bytes()
    sent = json.loads(raw)
    reply = answer(decode(raw).uid, admit(decode(raw), CONFIG, ca_pem=BROKER_CA_PEM))
    response = reply["response"]
    assert reply["apiVersion"] == "admission.k8s.io/v1" and reply["kind"] == "AdmissionReview"
    assert response["uid"] == sent["request"]["uid"]
    assert response["allowed"] is True, response.get("status")
    pod = sent["request"]["object"]
    return pod, apply(pod, patch_of(response)), response


def test_every_shape_has_a_fixture() -> None:
    assert set(SHAPES) >= {
        "minimal", "generate-name", "existing-volumes", "mesh-native-sidecar",
        "regular-init-containers", "automount-false", "several-containers",
        "containers-annotation", "sidecar-mode", "init-only-job", "all-options", "empty-arrays"}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPES)
def test_the_patch_applies_validates_and_keeps_every_promise(shape: str) -> None:
    before, after, _ = _mutated(shape)
    check_injected(before, after, ca_pem=BROKER_CA_PEM)
    expected = DATA / f"{shape}.expected.json"
    if UPDATE:
        expected.write_text(json.dumps(after, indent=2, sort_keys=True) + "\n")
    assert after == json.loads(expected.read_text()), f"{shape}: differs from {expected.name}"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPES)
def test_a_second_pass_yields_no_patch(shape: str) -> None:
    _, after, _ = _mutated(shape)
    again = copy.deepcopy(after)
    assert mutate(again, "shop", CONFIG) == Skip("already_injected")
    assert again == after


def test_mesh_proxy_starts_before_the_agent_and_the_mesh_init_too() -> None:
    _, after, _ = _mutated("mesh-native-sidecar")
    names = [c["name"] for c in after["spec"]["initContainers"]]
    assert names == ["istio-init", "istio-proxy", AGENT]


def test_regular_init_containers_run_after_the_agent() -> None:
    _, after, _ = _mutated("regular-init-containers")
    assert [c["name"] for c in after["spec"]["initContainers"]] == [AGENT, "migrate", "seed"]


def test_automount_false_is_left_alone_and_the_agent_has_its_own_token() -> None:
    before, after, _ = _mutated("automount-false")
    assert after["spec"]["automountServiceAccountToken"] is False
    assert before["spec"].get("volumes") is None
    assert [v["name"] for v in after["spec"]["volumes"]] == [
        "ephemeral-broker-credentials", "ephemeral-broker-token"]


def test_generate_name_pods_are_injected() -> None:
    before, after, _ = _mutated("generate-name")
    assert "name" not in after["metadata"]
    assert after["metadata"]["generateName"] == before["metadata"]["generateName"]


def test_sidecar_mode_adds_an_init_run_and_a_long_running_agent() -> None:
    _, after, _ = _mutated("sidecar-mode")
    assert [c["name"] for c in after["spec"]["initContainers"]] == [AGENT_INIT]
    assert [c["name"] for c in after["spec"]["containers"]] == ["app", AGENT]


def test_init_only_leaves_no_agent_running() -> None:
    _, after, _ = _mutated("init-only-job")
    assert [c["name"] for c in after["spec"]["initContainers"]] == [AGENT_INIT]
    assert [c["name"] for c in after["spec"]["containers"]] == ["report"]


def test_the_named_containers_only() -> None:
    _, after, _ = _mutated("containers-annotation")
    spec = after["spec"]
    mounted = {c["name"] for c in [*spec["initContainers"], *spec["containers"]]
               if any(m["name"] == "ephemeral-broker-credentials"
                      for m in c.get("volumeMounts") or [])}
    assert mounted == {"app", "migrate", AGENT}
    assert [c["name"] for c in spec["initContainers"]] == ["linkerd-proxy", AGENT, "migrate"]


def test_the_patch_adds_arrays_that_do_not_exist_and_appends_to_those_that_do() -> None:
    _, _, minimal = _mutated("minimal")
    paths = [(op["op"], op["path"]) for op in patch_of(minimal)]
    assert paths == [
        ("add", "/spec/containers/0/volumeMounts"),
        ("add", "/spec/volumes"),
        ("add", "/spec/initContainers"),
        ("add", "/metadata/annotations/ephemeral-broker~1status"),
    ]
    _, _, empty = _mutated("empty-arrays")
    assert [(op["op"], op["path"]) for op in patch_of(empty)] == [
        ("add", "/spec/containers/0/volumeMounts/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/initContainers/0"),
        ("add", "/metadata/annotations/ephemeral-broker~1status"),
    ]
