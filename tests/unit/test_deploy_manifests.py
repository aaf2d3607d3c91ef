"""deploy/kubernetes: every manifest valid against the Kubernetes schema of every version
from 1.29 on (strict), the kustomizations complete, the cross-references whole (selectors,
ports, service accounts, volumes, the webhook's service and certificate), the
configurations loadable by the code that reads them, `restricted` Pod Security met, the
webhook's choices as documented, and the broker's Vault login: its own projected
service-account token, with the audience and account the documented Vault role binds
(AppRole only as the documented alternative, which must stay loadable too).

The two variants (with cert-manager, without) are assembled here from the kustomizations
by a reader of the few kustomize features they use; where kubectl is installed, its
kustomize renders both and must give the same objects.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from broker.config import Settings, load_settings
from broker.durations import parse_duration
from broker.identity.model import Identity
from broker.injector.settings import InjectorSettings
from broker.policy.rules import decide
from broker.vault.settings import AppRoleAuth, KubernetesAuth

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
README = DEPLOY / "README.md"
VAULT_SETUP = ROOT / "deploy" / "vault-setup.md"
CERT_SCRIPT = DEPLOY / "no-cert-manager" / "webhook-certs.sh"
NS = "ephemeral-broker"
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
VERSIONS = sorted({v for v in all_versions() if Version(v) >= Version("1.29")}, key=Version)
# What a test gives the broker configuration's ${NAME} references. No Vault secret: the
# broker logs in with its own service-account token.
SECRET_VALUES = {
    "BROKER_DB_PASSWORD": "db-pass",
    "BROKER_ADMIN_TOKEN_SHA256": "ab" * 32,
    "BROKER_INJECTOR_TOKEN_SHA256": "cd" * 32,
}


@dataclass(frozen=True)
class Doc:
    path: str  # relative to deploy/kubernetes
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        return self.body["metadata"].get("namespace")

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    def __repr__(self) -> str:
        return f"{self.path}:{self.kind}/{self.name}"


def _rel(path: Path) -> str:
    return path.resolve().relative_to(DEPLOY).as_posix()


def _docs(path: Path) -> list[Doc]:
    return [Doc(_rel(path), d) for d in yaml.safe_load_all(path.read_text()) if d is not None]


YAML_FILES = sorted(p for p in DEPLOY.rglob("*.yaml"))
ALL_DOCS = [d for p in YAML_FILES for d in _docs(p)]
EXAMPLE_DOCS = [d for d in ALL_DOCS if d.path.startswith("examples/")]


# -- the kustomizations ----------------------------------------------------------------


def _kustomization(directory: Path) -> dict[str, Any]:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert data["kind"] in KUSTOMIZE_KINDS, directory
    return data


def _listed_paths(directory: Path) -> tuple[list[Path], list[Path]]:
    """(resources and components, patch files) a kustomization names, resolved."""
    data = _kustomization(directory)
    used = [(directory / e).resolve() for e in data.get("resources", []) + data.get(
        "components", [])]
    patches = [(directory / p["path"]).resolve() for p in data.get("patches", []) if "path" in p]
    return used, patches


def _merge_patch(docs: list[Doc], patch: Doc) -> list[Doc]:
    """A strategic-merge patch that sets metadata labels or annotations: all this
    repository's patches do, and anything else must extend this reader first."""
    assert set(patch.body) <= {"apiVersion", "kind", "metadata"}, patch
    assert set(patch.body["metadata"]) <= {"name", "namespace", "annotations", "labels"}, patch
    out, hits = [], 0
    for doc in docs:
        if (doc.kind, doc.name) == (patch.kind, patch.name) and doc.namespace == patch.namespace:
            hits += 1
            body = json.loads(json.dumps(doc.body))
            for field in ("annotations", "labels"):
                body["metadata"].setdefault(field, {}).update(patch.body["metadata"].get(field, {}))
            doc = Doc(doc.path, body)
        out.append(doc)
    assert hits == 1, f"patch {patch} matches {hits} objects"
    return out


def build(directory: Path, inherited: list[Doc] | None = None) -> list[Doc]:
    """The objects `kubectl kustomize directory` makes, for the features used here. A
    Component works on what the kustomization that uses it has gathered so far."""
    data = _kustomization(directory)
    assert set(data) <= {"apiVersion", "kind", "resources", "components", "patches"}, directory
    assert (inherited is not None) == (data["kind"] == "Component"), directory
    docs: list[Doc] = list(inherited or [])
    for entry in data.get("resources", []):
        target = (directory / entry).resolve()
        docs += build(target) if target.is_dir() else _docs(target)
    for entry in data.get("components", []):
        docs = build((directory / entry).resolve(), docs)
    for patch in data.get("patches", []):
        for p in _docs((directory / patch["path"]).resolve()):
            docs = _merge_patch(docs, p)
    return docs


WITH_CERT_MANAGER = build(DEPLOY)
WITHOUT_CERT_MANAGER = build(DEPLOY / "no-cert-manager")
VARIANTS = {"cert-manager": WITH_CERT_MANAGER, "no-cert-manager": WITHOUT_CERT_MANAGER}


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d.kind == kind and d.name == name]
    assert len(found) == 1, f"{kind}/{name}: {found}"
    return found[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.kind in ("Deployment", "Job")]


def pod_spec(doc: Doc) -> dict[str, Any]:
    return doc.body["spec"]["template"]["spec"]


def pod_labels(doc: Doc) -> dict[str, str]:
    return doc.body["spec"]["template"]["metadata"].get("labels", {})


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector against labels (matchLabels and the In/NotIn/Exists operators)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def config_of(docs: list[Doc], name: str) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", name).body["data"]["config.yaml"])


def broker_settings() -> Settings:
    raw = config_of(WITH_CERT_MANAGER, "ephemeral-broker-config")
    return load_settings(raw, source="broker ConfigMap", env=SECRET_VALUES)


# -- schema ----------------------------------------------------------------------------


def builtin(doc: Doc) -> bool:
    """A kind the Kubernetes schema knows (not kustomize's, not cert-manager's CRDs)."""
    return doc.kind not in KUSTOMIZE_KINDS and not doc.body["apiVersion"].startswith(
        "cert-manager.io/")


SCHEMA_FILES = sorted({d.path for d in ALL_DOCS if builtin(d)})


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", SCHEMA_FILES)
def test_every_builtin_document_is_valid_for_every_kubernetes_version(path, version):
    docs = [d for d in ALL_DOCS if d.path == path and builtin(d)]
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc.body, version, strict=True)


def test_the_versions_checked_start_at_1_29_and_reach_the_newest_schema():
    assert VERSIONS[0] == "1.29.0" and len(VERSIONS) >= 2
    assert VERSIONS[-1] == max(all_versions(), key=Version)


