"""What an SQS message body is to the EC2 termination source: a state change, ignored, or
malformed. Pure: no queue, no broker. The malformed cases are what an attacker who can
write to the queue (or a misrouted rule) would try."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from broker.events.settings import SqsEventSettings
from broker.events.sqs import (
    MAX_BODY_BYTES,
    StateChange,
    parse_state_change,
    poll_backoff,
)

# The example from the EventBridge documentation ("EC2 Instance State-change Notification").
DOCS_SAMPLE = {
    "version": "0",
    "id": "7bf73129-1428-4cd3-a780-95db273d1602",
    "detail-type": "EC2 Instance State-change Notification",
    "source": "aws.ec2",
    "account": "123456789012",
    "time": "2021-11-11T21:29:54Z",
    "region": "us-east-1",
    "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-abcd1111"],
    "detail": {"instance-id": "i-abcd1111", "state": "terminated"},
}
# As EventBridge delivers one to an SQS target: compact JSON, a current 17-digit id.
LONG_ID = "i-0a1b2c3d4e5f60718"
DELIVERED = (
    '{"version":"0","id":"ee376907-2647-4179-9203-343cfb3017a4","detail-type":'
    '"EC2 Instance State-change Notification","source":"aws.ec2","account":"111122223333",'
    '"time":"2025-03-04T10:11:12Z","region":"eu-west-1","resources":["arn:aws:ec2:eu-west-1:'
    f'111122223333:instance/{LONG_ID}"],"detail":{{"instance-id":"{LONG_ID}",'
    '"state":"shutting-down"}}'
)

REASONS = {
    "the message body is not text",
    "the message body is larger than 256 KiB",
    "the message has a duplicate key",
    "the message body is not JSON",
    "the message is not a JSON object",
    "the event's source is not aws.ec2",
    "the event is not an EC2 instance state-change notification",
    "the event's detail is not an object",
    "detail.instance-id is malformed",
    "detail.state is not an EC2 instance state",
    "account is not an AWS account id",
    "region is not an AWS region",
}


def event(**changes: Any) -> dict[str, Any]:
    """The docs sample with top-level changes; ``detail__x`` changes detail.x; a value of
    ``...`` removes the key."""
    out = copy.deepcopy(DOCS_SAMPLE)
    for key, value in changes.items():
        target, name = (out["detail"], key[len("detail__"):]) if key.startswith(
            "detail__") else (out, key)
        name = name.replace("_", "-") if name in ("instance_id", "detail_type") else name
        if value is ...:
            target.pop(name, None)
        else:
            target[name] = value
    return out


def body(*, raw_unicode: bool = False, **changes: Any) -> str:
    return json.dumps(event(**changes), ensure_ascii=not raw_unicode)


def padded(total: int, filler: str = "x") -> str:
    """A valid terminated event padded (in an extra field) to ``total`` bytes of UTF-8."""
    base = body(padding="")
    room = total - len(base.encode())
    assert room % len(filler.encode()) == 0
    return body(padding=filler * (room // len(filler.encode())))


# -- accepted ----------------------------------------------------------------------------

VALID = [
    pytest.param(json.dumps(DOCS_SAMPLE), StateChange(
        "i-abcd1111", "terminated", "123456789012", "us-east-1",
        "7bf73129-1428-4cd3-a780-95db273d1602"), id="eventbridge-docs-sample"),
    pytest.param(DELIVERED, StateChange(
        LONG_ID, "shutting-down", "111122223333", "eu-west-1",
        "ee376907-2647-4179-9203-343cfb3017a4"), id="delivered-shutting-down-17-digits"),
    pytest.param(json.dumps(DOCS_SAMPLE, indent=4), StateChange(
        "i-abcd1111", "terminated", "123456789012", "us-east-1",
        "7bf73129-1428-4cd3-a780-95db273d1602"), id="pretty-printed"),
    pytest.param(json.dumps(DOCS_SAMPLE).replace('"i-abcd1111"', '"\\u0069-abcd1111"'),
                 StateChange("i-abcd1111", "terminated", "123456789012", "us-east-1",
                             "7bf73129-1428-4cd3-a780-95db273d1602"),
                 id="json-escape-of-ascii-is-the-same-id"),
    pytest.param(body(detail={"instance-id": "i-abcd1111", "state": "terminated",
                              "future-field": {"x": [1, 2]}}),
                 StateChange("i-abcd1111", "terminated", "123456789012", "us-east-1",
                             "7bf73129-1428-4cd3-a780-95db273d1602"),
                 id="unknown-detail-fields-allowed"),
    pytest.param(body(id="not a uuid <script>"), StateChange(
        "i-abcd1111", "terminated", "123456789012", "us-east-1", None),
                 id="odd-event-id-dropped-not-fatal"),
    pytest.param(body(id=...), StateChange(
        "i-abcd1111", "terminated", "123456789012", "us-east-1", None), id="no-event-id"),
    pytest.param(body(region="us-gov-west-1"), StateChange(
        "i-abcd1111", "terminated", "123456789012", "us-gov-west-1",
        "7bf73129-1428-4cd3-a780-95db273d1602"), id="govcloud-region"),
    pytest.param(body(region="ap-southeast-2", detail__instance_id="i-0123456789abcdef0"),
                 StateChange("i-0123456789abcdef0", "terminated", "123456789012",
                             "ap-southeast-2", "7bf73129-1428-4cd3-a780-95db273d1602"),
                 id="ap-region-17-digit-id"),
    pytest.param(padded(MAX_BODY_BYTES), StateChange(
        "i-abcd1111", "terminated", "123456789012", "us-east-1",
        "7bf73129-1428-4cd3-a780-95db273d1602"), id="exactly-256KiB"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_state_changes_are_read_in_full(raw: str, expected: StateChange) -> None:
    assert parse_state_change(raw) == expected


@pytest.mark.parametrize("state", ["pending", "running", "stopping", "stopped"])
def test_other_states_are_ignored(state: str) -> None:
    assert parse_state_change(body(detail__state=state)) is None


@pytest.mark.parametrize(("states", "state", "acted"), [
    (("terminated",), "shutting-down", False),
    (("terminated",), "terminated", True),
    (("stopped", "terminated"), "stopped", True),
    (("shutting-down", "terminated"), "running", False),
], ids=["terminated-only-ignores-shutting-down", "terminated-only", "stopped-too",
        "default-ignores-running"])
def test_the_states_acted_on_are_configurable(
        states: tuple[str, ...], state: str, acted: bool) -> None:
    change = parse_state_change(body(detail__state=state), states)
    assert change == (StateChange("i-abcd1111", state, "123456789012", "us-east-1",
                                  "7bf73129-1428-4cd3-a780-95db273d1602") if acted else None)


# -- malformed ---------------------------------------------------------------------------

HUGE = padded(MAX_BODY_BYTES + 2)
# Few characters, many bytes: counted in bytes, as SQS does.
MULTIBYTE = body(padding="é" * (MAX_BODY_BYTES // 2 + 10), raw_unicode=True)
assert len(MULTIBYTE) < MAX_BODY_BYTES < len(MULTIBYTE.encode())
SNS_ENVELOPE = json.dumps({"Type": "Notification", "MessageId": "x", "TopicArn":
                           "arn:aws:sns:us-east-1:123456789012:t", "Message": json.dumps(
                               DOCS_SAMPLE)})

MALFORMED = [
    # not a JSON object
    pytest.param("", id="empty"),
    pytest.param("   \n", id="whitespace"),
    pytest.param("{", id="truncated"),
    pytest.param(json.dumps(DOCS_SAMPLE)[:-1], id="truncated-event"),
    pytest.param(json.dumps(DOCS_SAMPLE) + " x", id="trailing-garbage"),
    pytest.param(json.dumps(DOCS_SAMPLE) + json.dumps(DOCS_SAMPLE), id="two-events"),
    pytest.param("\ufeff" + json.dumps(DOCS_SAMPLE), id="byte-order-mark"),
    pytest.param("null", id="json-null"),
    pytest.param("[]", id="json-array"),
    pytest.param(json.dumps([DOCS_SAMPLE]), id="array-of-events"),
    pytest.param('"terminated"', id="json-string"),
    pytest.param(json.dumps(json.dumps(DOCS_SAMPLE)), id="double-encoded"),
    pytest.param("42", id="json-number"),
    pytest.param("true", id="json-bool"),
    pytest.param("{'source': 'aws.ec2'}", id="python-repr"),
    pytest.param(body()[:-1] + ', "x": NaN}', id="nan-constant"),
    pytest.param(body()[:-1] + ', "x": -Infinity}', id="infinity-constant"),
    pytest.param(body()[:-1] + ', "x": ' + "9" * 5000 + "}", id="huge-integer"),
    pytest.param("[" * 60000 + "]" * 60000, id="deep-nesting"),
    pytest.param(body()[:-1] + ', "x": ' + "[" * 60000 + "]" * 60000 + "}",
                 id="deep-nesting-in-an-event"),
    pytest.param(HUGE, id="over-256KiB"),
    pytest.param(MULTIBYTE, id="over-256KiB-in-bytes-not-characters"),
    pytest.param("x" * (10 * MAX_BODY_BYTES), id="megabytes-of-garbage"),
    pytest.param(SNS_ENVELOPE, id="sns-envelope-not-raw-delivery"),
    pytest.param(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}),
                 id="s3-test-event"),
    # duplicate keys: two parsers could pick different ones
    pytest.param(body()[:-1] + ', "source": "my.app"}', id="duplicate-source"),
    pytest.param(json.dumps(DOCS_SAMPLE).replace(
        '"instance-id": "i-abcd1111"',
        '"instance-id": "i-abcd1111", "instance-id": "i-0123456789abcdef0"'),
        id="duplicate-instance-id"),
    pytest.param(json.dumps(DOCS_SAMPLE).replace(
        '"state": "terminated"', '"state": "running", "state": "terminated"'),
        id="duplicate-state"),
    # source
    pytest.param(body(source=...), id="no-source"),
    pytest.param(body(source="my.app"), id="custom-source"),
    pytest.param(body(source="aws.ec2 "), id="source-trailing-space"),
    pytest.param(body(source="AWS.EC2"), id="source-upper-case"),
    pytest.param(body(source="aws.ec2\u0000"), id="source-nul"),
    pytest.param(body(source="aws.\u0435c2"), id="source-cyrillic-e"),
    pytest.param(body(source=["aws.ec2"]), id="source-list"),
    pytest.param(body(source=None), id="source-null"),
    # detail-type
    pytest.param(body(detail_type=...), id="no-detail-type"),
    pytest.param(body(detail_type="EC2 Instance State-change notification"),
                 id="detail-type-case"),
    pytest.param(body(detail_type="EC2 Instance State-change Notification "),
                 id="detail-type-trailing-space"),
    pytest.param(body(detail_type="EC2 Spot Instance Interruption Warning"),
                 id="spot-interruption-warning"),
    pytest.param(body(detail_type="EC2 Instance Rebalance Recommendation"),
                 id="rebalance-recommendation"),
    pytest.param(body(detail_type="EC2 Instance State\u2011change Notification"),
                 id="detail-type-non-breaking-hyphen"),
    pytest.param(body(detail_type="AWS API Call via CloudTrail"), id="cloudtrail-event"),
    # detail
    pytest.param(body(detail=...), id="no-detail"),
    pytest.param(body(detail=None), id="detail-null"),
    pytest.param(body(detail=[{"instance-id": "i-abcd1111", "state": "terminated"}]),
                 id="detail-list"),
    pytest.param(body(detail=json.dumps({"instance-id": "i-abcd1111", "state": "terminated"})),
                 id="detail-double-encoded"),
    # instance-id
    pytest.param(body(detail__instance_id=...), id="no-instance-id"),
    pytest.param(body(detail__instance_id=None), id="instance-id-null"),
    pytest.param(body(detail__instance_id=""), id="instance-id-empty"),
    pytest.param(body(detail__instance_id=123456789), id="instance-id-number"),
    pytest.param(body(detail__instance_id=["i-abcd1111"]), id="instance-id-list"),
    pytest.param(body(detail__instance_id="i-123/../x"), id="path-traversal"),
    pytest.param(body(detail__instance_id="../../i-abcd1111"), id="leading-traversal"),
    pytest.param(body(detail__instance_id="i-abcd1111/../../sys"), id="trailing-traversal"),
    pytest.param(body(detail__instance_id="i-abcd1111%2F..%2F"), id="percent-encoded-slash"),
    pytest.param(body(detail__instance_id="i-abcd111"), id="7-hex-digits"),
    pytest.param(body(detail__instance_id="i-0123456789abcdef01"), id="18-hex-digits"),
    pytest.param(body(detail__instance_id="i-ABCD1111"), id="upper-case-hex"),
    pytest.param(body(detail__instance_id="I-abcd1111"), id="upper-case-prefix"),
    pytest.param(body(detail__instance_id="i-abcdefgh"), id="not-hex"),
    pytest.param(body(detail__instance_id="i-abcd1111\n"), id="trailing-newline"),
    pytest.param(body(detail__instance_id=" i-abcd1111"), id="leading-space"),
    pytest.param(body(detail__instance_id="i-abcd1111 "), id="trailing-space"),
    pytest.param(body(detail__instance_id="i-abcd1111\u0000"), id="trailing-nul"),
    pytest.param(body(detail__instance_id="i-abcd\u200b1111"), id="zero-width-space"),
    pytest.param(body(detail__instance_id="\u0456-abcd1111"), id="cyrillic-i"),
    pytest.param(body(detail__instance_id="\u0456-abcd1111", raw_unicode=True),
                 id="cyrillic-i-unescaped"),
    pytest.param(body(detail__instance_id="i-abcd\u200b1111", raw_unicode=True),
                 id="zero-width-space-unescaped"),
    pytest.param(body(detail__instance_id="i-abcd1111\u202e", raw_unicode=True),
                 id="right-to-left-override"),
    pytest.param(body(detail__instance_id="i-abcd1111\u0301", raw_unicode=True),
                 id="combining-accent"),
    pytest.param(body(detail__instance_id="i\u2010abcd1111"), id="unicode-hyphen"),
    pytest.param(body(detail__instance_id="i-\uff11\uff12\uff13\uff14abcd"),
                 id="fullwidth-digits"),
    pytest.param(body(detail__instance_id="i-\u0661\u0662\u0663\u0664abcd"),
                 id="arabic-indic-digits"),
    pytest.param(body(detail__instance_id="i-abcd1111\ud800"), id="lone-surrogate"),
    pytest.param(body(detail__instance_id="i-abcd1111:other"), id="colon-suffix"),
    pytest.param(body(detail__instance_id="{account}"), id="format-field-injection"),
    pytest.param(body(detail__instance_id="i-abcd1111' OR '1'='1"), id="sql-ish"),
    pytest.param(body(detail__instance_id="arn:aws:ec2:us-east-1:123456789012:instance/"
                                          "i-abcd1111"), id="arn-not-id"),
    pytest.param(body(detail__instance_id="sir-abcd1111"), id="spot-request-id"),
    pytest.param(body(detail__instance_id="i-" + "a" * 5000), id="very-long-id"),
    # state
    pytest.param(body(detail__state=...), id="no-state"),
    pytest.param(body(detail__state=None), id="state-null"),
    pytest.param(body(detail__state=48), id="state-code-number"),
    pytest.param(body(detail__state={"name": "terminated"}), id="state-object"),
    pytest.param(body(detail__state="TERMINATED"), id="state-upper-case"),
    pytest.param(body(detail__state="terminated "), id="state-trailing-space"),
    pytest.param(body(detail__state="shutting_down"), id="state-underscore"),
    pytest.param(body(detail__state="deleted"), id="state-unknown"),
    pytest.param(body(detail__state="t\u0435rminated"), id="state-cyrillic-e"),
    pytest.param(body(detail__state="running", account="1"), id="ignored-state-bad-account"),
    # account
    pytest.param(body(account=...), id="no-account"),
    pytest.param(body(account=123456789012), id="account-number"),
    pytest.param(body(account="12345678901"), id="account-11-digits"),
    pytest.param(body(account="1234567890123"), id="account-13-digits"),
    pytest.param(body(account="12345678901a"), id="account-letter"),
    pytest.param(body(account="\u0661" * 12), id="account-arabic-indic-digits"),
    pytest.param(body(account="\uff11" * 12), id="account-fullwidth-digits"),
    pytest.param(body(account="123456789012\n"), id="account-trailing-newline"),
    pytest.param(body(account="{instance_id}"), id="account-format-field"),
    # region
    pytest.param(body(region=...), id="no-region"),
    pytest.param(body(region=""), id="region-empty"),
    pytest.param(body(region="US-EAST-1"), id="region-upper-case"),
    pytest.param(body(region="us_east_1"), id="region-underscores"),
    pytest.param(body(region="us-east-1\n"), id="region-trailing-newline"),
    pytest.param(body(region="us-east-1/../x"), id="region-traversal"),
    pytest.param(body(region="us-\u0435ast-1"), id="region-cyrillic-e"),
    pytest.param(body(region=["us-east-1"]), id="region-list"),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_messages_are_refused_without_echoing_them(raw: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_state_change(raw)
    assert str(err.value) in REASONS
    # Also with states that would act on any state: malformed is malformed.
    with pytest.raises(ValueError):
        parse_state_change(raw, ("pending", "running", "stopping", "stopped",
                                 "shutting-down", "terminated"))


@pytest.mark.parametrize("raw", [b'{"source": "aws.ec2"}', None, 42], ids=["bytes", "none",
                                                                            "int"])
def test_a_body_that_is_not_text_is_malformed(raw: Any) -> None:
    with pytest.raises(ValueError, match="not text"):
        parse_state_change(raw)


def test_each_malformed_case_names_its_reason() -> None:
    cases = {
        "the message body is larger than 256 KiB": HUGE,
        "the message has a duplicate key": body()[:-1] + ', "source": "aws.ec2"}',
        "the message body is not JSON": "{",
        "the message is not a JSON object": "[]",
        "the event's source is not aws.ec2": body(source="my.app"),
        "the event is not an EC2 instance state-change notification": body(detail_type="x"),
        "the event's detail is not an object": body(detail=None),
        "detail.instance-id is malformed": body(detail__instance_id="i-123/../x"),
        "detail.state is not an EC2 instance state": body(detail__state="gone"),
        "account is not an AWS account id": body(account="1"),
        "region is not an AWS region": body(region="x"),
    }
    for reason, raw in cases.items():
        with pytest.raises(ValueError) as err:
            parse_state_change(raw)
        assert str(err.value) == reason


# -- the broker's instance id, backoff, configuration -------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    ("{instance_id}", "i-abcd1111"),
    ("aws:{account}:{region}:{instance_id}", "aws:123456789012:us-east-1:i-abcd1111"),
    ("ec2-{region}-{instance_id}", "ec2-us-east-1-i-abcd1111"),
], ids=["plain", "account-region-prefix", "region-prefix"])
def test_broker_instance_id_follows_the_template(template: str, expected: str) -> None:
    change = parse_state_change(json.dumps(DOCS_SAMPLE))
    assert change is not None and change.broker_instance_id(template) == expected


@pytest.mark.parametrize(("failures", "rand", "expected"), [
    (1, 0.0, 0.5), (1, 0.999999, 0.9999995), (2, 0.0, 1.0), (3, 0.0, 2.0),
    (6, 0.0, 15.0), (7, 0.0, 15.0), (7, 0.999999, 29.999985), (10_000, 0.0, 15.0),
], ids=["first-low", "first-high", "second", "third", "capped", "stays-capped",
        "capped-high", "no-overflow"])
def test_poll_backoff_grows_with_jitter_and_is_capped(
        failures: int, rand: float, expected: float) -> None:
    assert poll_backoff(failures, base_s=1.0, max_s=30.0, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize("states", [("Terminated",), ("terminated", "deleted"), ()],
                         ids=["wrong-case", "unknown-state", "none"])
def test_unknown_states_in_settings_are_refused(states: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError, match="expected EC2 instance states"):
        SqsEventSettings(
            queue_url="https://sqs.us-east-1.amazonaws.com/123456789012/ec2-events",
            states=states)
