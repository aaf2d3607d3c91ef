"""What the injector admits, the agent accepts: the agent's own parser
(``broker.agent.spec.build_specs``) reads back every command line the injector emits, for
annotation sets generated at and around every limit (signal names carrying ',' or '=',
commands of 64 and 65 arguments and of 4096 bytes give or take a few, in multibyte text,
templates of 16 KiB). And the annotation parser itself is the one that refuses: the
check of the emitted arguments at admission never has to."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.agent.spec import MAX_COMMAND_ARGS, MAX_COMMAND_BYTES, MAX_TEMPLATE_BYTES, build_specs
from broker.injector.agentargs import agent_problems, credentials_and_templates
from broker.injector.annotations import SIGNALS, CredentialSpec, InjectionSpec
from broker.injector.containers import OUR_CONTAINERS
from broker.injector.model import Patch, Refusal
from broker.injector.mutate import mutate
from tests.unit.injector.podkit import CONFIG, P, apply, check_agent_reads, container, pod

BACKSTOP = "the agent would refuse this on its command line"
# One character of text, and how many bytes it takes in compact, unescaped JSON.
UNITS = {"a": 1, "é": 2, "€": 3, "😀": 4, "\\": 2, '"': 2, "\n": 2, ",": 1, "=": 1}
ANY_CHAR = st.sampled_from([*UNITS, " ", ":", "/", "$", "{", "}", "-", "_", ".", "\x00", "\x7f"])


def near(limit: int, overhead: int) -> st.SearchStrategy[str]:
    """Text whose size lands within a few bytes either side of ``limit``."""
    def build(unit: str, delta: int) -> str:
        return unit * max(0, (limit - overhead) // UNITS[unit] + delta)
    return st.builds(build, st.sampled_from(list(UNITS)), st.integers(-3, 3))


def commands() -> st.SearchStrategy[str]:
    small = st.lists(st.text(ANY_CHAR, max_size=12), min_size=0, max_size=4)
    many = st.integers(MAX_COMMAND_ARGS - 2, MAX_COMMAND_ARGS + 2).map(lambda n: ["x"] * n)
    big = near(MAX_COMMAND_BYTES, len('["x",""]')).map(lambda t: ["x", t])
    argv = st.one_of(small, many, big)
    dumped = st.builds(
        lambda a, ascii_json, spaced: json.dumps(
            a, ensure_ascii=ascii_json, separators=(", ", ": ") if spaced else (",", ":")),
        argv, st.booleans(), st.booleans())
    raw = st.sampled_from(['["a","\\ud800"]', '["\\u00e9"]', "[ \"a\" ,\n\"b\" ]", "nginx",
                           '["a"],ttl=1s'])
    return st.one_of(dumped, raw)


def signals() -> st.SearchStrategy[str]:
    process = st.one_of(st.text(ANY_CHAR, min_size=0, max_size=17),
                        st.sampled_from(["nginx", "a,ttl=1s", "x,perms=0644", "a=b",
                                         "a,keygen=x", "a,cn=b", "x,command=[\"y\"]"]))
    return st.builds(lambda s, p: f"{s}:{p}", st.sampled_from([*SIGNALS, "SIGKILL"]), process)


def templates() -> st.SearchStrategy[str]:
    return st.one_of(st.text(ANY_CHAR, max_size=20).map(lambda t: "${user}" + t),
                     near(MAX_TEMPLATE_BYTES, 0).map(lambda t: t.replace("\\", "$$")))


@st.composite
def annotation_sets(draw: st.DrawFn) -> dict[str, str]:
    """Options that go together (so that most sets are admissible), with the signal, the
    command and the template drawn at and around the agent's limits."""
    out: dict[str, str] = {}
    for name in draw(st.lists(st.sampled_from(["db", "tls", "x-1", "c" * 63]), min_size=1,
                              max_size=3, unique=True)):
        def option(prefix: str, values: st.SearchStrategy[str]) -> None:
            if draw(st.booleans()):
                out[P + prefix + name] = draw(values)  # noqa: B023 - drawn right here

        out[P + "credential-" + name] = draw(st.sampled_from(["app-db", "app_cert", "r"]))
        fmt = draw(st.sampled_from(["json", "env", "pem", "pgpass", "aws-credential-process",
                                    "template"]))
        out[P + "format-" + name] = fmt
        if fmt == "template":
            out[P + "template-" + name] = draw(templates())
        if fmt in ("json", "pem", "template") and draw(st.booleans()):
            out[P + "keygen-" + name] = draw(st.sampled_from(["ec-p256", "rsa-2048", "ed25519"]))
            option("common-name-", st.sampled_from(["api.shop.svc", "a" * 64, "a" * 65]))
        option("perms-", st.sampled_from(["0400", "0440", "0444", "0600", "0640"]))
        option("ttl-", st.sampled_from(["1s", "15m", "1h30m", "1500ms", "90", " 15m", "3650d"]))
        option("signal-", signals())
        option("command-", commands())
    return out


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(annotation_sets())
def test_what_the_injector_admits_the_agent_accepts(annotations: dict[str, Any]) -> None:
    obj = pod({"containers": [container("app")], "shareProcessNamespace": True}, annotations)
    outcome = mutate(obj, "shop", CONFIG)
    if isinstance(outcome, Refusal):
        assert BACKSTOP not in outcome.message, outcome.message  # the parsers agree
        return
    assert isinstance(outcome, Patch), outcome
    after = apply(obj, outcome.ops)
    ours = [c for c in (*after["spec"]["initContainers"], *after["spec"]["containers"])
            if c["name"] in OUR_CONTAINERS]
    assert ours
    for c in ours:
        build_specs(*credentials_and_templates(c["args"]))


