"""Wire-level tests of the EC2 flavor: every status code, header and path rule of the spec
(shared/spec/aws.md), credentials from every source, per-client roles, events, the ECS
endpoint and the signed instance identity document."""

import argparse
import base64
import collections
import email.utils
import http.client
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import mds
from clients import require_tool
from fake_sts import FakeSts

IMDS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
TOKEN_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


def call(server, method, path, headers=None, source=None, body=None):
    """One raw HTTP exchange: (status, lower-cased headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def get(server, path, **kwargs):
    return call(server, "GET", path, **kwargs)


def text(server, path, **kwargs):
    status, _, body = get(server, path, **kwargs)
    assert status == 200, (path, status, body)
    return body.decode("utf-8")


def put_token(server, ttl="21600", **kwargs):
    status, headers, body = call(server, "PUT", "/latest/api/token",
                                 headers={TOKEN_TTL: ttl}, **kwargs)
    assert status == 200, (status, body)
    return body.decode("ascii")


@pytest.fixture
def ec2(mds_server_factory):
    def start(config=None, **options):
        return mds_server_factory(config=config, flavor="ec2", options=options)
    return start


# ---------------------------------------------------------------------------
# Default instance, headers, listings
# ---------------------------------------------------------------------------

def test_default_instance_is_plausible_and_consistent(ec2):
    server = ec2()
    status, headers, body = get(server, "/latest/meta-data/")
    assert status == 200
    assert headers["server"] == "EC2ws"
    assert headers["content-type"] == "text/plain"
    listing = body.decode()
    assert not listing.endswith("\n")
    entries = listing.split("\n")
    assert entries == sorted(entries)
    for expected in ("ami-id", "instance-id", "instance-type", "local-ipv4", "public-ipv4",
                     "mac", "hostname", "network/", "placement/", "iam/",
                     "block-device-mapping/", "events/", "services/"):
        assert expected in entries
    for absent in ("spot/", "tags/", "autoscaling/", "public-keys/"):
        assert absent not in entries

    zone = text(server, "/latest/meta-data/placement/availability-zone")
    region = text(server, "/latest/meta-data/placement/region")
    zone_id = text(server, "/latest/meta-data/placement/availability-zone-id")
    assert zone[:-1] == region and zone.startswith(region)
    assert re.match(r"^[a-z]+\d-az\d$", zone_id)
    assert re.match(r"^i-[0-9a-f]{17}$", text(server, "/latest/meta-data/instance-id"))
    assert re.match(r"^ami-[0-9a-f]{17}$", text(server, "/latest/meta-data/ami-id"))
    local_ip = text(server, "/latest/meta-data/local-ipv4")
    public_ip = text(server, "/latest/meta-data/public-ipv4")
    ipaddress.ip_address(local_ip)
    ipaddress.ip_address(public_ip)
    hostname = text(server, "/latest/meta-data/hostname")
    assert hostname.startswith("ip-" + local_ip.replace(".", "-") + ".")
    mac = text(server, "/latest/meta-data/mac")
    assert re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", mac)
    assert text(server, "/latest/meta-data/network/interfaces/macs/") == mac + "/"
    base = "/latest/meta-data/network/interfaces/macs/%s/" % mac
    assert text(server, base + "local-ipv4s") == local_ip
    assert text(server, base + "public-ipv4s") == public_ip
    assert text(server, base + "ipv4-associations/" + public_ip) == local_ip
    assert text(server, base + "mac") == mac

    document = json.loads(text(server, "/latest/dynamic/instance-identity/document"))
    assert document["region"] == region
    assert document["availabilityZone"] == zone
    assert document["instanceId"] == text(server, "/latest/meta-data/instance-id")
    assert document["imageId"] == text(server, "/latest/meta-data/ami-id")
    assert document["privateIp"] == local_ip
    assert document["kernelId"] is None and document["billingProducts"] is None
    assert IMDS_TIME.match(document["pendingTime"])

    role = text(server, "/latest/meta-data/iam/security-credentials/")
    info = json.loads(text(server, "/latest/meta-data/iam/info"))
    assert info["Code"] == "Success"
    assert info["InstanceProfileArn"].rsplit("/", 1)[-1] == role
    assert re.match(r"^arn:aws:iam::%s:instance-profile/" % document["accountId"],
                    info["InstanceProfileArn"])
    assert info["InstanceProfileId"].startswith("AIPA")
    assert server.env == {"AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url + "/"}


def test_region_follows_configuration_everywhere(ec2):
    server = ec2(config={"ec2": {"meta-data": {"placement": {"region": "eu-west-1"}}}})
    assert text(server, "/latest/meta-data/placement/availability-zone") == "eu-west-1a"
    assert text(server, "/latest/meta-data/placement/availability-zone-id").startswith("euw1-")
    document = json.loads(text(server, "/latest/dynamic/instance-identity/document"))
    assert (document["region"], document["availabilityZone"]) == ("eu-west-1", "eu-west-1a")
    assert text(server, "/latest/meta-data/hostname").endswith(".eu-west-1.compute.internal")

    # A runtime update moves every derived value along; a contradiction is refused and the
    # previous tree keeps serving.
    with pytest.raises(mds.ConfigError):
        server.update("meta-data/placement/availability-zone", "ap-southeast-2c")
    assert text(server, "/latest/meta-data/placement/region") == "eu-west-1"
    server.update("meta-data/placement", {"availability-zone": "ap-southeast-2c"})
    assert text(server, "/latest/meta-data/placement/region") == "ap-southeast-2"
    document = json.loads(text(server, "/latest/dynamic/instance-identity/document"))
    assert document["region"] == "ap-southeast-2"
    assert document["availabilityZone"] == "ap-southeast-2c"


def test_a_local_zone_belongs_to_its_parent_region(ec2):
    # Local and Wavelength Zones carry a group in their name ("us-west-2-lax-1a"); the region
    # is still us-west-2, and SDKs take it from the identity document.
    server = ec2(config={"ec2": {"meta-data": {"placement": {
        "availability-zone": "us-west-2-lax-1a"}}}})
    assert text(server, "/latest/meta-data/placement/region") == "us-west-2"
    assert text(server, "/latest/meta-data/placement/availability-zone-id") == "usw2-lax1-az1"
    document = json.loads(text(server, "/latest/dynamic/instance-identity/document"))
    assert (document["region"], document["availabilityZone"]) == ("us-west-2", "us-west-2-lax-1a")
    assert text(server, "/latest/meta-data/hostname").endswith(".us-west-2.compute.internal")


def test_a_document_without_an_ec2_section_is_refused(ec2):
    with pytest.raises(mds.ConfigError, match='no "ec2" section'):
        ec2(config={"EC2": {"meta-data": {}}})


@pytest.mark.parametrize("config, words", [
    ({"ec2": {"meta-data": {"events": "none"}}}, "events"),
    ({"ec2": {"meta-data": {"events": {"maintenance": ["a", "b"]}}}}, "events"),
    ({"ec2": {}, "mds": {"ec2": {"role": 5}}}, '"role"'),
    ({"ec2": {}, "mds": {"ec2": {"role": ""}}}, '"role"'),
    ({"ec2": {}, "mds": {"ec2": {"clients": {"127.0.0.1": 7}}}}, "clients"),
    ({"ec2": {}, "mds": {"ec2": {"events": {"autoscaling": {"state": 5}}}}}, "autoscaling.state"),
    ({"ec2": {}, "mds": {"ec2": {"ecs": {"auth_token": 12345}}}}, "auth_token"),
    ({"ec2": {}, "mds": {"ec2": {"ecs": {"path": "mds/creds"}}}}, "path"),
    ({"ec2": {}, "mds": {"ec2": {"roles": {"r": {"role_arn": "bad"}}}}}, "role_arn"),
    ({"ec2": {}, "mds": {"ec2": {"imdsv2_required": "false"}}}, "imdsv2_required"),
    ({"ec2": {}, "mds": {"ec2": {"events": {"spot": {"at": -1e17}}}}}, "out of range"),
    ({"ec2": {}, "mds": {"ec2": {"events": {"spot": {"notice": "soon"}}}}}, "notice"),
    ({"ec2": {"meta-data": {"local-ipv4": ["10.0.0.1", "10.0.0.2"]}}}, "local-ipv4"),
    ({"ec2": {"meta-data": {"public-keys": {"k": {"not": "a key"}}}}}, "public-keys"),
    ({"ec2": {"meta-data": {"local-hostname": ["a", "b"]}}}, "local-hostname"),
    ({"ec2": {}, "mds": {"ec2": {"account_id": {"a": 1}}}}, "account_id"),
    ({"ec2": {}, "mds": {"ec2": {"account_id": "abc"}}}, "account_id"),
    ({"ec2": {}, "mds": {"ec2": {"account_id": 12345678901}}}, "account_id"),   # a lost 0
    # The ECS path is matched first: under an IMDS path it would take that path over.
    ({"ec2": {}, "mds": {"ec2": {"ecs": {"path": "/latest/meta-data/instance-id"}}}}, "path"),
    ({"ec2": {}, "mds": {"ec2": {"ecs": {"path": "/2021-07-15/x"}}}}, "path"),
    ({"ec2": {}, "mds": {"ec2": {"ecs": {"path": "/"}}}}, "path"),
])
def test_settings_that_would_break_requests_are_refused_when_loaded(ec2, config, words):
    # Each of these used to load and then answer 500 (or drop the connection) on requests.
    with pytest.raises(mds.ConfigError) as caught:
        ec2(config=config)
    assert words in str(caught.value)


def test_loose_but_meaningful_ec2_settings_are_understood(ec2):
    server = ec2(config={"ec2": {"meta-data": {
        "placement": None,
        "public-keys": {"gone": None, "kept": {"openssh-key": "ssh-ed25519 AAAA kept"}}}},
        "mds": {"ec2": {"clients": {"::ffff:127.0.0.1": "batch"},
                        "events": {"spot": {"after": 0, "notice": "2m"}}}}})
    assert text(server, "/latest/meta-data/public-keys/") == "0=kept"
    assert text(server, "/latest/meta-data/public-keys/0/openssh-key") == \
        "ssh-ed25519 AAAA kept"
    # A client written as an IPv4-mapped address matches the IPv4 client.
    assert text(server, "/latest/meta-data/iam/security-credentials/") == "batch"
    action = json.loads(text(server, "/latest/meta-data/spot/instance-action"))
    assert 100 < mds.parse_imds_time(action["time"]) - time.time() <= 121


def test_account_ids_keep_their_digits_everywhere(ec2):
    for written in ("012345678901", 210987654321):
        server = ec2(config={"ec2": {}, "mds": {"ec2": {"account_id": written}}})
        account = str(written)
        document = json.loads(text(server, "/latest/dynamic/instance-identity/document"))
        assert document["accountId"] == account
        info = json.loads(text(server, "/latest/meta-data/iam/info"))
        assert info["InstanceProfileArn"].split(":")[4] == account
        mac = text(server, "/latest/meta-data/mac")
        assert text(server, "/latest/meta-data/network/interfaces/macs/%s/owner-id" % mac) \
            == account


def test_a_configured_local_hostname_is_the_hostname_everywhere(ec2):
    # Resource-name hostnames: EC2 serves the same name as hostname, local-hostname and the
    # interface's local-hostname.
    name = "i-0a1b2c3d4e5f67890.us-west-2.compute.internal"
    server = ec2(config={"ec2": {"meta-data": {"local-hostname": name}}})
    mac = text(server, "/latest/meta-data/mac")
    assert text(server, "/latest/meta-data/local-hostname") == name
    assert text(server, "/latest/meta-data/hostname") == name
    assert text(server, "/latest/meta-data/network/interfaces/macs/%s/local-hostname" % mac) \
        == name


def test_runtime_updates_address_list_elements_by_index(ec2):
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"events": {"maintenance": [
        {"after": 0, "code": "system-reboot", "starts_in": 3600}]}}}})
    server.update("mds/ec2/events/maintenance/0/code", "instance-stop")
    scheduled = json.loads(text(server, "/latest/meta-data/events/maintenance/scheduled"))
    assert scheduled[0]["Code"] == "instance-stop"
    with pytest.raises(mds.ConfigError):
        server.update("mds/ec2/events/maintenance/5/code", "x")


def test_inconsistent_placement_is_refused(ec2):
    with pytest.raises(mds.ConfigError, match="not in region"):
        ec2(config={"ec2": {"meta-data": {"placement": {
            "region": "us-west-2", "availability-zone": "us-east-1b"}}}})
    with pytest.raises(mds.ConfigError, match="iam"):
        ec2(config={"ec2": {"meta-data": {"iam": {"info": "x"}}}})


def test_versions_and_dated_paths(ec2):
    server = ec2()
    versions = text(server, "/")
    assert not versions.endswith("\n")
    lines = versions.split("\n")
    assert lines[0] == "1.0" and lines[-1] == "latest" and "2009-04-04" in lines
    assert lines == sorted(lines)
    assert text(server, "/latest/") == "dynamic\nmeta-data"
    assert text(server, "/latest") == "dynamic\nmeta-data"
    assert text(server, "/2009-04-04/") == "dynamic\nmeta-data"
    assert text(server, "/2009-04-04/meta-data/instance-id") == \
        text(server, "/latest/meta-data/instance-id")
    status, headers, body = get(server, "/1999-01-01/meta-data/")
    assert status == 404


def test_trailing_slash_rules(ec2):
    server = ec2(config={"ec2": {"user-data": "#!/bin/sh\necho hi\n"}})
    with_slash = text(server, "/latest/meta-data/placement/")
    assert text(server, "/latest/meta-data/placement") == with_slash
    assert with_slash == "availability-zone\navailability-zone-id\nregion"
    zone = text(server, "/latest/meta-data/placement/availability-zone")
    assert text(server, "/latest/meta-data/placement/availability-zone/") == zone
    role = text(server, "/latest/meta-data/iam/security-credentials")
    assert role == text(server, "/latest/meta-data/iam/security-credentials/")
    assert json.loads(text(server, "/latest/meta-data/iam/security-credentials/%s/" % role))[
        "Code"] == "Success"
    status, headers, body = get(server, "/latest/user-data/")
    assert (status, body) == (200, b"#!/bin/sh\necho hi\n")
    # Double slashes are tolerated like on EC2.
    assert text(server, "/latest/meta-data//placement//region") == \
        text(server, "/latest/meta-data/placement/region")


def test_not_found_page(ec2):
    server = ec2()
    for path in ("/latest/meta-data/nope", "/latest/meta-data/spot/instance-action",
                 "/latest/user-data", "/nothing", "/latest/meta-data/instance-id/extra"):
        status, headers, body = get(server, path)
        assert status == 404, path
        assert headers["server"] == "EC2ws"
        assert b"<title>404 - Not Found</title>" in body
        assert body.startswith(b'<?xml version="1.0" encoding="iso-8859-1"?>')


def test_answers_carry_last_modified_of_the_tree(ec2):
    server = ec2(config={"ec2": {"user-data": "#!/bin/sh\n"}})
    started = time.time()
    stamps = set()
    for path in ("/latest/meta-data/instance-id", "/latest/meta-data/", "/latest/user-data",
                 "/latest/dynamic/instance-identity/document"):
        status, headers, _ = get(server, path)
        assert status == 200, path
        assert headers["last-modified"].endswith(" GMT"), headers
        stamps.add(headers["last-modified"])
    assert len(stamps) == 1
    (stamp,) = stamps
    assert abs(email.utils.parsedate_to_datetime(stamp).timestamp() - started) < 5
    assert "last-modified" not in get(server, "/latest/meta-data/nope")[1]
    time.sleep(1.1)                      # HTTP dates have whole seconds
    server.update("meta-data/instance-id", "i-0123456789abcdef0")
    later = get(server, "/latest/meta-data/instance-id")[1]["last-modified"]
    assert (email.utils.parsedate_to_datetime(later)
            > email.utils.parsedate_to_datetime(stamp))


def test_user_data_bytes_and_content_type(ec2):
    raw = bytes(range(256))
    server = ec2(config={"ec2": {"user-data": {"base64": base64.b64encode(raw).decode()}}})
    status, headers, body = get(server, "/latest/user-data")
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert body == raw
    assert text(server, "/latest/") == "dynamic\nmeta-data\nuser-data"


def test_user_data_base64_may_be_wrapped_like_the_base64_command_writes_it(ec2):
    raw = bytes(range(256)) * 2
    wrapped = base64.encodebytes(raw).decode()          # 76-column lines, as `base64 file`
    assert "\n" in wrapped.strip()
    server = ec2(config={"ec2": {"user-data": {"base64": wrapped}}})
    assert get(server, "/latest/user-data")[2] == raw
    with pytest.raises(mds.ConfigError, match="not valid base64"):
        ec2(config={"ec2": {"user-data": {"base64": wrapped.replace("A", "*", 1)}}})
    with pytest.raises(mds.ConfigError, match="not valid base64"):
        ec2(config={"ec2": {"user-data": {"base64": 42}}})


def test_head_and_other_methods(ec2):
    server = ec2()
    status, headers, body = call(server, "HEAD", "/latest/meta-data/instance-id")
    assert status == 200 and body == b""
    assert int(headers["content-length"]) == len(text(server, "/latest/meta-data/instance-id"))
    status, headers, body = call(server, "POST", "/latest/meta-data/instance-id", body=b"")
    assert status == 405
    status, headers, body = call(server, "PUT", "/latest/meta-data/instance-id", body=b"",
                                 headers={TOKEN_TTL: "60"})
    assert status == 405


def test_custom_paths_tags_and_public_keys(ec2):
    server = ec2(config={"ec2": {"meta-data": {
        "tags": {"instance": {"Name": "web-1", "team": "infra"}},
        "public-keys": {"my-key": "ssh-ed25519 AAAAC3Nza my-key"},
        "security-groups": ["default", "web"],
        "custom": {"deep": {"value": 42}},
        "public-ipv4": None,
    }}})
    listing = text(server, "/latest/meta-data/").split("\n")
    assert "tags/" in listing and "public-keys/" in listing and "custom/" in listing
    assert "public-ipv4" not in listing and "public-hostname" not in listing
    assert get(server, "/latest/meta-data/public-ipv4")[0] == 404
    assert text(server, "/latest/meta-data/tags/instance") == "Name\nteam"
    assert text(server, "/latest/meta-data/tags/instance/Name") == "web-1"
    assert text(server, "/latest/meta-data/public-keys/") == "0=my-key"
    assert text(server, "/latest/meta-data/public-keys/0/") == "openssh-key"
    assert text(server, "/latest/meta-data/public-keys/0/openssh-key") == \
        "ssh-ed25519 AAAAC3Nza my-key"
    assert text(server, "/latest/meta-data/security-groups") == "default\nweb"
    assert text(server, "/latest/meta-data/custom/deep/value") == "42"


# ---------------------------------------------------------------------------
# IMDSv2 tokens
# ---------------------------------------------------------------------------

def test_token_put(ec2):
    server = ec2()
    status, headers, body = call(server, "PUT", "/latest/api/token", headers={TOKEN_TTL: "300"})
    assert status == 200
    assert headers[TOKEN_TTL.lower()] == "300"
    assert headers["content-type"] == "text/plain"
    assert headers["server"] == "EC2ws"
    assert len(body) == 56 and re.match(rb"^[A-Za-z0-9_=-]+$", body)
    assert put_token(server, "300") != body.decode()


@pytest.mark.parametrize("ttl", [None, "", "0", "-1", "21601", "abc", "1.5", "99999999"])
def test_token_put_with_bad_ttl_is_400(ec2, ttl):
    server = ec2()
    headers = {} if ttl is None else {TOKEN_TTL: ttl}
    status, _, _ = call(server, "PUT", "/latest/api/token", headers=headers)
    assert status == 400


@pytest.mark.parametrize("ttl, seconds", [("1", "1"), ("21600", "21600"), ("0021600", "21600")])
def test_token_ttl_bounds_are_accepted(ec2, ttl, seconds):
    server = ec2()
    status, headers, _ = call(server, "PUT", "/latest/api/token", headers={TOKEN_TTL: ttl})
    assert status == 200 and headers[TOKEN_TTL.lower()] == seconds


def test_token_put_with_forwarded_for_is_403(ec2):
    server = ec2()
    status, _, _ = call(server, "PUT", "/latest/api/token",
                        headers={TOKEN_TTL: "60", "X-Forwarded-For": "10.0.0.9"})
    assert status == 403


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_token_path_other_methods_are_405(ec2, method):
    server = ec2()
    status, headers, body = call(server, method, "/latest/api/token",
                                 headers={TOKEN_TTL: "60"}, body=b"" if method != "GET" else None)
    assert status == 405
    assert headers["allow"] == "OPTIONS, PUT"
    assert body == b""


def test_the_token_405_has_the_real_reason_phrase(ec2):
    server = ec2()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/latest/api/token")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert (response.status, response.reason) == (405, "Not Allowed")


def test_versioned_token_path_is_403(ec2):
    server = ec2()
    status, _, _ = call(server, "PUT", "/2021-03-23/api/token", headers={TOKEN_TTL: "60"})
    assert status == 403


def test_token_use_and_rejections(ec2):
    server = ec2()
    token = put_token(server, "600")
    status, headers, body = get(server, "/latest/meta-data/instance-id", headers={TOKEN: token})
    assert status == 200
    remaining = int(headers["x-aws-ec2-metadata-token-ttl-seconds"])
    assert 590 <= remaining <= 600
    # Header names are case-insensitive (botocore and Node send them lower-case).
    assert get(server, "/latest/meta-data/instance-id",
               headers={TOKEN.lower(): token})[0] == 200
    # Unknown or tampered tokens: 401 even though IMDSv1 is allowed.
    assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: "bogus"})[0] == 401
    forged = token[:-6] + ("AAAA==" if not token.endswith("AAAA==") else "BBBB==")
    assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: forged})[0] == 401
    # base64 decoding skips characters outside its alphabet; a mangled token is still refused.
    for mangled in (token + "!!!", token[:20] + " " + token[20:], token[:20] + "." + token[20:]):
        assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: mangled})[0] == 401
    # A token from another server instance is unknown here.
    other = ec2()
    assert get(server, "/latest/meta-data/instance-id",
               headers={TOKEN: put_token(other)})[0] == 401
    # Token + X-Forwarded-For -> 403; a tokenless v1 GET with XFF is served.
    assert get(server, "/latest/meta-data/instance-id",
               headers={TOKEN: token, "X-Forwarded-For": "10.1.1.1"})[0] == 403
    status, headers, _ = get(server, "/latest/meta-data/instance-id",
                             headers={"X-Forwarded-For": "10.1.1.1"})
    assert status == 200
    assert "x-aws-ec2-metadata-token-ttl-seconds" not in headers


def test_expired_token_is_401(ec2):
    server = ec2()
    token = put_token(server, "1")
    assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: token})[0] == 200
    time.sleep(1.3)
    assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: token})[0] == 401


@pytest.mark.parametrize("how", ["option", "document"])
def test_imdsv2_required(ec2, how):
    if how == "option":
        server = ec2(imdsv2_required=True)
    else:
        server = ec2(config={"ec2": {}, "mds": {"ec2": {"imdsv2_required": True}}})
    status, headers, body = get(server, "/latest/meta-data/instance-id")
    assert status == 401
    assert b"401 - Unauthorized" in body
    assert get(server, "/")[0] == 401
    token = put_token(server)
    assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: token})[0] == 200
    assert get(server, "/latest/meta-data/instance-id", headers={TOKEN: "bad"})[0] == 401


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------

def _credentials(server, role=None, **kwargs):
    role = role or text(server, "/latest/meta-data/iam/security-credentials/", **kwargs)
    status, headers, body = get(server, "/latest/meta-data/iam/security-credentials/" + role,
                                **kwargs)
    assert status == 200
    assert headers["content-type"] == "text/plain"
    return body.decode("utf-8")


def test_offline_credentials_json_exactly(ec2):
    started = time.time()
    server = ec2()
    raw = _credentials(server)
    creds = json.loads(raw, object_pairs_hook=collections.OrderedDict)
    assert list(creds) == ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey",
                           "Token", "Expiration"]
    assert raw.startswith('{\n  "Code" : "Success",\n  "LastUpdated" : "')
    assert not raw.endswith("\n")
    assert creds["Type"] == "AWS-HMAC"
    assert re.match(r"^ASIA[A-Z2-7]{16}$", creds["AccessKeyId"])
    assert len(creds["SecretAccessKey"]) == 40
    assert len(creds["Token"]) > 100
    assert IMDS_TIME.match(creds["Expiration"]) and IMDS_TIME.match(creds["LastUpdated"])
    left = mds.parse_imds_time(creds["Expiration"]) - time.time()
    assert left > 4 * 3600, "offline credentials must be valid for hours"
    # When these keys were obtained: since the server started, and not in the future.
    assert started - 1 <= mds.parse_imds_time(creds["LastUpdated"]) <= time.time()
    # Stable between requests within a rotation period.
    assert json.loads(_credentials(server))["AccessKeyId"] == creds["AccessKeyId"]


def test_offline_credentials_rotate_and_never_expire():
    now = [1_000_000.0]
    provider = mds.OfflineRoleCredentials("r", lifetime=6 * 3600, rotation=3600,
                                          clock=lambda: now[0])
    seen = []
    for step in range(30):              # 15 hours in 30-minute steps
        creds = provider.credentials()
        assert creds["Expiration"] - now[0] >= 5 * 3600
        assert creds["LastUpdated"] <= now[0]
        seen.append(creds["AccessKeyId"])
        now[0] += 1800
    assert len(set(seen)) == 15         # a new key set every hour
    assert seen[0] == seen[1] != seen[2]


def test_static_credentials_from_environment(ec2, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASTATICEXAMPLE000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "static/secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "static-session-token")
    server = ec2(static_credentials=True)
    creds = json.loads(_credentials(server))
    assert creds["Code"] == "Success"
    assert (creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"]) == (
        "AKIASTATICEXAMPLE000", "static/secret", "static-session-token")
    # Session keys of unknown expiry usually last an hour: clients are told to come back
    # within one (botocore refreshes 15 minutes before), long-term keys within six.
    assert 2700 <= mds.parse_imds_time(creds["Expiration"]) - time.time() <= 3600
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    creds = json.loads(_credentials(server))
    assert creds["Token"] == ""
    assert mds.parse_imds_time(creds["Expiration"]) - time.time() > 4 * 3600


def test_static_credentials_from_profile(ec2, monkeypatch, tmp_path):
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text("[default]\naws_access_key_id = AKIADEFAULT\n"
                                "aws_secret_access_key = default-secret\n\n"
                                "[dev]\naws_access_key_id = AKIADEV\n"
                                "aws_secret_access_key = dev%secret\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-config"))
    server = ec2(aws_profile="dev", role_name="dev-role")
    assert text(server, "/latest/meta-data/iam/security-credentials/") == "dev-role"
    creds = json.loads(_credentials(server))
    # RawConfigParser: a "%" in a secret is taken literally; long-term keys have no token.
    assert (creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"]) == (
        "AKIADEV", "dev%secret", "")


def test_missing_static_credentials_give_the_imds_error_form(ec2, monkeypatch, tmp_path,
                                                             caplog):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with caplog.at_level("WARNING"):
        server = ec2(static_credentials=True)
    # Said at startup, before any client asks.
    assert any("not usable yet" in r.getMessage() and "no AWS source credentials"
               in r.getMessage() for r in caplog.records), caplog.records
    assert "role mds-ec2-role (default): static AWS credentials from the environment" in \
        server.flavor.startup_lines()
    caplog.clear()
    with caplog.at_level("WARNING"):
        creds = json.loads(_credentials(server))
    assert creds["Code"] != "Success"
    assert "no AWS source credentials" in creds["Message"]
    assert IMDS_TIME.match(creds["LastUpdated"])
    assert any("unavailable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("which", ["AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"])
def test_a_credentials_file_that_is_not_utf8_gives_the_imds_error_form(ec2, monkeypatch,
                                                                        tmp_path, which):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b"[default]\naws_access_key_id = AKIALATIN1\n"
                       b"aws_secret_access_key = s\xe9cret-in-latin-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv(which, str(latin1))
    server = ec2(static_credentials=True)
    body = _credentials(server)                  # a 200 in the IMDS error form, not a 500
    creds = json.loads(body)
    assert creds["Code"] != "Success", creds
    assert "%s: it is not UTF-8 text" % latin1 in creds["Message"]
    assert "cret-in-latin" not in body and "Traceback" not in body
    assert IMDS_TIME.match(creds["LastUpdated"])


def test_source_key_and_region_resolution(tmp_path):
    config = tmp_path / "config"
    config.write_text("[default]\nregion = us-west-2\n\n[profile ops]\nregion = eu-north-1\n"
                      "aws_access_key_id = AKIACONFIGOPS\naws_secret_access_key = cfg\n")
    credentials = tmp_path / "credentials"
    credentials.write_text("[ops]\naws_access_key_id = AKIACREDOPS\n"
                           "aws_secret_access_key = cred\naws_session_token = tok\n")
    base = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    keys = mds.resolve_aws_source_keys("ops", base)
    assert (keys.access_key, keys.secret_key, keys.session_token) == (
        "AKIACREDOPS", "cred", "tok")           # credentials file beats config file
    assert "cred" not in repr(keys) and "tok" not in repr(keys)
    env = dict(base, AWS_ACCESS_KEY_ID="AKIAENV", AWS_SECRET_ACCESS_KEY="envsecret")
    assert mds.resolve_aws_source_keys(None, env).access_key == "AKIAENV"
    assert mds.resolve_aws_source_keys("ops", env).access_key == "AKIACREDOPS"
    assert mds.resolve_aws_source_keys(None, dict(base, AWS_PROFILE="ops")).access_key == \
        "AKIACREDOPS"
    with pytest.raises(mds.CredentialError):
        mds.resolve_aws_source_keys(None, base)  # "default" has a region but no keys
    assert mds.resolve_aws_region(None, base) == "us-west-2"
    assert mds.resolve_aws_region("ops", base) == "eu-north-1"
    assert mds.resolve_aws_region("ops", dict(base, AWS_DEFAULT_REGION="sa-east-1")) == \
        "sa-east-1"
    assert mds.resolve_aws_region("ops", dict(base, AWS_REGION="ca-central-1",
                                              AWS_DEFAULT_REGION="sa-east-1")) == "ca-central-1"
    assert mds.resolve_aws_region("nobody", {"AWS_CONFIG_FILE": str(tmp_path / "x"),
                                             "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}) \
        is None



def _profiles(tmp_path, config_text, credentials_text=""):
    (tmp_path / "config").write_text(config_text)
    (tmp_path / "credentials").write_text(credentials_text)
    return {"AWS_CONFIG_FILE": str(tmp_path / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}


def test_a_profiles_keys_come_from_one_file_together(tmp_path):
    # botocore takes the credentials file's keys as a set: a token from the config file
    # would not belong to them.
    env = _profiles(tmp_path, "[profile ops]\naws_session_token = STALE-OLD-TOKEN\n",
                    "[ops]\naws_access_key_id = AKIACREDOPS\naws_secret_access_key = cred\n")
    keys = mds.resolve_aws_source_keys("ops", env)
    assert (keys.access_key, keys.session_token) == ("AKIACREDOPS", None)


@pytest.mark.parametrize("config_text, credentials_text, environ, reason", [
    ("[profile ops]\naws_secret_access_key = cfg\n", "[ops]\naws_access_key_id = AKIA1\n", {},
     "only one of"),
    ("[profile ops]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = base\n",
     "[ops]\naws_access_key_id = AKIA1\naws_secret_access_key = s\n", {}, "role_arn"),
    ("[profile ops]\ncredential_process = /bin/creds\n", "", {}, "credential_process"),
    ("[profile ops]\nsso_session = corp\n", "", {}, "sso_session"),
    ("", "", {"AWS_ACCESS_KEY_ID": "AKIAONLYID"}, "partial AWS credentials"),
])
def test_profiles_botocore_would_read_differently_are_refused(tmp_path, config_text,
                                                              credentials_text, environ,
                                                              reason):
    env = dict(_profiles(tmp_path, config_text, credentials_text), **environ)
    with pytest.raises(mds.CredentialError) as caught:
        mds.resolve_aws_source_keys(None if environ else "ops", env)
    assert reason in str(caught.value)


@pytest.mark.parametrize("section", ['profile "dev"', "profile  dev", " profile dev "])
def test_config_profile_sections_are_read_as_botocore_reads_them(tmp_path, section):
    env = _profiles(tmp_path, "[%s]\naws_access_key_id = AKIADEV\naws_secret_access_key = d\n"
                    "region = eu-west-3\n" % section)
    assert mds.resolve_aws_source_keys("dev", env).access_key == "AKIADEV"
    assert mds.resolve_aws_region("dev", env) == "eu-west-3"


# ---------------------------------------------------------------------------
# AssumeRole through the server, against the fake STS
# ---------------------------------------------------------------------------

SOURCE_KEY, SOURCE_SECRET = "AKIAMDSSOURCE0000001", "mds/source/secret"
ROLE_ARN = "arn:aws:iam::210987654321:role/app-role"


@pytest.fixture
def sts_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SOURCE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with FakeSts({SOURCE_KEY: (SOURCE_SECRET, None)}, region="eu-central-1") as sts:
        yield sts


def _assume_role_config(sts, **role):
    spec = dict({"role_arn": ROLE_ARN, "sts_endpoint": sts.url, "sts_region": "eu-central-1"},
                **role)
    return {"ec2": {}, "mds": {"ec2": {"role": "app-role", "roles": {"app-role": spec}}}}


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_assume_role_is_cached_not_called_per_request(ec2, sts_env):
    server = ec2(role_arn=ROLE_ARN, sts_endpoint=sts_env.url, sts_region="eu-central-1")
    assert _wait_for(lambda: sts_env.calls == 1)
    assert text(server, "/latest/meta-data/iam/security-credentials/") == "app-role"
    info = json.loads(text(server, "/latest/meta-data/iam/info"))
    assert info["InstanceProfileArn"] == "arn:aws:iam::210987654321:instance-profile/app-role"
    issued = sts_env.issued[0]
    for _ in range(40):
        creds = json.loads(_credentials(server, "app-role"))
        assert (creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"]) == issued[:3]
    assert sts_env.calls == 1
    request = sts_env.requests[0]
    assert request["accepted"]
    assert request["params"]["RoleArn"] == ROLE_ARN
    assert request["params"]["DurationSeconds"] == "3600"
    assert creds["Expiration"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued[3]))


def test_assume_role_refreshes_in_background_before_expiry(ec2, sts_env):
    sts_env.lifetime = 4          # every session lasts 4 s; refresh when 2 s are left
    server = ec2(config=_assume_role_config(sts_env, refresh_margin=2))
    assert _wait_for(lambda: sts_env.calls >= 1)
    keys_seen = set()
    started = time.time()
    requests = 0
    while time.time() - started < 5.0:
        creds = json.loads(_credentials(server, "app-role"))
        assert creds["Code"] == "Success"
        # Never an expired credential (1 s of slack for the whole-second format).
        assert mds.parse_imds_time(creds["Expiration"]) > time.time() - 1
        keys_seen.add(creds["AccessKeyId"])
        requests += 1
        time.sleep(0.05)
    # Refreshed in the background (new keys, more than the first call), but not per request.
    assert len(keys_seen) >= 2 and sts_env.calls >= 2
    assert sts_env.calls < requests / 2, (sts_env.calls, requests)


def test_sts_failure_keeps_serving_valid_cache_then_reports(ec2, sts_env, caplog):
    sts_env.lifetime = 3
    server = ec2(config=_assume_role_config(sts_env, refresh_margin=1, retry_delay=0.5))
    assert _wait_for(lambda: sts_env.calls == 1)
    first = json.loads(_credentials(server, "app-role"))
    sts_env.failing = (503, "ServiceUnavailable")
    # While the cached session is valid it is still served.
    deadline = mds.parse_imds_time(first["Expiration"])
    while time.time() < deadline - 1.2:
        assert json.loads(_credentials(server, "app-role"))["AccessKeyId"] == \
            first["AccessKeyId"]
        time.sleep(0.1)
    time.sleep(max(0, deadline - time.time()) + 0.5)
    with caplog.at_level("WARNING"):
        failed = json.loads(_credentials(server, "app-role"))
    assert failed["Code"] == "AssumeRoleUnauthorizedAccess"
    assert "ServiceUnavailable" in failed["Message"]
    assert SOURCE_SECRET not in failed["Message"]
    for record in caplog.records:
        assert SOURCE_SECRET not in record.getMessage()
    attempts = len(sts_env.requests)
    for _ in range(30):
        _credentials(server, "app-role")
    # 30 requests do not turn into 30 STS calls (retries are paced by the refresher).
    assert len(sts_env.requests) <= attempts + 8
    # Recovery: STS works again -> fresh credentials without a restart.
    sts_env.failing = None
    assert _wait_for(lambda: json.loads(_credentials(server, "app-role"))["Code"] == "Success")


@pytest.mark.parametrize("bad", [{"duration": "1h"}, {"duration": 60}, {"duration": 1800.5},
                                 {"refresh_margin": True}, {"retry_delay": -1}])
def test_a_bad_role_setting_on_reload_leaves_the_running_role_refreshing(ec2, sts_env, tmp_path,
                                                                         caplog, bad):
    sts_env.lifetime = 4          # every session lasts 4 s; refreshed when 2 s are left
    config = tmp_path / "ec2.json"
    config.write_text(json.dumps(_assume_role_config(sts_env, refresh_margin=2)))
    server = ec2(config=str(config))
    assert _wait_for(lambda: sts_env.calls >= 1)
    with caplog.at_level("ERROR", logger="mds"):
        config.write_text(json.dumps(_assume_role_config(sts_env, **dict(
            {"refresh_margin": 2}, **bad))))
        assert server.reload() is False
    field = next(iter(bad))
    assert any("reload failed" in r.getMessage() and field in r.getMessage()
               for r in caplog.records)
    # The role still serving is the one whose refresher still runs: more AssumeRole calls come.
    calls = sts_env.calls
    assert _wait_for(lambda: sts_env.calls > calls, timeout=15)
    assert json.loads(_credentials(server, "app-role"))["Code"] == "Success"


def test_a_reload_that_drops_a_role_does_not_wait_for_its_hanging_sts_call(ec2, sts_env,
                                                                            tmp_path):
    sts_env.lifetime = 4          # the first session is refreshed about 2 s after it is issued
    config = tmp_path / "ec2.json"
    config.write_text(json.dumps(_assume_role_config(sts_env, refresh_margin=2)))
    server = ec2(config=str(config))
    assert sts_env.calls == 1
    sts_env.delay = 4.0           # the refresh hangs
    assert _wait_for(lambda: sts_env.started == 2)
    config.write_text(json.dumps({"ec2": {}, "mds": {"ec2": {"role": "other"}}}))
    assert server.reload() is True
    # The reload returned while the dropped role's STS call was still hanging.
    assert sts_env.calls == 1
    assert text(server, "/latest/meta-data/iam/security-credentials/") == "other"


def test_a_refresher_that_failed_a_thousand_times_still_recovers(sts_env):
    provider = mds.AssumeRoleCredentials(
        ROLE_ARN, mds.resolve_aws_source_keys, region="eu-central-1", endpoint=sts_env.url,
        retry_delay=0.00001, max_retry_delay=0.0001)
    sts_env.failing = (403, "ExpiredToken")
    provider.start(wait=0)
    try:
        assert _wait_for(lambda: sts_env.started > 1100, timeout=60)
        sts_env.failing = None
        assert _wait_for(lambda: sts_env.calls >= 1)
        assert provider.credentials()["AccessKeyId"].startswith("ASIA")
    finally:
        provider.stop()


def test_a_session_shorter_than_the_margin_is_refreshed_halfway_not_in_a_loop(ec2, sts_env):
    server = ec2(config=_assume_role_config(sts_env, duration=900))
    assert _wait_for(lambda: sts_env.calls == 1)
    assert json.loads(_credentials(server, "app-role"))["Code"] == "Success"
    time.sleep(2.5)
    assert sts_env.calls == 1


def test_a_refresher_that_slept_through_its_time_is_woken_by_a_client(sts_env):
    # Its sleep runs on the monotonic clock, which stands still while the host is suspended;
    # wall time (this fake clock) runs on.
    skew = [0.0]
    provider = mds.AssumeRoleCredentials(
        ROLE_ARN, mds.resolve_aws_source_keys, region="eu-central-1", endpoint=sts_env.url,
        clock=lambda: time.time() + skew[0])
    provider.start()
    try:
        assert sts_env.calls == 1
        skew[0] = 2000.0                        # past the 30-minute margin of a 1-hour session
        assert provider.credentials()["AccessKeyId"]
        assert _wait_for(lambda: sts_env.calls == 2)
    finally:
        provider.stop()


def test_an_sts_endpoint_spelled_in_capitals_still_verifies(ec2, sts_env):
    endpoint = sts_env.url.replace("127.0.0.1", "LocalHost")
    server = ec2(config=_assume_role_config(sts_env, sts_endpoint=endpoint))
    assert _wait_for(lambda: sts_env.calls == 1)
    assert json.loads(_credentials(server, "app-role"))["Code"] == "Success"


def test_clients_do_not_read_the_servers_own_identity_in_sts_errors(ec2, sts_env, caplog):
    sts_env.failing = (403, "AccessDenied")
    user = "arn:aws:iam::123456789012:user/alice"
    sts_env.fail_next(50, 403, "AccessDenied", "User: %s is not authorized to perform: "
                      "sts:AssumeRole on resource: %s" % (user, ROLE_ARN))
    sts_env.failing = None
    with caplog.at_level("WARNING"):
        server = ec2(config=_assume_role_config(sts_env))
        assert _wait_for(lambda: sts_env.started >= 1)
        failed = json.loads(_credentials(server, "app-role"))
    assert failed["Code"] != "Success" and "AccessDenied" in failed["Message"]
    assert user not in failed["Message"] and ROLE_ARN in failed["Message"]
    assert user in caplog.text                  # the operator still sees who was refused


def test_assume_role_bad_source_key_is_reported(ec2, sts_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    server = ec2(config=_assume_role_config(sts_env))
    assert _wait_for(lambda: len(sts_env.requests) >= 1)
    assert sts_env.requests[0]["error_code"] == "SignatureDoesNotMatch"
    failed = json.loads(_credentials(server, "app-role"))
    assert failed["Code"] != "Success"
    assert "SignatureDoesNotMatch" in failed["Message"]
    assert "not-the-secret" not in failed["Message"]



def test_sts_error_text_never_quotes_the_source_credentials(ec2, monkeypatch, caplog):
    # Realistic shapes: a 40-character secret key and a long session token, echoed back by STS.
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
    token = "FwoGZXIvYXdzEBYaDExampleSessionToken" + "Ab12" * 30
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SOURCE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with FakeSts({SOURCE_KEY: (secret, token)}, region="eu-central-1") as sts:
        sts.fail_next(count=50, status=403, code="AccessDenied",
                      message="not authorized for session %s with key %s" % (token, secret))
        with caplog.at_level("WARNING"):
            server = ec2(config=_assume_role_config(sts))
            assert _wait_for(lambda: len(sts.requests) >= 1)
            failed = json.loads(_credentials(server, "app-role"))
    assert failed["Code"] != "Success" and "AccessDenied" in failed["Message"]
    for text in [failed["Message"]] + [record.getMessage() for record in caplog.records]:
        assert token not in text and secret not in text, text



def test_an_unusable_sts_endpoint_is_reported_not_left_pending(ec2, sts_env):
    # A scheme-less endpoint used to kill the refresher thread: clients then saw "pending"
    # forever.  It must be reported like any other STS failure.
    config = _assume_role_config(sts_env)
    config["mds"]["ec2"]["roles"]["app-role"]["sts_endpoint"] = "sts.eu-central-1.amazonaws.com"
    server = ec2(config=config)
    failed = json.loads(_credentials(server, "app-role"))
    assert failed["Code"] != "Success"
    assert "not a usable URL" in failed["Message"], failed["Message"]


# ---------------------------------------------------------------------------
# Per-client roles (source address -> role)
# ---------------------------------------------------------------------------

PER_CLIENT = {"ec2": {}, "mds": {"ec2": {
    "roles": {"role-a": "offline", "role-b": {"source": "offline"}},
    "clients": {"127.0.0.2": "role-a", "127.0.0.3/32": "role-b", "127.0.0.64/26": None},
}}}


def test_per_client_roles_are_isolated(ec2):
    server = ec2(config=PER_CLIENT)
    base = "/latest/meta-data/iam/security-credentials/"
    assert text(server, base, source="127.0.0.2") == "role-a"
    assert text(server, base, source="127.0.0.3") == "role-b"
    assert text(server, base, source="127.0.0.1") == mds.DEFAULT_ROLE_NAME
    a = json.loads(_credentials(server, "role-a", source="127.0.0.2"))
    b = json.loads(_credentials(server, "role-b", source="127.0.0.3"))
    assert a["Code"] == b["Code"] == "Success"
    assert a["AccessKeyId"] != b["AccessKeyId"]
    # Neither client can read the other's role, with or without a trailing slash.
    for path in (base + "role-b", base + "role-b/"):
        assert get(server, path, source="127.0.0.2")[0] == 404
    assert get(server, base + "role-a", source="127.0.0.3")[0] == 404
    assert get(server, base + "role-a", source="127.0.0.1")[0] == 404
    info_a = json.loads(text(server, "/latest/meta-data/iam/info", source="127.0.0.2"))
    assert info_a["InstanceProfileArn"].endswith("/role-a")
    # A client mapped to no role sees no iam/ at all.
    assert "iam/" not in text(server, "/latest/meta-data/", source="127.0.0.70").split("\n")
    assert get(server, "/latest/meta-data/iam/info", source="127.0.0.70")[0] == 404
    assert get(server, base, source="127.0.0.70")[0] == 404


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------

def test_spot_interruption_after_delay(ec2):
    server = ec2(spot_interruption_after=1.0)
    assert text(server, "/latest/meta-data/instance-life-cycle") == "spot"
    assert get(server, "/latest/meta-data/spot/instance-action")[0] == 404
    assert "spot/" not in text(server, "/latest/meta-data/").split("\n")
    time.sleep(1.2)
    assert "spot/" in text(server, "/latest/meta-data/").split("\n")
    action = json.loads(text(server, "/latest/meta-data/spot/instance-action"))
    assert action["action"] == "terminate"
    assert IMDS_TIME.match(action["time"])
    when = mds.parse_imds_time(action["time"])
    assert 100 < when - time.time() <= 121
    assert text(server, "/latest/meta-data/spot/termination-time") == action["time"]


def test_events_scheduled_at_runtime(ec2):
    server = ec2()
    assert get(server, "/latest/meta-data/events/recommendations/rebalance")[0] == 404
    # Listed on every instance, and an empty array (Jackson's "[ ]") while nothing is due.
    assert text(server, "/latest/meta-data/events/maintenance/") == "history\nscheduled"
    assert text(server, "/latest/meta-data/events/maintenance/scheduled") == "[ ]"
    assert text(server, "/latest/meta-data/events/maintenance/history") == "[ ]"
    assert get(server, "/latest/meta-data/autoscaling/target-lifecycle-state")[0] == 404

    server.flavor.schedule_event("rebalance", 0)
    server.flavor.schedule_event("spot", 0, action="stop")
    server.flavor.schedule_event("maintenance", 0, code="system-reboot", starts_in=3600,
                                 duration=600)
    server.update("mds/ec2/events/autoscaling", {"after": 0, "state": "Warmed:Stopped"})
    assert text(server, "/latest/meta-data/events/") == "maintenance/\nrecommendations/"
    notice = json.loads(text(server, "/latest/meta-data/events/recommendations/rebalance"))
    assert IMDS_TIME.match(notice["noticeTime"])
    assert json.loads(text(server, "/latest/meta-data/spot/instance-action"))["action"] == "stop"
    scheduled = json.loads(text(server, "/latest/meta-data/events/maintenance/scheduled"))
    assert len(scheduled) == 1
    event = scheduled[0]
    assert event["Code"] == "system-reboot" and event["State"] == "active"
    assert re.match(r"^instance-event-[0-9a-f]{17}$", event["EventId"])
    assert re.match(r"^\d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$", event["NotBefore"])
    assert text(server, "/latest/meta-data/autoscaling/target-lifecycle-state") == \
        "Warmed:Stopped"


def test_scheduled_events_are_printed_as_imds_prints_them(ec2):
    # The real capture (aws.md §3.4): "[ {" ... "} ]", members one per line as "key" : value.
    server = ec2()
    server.flavor.schedule_event("maintenance", 0, code="system-reboot", starts_in=60)
    body = text(server, "/latest/meta-data/events/maintenance/scheduled")
    assert body.startswith('[ {\n  "NotBefore" : "') and body.endswith('"\n} ]'), body
    assert '\n  "Code" : "system-reboot",\n' in body


def test_flags_move_configured_spot_and_rebalance_events(ec2):
    # A flag wins over the config's "at", as over its "after".
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"events": {
        "spot": {"at": "2030-01-01T00:00:00Z"}, "rebalance": {"at": "2030-01-01T00:00:00Z"}}}}},
        spot_interruption_after=0, rebalance_after=0)
    assert json.loads(text(server, "/latest/meta-data/spot/instance-action"))["action"]
    assert "noticeTime" in json.loads(
        text(server, "/latest/meta-data/events/recommendations/rebalance"))


def test_autoscaling_lifecycle_changes_at_its_time(ec2):
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"events": {
        "autoscaling": {"after": 1, "state": "Terminated"}}}}})
    assert text(server, "/latest/meta-data/autoscaling/target-lifecycle-state") == "InService"
    time.sleep(1.2)
    assert text(server, "/latest/meta-data/autoscaling/target-lifecycle-state") == "Terminated"


def test_a_maintenance_event_moves_to_history_once_it_is_over(ec2):
    now = time.time()
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"events": {"maintenance": [
        {"at": now - 7200, "starts_in": 600, "duration": 600, "event_id": "instance-event-0done"},
        {"at": now - 60, "starts_in": 3600, "duration": None, "event_id": "instance-event-0open"},
    ]}}}})
    scheduled = json.loads(text(server, "/latest/meta-data/events/maintenance/scheduled"))
    history = json.loads(text(server, "/latest/meta-data/events/maintenance/history"))
    assert [e["EventId"] for e in scheduled] == ["instance-event-0open"]
    assert "NotAfter" not in scheduled[0] and scheduled[0]["State"] == "active"
    assert [(e["EventId"], e["State"]) for e in history] == [("instance-event-0done",
                                                             "completed")]
    assert list(history[0]) == ["NotBefore", "Code", "Description", "EventId", "NotAfter",
                                "State"]


def test_a_maintenance_event_leaves_scheduled_when_it_ends(ec2):
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"events": {"maintenance": [
        {"after": 0, "starts_in": 0, "duration": 1}]}}}})
    assert len(json.loads(text(server, "/latest/meta-data/events/maintenance/scheduled"))) == 1
    assert json.loads(text(server, "/latest/meta-data/events/maintenance/history")) == []
    time.sleep(1.2)
    assert json.loads(text(server, "/latest/meta-data/events/maintenance/scheduled")) == []
    assert len(json.loads(text(server, "/latest/meta-data/events/maintenance/history"))) == 1


@pytest.mark.parametrize("key", ["team/a", "with space", "_index", "..", ".", "tab\t",
                                 "new\nline", "é"])
def test_tag_keys_that_ec2_refuses_to_expose_are_refused(ec2, key):
    # EC2 will not turn tags in metadata on while a key is outside its alphabet; served, a
    # key holding "/" would be listed but could not be fetched.
    with pytest.raises(mds.ConfigError, match="tag key"):
        ec2(config={"ec2": {"meta-data": {"tags": {"instance": {key: "v"}}}}})
    server = ec2(config={"ec2": {"meta-data": {"tags": {"instance": {"Name": "web"}}}}})
    with pytest.raises(mds.ConfigError, match="tag key"):
        server.update(["meta-data", "tags", "instance", key], "v")
    assert text(server, "/latest/meta-data/tags/instance") == "Name"


def test_tag_keys_may_use_the_whole_allowed_alphabet(ec2):
    key = "aws:autoscaling:groupName+-=.,_@09"
    server = ec2(config={"ec2": {"meta-data": {"tags": {"instance": {key: "v", "...": "w"}}}}})
    assert text(server, "/latest/meta-data/tags/instance/" + key) == "v"
    assert text(server, "/latest/meta-data/tags/instance/...") == "w"


def test_delete_of_a_default_value_hides_it_and_of_nothing_names_the_path(ec2):
    server = ec2()
    assert "local-ipv4" in text(server, "/latest/meta-data/").split("\n")
    server.delete("/latest/meta-data/local-ipv4")      # derived, not held by the document
    assert get(server, "/latest/meta-data/local-ipv4")[0] == 404
    assert "local-ipv4" not in text(server, "/latest/meta-data/").split("\n")
    server.delete("meta-data/placement/availability-zone-id")
    assert get(server, "/latest/meta-data/placement/availability-zone-id")[0] == 404
    for path in ("meta-data/no-such-key", "meta-data/instance-id/below-a-leaf",
                 "dynamic/fws", "mds/ec2/role",
                 "meta-data/local-ipv4"):          # hidden already: a second delete
        with pytest.raises(KeyError, match="nothing to delete at " + path):
            server.delete(path)
    assert get(server, "/latest/meta-data/local-ipv4")[0] == 404


def test_delete_of_a_value_derived_from_others_is_refused_and_changes_nothing(ec2):
    server = ec2(config={"ec2": {"meta-data": {
        "local-ipv4": "10.1.2.3", "public-keys": {"my-key": "ssh-ed25519 AAAA me"}}}})
    zone = text(server, "/latest/meta-data/placement/availability-zone")
    for path in ("meta-data/placement/availability-zone", "meta-data/public-keys/0"):
        with pytest.raises(KeyError, match="derived from other values"):
            server.delete(path)
    assert text(server, "/latest/meta-data/placement/availability-zone") == zone
    assert text(server, "/latest/meta-data/public-keys/") == "0=my-key"
    # A value the config sets is deleted, and the default it was laid over stays hidden.
    server.delete("meta-data/local-ipv4")
    assert get(server, "/latest/meta-data/local-ipv4")[0] == 404
    server.delete("meta-data/public-keys/my-key")
    assert get(server, "/latest/meta-data/public-keys/")[0] == 404
    assert "public-keys/" not in text(server, "/latest/meta-data/").split("\n")


def test_a_client_network_with_an_ipv6_zone_is_read(ec2):
    # Python 3.8 cannot parse a zone; the zone is dropped, as from clients' addresses.
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"clients": {
        "fe80::1%eth0": "one", "fe80::%eth1/64": "net"}}}})
    tree = server.store.tree
    assert server.flavor.role_for_client(tree, "fe80::1%eth0") == "one"
    assert server.flavor.role_for_client(tree, "fe80::2") == "net"


def test_update_takes_segments_for_a_client_network(ec2):
    server = ec2(config={"ec2": {}, "mds": {"ec2": {"roles": {"dev": "offline"}}}})
    default = text(server, "/latest/meta-data/iam/security-credentials/")
    server.update(["mds", "ec2", "clients", "127.0.0.0/8"], "dev")
    assert default != "dev"
    assert text(server, "/latest/meta-data/iam/security-credentials/") == "dev"
    server.delete(("mds", "ec2", "clients", "127.0.0.0/8"))
    assert text(server, "/latest/meta-data/iam/security-credentials/") == default


def test_runtime_update_of_imds_paths(ec2):
    server = ec2()
    server.update("meta-data/spot/instance-action",
                  {"action": "hibernate", "time": "2030-01-01T00:00:00Z"})
    body = text(server, "/latest/meta-data/spot/instance-action")
    assert json.loads(body) == {"action": "hibernate", "time": "2030-01-01T00:00:00Z"}
    server.update("user-data", "hello")
    assert get(server, "/latest/user-data")[2] == b"hello"
    server.delete("user-data")
    assert get(server, "/latest/user-data")[0] == 404


# ---------------------------------------------------------------------------
# Instance identity signatures
# ---------------------------------------------------------------------------

def test_identity_document_signature_and_rsa2048_verify(ec2, tmp_path):
    server = ec2()
    document = get(server, "/latest/dynamic/instance-identity/document")[2]
    assert document.startswith(b'{\n  "accountId" : "')
    status, headers, pem = get(server, mds.EC2_CERTIFICATE_PATH)
    assert status == 200 and pem.startswith(b"-----BEGIN CERTIFICATE-----")
    certificate = x509.load_pem_x509_certificate(pem)

    signature = text(server, "/latest/dynamic/instance-identity/signature")
    certificate.public_key().verify(base64.b64decode(signature), document,
                                    padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(Exception):
        certificate.public_key().verify(base64.b64decode(signature), document + b" ",
                                        padding.PKCS1v15(), hashes.SHA256())

    listing = text(server, "/latest/dynamic/instance-identity/").split("\n")
    assert set(listing) == {"document", "pkcs7", "rsa2048", "signature"}

    # AWS's documented procedure: wrap rsa2048 in PEM lines and verify with openssl.
    rsa2048 = text(server, "/latest/dynamic/instance-identity/rsa2048")
    assert "BEGIN" not in rsa2048
    assert all(len(line) <= 64 for line in rsa2048.split("\n"))
    openssl = require_tool("openssl")
    (tmp_path / "rsa2048.pem").write_text("-----BEGIN PKCS7-----\n%s\n-----END PKCS7-----\n"
                                          % rsa2048)
    (tmp_path / "cert.pem").write_bytes(pem)
    completed = subprocess.run(
        [openssl, "smime", "-verify", "-in", str(tmp_path / "rsa2048.pem"), "-inform", "PEM",
         "-certfile", str(tmp_path / "cert.pem"), "-CAfile", str(tmp_path / "cert.pem"),
         "-purpose", "any"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert completed.returncode == 0, completed.stderr.decode()
    assert completed.stdout == document
    assert b"Verification successful" in completed.stderr


# ---------------------------------------------------------------------------
# ECS container credentials
# ---------------------------------------------------------------------------

def test_ecs_endpoint_serves_the_role_credentials(ec2):
    server = ec2(config=PER_CLIENT)
    status, headers, body = get(server, mds.ECS_CREDENTIALS_PATH, source="127.0.0.2")
    assert status == 200
    assert "json" in headers["content-type"]
    creds = json.loads(body)
    imds = json.loads(_credentials(server, "role-a", source="127.0.0.2"))
    assert creds["AccessKeyId"] == imds["AccessKeyId"]
    assert creds["Token"] == imds["Token"]
    assert creds["Expiration"] == imds["Expiration"]
    assert creds["RoleArn"] == "arn:aws:iam::123456789012:role/role-a"
    assert creds["AccountId"] == "123456789012"
    assert get(server, mds.ECS_CREDENTIALS_PATH, source="127.0.0.70")[0] == 404
    assert server.flavor.ecs_env() == {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": server.url + mds.ECS_CREDENTIALS_PATH}


def test_ecs_account_id_is_the_roles_account(ec2):
    # A role may live in another account than the instance: AccountId follows its ARN.
    arn = "arn:aws:iam::999988887777:role/cross"
    server = ec2(config={"ec2": {}, "mds": {"ec2": {
        "role": "cross", "roles": {"cross": {"source": "offline", "role_arn": arn}}}}})
    creds = json.loads(get(server, mds.ECS_CREDENTIALS_PATH)[2])
    assert (creds["RoleArn"], creds["AccountId"]) == (arn, "999988887777")


def test_ecs_endpoint_authorization_token(ec2):
    server = ec2(ecs_auth_token="secret-token-123")
    status, _, body = get(server, mds.ECS_CREDENTIALS_PATH)
    assert status == 401 and json.loads(body)["Code"] == "AccessDenied"
    status, _, body = get(server, mds.ECS_CREDENTIALS_PATH, headers={"Authorization": "nope"})
    assert status == 403
    assert b"secret-token-123" not in body
    status, _, body = get(server, mds.ECS_CREDENTIALS_PATH,
                          headers={"Authorization": "secret-token-123"})
    assert status == 200 and json.loads(body)["AccessKeyId"].startswith("ASIA")
    # The ECS endpoint needs no IMDSv2 token even when IMDSv2 is required.
    required = ec2(imdsv2_required=True)
    assert get(required, mds.ECS_CREDENTIALS_PATH)[0] == 200


# ---------------------------------------------------------------------------
# CLI options and startup lines
# ---------------------------------------------------------------------------

def test_cli_options_round_trip(ec2):
    parser = argparse.ArgumentParser()
    mds.add_ec2_arguments(parser)
    args = parser.parse_args(["--imdsv2-required", "--spot-interruption-after", "2m",
                              "--role-name", "web", "--ecs-auth-token", "t0k"])
    options = mds.ec2_options_from_args(args)
    assert options == {"imdsv2_required": True, "spot_interruption_after": 120.0,
                       "role_name": "web", "ecs_auth_token": "t0k"}
    server = ec2(**options)
    assert get(server, "/latest/meta-data/")[0] == 401
    lines = "\n".join(server.flavor.startup_lines())
    assert "IMDSv2 required" in lines
    assert "role web (default)" in lines
    assert mds.EC2_CERTIFICATE_PATH in lines
    assert "t0k" not in lines
    assert mds.parse_duration("1h30m") == 5400 and mds.parse_duration("45") == 45
    with pytest.raises(ValueError):
        mds.parse_duration("soon")
    with pytest.raises(mds.ConfigError):
        ec2(role_arn="not-an-arn")


def test_command_line_ec2_server(tmp_path):
    """`python mds.py --flavor ec2 ...` prints the export line and serves with the flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, mds.__file__, "--flavor", "ec2", "--port", "0", "--imdsv2-required",
         "--role-name", "cli-role", "--spot-interruption-after", "1h"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    try:
        deadline = time.time() + 30
        endpoint = None
        while time.time() < deadline and endpoint is None:
            line = process.stderr.readline().decode("utf-8", "replace")
            if not line:
                break
            lines.append(line)
            match = re.search(r"export AWS_EC2_METADATA_SERVICE_ENDPOINT=(http://\S+)", line)
            if match:
                endpoint = match.group(1)
        assert endpoint, "no export line in:\n" + "".join(lines)
        output = "".join(lines)
        assert "IMDSv2 required" in output
        # As loud as the GCE flavor: the role's keys are fake.
        assert re.search(r" WARNING OFFLINE MODE: .*role cli-role .*AWS will reject", output), \
            output
        assert mds.EC2_CERTIFICATE_PATH in output
        port = int(re.search(r":(\d+)/$", endpoint).group(1))

        class Endpoint(object):
            pass
        server = Endpoint()
        server.port = port
        assert get(server, "/latest/meta-data/instance-id")[0] == 401
        token = put_token(server)
        assert text(server, "/latest/meta-data/iam/security-credentials/",
                    headers={TOKEN: token}) == "cli-role"
        assert text(server, "/latest/meta-data/instance-life-cycle",
                    headers={TOKEN: token}) == "spot"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("bad_settings", [
    {"ecs": "not-an-object"},
    {"events": {"spot": {"notice": "soon"}}},
    {"clients": {"127.0.0.2": {"role": "object-instead-of-a-name"}}},
])
def test_a_bad_ec2_reload_keeps_the_last_good_tree_and_the_watcher(ec2, tmp_path, caplog,
                                                                   bad_settings):
    config = tmp_path / "ec2.json"
    config.write_text(json.dumps({"ec2": {"meta-data": {"instance-type": "m5.large"}}}))
    server = ec2(config=str(config))
    with caplog.at_level("ERROR", logger="mds"):
        config.write_text(json.dumps({"ec2": {}, "mds": {"ec2": bad_settings}}))
        assert server.reload() is False
    assert any("reload failed" in r.getMessage() for r in caplog.records)
    assert text(server, "/latest/meta-data/instance-type") == "m5.large"
    # The file watcher is still alive: the next good edit is served.
    config.write_text(json.dumps({"ec2": {"meta-data": {"instance-type": "c7g.xlarge"}}}))
    assert _wait_for(lambda: text(server, "/latest/meta-data/instance-type") == "c7g.xlarge")
