"""SigV4 signer and STS client: published test vectors, byte equality with botocore, and
AssumeRole against a local fake STS (tests/fake_sts.py) that re-derives every signature."""

import collections
import datetime
import os
import socket
import time
import urllib.parse

import pytest

import botocore.awsrequest
import botocore.session

import mds
from fake_sts import FakeSts

# ---------------------------------------------------------------------------
# AWS Signature Version 4 Test Suite
# Copyright 2019 Amazon.com, Inc. or its affiliates. All Rights Reserved.
# Licensed under the Apache License, Version 2.0. The request inputs and expected
# SignedHeaders/Signature values below are transcribed from the suite's .req/.authz files
# (as shipped in botocore's source distribution, tests/unit/auth/aws4_testsuite); Host and
# X-Amz-Date are the same for every case and added by the driver. For
# get-vanilla-with-session-token the suite puts the token only in the canonical request; it
# is passed to the signer as the session token.
# ---------------------------------------------------------------------------
SUITE_ACCESS_KEY = "AKIDEXAMPLE"
SUITE_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_REGION = "us-east-1"
SUITE_SERVICE = "service"
SUITE_HOST = "example.amazonaws.com"
SUITE_TIME = datetime.datetime(2015, 8, 30, 12, 36, 0, tzinfo=datetime.timezone.utc)

# (case, method, request target, extra headers, body, session token,
#  expected SignedHeaders, expected Signature)
SUITE_CASES = [
    ('get-header-key-duplicate', 'GET', '/', (('My-Header1', 'value2'), ('My-Header1', 'value2'), ('My-Header1', 'value1')), '', None,
     'host;my-header1;x-amz-date', 'c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea'),
    ('get-header-value-multiline', 'GET', '/', (('My-Header1', 'value1\n  value2\n     value3'),), '', None,
     'host;my-header1;x-amz-date', 'cfd34249e4b1c8d6b91ef74165d41a32e5fab3306300901bb65a51a73575eefd'),
    ('get-header-value-order', 'GET', '/', (('My-Header1', 'value4'), ('My-Header1', 'value1'), ('My-Header1', 'value3'), ('My-Header1', 'value2')), '', None,
     'host;my-header1;x-amz-date', '08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01'),
    ('get-header-value-trim', 'GET', '/', (('My-Header1', ' value1'), ('My-Header2', ' "a   b   c"')), '', None,
     'host;my-header1;my-header2;x-amz-date', 'acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736'),
    ('get-unreserved', 'GET', '/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (), '', None,
     'host;x-amz-date', '07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f'),
    ('get-utf8', 'GET', '/ሴ', (), '', None,
     'host;x-amz-date', '8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85'),
    ('get-vanilla', 'GET', '/', (), '', None,
     'host;x-amz-date', '5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31'),
    ('get-vanilla-empty-query-key', 'GET', '/?Param1=value1', (), '', None,
     'host;x-amz-date', 'a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb'),
    ('get-vanilla-query', 'GET', '/', (), '', None,
     'host;x-amz-date', '5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31'),
    ('get-vanilla-query-order-encoded', 'GET', '/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1', (), '', None,
     'host;x-amz-date', '371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac'),
    ('get-vanilla-query-order-key', 'GET', '/?Param1=value2&Param1=Value1', (), '', None,
     'host;x-amz-date', 'eedbc4e291e521cf13422ffca22be7d2eb8146eecf653089df300a15b2382bd1'),
    ('get-vanilla-query-order-key-case', 'GET', '/?Param2=value2&Param1=value1', (), '', None,
     'host;x-amz-date', 'b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500'),
    ('get-vanilla-query-order-value', 'GET', '/?Param1=value2&Param1=value1', (), '', None,
     'host;x-amz-date', '5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694'),
    ('get-vanilla-query-unreserved', 'GET', '/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (), '', None,
     'host;x-amz-date', '9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197'),
    ('get-vanilla-utf8-query', 'GET', '/?ሴ=bar', (), '', None,
     'host;x-amz-date', '2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04'),
    ('get-vanilla-with-session-token', 'GET', '/', (), '', '6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267',
     'host;x-amz-date;x-amz-security-token', '07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8'),
    ('normalize-path/get-relative', 'GET', '/example/..', (), '', None,
     'host;x-amz-date', '5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31'),
    ('normalize-path/get-relative-relative', 'GET', '/example1/example2/../..', (), '', None,
     'host;x-amz-date', '5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31'),
    ('normalize-path/get-slash', 'GET', '//', (), '', None,
     'host;x-amz-date', '5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31'),
    ('normalize-path/get-slash-dot-slash', 'GET', '/./', (), '', None,
     'host;x-amz-date', '5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31'),
    ('normalize-path/get-slash-pointless-dot', 'GET', '/./example', (), '', None,
     'host;x-amz-date', 'ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5'),
    ('normalize-path/get-slashes', 'GET', '//example//', (), '', None,
     'host;x-amz-date', '9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84'),
    ('normalize-path/get-space', 'GET', '/example space/', (), '', None,
     'host;x-amz-date', '652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741'),
    ('normalize-path/get-special-character', 'GET', '/example/$delete', (), '', None,
     'host;x-amz-date', 'a853c9b21b528b19643d00910d35b83a10c366a10833ceefb45edd6c80e40f27'),
    ('post-header-key-case', 'POST', '/', (), '', None,
     'host;x-amz-date', '5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b'),
    ('post-header-key-sort', 'POST', '/', (('My-Header1', 'value1'),), '', None,
     'host;my-header1;x-amz-date', 'c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c'),
    ('post-header-value-case', 'POST', '/', (('My-Header1', 'VALUE1'),), '', None,
     'host;my-header1;x-amz-date', 'cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d'),
    ('post-sts-token/post-sts-header-after', 'POST', '/', (), '', None,
     'host;x-amz-date', '5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b'),
    ('post-sts-token/post-sts-header-before', 'POST', '/', (), '', 'AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==',
     'host;x-amz-date;x-amz-security-token', '85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead'),
    ('post-vanilla', 'POST', '/', (), '', None,
     'host;x-amz-date', '5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b'),
    ('post-vanilla-empty-query-value', 'POST', '/?Param1=value1', (), '', None,
     'host;x-amz-date', '28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11'),
    ('post-vanilla-query', 'POST', '/?Param1=value1', (), '', None,
     'host;x-amz-date', '28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11'),
    ('post-x-www-form-urlencoded', 'POST', '/', (('Content-Type', 'application/x-www-form-urlencoded'),), 'Param1=value1', None,
     'content-type;host;x-amz-date', 'ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a'),
    ('post-x-www-form-urlencoded-parameters', 'POST', '/', (('Content-Type', 'application/x-www-form-urlencoded; charset=utf8'),), 'Param1=value1', None,
     'content-type;host;x-amz-date', '1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe'),
]


