"""The injector's ``image_digests`` option: off by default; ``warn`` admits an opted-in
pod with a warning per container named by tag; ``refuse`` refuses it, naming each; the
agent's own image must be pinned whenever the option is on; pods that are not opted in,
and skipped namespaces, are never looked at."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.injector.images import by_digest, digest_effect
from broker.injector.model import Patch, Refusal, Skip
from broker.injector.mutate import mutate
from broker.injector.settings import InjectorSettings
from tests.unit.injector.podkit import CONFIG, P, apply, container, first_patch, pod

SHA = "a" * 64
AGENT = f"registry.example/ephemeral-broker@sha256:{SHA}"
PINNED = f"registry.example/app@sha256:{SHA}"


def config(mode: str) -> InjectorSettings:
    return InjectorSettings(broker_url="https://b.svc:8300", image_digests=mode,
                            agent={"image": AGENT})


@pytest.mark.parametrize(("image", "pinned"), [
    (PINNED, True),
    (f"registry.example/app:1.2@sha256:{SHA}", True),  # the digest wins over the tag
    (f"app@sha256:{SHA}", True),
    (f"registry.example/app@sha512:{'b' * 128}", True),
    ("registry.example/app:1.2", False),
    ("registry.example/app", False),  # no tag: latest
    ("registry.example:5000/app", False),  # a port, not a tag
    (f"registry.example/app@sha256:{SHA[:-1]}", False),  # one digit short
    (f"registry.example/app@sha256:{SHA.upper()}", False),  # digests are lower-case hex
    (f"registry.example/app@sha256:{SHA}x", False),
    (f"registry.example/app@md5:{SHA[:32]}", False),
    (f"registry.example/app@sha256:{SHA}\n", False),
    ("", False), (None, False), (3, False), (["x"], False),
])
def test_a_reference_is_pinned_only_by_a_whole_digest(image, pinned):
    assert by_digest(image) is pinned


def test_off_by_default_and_a_tag_changes_nothing():
    assert CONFIG.image_digests == "off"
    obj = pod({"containers": [container("app")]})
    default = InjectorSettings(broker_url="https://b.svc:8300", agent={"image": AGENT})
    assert default.image_digests == "off"
    assert mutate(obj, "shop", default) == mutate(obj, "shop", config("off"))
    assert not any("digest" in w for w in first_patch(mutate(obj, "shop", CONFIG)).warnings)
    assert digest_effect("off", [container("app")]) == ([], None)


def test_warn_admits_the_pod_with_one_warning_per_container_named_by_tag():
    obj = pod({"initContainers": [container("migrate")],
               "containers": [container("app", image=PINNED), container("web")]})
    outcome = first_patch(mutate(obj, "shop", config("warn")))
    found = [w for w in outcome.warnings if "not by digest" in w]
    assert found == [
        "container 'migrate': image 'registry.example/migrate:1' is named by tag, not by "
        "digest: use NAME@sha256:DIGEST (image_digests in the injector's configuration: "
        "only images pinned by digest are expected)",
        "container 'web': image 'registry.example/web:1' is named by tag, not by digest: "
        "use NAME@sha256:DIGEST (image_digests in the injector's configuration: only "
        "images pinned by digest are expected)",
    ]
    # the patch is the one "off" gives: a warning changes nothing in the pod
    assert outcome.ops == first_patch(mutate(obj, "shop", config("off"))).ops


def test_refuse_refuses_the_pod_naming_each_container_and_the_fix():
    obj = pod({"containers": [container("app", image=PINNED), container("web")]})
    outcome = mutate(obj, "shop", config("refuse"))
    assert outcome == Refusal(
        "container 'web': image 'registry.example/web:1' is named by tag, not by digest: "
        "use NAME@sha256:DIGEST (image_digests in the injector's configuration: only "
        "images pinned by digest are admitted)")


def test_refuse_admits_a_pod_whose_every_image_is_pinned_as_off_would():
    obj = pod({"initContainers": [container("migrate", image=PINNED)],
               "containers": [container("app", image=PINNED)]})
    pinned = first_patch(mutate(obj, "shop", config("refuse")))
    assert pinned == first_patch(mutate(obj, "shop", config("off")))
    injected = apply(obj, pinned.ops)
    images = [c["image"] for c in [*injected["spec"]["initContainers"],
                                    *injected["spec"]["containers"]]]
    assert AGENT in images and all(by_digest(i) for i in images)


def test_refuse_adds_its_finding_to_the_pod_s_other_problems():
    obj = pod({"containers": [container("app", ports=[{"containerPort": 8399}])]})
    outcome = mutate(obj, "shop", config("refuse"))
    assert isinstance(outcome, Refusal)
    assert "declares port 8399" in outcome.message and "not by digest" in outcome.message


@pytest.mark.parametrize("mode", ["warn", "refuse"])
def test_pods_not_opted_in_and_skipped_namespaces_are_not_looked_at(mode):
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
             "spec": {"containers": [container("app")]}}
    assert mutate(plain, "shop", config(mode)) == Skip("not_opted_in")
    assert mutate(pod({"containers": [container("app")]}), "kube-system",
                  config(mode)) == Skip("namespace_skipped")


def test_a_container_another_webhook_adds_by_tag_after_injection_is_caught_on_reinvocation():
    obj = pod({"containers": [container("app", image=PINNED)]})
    after = apply(obj, first_patch(mutate(obj, "shop", config("refuse"))).ops)
    after["spec"]["containers"].append(container("proxy"))
    refused = mutate(after, "shop", config("refuse"))
    assert isinstance(refused, Refusal) and "'proxy'" in refused.message
    warned = mutate(after, "shop", config("warn"))
    assert isinstance(warned, Patch) and not warned.first_pass
    assert any("'proxy'" in w for w in warned.warnings)
    # nothing new and everything pinned: the second pass has nothing to say
    again = apply(obj, first_patch(mutate(obj, "shop", config("refuse"))).ops)
    assert mutate(again, "shop", config("refuse")) == Skip("already_injected")


@pytest.mark.parametrize("mode", ["warn", "refuse"])
def test_the_option_needs_the_agent_s_own_image_pinned(mode):
    with pytest.raises(ValidationError, match="agent.image: image_digests is .* pinned by digest"):
        InjectorSettings(broker_url="https://b.svc:8300", image_digests=mode)
    with pytest.raises(ValidationError):
        InjectorSettings(broker_url="https://b.svc:8300", image_digests="on",
                         agent={"image": AGENT})


def test_annotations_cannot_turn_the_option_off_for_a_pod():
    obj = pod({"containers": [container("web")]},
              {P + "credential-db": "app-db", P + "image-digests": "off"})
    outcome = mutate(obj, "shop", config("refuse"))
    assert isinstance(outcome, Refusal)
