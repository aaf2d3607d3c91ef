"""STS's documented XML: an answer parses into a session, an error yields only a trusted
code, and nothing unusable is echoed. Pure: no AWS."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.aws.sts import parse_error, parse_session
from broker.errors import UpstreamRejected

# AWS's documented AssumeRoleWithWebIdentity answer (STS API reference), trimmed.
STS_ANSWER = b"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>amzn1.account.AF6RHO7KZU5XRVQJGXK6HB56KR2A</SubjectFromWebIdentityToken>
    <Audience>client.5498841531868486423.1548@apps.example.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:app1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <Provider>www.amazon.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""


def test_the_documented_sts_answer_parses_into_a_session():
    s = parse_session(STS_ANSWER)
    assert (
        s.access_key_id,
        s.secret_access_key.reveal(),
        s.session_token.reveal(),
        s.expiration,
        s.assumed_role_id,
        s.arn,
    ) == (
        "ASgeIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
        "AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE",
        datetime(2014, 10, 24, 23, 0, 23, tzinfo=UTC),
        "AROACLKWSDQRAOEXAMPLE:app1",
        "arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1",
    )


STS_ERROR = b"""<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>
    <Message>Couldn't retrieve verification key from your identity provider</Message></Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>"""


@pytest.mark.parametrize(
    "body,code,retryable",
    [
        (STS_ERROR, "InvalidIdentityToken", False),
        (
            STS_ERROR.replace(b"InvalidIdentityToken", b"IDPCommunicationError"),
            "IDPCommunicationError",
            True,
        ),
        (STS_ERROR.replace(b"InvalidIdentityToken", b"<x/>"), "unknown", False),
        (STS_ERROR.replace(b"InvalidIdentityToken", b"Bad Code; rm -rf"), "unknown", False),
        (b"<html>502 Bad Gateway</html>", "unknown", False),
        (b"not xml", "unknown", False),
    ],
    ids=["invalid-token", "idp-unreachable", "nested-code", "odd-code", "proxy-page", "garbage"],
)
def test_sts_errors_yield_only_a_trusted_code(body, code, retryable):
    err = parse_error(body)
    assert (err.code, err.retryable) == (code, retryable)


@pytest.mark.parametrize(
    "body,what",
    [
        (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>', "carries a DTD"),
        (b"<r>" + b"x" * (64 * 1024) + b"</r>", "too large"),
        (b"<AssumeRoleWithWebIdentityResponse><oops", "not XML"),
        (b"<GetCallerIdentityResponse/>", "not an AssumeRoleWithWebIdentity response"),
        (
            STS_ANSWER.replace(
                b"<SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>", b""
            ),
            "SecretAccessKey is missing",
        ),
        (STS_ANSWER.replace(b"2014-10-24T23:00:23Z", b"tomorrow"), "Expiration is not"),
        (STS_ANSWER.replace(b"2014-10-24T23:00:23Z", b"2014-10-24T23:00:23"), "no time zone"),
        (STS_ANSWER.replace(b"ASgeIAIOSFODNN7EXAMPLE", b"AS<b>x</b>"), "AccessKeyId"),
        (STS_ANSWER.replace(b"AROACLKWSDQRAOEXAMPLE:app1", b"AROA"), "AssumedRoleId"),
    ],
    ids=[
        "dtd",
        "oversized",
        "truncated",
        "other-action",
        "no-secret",
        "bad-expiry",
        "naive-expiry",
        "malformed-key-id",
        "malformed-role-id",
    ],
)
def test_unusable_sts_answers_are_refused_without_echo(body, what):
    with pytest.raises(UpstreamRejected) as err:
        parse_session(body)
    assert err.value.code == "aws_sts_bad_response" and what in str(err.value)
    assert b"wJalr" not in str(err.value).encode()