def test_suite_has_every_published_case():
    assert len(SUITE_CASES) == 34
    assert len({case[0] for case in SUITE_CASES}) == 34


@pytest.mark.parametrize("case", SUITE_CASES, ids=[c[0] for c in SUITE_CASES])
def test_published_sigv4_vectors(case):
    name, method, target, headers, body, token, signed_headers, signature = case
    headers = [("Host", SUITE_HOST)] + list(headers) + [("X-Amz-Date", "20150830T123600Z")]
    added = mds.sigv4_sign(method, "https://" + SUITE_HOST + target, headers,
                           body.encode("utf-8"), SUITE_REGION, SUITE_SERVICE,
                           SUITE_ACCESS_KEY, SUITE_SECRET_KEY, session_token=token,
                           now=SUITE_TIME)
    assert added["X-Amz-Date"] == "20150830T123600Z"
    assert added["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=%s, Signature=%s" % (signed_headers, signature))
    if token:
        assert added["X-Amz-Security-Token"] == token
    else:
        assert "X-Amz-Security-Token" not in added


def test_signer_accepts_epoch_and_naive_datetime_clocks():
    epoch = SUITE_TIME.timestamp()
    naive = SUITE_TIME.replace(tzinfo=None)
    results = [mds.sigv4_sign("GET", "https://example.amazonaws.com/", {}, b"", "us-east-1",
                              "service", SUITE_ACCESS_KEY, SUITE_SECRET_KEY, now=clock)
               for clock in (epoch, naive, SUITE_TIME)]
    assert results[0] == results[1] == results[2]
    # get-vanilla: the signer derives Host from the URL when it is not given.
    assert results[0]["Authorization"].endswith(
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")


def test_host_keeps_non_default_port_only():
    def canonical_host(url):
        canonical, _ = mds.sigv4_canonical_request("POST", url, {}, b"", "20150830T123600Z")
        return [line for line in canonical.split("\n") if line.startswith("host:")][0]

    assert canonical_host("https://sts.amazonaws.com:443/") == "host:sts.amazonaws.com"
    assert canonical_host("http://127.0.0.1:80/") == "host:127.0.0.1"
    assert canonical_host("http://127.0.0.1:8443/") == "host:127.0.0.1:8443"
    assert canonical_host("https://[::1]:9000/") == "host:[::1]:9000"


# ---------------------------------------------------------------------------
# Byte equality with botocore for AssumeRole
# ---------------------------------------------------------------------------

class _CannedBody(object):
    def __init__(self, payload):
        self._payload = payload

    def stream(self, **kwargs):
        yield self._payload


_CANNED_ASSUME_ROLE = b"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult><AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/demo/s1</Arn>
<AssumedRoleId>AROAEXAMPLE:s1</AssumedRoleId></AssumedRoleUser><Credentials>
<AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>x</SecretAccessKey>
<SessionToken>y</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials>
</AssumeRoleResult></AssumeRoleResponse>"""


def _botocore_assume_role_request(region, access_key, secret_key, token, role_arn, session):
    """The AssumeRole request botocore signs, captured before it would be sent."""
    session_obj = botocore.session.Session()
    session_obj.set_config_variable("config_file", os.devnull)
    session_obj.set_config_variable("credentials_file", os.devnull)
    client = session_obj.create_client(
        "sts", region_name=region, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, aws_session_token=token)
    captured = []

    def before_send(request, **kwargs):
        captured.append(request)
        return botocore.awsrequest.AWSResponse(request.url, 200, {},
                                               _CannedBody(_CANNED_ASSUME_ROLE))

    client.meta.events.register("before-send.sts.AssumeRole", before_send)
    answer = client.assume_role(RoleArn=role_arn, RoleSessionName=session,
                                DurationSeconds=3600)
    assert answer["Credentials"]["AccessKeyId"] == "ASIAEXAMPLE"
    assert len(captured) == 1
    return captured[0]


BOTOCORE_CASES = [
    # (region given to botocore, region given to mds, session token)
    ("us-east-1", "us-east-1", None),
    ("eu-west-1", "eu-west-1", "FwoGZXIvYXdzEJr//////////wEaDEXAMPLETOKEN+/="),
    ("aws-global", None, None),
    ("ap-southeast-2", "ap-southeast-2", "token with  a space"),
]


@pytest.mark.parametrize("botocore_region, mds_region, token", BOTOCORE_CASES,
                         ids=[c[0] for c in BOTOCORE_CASES])
def test_assume_role_request_is_byte_identical_to_botocore(botocore_region, mds_region, token):
    role_arn = "arn:aws:iam::123456789012:role/demo"
    sent = _botocore_assume_role_request(botocore_region, "AKIDEXAMPLE", SUITE_SECRET_KEY,
                                         token, role_arn, "s1")
    amz_date = sent.headers["X-Amz-Date"]
    amz_date = amz_date.decode() if isinstance(amz_date, bytes) else amz_date
    signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    keys = mds.AwsKeys("AKIDEXAMPLE", SUITE_SECRET_KEY, token, None, "test")
    params = [("Action", "AssumeRole"), ("Version", "2011-06-15"), ("RoleArn", role_arn),
              ("RoleSessionName", "s1"), ("DurationSeconds", "3600")]
    url, headers, body = mds.sts_build_request(collections.OrderedDict(params), keys,
                                               region=mds_region, now=signed_at)

    def text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value

    assert url == sent.url
    assert body == (sent.body if isinstance(sent.body, bytes) else sent.body.encode("utf-8"))
    assert headers["Authorization"] == text(sent.headers["Authorization"])
    assert headers["X-Amz-Date"] == amz_date
    assert headers["Content-Type"] == text(sent.headers["Content-Type"])
    if token:
        assert headers["X-Amz-Security-Token"] == text(sent.headers["X-Amz-Security-Token"])
    else:
        assert "X-Amz-Security-Token" not in headers
    expected_host = {"aws-global": "sts.amazonaws.com"}.get(
        botocore_region, "sts.%s.amazonaws.com" % botocore_region)
    assert url == "https://%s/" % expected_host
    scope_region = mds_region or "us-east-1"
    assert "/%s/sts/aws4_request" % scope_region in headers["Authorization"]


# ---------------------------------------------------------------------------
# STS client against the fake STS
# ---------------------------------------------------------------------------

SOURCE = mds.AwsKeys("AKIASOURCEEXAMPLE", "source/secret+key", None, None, "test")
SESSION_SOURCE = mds.AwsKeys("ASIASOURCEEXAMPLE", "session/secret", "session token==", None,
                             "test")


@pytest.fixture
def fake_sts():
    with FakeSts({SOURCE.access_key: (SOURCE.secret_key, None),
                  SESSION_SOURCE.access_key: (SESSION_SOURCE.secret_key,
                                              SESSION_SOURCE.session_token)},
                 region="eu-west-1") as sts:
        yield sts


def test_assume_role_against_fake_sts(fake_sts):
    before = time.time()
    creds = mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", SOURCE,
                                session_name="mds-test", region="eu-west-1",
                                endpoint=fake_sts.url, duration=1800)
    assert fake_sts.calls == 1
    request = fake_sts.requests[0]
    assert request["accepted"] and request["error_code"] is None
    assert request["params"] == {"Action": "AssumeRole", "Version": "2011-06-15",
                                 "RoleArn": "arn:aws:iam::123456789012:role/demo",
                                 "RoleSessionName": "mds-test", "DurationSeconds": "1800"}
    issued_key, issued_secret, issued_token, issued_expiry = fake_sts.issued[0]
    assert creds["AccessKeyId"] == issued_key
    assert creds["SecretAccessKey"] == issued_secret
    assert creds["Token"] == issued_token
    assert abs(creds["Expiration"] - (before + 1800)) < 5
    assert creds["AssumedRoleArn"] == "arn:aws:sts::123456789012:assumed-role/demo/mds-test"


def test_assume_role_with_session_token_source(fake_sts):
    creds = mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", SESSION_SOURCE,
                                region="eu-west-1", endpoint=fake_sts.url)
    assert creds["AccessKeyId"].startswith("ASIA")
    headers = {k.lower(): v for k, v in fake_sts.requests[0]["headers"].items()}
    assert headers["x-amz-security-token"] == "session token=="
    assert "x-amz-security-token" in headers["authorization"]


def test_get_session_token_against_fake_sts(fake_sts):
    creds = mds.sts_get_session_token(SOURCE, region="eu-west-1", endpoint=fake_sts.url,
                                      duration=900)
    assert fake_sts.requests[0]["params"]["Action"] == "GetSessionToken"
    assert creds["Token"] == fake_sts.issued[0][2]


@pytest.mark.parametrize("keys, region, code", [
    (mds.AwsKeys(SOURCE.access_key, "wrong-secret", None, None, "t"), "eu-west-1",
     "SignatureDoesNotMatch"),
    (mds.AwsKeys("AKIAUNKNOWN", "whatever", None, None, "t"), "eu-west-1",
     "InvalidClientTokenId"),
    (SOURCE, "us-west-2", "SignatureDoesNotMatch"),  # scope names the wrong region
])
def test_bad_signatures_are_rejected_with_sts_error(fake_sts, keys, region, code):
    with pytest.raises(mds.CredentialError) as raised:
        mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", keys, region=region,
                            endpoint=fake_sts.url)
    assert code in str(raised.value)
    assert "HTTP 403" in str(raised.value)
    assert fake_sts.calls == 0
    assert fake_sts.requests[0]["error_code"] == code
    # The error names the cause but never a secret.
    assert keys.secret_key not in str(raised.value)


def test_sts_error_on_demand_and_unreachable(fake_sts):
    fake_sts.fail_next(1, status=403, code="AccessDenied")
    with pytest.raises(mds.CredentialError) as raised:
        mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", SOURCE, region="eu-west-1",
                            endpoint=fake_sts.url)
    assert "AccessDenied" in str(raised.value)
    # Next call succeeds again.
    mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", SOURCE, region="eu-west-1",
                        endpoint=fake_sts.url)
    assert fake_sts.calls == 1

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(mds.CredentialError) as raised:
        mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", SOURCE, region="eu-west-1",
                            endpoint="http://127.0.0.1:%d/" % port, timeout=2)
    assert "unreachable" in str(raised.value)


def test_imds_time_round_trip():
    assert mds.format_imds_time(0) == "1970-01-01T00:00:00Z"
    assert mds.parse_imds_time("2026-11-22T19:00:00Z") == mds.parse_imds_time(
        "2026-11-22T19:00:00.123+00:00")
    assert mds.parse_imds_time("2026-11-22T20:00:00+01:00") == mds.parse_imds_time(
        "2026-11-22T19:00:00Z")
    with pytest.raises(ValueError):
        mds.parse_imds_time("22 Nov 2026")


def test_an_sts_error_quoting_the_callers_own_keys_is_masked(fake_sts):
    # An error message that echoes the session token (as a presigned URL would, percent-
    # encoded) or the secret key must not carry them on to IMDS clients or the log.
    quoted = urllib.parse.quote(SESSION_SOURCE.session_token, safe="")
    fake_sts.fail_next(status=403, code="SignatureDoesNotMatch", message=(
        "secret %s; see https://sts.example/x?X-Amz-Security-Token=%s; token %s"
        % (SESSION_SOURCE.secret_key, quoted, SESSION_SOURCE.session_token)))
    with pytest.raises(mds.CredentialError) as caught:
        mds.sts_assume_role("arn:aws:iam::123456789012:role/demo", SESSION_SOURCE,
                            region="eu-west-1", endpoint=fake_sts.url)
    message = str(caught.value)
    assert "SignatureDoesNotMatch" in message and "https://sts.example/x" in message
    for secret in (SESSION_SOURCE.secret_key, SESSION_SOURCE.session_token, quoted):
        assert secret not in message