def test_a_strict_schema_refuses_a_misspelt_field():
    body = json.loads(json.dumps(one(WITH_CERT_MANAGER, "Deployment", "ephemeral-broker").body))
    context = body["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, VERSIONS[0], strict=True)


CERT_SPEC_KEYS = {"secretName", "issuerRef", "dnsNames", "duration", "renewBefore", "usages",
                  "privateKey", "isCA", "commonName"}
CERT_USAGES = {"server auth", "client auth", "digital signature", "key encipherment",
               "cert sign", "crl sign"}


def test_cert_manager_documents_are_well_formed():
    cm = [d for d in ALL_DOCS if d.body["apiVersion"].startswith("cert-manager.io/")]
    assert {d.kind for d in cm} == {"Issuer", "Certificate"}
    issuers = {d.name: d for d in cm if d.kind == "Issuer"}
    certs = {d.name: d for d in cm if d.kind == "Certificate"}
    for doc in cm:
        assert doc.body["apiVersion"] == "cert-manager.io/v1", doc
        assert doc.namespace == NS, doc
        assert set(doc.body) == {"apiVersion", "kind", "metadata", "spec"}, doc
    for doc in issuers.values():
        spec = doc.body["spec"]
        assert len(spec) == 1 and next(iter(spec)) in ("selfSigned", "ca"), doc
        if "ca" in spec:
            # A CA issuer signs with a Secret some Certificate here makes (isCA).
            ca_certs = [c for c in certs.values() if c.body["spec"].get("isCA")]
            assert spec["ca"]["secretName"] in {c.body["spec"]["secretName"] for c in ca_certs}
    for doc in certs.values():
        spec = doc.body["spec"]
        assert set(spec) <= CERT_SPEC_KEYS, doc
        assert spec["secretName"] and spec["issuerRef"]["name"] in issuers, doc
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer",
                                     "name": spec["issuerRef"]["name"]}, doc
        assert set(spec.get("usages", [])) <= CERT_USAGES, doc
        assert set(spec["privateKey"]) <= {"algorithm", "size", "rotationPolicy", "encoding"}
        for field in ("duration", "renewBefore"):
            if field in spec:
                assert re.fullmatch(r"\d+h", spec[field]), (doc, field)
        if "renewBefore" in spec:
            assert int(spec["renewBefore"][:-1]) < int(spec["duration"][:-1]), doc
        assert spec.get("isCA") or spec.get("dnsNames"), doc
    # The chain: self-signed root → CA certificate → CA issuer → the serving certificates
    # (the injector's and the broker's: one CA, which the webhook and the agents trust).
    for name in ("ephemeral-broker-injector-tls", "ephemeral-broker-tls"):
        serving = certs[name].body["spec"]
        ca_issuer = issuers[serving["issuerRef"]["name"]].body["spec"]["ca"]
        assert certs["ephemeral-broker-ca"].body["spec"]["secretName"] == ca_issuer[
            "secretName"]
        assert "server auth" in serving["usages"] and not serving.get("isCA")
        assert serving["privateKey"]["rotationPolicy"] == "Always"


# -- the kustomizations list every file -------------------------------------------------


def test_every_file_is_listed_by_exactly_one_kustomization_and_every_listed_file_exists():
    owners: dict[Path, list[Path]] = {}
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        used, patches = _listed_paths(kfile.parent)
        for path in used + patches:
            assert path.exists(), f"{_rel(kfile)} lists {path}, which does not exist"
            if path.is_dir():
                assert (path / "kustomization.yaml").exists(), path
            else:
                owners.setdefault(path, []).append(kfile)
    manifests = {p.resolve() for p in YAML_FILES if p.name != "kustomization.yaml"
                 and not _rel(p).startswith("examples/")}
    unlisted = sorted(_rel(p) for p in manifests - set(owners))
    assert not unlisted, f"not in any kustomization: {unlisted}"
    twice = {_rel(p): [_rel(k) for k in ks] for p, ks in owners.items() if len(ks) > 1}
    assert not twice
    # examples/ is applied on its own, and nothing else lies about.
    assert {d.path.split("/")[0] for d in EXAMPLE_DOCS} == {"examples"}
    assert sorted(p.name for p in (DEPLOY / "examples").iterdir()) == [
        "app-deployment.yaml", "job.yaml"]


def test_the_variants_differ_by_the_certificate_and_the_ca_injection_only():
    with_keys = {d.key for d in WITH_CERT_MANAGER}
    without_keys = {d.key for d in WITHOUT_CERT_MANAGER}
    assert without_keys < with_keys
    assert {k[0] for k in with_keys - without_keys} == {"Issuer", "Certificate"}
    hook = one(WITH_CERT_MANAGER, "MutatingWebhookConfiguration", "ephemeral-broker-injector")
    assert hook.body["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NS}/ephemeral-broker-injector-tls"}
    bare = one(WITHOUT_CERT_MANAGER, "MutatingWebhookConfiguration", "ephemeral-broker-injector")
    assert "annotations" not in bare.body["metadata"]
    # The CA injection names the Certificate whose CA signs the injector's serving cert.
    ns, name = hook.body["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    cert = one(WITH_CERT_MANAGER, "Certificate", name)
    assert cert.namespace == ns
    for docs in VARIANTS.values():
        assert len({d.key for d in docs}) == len(docs), "an object is defined twice"
        for doc in filter(builtin, docs):  # as applied, patches included
            assert kubernetes_validate.validate(doc.body, VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (and its kustomize) absent")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kubectl_kustomize_renders_the_same_objects(variant):
    directory = DEPLOY if variant == "cert-manager" else DEPLOY / variant
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    ours = {d.key: d.body for d in VARIANTS[variant]}
    theirs = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
              for d in rendered}
    assert theirs == ours


# -- cross-references ------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_namespaced_object_lives_in_a_namespace_that_is_shipped(variant):
    docs = VARIANTS[variant]
    namespaces = {d.name for d in docs if d.kind == "Namespace"}
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding",
                      "MutatingWebhookConfiguration"}
    for doc in docs:
        if doc.kind in cluster_scoped:
            assert doc.namespace is None, doc
        else:
            assert doc.namespace in namespaces, doc
    example_namespaces = {d.name for d in EXAMPLE_DOCS if d.kind == "Namespace"}
    for doc in EXAMPLE_DOCS:
        assert doc.kind == "Namespace" or doc.namespace in example_namespaces, doc


def test_deployments_select_their_own_pods():
    for doc in [d for d in ALL_DOCS if d.kind == "Deployment"]:
        assert matches(doc.body["spec"]["selector"], pod_labels(doc)), doc