# The check itself, for what the annotation parser would never let through: each of the
# agent's refusals is turned into the annotation that asked for it.
BASE = CredentialSpec(name="db", role="app-db")


@pytest.mark.parametrize(("credential", "annotation"), [
    (replace(BASE, signal="SIGHUP:a,perms=0644"), "perms-db"),
    (replace(BASE, signal="SIGHUP:a=b"), "signal-db"),
    (replace(BASE, command=("x",) * (MAX_COMMAND_ARGS + 1)), "command-db"),
    (replace(BASE, command=("é" * MAX_COMMAND_BYTES,)), "command-db"),
    (replace(BASE, common_name="a b"), "common-name-db"),
    (replace(BASE, format="template", template="é" * MAX_TEMPLATE_BYTES), "template-db"),
    (replace(BASE, format="template"), "format-db"),
    (replace(BASE, role="Bad"), "credential-db"),
    (replace(BASE, perms="0777"), "perms-db"),
], ids=["signal-smuggles-perms", "signal-equals", "command-args", "command-bytes", "cn",
        "template-bytes", "template-missing", "role", "perms"])
def test_a_command_line_the_agent_would_refuse_refuses_the_pod_naming_the_annotation(
        credential: CredentialSpec, annotation: str) -> None:
    [problem] = agent_problems(InjectionSpec(credentials=(credential,)), CONFIG)
    assert problem.startswith(f"{P}{annotation}: {BACKSTOP}: --"), problem


def test_an_admitted_pod_needs_no_such_refusal() -> None:
    spec = InjectionSpec(credentials=(replace(BASE, command=("x",) * MAX_COMMAND_ARGS,
                                              signal="SIGHUP:nginx"),))
    assert agent_problems(spec, CONFIG) == []


def test_a_multibyte_command_within_the_agents_limit_is_emitted_as_it_came() -> None:
    """Emitted as escapes (\\u00e9), each é took six bytes on the agent's command line, and
    3 KB of annotation became 9 KB the agent refused."""
    argv = ["x", "é" * 1500]
    obj = pod({"containers": [container("app")]}, {
        P + "credential-db": "app-db", P + "command-db": json.dumps(argv, ensure_ascii=False)})
    outcome = mutate(obj, "shop", CONFIG)
    assert isinstance(outcome, Patch), outcome
    [agent] = [c for c in apply(obj, outcome.ops)["spec"]["initContainers"]
               if c["name"] in OUR_CONTAINERS]
    [credential], _ = credentials_and_templates(agent["args"])
    assert credential.endswith(",command=" + json.dumps(argv, ensure_ascii=False,
                                                        separators=(",", ":")))
    assert build_specs([credential])[0].command == tuple(argv)


def test_check_agent_reads_still_holds_for_the_largest_command() -> None:
    argv = ["x", "é" * ((MAX_COMMAND_BYTES - len('["x",""]')) // 2)]
    annotations = {P + "credential-db": "app-db",
                   P + "command-db": json.dumps(argv, ensure_ascii=False, separators=(",", ":"))}
    assert len(annotations[P + "command-db"].encode()) == MAX_COMMAND_BYTES
    obj = pod({"containers": [container("app")]}, annotations)
    outcome = mutate(obj, "shop", CONFIG)
    assert isinstance(outcome, Patch), outcome
    for c in apply(obj, outcome.ops)["spec"]["initContainers"]:
        if c["name"] in OUR_CONTAINERS:
            check_agent_reads(c["args"], InjectionSpec(credentials=(replace(
                BASE, command=tuple(argv)),)))