def test_services_select_exactly_one_deployment_and_target_its_named_ports():
    for svc in [d for d in ALL_DOCS if d.kind == "Service"]:
        selected = [d for d in ALL_DOCS if d.kind == "Deployment" and d.namespace == svc.namespace
                    and matches({"matchLabels": svc.body["spec"]["selector"]}, pod_labels(d))]
        assert len(selected) == 1, f"{svc} selects {selected}"
        names = {p["name"] for c in pod_spec(selected[0])["containers"]
                 for p in c.get("ports", [])}
        for port in svc.body["spec"]["ports"]:
            assert port["targetPort"] in names, (svc, port)


def test_each_disruption_budget_covers_exactly_one_deployment():
    for pdb in [d for d in ALL_DOCS if d.kind == "PodDisruptionBudget"]:
        covered = [d for d in ALL_DOCS if d.kind == "Deployment" and d.namespace == pdb.namespace
                   and matches(pdb.body["spec"]["selector"], pod_labels(d))]
        assert len(covered) == 1, f"{pdb} covers {covered}"
        assert covered[0].body["spec"]["replicas"] > pdb.body["spec"]["maxUnavailable"]


def test_network_policies_select_workloads_and_allow_the_ports_they_serve():
    docs = WITH_CERT_MANAGER
    for pol in [d for d in docs if d.kind == "NetworkPolicy"]:
        selected = [w for w in workloads(docs) if w.namespace == pol.namespace
                    and matches(pol.body["spec"]["podSelector"], pod_labels(w))]
        assert selected, pol
        served = {p["containerPort"] for w in selected for c in pod_spec(w)["containers"]
                  for p in c.get("ports", [])}
        allowed = {p["port"] for rule in pol.body["spec"]["ingress"] for p in rule["ports"]}
        assert allowed == served, pol
    broker = one(docs, "NetworkPolicy", "ephemeral-broker")
    assert {w.name for w in workloads(docs) if matches(broker.body["spec"]["podSelector"],
                                                       pod_labels(w))} == {
        "ephemeral-broker", "ephemeral-broker-migrate"}
    egress = {(p["port"], p["protocol"]) for r in broker.body["spec"]["egress"]
              for p in r["ports"]}
    # DNS, Vault, PostgreSQL, the API server; nothing else.
    assert egress == {(53, "UDP"), (53, "TCP"), (8200, "TCP"), (5432, "TCP"), (443, "TCP"),
                      (6443, "TCP")}
    # Injected pods reach the broker: the label that the webhook selects on opens it.
    hook = one(docs, "MutatingWebhookConfiguration", "ephemeral-broker-injector")
    peers = broker.body["spec"]["ingress"][0]["from"]
    inject_label = hook.body["webhooks"][0]["objectSelector"]["matchLabels"]
    assert {"namespaceSelector": {}, "podSelector": {"matchLabels": inject_label}} in peers
    # The injector reaches the broker's pods for the preview.
    injector_pol = one(docs, "NetworkPolicy", "ephemeral-broker-injector")
    to_broker = injector_pol.body["spec"]["egress"][1]["to"][0]["podSelector"]
    assert matches(to_broker, pod_labels(one(docs, "Deployment", "ephemeral-broker")))


def test_the_webhook_calls_the_injector_service_on_a_port_it_serves_with_a_certificate_for_it():
    docs = WITH_CERT_MANAGER
    hook = one(docs, "MutatingWebhookConfiguration", "ephemeral-broker-injector").body
    (webhook,) = hook["webhooks"]
    ref = webhook["clientConfig"]["service"]
    svc = one(docs, "Service", ref["name"])
    assert svc.namespace == ref["namespace"]
    assert ref["port"] in {p["port"] for p in svc.body["spec"]["ports"]}
    assert ref["path"] == "/mutate"
    cert = one(docs, "Certificate", "ephemeral-broker-injector-tls").body["spec"]
    assert f"{ref['name']}.{ref['namespace']}.svc" in cert["dnsNames"]
    # The injector serves the Certificate's Secret.
    injector = one(docs, "Deployment", "ephemeral-broker-injector")
    secrets = {s["secret"]["name"] for v in pod_spec(injector)["volumes"] if "projected" in v
               for s in v["projected"]["sources"] if "secret" in s}
    assert cert["secretName"] in secrets


def test_service_accounts_and_role_bindings_refer_to_what_exists():
    docs = WITH_CERT_MANAGER
    accounts = {(d.namespace, d.name) for d in docs + EXAMPLE_DOCS if d.kind == "ServiceAccount"}
    for w in workloads(docs) + workloads(EXAMPLE_DOCS):
        assert (w.namespace, pod_spec(w)["serviceAccountName"]) in accounts, w
    for binding in [d for d in docs if d.kind == "ClusterRoleBinding"]:
        one(docs, binding.body["roleRef"]["kind"], binding.body["roleRef"]["name"])
        for subject in binding.body["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts, binding


def test_the_broker_may_only_get_list_and_watch_pods():
    role = one(WITH_CERT_MANAGER, "ClusterRole", "ephemeral-broker-pods").body
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    assert [d for d in WITH_CERT_MANAGER if d.kind in ("Role", "RoleBinding")] == []
    binding = one(WITH_CERT_MANAGER, "ClusterRoleBinding", "ephemeral-broker-pods").body
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ephemeral-broker",
                                    "namespace": NS}]
    # Only the broker mounts an API token; the injector and the Job call no Kubernetes API.
    mounting = {w.name for w in workloads(WITH_CERT_MANAGER)
                if pod_spec(w).get("automountServiceAccountToken") is not False}
    assert mounting == {"ephemeral-broker"}


def _operator_created() -> dict[tuple[str, str], set[str]]:
    """The Secrets and ConfigMaps README.md tells the operator to create, with their keys."""
    text = README.read_text()
    made: dict[tuple[str, str], set[str]] = {}
    for match in re.finditer(r"create (secret generic|configmap) ([a-z0-9-]+)((?:\\\n|[^\n])*)",
                             text):
        kind = "Secret" if match.group(1).startswith("secret") else "ConfigMap"
        keys = set(re.findall(r"--from-(?:literal|file)=([A-Za-z0-9._-]+)", match.group(3)))
        made[(kind, match.group(2))] = keys
    return made


def _references(doc: Doc) -> list[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every Secret and ConfigMap a pod template reads."""
    spec, refs = pod_spec(doc), []
    for vol in spec.get("volumes", []):
        if "configMap" in vol:
            refs += [("ConfigMap", vol["configMap"]["name"], i["key"])
                     for i in vol["configMap"].get("items", [{"key": None}])]
        if "secret" in vol:
            refs += [("Secret", vol["secret"]["secretName"], i["key"])
                     for i in vol["secret"].get("items", [{"key": None}])]
        for src in vol.get("projected", {}).get("sources", []):
            for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if field in src:
                    refs += [(kind, src[field]["name"], i["key"])
                             for i in src[field].get("items", [{"key": None}])]
    for c in containers(spec):
        for env in c.get("env", []):
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                ref = env.get("valueFrom", {}).get(field)
                if ref:
                    refs.append((kind, ref["name"], ref["key"]))
        assert "envFrom" not in c, doc
    return refs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_secret_and_config_map_read_is_shipped_issued_or_created_by_the_operator(variant):
    docs = VARIANTS[variant]
    shipped = {("ConfigMap", d.name): set(d.body["data"]) for d in docs if d.kind == "ConfigMap"}
    issued = {("Secret", d.body["spec"]["secretName"]): {"tls.crt", "tls.key", "ca.crt"}
              for d in docs if d.kind == "Certificate"}
    if variant == "no-cert-manager":  # webhook-certs.sh makes both
        for name in ("ephemeral-broker-injector-tls", "ephemeral-broker-tls"):
            issued[("Secret", name)] = {"tls.crt", "tls.key", "ca.crt"}
    created = _operator_created()
    assert created, "README.md must say which Secrets and ConfigMaps to create"
    available = {**shipped, **issued, **created}
    used = set()
    for w in workloads(docs):
        for kind, name, key in _references(w):
            assert (kind, name) in available, f"{w} reads {kind} {name}: nobody makes it"
            assert key is None or key in available[(kind, name)], f"{w}: {name} has no {key}"
            used.add((kind, name))
    # README asks for nothing that no pod reads.
    assert set(created) <= used


def test_the_certificate_script_makes_the_secrets_the_injector_and_the_broker_mount():
    text = CERT_SCRIPT.read_text()
    injector = one(WITHOUT_CERT_MANAGER, "Deployment", "ephemeral-broker-injector")
    tls = [(k, n, key) for k, n, key in _references(injector) if n.endswith("-tls")]
    assert tls == [("Secret", "ephemeral-broker-injector-tls", "tls.crt"),
                   ("Secret", "ephemeral-broker-injector-tls", "tls.key"),
                   ("Secret", "ephemeral-broker-tls", "ca.crt")]  # the CA only, never a key
    broker = one(WITHOUT_CERT_MANAGER, "Deployment", "ephemeral-broker")
    tls = [(k, n, key) for k, n, key in _references(broker) if n.endswith("-tls")]
    assert tls == [("Secret", "ephemeral-broker-tls", "tls.crt"),
                   ("Secret", "ephemeral-broker-tls", "tls.key")]
    assert 'secret="ephemeral-broker-injector-tls"' in text
    assert 'broker_secret="ephemeral-broker-tls"' in text
    assert 'broker_service="ephemeral-broker"' in text
    assert f'namespace="{NS}"' in text and 'webhook="ephemeral-broker-injector"' in text


def test_every_volume_mount_and_probe_port_names_something_in_its_pod():
    for w in workloads(WITH_CERT_MANAGER) + workloads(EXAMPLE_DOCS):
        spec = pod_spec(w)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(spec):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (w, c["name"], mount)
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, (w, c["name"], probe)


def test_one_image_for_the_broker_its_migrations_the_injector_and_the_agent():
    docs = WITH_CERT_MANAGER
    images = {c["image"] for w in workloads(docs) for c in containers(pod_spec(w))}
    agent = config_of(docs, "ephemeral-broker-injector-config")["agent"]["image"]
    assert images == {agent}


def test_the_broker_s_image_is_referenced_by_digest_never_by_tag():
    """`make image` then `make pin-image` rewrites these to the built image's digest."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        found += re.findall(r"ghcr\.io/example/ephemeral-broker\S*", path.read_text())
    assert len(found) >= 4
    assert {re.fullmatch(r"ghcr\.io/example/ephemeral-broker@sha256:[0-9a-f]{64}", f) is not None
            for f in found} == {True}, found
    assert len(set(found)) == 1, "one image, one digest"


# -- the configurations ----------------------------------------------------------------


def test_the_broker_config_map_loads_with_the_broker_s_own_loader():
    settings = broker_settings()
    assert settings.store.url == (
        "postgresql://broker:db-pass@postgres.example.internal:5432/broker")
    assert settings.vault.auth == KubernetesAuth(
        method="kubernetes", role="broker", mount="kubernetes",
        token_path=Path("/var/run/secrets/vault/token"))
    assert settings.admin.token_sha256 == "ab" * 32
    assert [(o.name, o.scope) for o in settings.admin.operators] == [("injector", "read")]
    (issuer,) = settings.identity.issuers
    assert (issuer.name, issuer.kind, issuer.key_source) == ("k8s-prod", "kubernetes", "file")
    assert issuer.instance_claim == ("kubernetes.io", "pod", "uid")
    assert issuer.replay == "off" and issuer.liveness.check == "kubernetes"
    assert settings.kubernetes is not None
    assert settings.kubernetes.watch and settings.kubernetes.issuer == "k8s-prod"
    assert settings.server.host == "0.0.0.0"


def test_the_broker_config_map_needs_every_variable_it_names():
    raw = config_of(WITH_CERT_MANAGER, "ephemeral-broker-config")
    for name in SECRET_VALUES:
        env = {k: v for k, v in SECRET_VALUES.items() if k != name}
        with pytest.raises(Exception, match=name):
            load_settings(raw, source="broker ConfigMap", env=env)


def _mount_for(doc: Doc, container: str, path: str) -> tuple[dict[str, Any], str]:
    """The volume that holds ``path`` in the container, and the path inside the volume."""
    spec = pod_spec(doc)
    (c,) = [c for c in containers(spec) if c["name"] == container]
    hits = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(hits) == 1, (doc, path, hits)
    (volume,) = [v for v in spec["volumes"] if v["name"] == hits[0]["name"]]
    return volume, path[len(hits[0]["mountPath"].rstrip("/")) + 1:]


def _volume_paths(volume: dict[str, Any]) -> set[str]:
    sources = volume.get("projected", {}).get("sources", [volume])
    out = set()
    for src in sources:
        for field in ("configMap", "secret"):
            if field in src:
                out |= {i["path"] for i in src[field].get("items", [])}
    return out


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def env_refs(node: Any) -> set[str]:
    """The ${NAME}s in a parsed configuration's values: what the loader expands (a
    commented-out line names nothing)."""
    if isinstance(node, dict):
        return set().union(*(env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node))
    return set(ENV_REF.findall(node)) if isinstance(node, str) else set()


def test_every_variable_and_file_the_broker_config_names_reaches_its_containers():
    names = env_refs(config_of(WITH_CERT_MANAGER, "ephemeral-broker-config"))
    assert names == set(SECRET_VALUES)
    for w in [d for d in workloads(WITH_CERT_MANAGER) if d.namespace == NS
              and d.name in ("ephemeral-broker", "ephemeral-broker-migrate")]:
        (c,) = pod_spec(w)["containers"]
        assert c["args"][-2:] == ["--config", "/etc/broker/config.yaml"]
        volume, inner = _mount_for(w, c["name"], "/etc/broker/config.yaml")
        assert volume["configMap"]["name"] == "ephemeral-broker-config" and inner == "config.yaml"
        assert {e["name"] for e in c["env"]} == names, w
    settings = broker_settings()
    broker = one(WITH_CERT_MANAGER, "Deployment", "ephemeral-broker")
    jwks = str(settings.identity.issuers[0].jwks_file)
    volume, inner = _mount_for(broker, "broker", jwks)
    assert volume["configMap"]["name"] == "ephemeral-broker-cluster-jwks" and inner == "jwks.json"
    assert ("ConfigMap", "ephemeral-broker-cluster-jwks") in _operator_created()
    assert "jwks.json" in _operator_created()[("ConfigMap", "ephemeral-broker-cluster-jwks")]
    # The Service serves the port the broker listens on.
    svc = one(WITH_CERT_MANAGER, "Service", "ephemeral-broker").body["spec"]["ports"][0]
    (port,) = broker.body["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["containerPort"] == settings.server.port == svc["port"]


# -- the broker's Vault login ------------------------------------------------------------


def vault_role_writes(text: str, mount: str, role: str) -> list[dict[str, str]]:
    """The parameters of each `vault|bao write auth/<mount>/role/<role> k=v ...` in a
    document's shell blocks, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    found = re.findall(rf"^(?:vault|bao) write auth/{mount}/role/{role} (.*)$", joined, re.M)
    return [dict(arg.split("=", 1) for arg in line.split()) for line in found]


def test_the_broker_logs_in_to_vault_with_a_projected_token_for_vault_alone():
    settings = broker_settings()
    auth = settings.vault.auth
    assert isinstance(auth, KubernetesAuth)
    broker = one(WITH_CERT_MANAGER, "Deployment", "ephemeral-broker")
    spec = pod_spec(broker)
    # token_path is the file of a projected service-account token, mounted read-only.
    volume, inner = _mount_for(broker, "broker", str(auth.token_path))
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == inner
    (c,) = spec["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    # Bounded: a copied file is worth an hour at most (600 s is Kubernetes' minimum).
    assert 600 <= token["expirationSeconds"] <= 3600
    # Issued for Vault alone: neither the agents' audience at the broker nor the API
    # server's (the issuer's, the automounted token's), so it stands in for neither.
    (issuer,) = settings.identity.issuers
    assert token["audience"] not in ("", settings.identity.audience, issuer.issuer)
    # The Vault role that deploy/vault-setup.md and README.md write admits exactly this
    # token: its audience, the pod's service account and namespace, the broker's policy.
    for doc in (VAULT_SETUP, README):
        (role,) = vault_role_writes(doc.read_text(), auth.mount, auth.role)
        assert role["audience"] == token["audience"], doc
        assert role["bound_service_account_names"] == spec["serviceAccountName"], doc
        assert role["bound_service_account_namespaces"] == broker.namespace, doc
        assert role["token_policies"] == "broker", doc
    # Only the broker's pod holds a Vault token: the migrations Job never logs in.
    holders = {w.name for w in workloads(WITH_CERT_MANAGER)
               for v in pod_spec(w).get("volumes", [])
               for src in v.get("projected", {}).get("sources", [])
               if "serviceAccountToken" in src}
    assert holders == {"ephemeral-broker"}
    # And no AppRole left: no secret id in any workload, Secret key or README command.
    for docs in VARIANTS.values():
        for w in workloads(docs):
            assert "approle" not in json.dumps(w.body).lower(), w
    assert not [k for keys in _operator_created().values() for k in keys if "approle" in k]


def _commented_approle_auth() -> dict[str, Any]:
    """The AppRole login the broker ConfigMap keeps, commented out, under vault.auth."""
    text = one(WITH_CERT_MANAGER, "ConfigMap", "ephemeral-broker-config").body["data"][
        "config.yaml"]
    lines = text.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.strip() == "# method: approle"]
    prefix = lines[start][:lines[start].index("#") + 2]
    block = []
    for line in lines[start:]:
        if not line.startswith(prefix) or ":" not in line:
            break
        block.append(line[len(prefix):])
    return yaml.safe_load("\n".join(block))


def _readme_section(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"\n## {title}\n") + 1:]
    return section[:section.index("\n## ")]


def _json_patch_adds(body: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """``body`` with JSON-patch ``add`` operations applied (the README's patches use
    nothing else)."""
    body = json.loads(json.dumps(body))
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = op["path"].lstrip("/").split("/")
        node: Any = body
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if last == "-":
            node.append(op["value"])
        elif isinstance(node, list):
            node.insert(int(last), op["value"])
        else:
            node[last] = op["value"]
    return body


def test_the_documented_approle_alternative_loads_and_reaches_both_workloads():
    raw = config_of(WITH_CERT_MANAGER, "ephemeral-broker-config")
    raw["vault"]["auth"] = _commented_approle_auth()
    names = env_refs(raw)
    assert names == set(SECRET_VALUES) | {"BROKER_APPROLE_SECRET_ID"}
    env = {**SECRET_VALUES, "BROKER_APPROLE_SECRET_ID": "approle-secret"}
    settings = load_settings(raw, source="AppRole alternative", env=env)
    assert isinstance(settings.vault.auth, AppRoleAuth)
    assert settings.vault.auth.secret_id.get_secret_value() == "approle-secret"
    assert "approle-secret" not in repr(settings)
    # README.md's overlay patches give the variable to the broker and to the migrations
    # Job (which loads the same configuration), from the Secret key it asks to add.
    section = _readme_section("AppRole instead")
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    patched = {}
    for patch in yaml.safe_load(block)["patches"]:
        target = one(WITH_CERT_MANAGER, patch["target"]["kind"], patch["target"]["name"])
        patched[target.name] = _json_patch_adds(target.body, yaml.safe_load(patch["patch"]))
    assert set(patched) == {"ephemeral-broker", "ephemeral-broker-migrate"}
    for name, body in patched.items():
        (c,) = body["spec"]["template"]["spec"]["containers"]
        assert {e["name"] for e in c["env"]} == names, name
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"]
                  if e["name"] == "BROKER_APPROLE_SECRET_ID"]
        assert ref == {"name": "ephemeral-broker-secrets", "key": "approle-secret-id"}
        assert f"`{ref['key']}`" in section and f"`{ref['name']}`" in section
        assert kubernetes_validate.validate(body, VERSIONS[-1], strict=True)


def test_the_broker_serves_tls_with_the_certificate_issued_for_its_service():
    docs = WITH_CERT_MANAGER
    settings = broker_settings()
    tls = settings.server.tls
    assert tls is not None and tls.reload_s > 0
    broker = one(docs, "Deployment", "ephemeral-broker")
    cert = one(docs, "Certificate", "ephemeral-broker-tls").body["spec"]
    for path, key in ((tls.cert_file, "tls.crt"), (tls.key_file, "tls.key")):
        volume, inner = _mount_for(broker, "broker", str(path))
        assert volume["secret"]["secretName"] == cert["secretName"], path
        assert {i["key"]: i["path"] for i in volume["secret"]["items"]}[key] == inner
    # The names clients call are in the certificate: the Service's, and the injector's
    # broker_url (what every agent calls).
    svc = one(docs, "Service", "ephemeral-broker")
    assert f"{svc.name}.{svc.namespace}.svc" in cert["dnsNames"]
    cfg = config_of(docs, "ephemeral-broker-injector-config")
    host = cfg["broker_url"].removeprefix("https://").rsplit(":", 1)[0]
    assert host in cert["dnsNames"]
    assert [p["name"] for p in svc.body["spec"]["ports"]] == ["https"]
    # The injector reads the broker's CA from the same Secret (ca.crt only), for its
    # preview and for the agents it adds.
    injector = one(docs, "Deployment", "ephemeral-broker-injector")
    for path in (cfg["agent"]["ca_file"], cfg["preview"]["ca_file"]):
        volume, inner = _mount_for(injector, "injector", path)
        sources = [src["secret"] for src in volume["projected"]["sources"] if "secret" in src
                   and src["secret"]["name"] == cert["secretName"]]
        assert sources == [{"name": cert["secretName"],
                            "items": [{"key": "ca.crt", "path": inner}]}], path
    # The migrations Job loads the same configuration without the certificate: the files
    # are read when the broker serves, not when the configuration is loaded.
    job = one(docs, "Job", "ephemeral-broker-migrate")
    assert all(v["name"] != "tls" for v in pod_spec(job)["volumes"])


def test_the_injector_config_agrees_with_the_broker_its_service_and_its_webhook():
    docs = WITH_CERT_MANAGER
    cfg = config_of(docs, "ephemeral-broker-injector-config")
    settings = broker_settings()
    assert cfg["audience"] == settings.identity.audience
    assert cfg["issuer"] in {i.name for i in settings.identity.issuers}
    (issuer,) = [i for i in settings.identity.issuers if i.name == cfg["issuer"]]
    assert issuer.kind == "kubernetes"
    svc = one(docs, "Service", "ephemeral-broker")
    assert cfg["broker_url"] == f"https://{svc.name}.{svc.namespace}.svc:{settings.server.port}"
    injector = one(docs, "Deployment", "ephemeral-broker-injector")
    (c,) = pod_spec(injector)["containers"]
    assert c["args"] == ["injector", "--config", "/etc/injector/config.yaml"]
    assert int(cfg["listen"].rsplit(":", 1)[1]) == c["ports"][0]["containerPort"] == 8443
    for path in (cfg["tls"]["cert_file"], cfg["tls"]["key_file"], "/etc/injector/config.yaml",
                 cfg["preview"]["token_file"], cfg["preview"]["ca_file"],
                 cfg["agent"]["ca_file"]):
        volume, inner = _mount_for(injector, "injector", path)
        assert inner in _volume_paths(volume), path
    hook = one(docs, "MutatingWebhookConfiguration", "ephemeral-broker-injector").body
    (expr,) = hook["webhooks"][0]["namespaceSelector"]["matchExpressions"]
    assert set(cfg["skip_namespaces"]) == set(expr["values"])
    assert cfg["token_expiration_s"] >= 600
    assert cfg["agent"]["run_as_user"] != 0


def test_the_injector_config_map_loads_with_the_injector_s_settings():
    cfg = config_of(WITH_CERT_MANAGER, "ephemeral-broker-injector-config")
    settings = InjectorSettings.model_validate(cfg)
    assert settings.audience == "ephemeral-broker"
    assert settings.issuer == "k8s-prod"


# -- the examples ----------------------------------------------------------------------


PREFIX = "ephemeral-broker/"
CRED_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
PER_CREDENTIAL = ("credential", "format", "template", "perms", "command", "signal", "ttl",
                  "keygen", "common-name")
POD_WIDE = {"inject", "mode", "on-exit", "containers", "agent-cpu-request", "agent-cpu-limit",
            "agent-memory-request", "agent-memory-limit"}


def _annotation_problems(annotations: dict[str, str], spec: dict[str, Any]) -> list[str]:
    """The contract's rules (k8s-contract.md), for the examples: what the injector would
    refuse. The injector's own parser decides in production."""
    ours = {k[len(PREFIX):]: v for k, v in annotations.items() if k.startswith(PREFIX)}
    problems, names = [], set()
    for key in ours:
        if key.startswith("credential-"):
            names.add(key[len("credential-"):])
    for key, value in ours.items():
        field = next((f for f in PER_CREDENTIAL if key.startswith(f + "-")), None)
        if field is None:
            if key not in POD_WIDE:
                problems.append(f"unknown annotation {key}")
            continue
        name = key[len(field) + 1:]
        if not CRED_NAME.match(name) or name not in names:
            problems.append(f"{key}: no credential named {name!r}")
        if field == "format" and value not in (
                "json", "env", "pem", "pgpass", "aws-credential-process", "template"):
            problems.append(f"{key}: unknown format {value}")
        if field == "perms" and (not re.fullmatch(r"0[0-7]{3}", value)
                                 or int(value, 8) & 0o133):
            problems.append(f"{key}: {value} is writable by others or executable")
        if field == "command":
            argv = json.loads(value)
            if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
                problems.append(f"{key}: not a JSON array of strings")
        if field == "ttl":
            parse_duration(value)
        if field == "keygen" and value not in ("ec-p256", "rsa-2048", "ed25519"):
            problems.append(f"{key}: unknown key type")
        if field == "signal" and not spec.get("shareProcessNamespace"):
            problems.append(f"{key}: needs shareProcessNamespace")
    if ours.get("mode", "native") not in ("native", "sidecar", "init-only"):
        problems.append("mode")
    if ours.get("on-exit", "terminate") not in ("terminate", "release", "keep"):
        problems.append("on-exit")
    return problems


EXAMPLE_PODS = workloads(EXAMPLE_DOCS)


def test_the_examples_show_a_deployment_a_native_sidecar_job_and_an_init_only_job():
    modes = {(w.kind, w.body["spec"]["template"]["metadata"]["annotations"].get(
        PREFIX + "mode", "native")) for w in EXAMPLE_PODS}
    assert modes == {("Deployment", "native"), ("Job", "native"), ("Job", "init-only")}
    app = one(EXAMPLE_DOCS, "Deployment", "payments-api")
    ann = app.body["spec"]["template"]["metadata"]["annotations"]
    formats = {v for k, v in ann.items() if k.startswith(PREFIX + "format-")}
    assert formats == {"pgpass", "pem"}
    assert any(k.startswith(PREFIX + "command-") for k in ann)


@pytest.mark.parametrize("pod", EXAMPLE_PODS, ids=lambda d: d.name)
def test_example_annotations_follow_the_contract(pod):
    meta = pod.body["spec"]["template"]["metadata"]
    assert meta["labels"][PREFIX + "inject"] == meta["annotations"][PREFIX + "inject"] == "true"
    assert _annotation_problems(meta["annotations"], pod_spec(pod)) == []


@pytest.mark.parametrize(("key", "value"), [
    ("perms-db", "0660"), ("perms-db", "0402"), ("perms-db", "0500"), ("perms-db", "400"),
    ("format-db", "yaml"), ("mode", "daemon"),
    ("command-db", '"reload"'), ("signal-db", "SIGHUP:nginx"), ("colour", "blue"),
    ("format-other", "json"),
], ids=lambda v: str(v))
def test_the_annotation_check_finds_each_contract_violation(key, value):
    base = {PREFIX + "inject": "true", PREFIX + "credential-db": "payments-db"}
    assert _annotation_problems(base, {}) == []
    assert _annotation_problems({**base, PREFIX + key: value}, {}) != []


@pytest.mark.parametrize("pod", EXAMPLE_PODS, ids=lambda d: d.name)
def test_the_broker_policy_grants_every_role_an_example_asks_for(pod):
    settings = broker_settings()
    issuer_name = config_of(WITH_CERT_MANAGER, "ephemeral-broker-injector-config")["issuer"]
    (issuer,) = [i for i in settings.identity.issuers if i.name == issuer_name]
    ns, sa = pod.namespace, pod_spec(pod)["serviceAccountName"]
    now = datetime.now(UTC)
    identity = Identity(
        issuer_name=issuer.name, issuer=issuer.issuer, subject=f"system:serviceaccount:{ns}:{sa}",
        instance_id="0b7c7f7e-3a51-4bb8-9e53-4b8cf6b9f1a2", workload=f"{ns}/{sa}",
        issued_at=now, expires_at=now,
        claims={"kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}}},
    )
    ann = pod.body["spec"]["template"]["metadata"]["annotations"]
    roles = {v for k, v in ann.items() if k.startswith(PREFIX + "credential-")}
    assert roles
    for role in roles:
        decision = decide(identity, role, None, roles=settings.roles,
                          rules=settings.policy.rules)
        assert decision.allowed, (pod, role, decision.reason)
    # And the policy is not open to everyone: another account of the namespace gets none.
    other = Identity(**{**identity.__dict__, "workload": f"{ns}/someone-else"})
    assert not any(decide(other, r, None, roles=settings.roles,
                          rules=settings.policy.rules).allowed for r in roles)


def test_the_pki_example_asks_for_the_name_its_role_issues():
    settings = broker_settings()
    ann = one(EXAMPLE_DOCS, "Deployment", "payments-api").body["spec"]["template"]["metadata"][
        "annotations"]
    role = settings.roles[ann[PREFIX + "credential-tls"]]
    assert role.engine == "pki" and role.mode == "sign"
    assert ann[PREFIX + "common-name-tls"] == role.params["common_name"]


# -- restricted Pod Security -----------------------------------------------------------


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What the `restricted` Pod Security Standard refuses in a pod spec, field by field;
    plus a read-only root filesystem, which this project asks of every container."""
    out = []
    pod_sc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(field)
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: {sorted(kinds)}")
    if pod_sc.get("sysctls"):
        out.append("sysctls")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in containers(spec):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if any("hostPort" in p for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem must be true")
    return out


POD_TEMPLATES = workloads(WITH_CERT_MANAGER) + EXAMPLE_PODS


@pytest.mark.parametrize("doc", POD_TEMPLATES, ids=lambda d: f"{d.kind}-{d.name}")
def test_every_pod_meets_the_restricted_pod_security_standard(doc):
    spec = pod_spec(doc)
    assert restricted_violations(spec) == []
    # Explicitly, the fields the issue names, on every container of ours.
    for c in containers(spec):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_namespaces_enforce_the_restricted_standard():
    for ns in [d for d in ALL_DOCS if d.kind == "Namespace"]:
        assert ns.body["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


MUTATIONS = {
    "escalation": lambda c, p: c["securityContext"].update(allowPrivilegeEscalation=True),
    "caps kept": lambda c, p: c["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
    "caps added": lambda c, p: c["securityContext"].update(
        capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "root": lambda c, p: c["securityContext"].update(runAsNonRoot=False),
    "uid 0": lambda c, p: c["securityContext"].update(runAsUser=0),
    "seccomp": lambda c, p: c["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    "writable root": lambda c, p: c["securityContext"].update(readOnlyRootFilesystem=False),
    "privileged": lambda c, p: c["securityContext"].update(privileged=True),
    "host network": lambda c, p: p.update(hostNetwork=True),
    "host path": lambda c, p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "host port": lambda c, p: c["ports"].append({"containerPort": 1, "hostPort": 1}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_pod_security_check_finds_each_violation(mutation):
    spec = json.loads(json.dumps(pod_spec(one(WITH_CERT_MANAGER, "Deployment",
                                              "ephemeral-broker"))))
    MUTATIONS[mutation](spec["containers"][0], spec)
    assert restricted_violations(spec) != []


# -- the workloads' shape --------------------------------------------------------------


def test_the_broker_deployment_is_replicated_spread_probed_and_bounded():
    broker = one(WITH_CERT_MANAGER, "Deployment", "ephemeral-broker").body
    spec = broker["spec"]["template"]["spec"]
    assert broker["spec"]["replicas"] >= 2
    assert broker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (c,) = spec["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The broker serves HTTPS only: the kubelet probes it so (without verifying).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS" and c[probe]["httpGet"]["port"] == (
            "https"), probe
    assert c["args"][0] == "serve"
    # The broker drains requests for 60 s on SIGTERM (broker/app/http.py DRAIN_S).
    assert spec["terminationGracePeriodSeconds"] > 60
    pdb = one(WITH_CERT_MANAGER, "PodDisruptionBudget", "ephemeral-broker").body["spec"]
    assert pdb["maxUnavailable"] == 1


def test_the_migrations_job_runs_broker_migrate_with_the_config():
    job = one(WITH_CERT_MANAGER, "Job", "ephemeral-broker-migrate").body
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] + c["args"] == ["broker", "migrate", "--config", "/etc/broker/config.yaml"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1


def test_the_injector_runs_twice_over_with_https_probes():
    injector = one(WITH_CERT_MANAGER, "Deployment", "ephemeral-broker-injector").body
    assert injector["spec"]["replicas"] == 2
    (c,) = injector["spec"]["template"]["spec"]["containers"]
    assert c["command"] + c["args"] == ["broker", "injector", "--config",
                                        "/etc/injector/config.yaml"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    svc = one(WITH_CERT_MANAGER, "Service", "ephemeral-broker-injector").body["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in svc] == [(443, "https")]
    assert c["ports"][0]["containerPort"] == 8443


def test_the_webhook_is_configured_as_the_issue_requires():
    hook = one(WITH_CERT_MANAGER, "MutatingWebhookConfiguration", "ephemeral-broker-injector")
    (w,) = hook.body["webhooks"]
    assert w["failurePolicy"] == "Fail"
    assert w["objectSelector"] == {"matchLabels": {"ephemeral-broker/inject": "true"}}
    assert w["namespaceSelector"] == {"matchExpressions": [{
        "key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": ["kube-system", "kube-public", NS]}]}
    assert w["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}]
    assert w["sideEffects"] == "None"
    assert w["admissionReviewVersions"] == ["v1"]
    assert w["timeoutSeconds"] == 10
    assert w["reinvocationPolicy"] == "IfNeeded"
    assert w["matchPolicy"] == "Equivalent"
    # The injector's namespace is left out: it never depends on itself.
    injector = one(WITH_CERT_MANAGER, "Deployment", "ephemeral-broker-injector")
    assert not matches(w["namespaceSelector"],
                       {"kubernetes.io/metadata.name": injector.namespace})
    assert matches(w["namespaceSelector"], {"kubernetes.io/metadata.name": "payments"})
    # Each choice is explained where it is made: a comment right above its line.
    lines = (DEPLOY / "base" / "injector" / "webhook.yaml").read_text().splitlines()
    for field in ("failurePolicy:", "objectSelector:", "namespaceSelector:", "sideEffects:",
                  "timeoutSeconds:", "reinvocationPolicy:", "matchPolicy:", "- operations:",
                  "admissionReviewVersions:"):
        (at,) = [i for i, line in enumerate(lines) if line.lstrip().startswith(field)]
        assert lines[at - 1].lstrip().startswith("#") or "#" in lines[at], field


# -- webhook-certs.sh ------------------------------------------------------------------


def _run_cert_script(tmp_path: Path, ca_dir: Path) -> tuple[dict[str, Any], list[list[str]]]:
    stub = tmp_path / "kubectl"
    stub.write_text(
        "#!/bin/sh\n"
        'd="$(dirname "$0")"\n'
        'printf "%s\\0" "$@" >> "$d/calls"; printf "\\n" >> "$d/calls"\n'
        'case "$1" in apply) cat > "$d/applied.yaml" ;; get) printf x ;; esac\n'
    )
    stub.chmod(0o755)
    (tmp_path / "calls").write_text("")
    env = {**os.environ, "KUBECTL": str(stub)}
    subprocess.run(["bash", str(CERT_SCRIPT), "--dir", str(ca_dir)], env=env, check=True,
                   capture_output=True, timeout=120)
    calls = [line.split("\0")[:-1] for line in (tmp_path / "calls").read_text().splitlines()
             if line]
    applied = {d["metadata"]["name"]: d
               for d in yaml.safe_load_all((tmp_path / "applied.yaml").read_text())}
    return applied, calls


def _openssl_text(cert: Path) -> str:
    return subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(cert)],
                          check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl absent")
def test_webhook_certs_script_makes_a_secret_and_a_ca_bundle_that_fit_together(tmp_path):
    ca_dir = tmp_path / "ca"
    applied, calls = _run_cert_script(tmp_path, ca_dir)
    assert set(applied) == {"ephemeral-broker-injector-tls", "ephemeral-broker-tls"}
    secret = applied["ephemeral-broker-injector-tls"]
    assert kubernetes_validate.validate(secret, VERSIONS[-1], strict=True)
    assert (secret["metadata"], secret["type"]) == (
        {"name": "ephemeral-broker-injector-tls", "namespace": NS}, "kubernetes.io/tls")
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert files["tls.crt"] == (ca_dir / "tls.crt").read_bytes()
    assert files["ca.crt"] == (ca_dir / "ca.crt").read_bytes()
    assert b"PRIVATE KEY" in files["tls.key"]
    # No key material on a command line; the caBundle patch carries the CA only.
    assert calls[0] == ["apply", "-f", "-"]
    patch = calls[-1]
    assert patch[:4] == ["patch", "mutatingwebhookconfiguration", "ephemeral-broker-injector",
                         "--type=json"]
    (op,) = json.loads(patch[-1])
    assert op["path"] == "/webhooks/0/clientConfig/caBundle"
    assert base64.b64decode(op["value"]) == files["ca.crt"]
    # The serving certificate chains to the CA and names the Service the API server calls.
    subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "ca.crt"),
                    str(ca_dir / "tls.crt")], check=True, capture_output=True)
    text = _openssl_text(ca_dir / "tls.crt")
    assert f"DNS:ephemeral-broker-injector.{NS}.svc," in text
    assert "TLS Web Server Authentication" in text and "CA:FALSE" in text
    assert oct((ca_dir / "ca.key").stat().st_mode & 0o777) == "0o600"
    # The broker's Secret: a serving certificate for its Service, under the same CA (the
    # one the injector hands to the agents).
    broker = applied["ephemeral-broker-tls"]
    assert kubernetes_validate.validate(broker, VERSIONS[-1], strict=True)
    assert (broker["metadata"], broker["type"]) == (
        {"name": "ephemeral-broker-tls", "namespace": NS}, "kubernetes.io/tls")
    broker_files = {k: base64.b64decode(v) for k, v in broker["data"].items()}
    assert broker_files["ca.crt"] == files["ca.crt"]
    assert broker_files["tls.crt"] == (ca_dir / "broker.crt").read_bytes()
    assert b"PRIVATE KEY" in broker_files["tls.key"] and broker_files["tls.key"] != files[
        "tls.key"]
    subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "ca.crt"),
                    str(ca_dir / "broker.crt")], check=True, capture_output=True)
    text = _openssl_text(ca_dir / "broker.crt")
    assert (f"DNS:ephemeral-broker.{NS}.svc, DNS:ephemeral-broker.{NS}.svc.cluster.local, "
            "DNS:localhost") in text
    assert "TLS Web Server Authentication" in text and "CA:FALSE" in text
    # A second run renews the serving certificates under the same CA: caBundle unchanged.
    again, calls2 = _run_cert_script(tmp_path, ca_dir)
    for name, first in applied.items():
        assert again[name]["data"]["ca.crt"] == first["data"]["ca.crt"]
        assert again[name]["data"]["tls.crt"] != first["data"]["tls.crt"]
    assert json.loads(calls2[-1][-1]) == [op]
