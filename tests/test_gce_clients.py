"""Real GCE client libraries (Node, Go, Python) against a running mds server.

Every expectation is read back from the server itself (its metadata tree and
its token endpoint) so the tests check that the clients understood the
server, not that the server matches a copy of its own defaults.
"""

import base64
import json
import os
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import mds
from clients import (DEBIAN_GOPATH, NODE_DIR, MdsCli, go_binary, require_path, require_tool,
                     run_go, run_node, run_python, start_go)

AUDIENCE = "https://mds-test.example/endpoint?x=1"
SECOND_AUDIENCE = "https://mds-test.example/second"
ID_TOKEN_ISSUER = "https://accounts.google.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
STORAGE_READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
USERINFO_EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email"
IDENTITY_PATH = "instance/service-accounts/default/identity"
# Seconds allowed between the server computing expires_in and a client
# turning it into an absolute expiry.
CLOCK_SLACK_SECONDS = 30


def custom_vm_document():
    """A VM unlike the built-in default, so no client can pass on defaults alone.

    The service-account e-mail is deliberately outside *.gserviceaccount.com and
    the instance id above 2**63 (ids are unsigned 64-bit), beyond JS number precision.
    """
    document = mds.default_gce_document()
    v1 = document["computeMetadata"]["v1"]
    email = "robot@custom-project.mds-test.example"
    account = {"aliases": ["default"], "email": email,
               "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]}
    v1["project"].update({"projectId": "custom-project-42", "numericProjectId": 98765432109})
    v1["project"]["attributes"] = {"team": "infra"}
    v1["instance"].update({
        "id": 18446744073709551557,
        "name": "custom-vm",
        "hostname": "custom-vm.europe-west4-b.c.custom-project-42.internal",
        "zone": "projects/98765432109/zones/europe-west4-b",
        "tags": ["alpha", "beta", "gamma"],
        "attributes": {"foo": "bar", "startup-script": "#!/bin/sh\necho hi\n"},
        "serviceAccounts": {"default": dict(account), email: dict(account)},
    })
    v1["instance"]["networkInterfaces"][0].update({"ip": "10.10.0.7"})
    v1["instance"]["networkInterfaces"][0]["accessConfigs"][0]["externalIp"] = "203.0.113.9"
    v1["instance"]["licenses"] = [{"id": "1000010"}, {"id": "7883559014960410759"}]
    return document


SECONDARY_EMAIL = "builder@custom-project-42.iam.gserviceaccount.com"
SECONDARY_SCOPES = [USERINFO_EMAIL_SCOPE, STORAGE_READ_SCOPE]
CUSTOM_UNIVERSE = "universe.mds-test.example"


def two_account_document():
    """The custom VM with a second, non-default account and its own universe domain."""
    document = custom_vm_document()
    v1 = document["computeMetadata"]["v1"]
    v1["instance"]["serviceAccounts"][SECONDARY_EMAIL] = {
        "aliases": [], "email": SECONDARY_EMAIL, "scopes": list(SECONDARY_SCOPES)}
    v1["universe"] = {"universeDomain": CUSTOM_UNIVERSE}
    return document


# Every client test runs against the default VM and against a custom one.
VM_CONFIGS = pytest.mark.parametrize(
    "gce_server", [None, custom_vm_document()], ids=["default-vm", "custom-vm"], indirect=True)
# ... and, where accounts matter, against one with a second service account too.
ALL_VM_CONFIGS = pytest.mark.parametrize(
    "gce_server", [None, custom_vm_document(), two_account_document()],
    ids=["default-vm", "custom-vm", "two-accounts"], indirect=True)


def fetch(server, path, query=None, headers=None):
    """GET `path` from the server directly; returns (status, headers, body bytes)."""
    url = server.url + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request_headers = {"Metadata-Flavor": "Google"}
    request_headers.update(headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=request_headers)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def served(server, key, query=None):
    """Text value the server serves at computeMetadata/v1/<key> (must be 200)."""
    status, _, body = fetch(server, "/computeMetadata/v1/" + key, query)
    assert status == 200, "server answered %d for %s: %r" % (status, key, body[:200])
    return body.decode("utf-8")


def served_lines(server, key):
    return [line for line in served(server, key).split("\n") if line]


def served_token(server, scopes=None, account="default"):
    """The access token the server's token endpoint hands out right now."""
    query = {"scopes": ",".join(scopes)} if scopes else None
    status, headers, body = fetch(
        server, "/computeMetadata/v1/instance/service-accounts/%s/token" % account, query)
    assert status == 200, body[:200]
    return json.loads(body.decode("utf-8"))


def decode_jwt(token):
    """(header, claims, signing input, signature) of a compact JWS, unverified."""
    parts = token.split(".")
    assert len(parts) == 3, "not a compact JWS: %r" % token[:40]

    def b64(segment):
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))

    return (json.loads(b64(parts[0])), json.loads(b64(parts[1])),
            (parts[0] + "." + parts[1]).encode("ascii"), b64(parts[2]))


def value_of(report, name):
    """A client call's value; fails with the client's own error text otherwise."""
    entry = report[name]
    assert "error" not in entry, "%s failed in the client: %s" % (name, entry["error"])
    return entry["value"]


def as_decimal_text(value):
    """gcp-metadata hands numbers back as JS numbers or json-bigint BigNumbers."""
    if isinstance(value, dict) and "bignumber" in value:
        return value["bignumber"]
    return str(value)


def assert_valid_id_token(server, token, audience, email):
    header, claims, signing_input, signature = decode_jwt(token)
    assert header["alg"] == "RS256"
    assert claims["aud"] == audience
    assert claims["email"] == email
    assert claims["iss"] == ID_TOKEN_ISSUER
    # Python and Node clients read exp as a number to schedule refreshes.
    assert isinstance(claims["exp"], int) and isinstance(claims["iat"], int)
    now = time.time()
    assert claims["iat"] <= now + CLOCK_SLACK_SECONDS
    assert now < claims["exp"] <= now + 3600 + CLOCK_SLACK_SECONDS
    verify_signature(server, header, signing_input, signature)
    return claims


def assert_full_format_claims(server, claims):
    """format=full (what Node and Python request) embeds the VM's identity."""
    compute = claims["google"]["compute_engine"]
    assert compute["project_id"] == served(server, "project/project-id")
    assert str(compute["project_number"]) == served(server, "project/numeric-project-id")
    assert isinstance(compute["project_number"], int)
    # instance_id is a string in real tokens: it can exceed 2**53.
    assert compute["instance_id"] == served(server, "instance/id")
    assert compute["instance_name"] == served(server, "instance/name")
    assert compute["zone"] == served(server, "instance/zone").rsplit("/", 1)[-1]
    assert isinstance(compute["instance_creation_timestamp"], int)


def verify_signature(server, header, signing_input, signature):
    """Check the RS256 signature with the key the server publishes for id tokens."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    numbers = server_signing_key_numbers(server, header.get("kid"))
    public_key = rsa.RSAPublicNumbers(numbers[1], numbers[0]).public_key()
    # Raises InvalidSignature on mismatch.
    public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())


def server_signing_key_numbers(server, key_id):
    """(n, e) of the key the server publishes as a JWKS, like Google's oauth2/v3/certs."""
    status, _, body = fetch(server, "/oauth2/v3/certs")
    assert status == 200, "no JWKS at /oauth2/v3/certs: %d %r" % (status, body[:200])
    keys = json.loads(body.decode("utf-8"))["keys"]
    matching = [key for key in keys if key.get("kid") == key_id]
    assert matching, "id token kid %r not in the server's JWKS %r" % (
        key_id, [key.get("kid") for key in keys])
    jwk = matching[0]
    assert jwk["kty"] == "RSA"

    def b64_int(text):
        return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")

    return b64_int(jwk["n"]), b64_int(jwk["e"])


@VM_CONFIGS
def test_node_gcp_metadata_and_google_auth(gce_server, client_env):
    report = run_node("gce.js", client_env(gce_server), [AUDIENCE])
    project_id = served(gce_server, "project/project-id")

    assert value_of(report, "is_available") is True
    assert value_of(report, "project_id") == project_id
    assert as_decimal_text(value_of(report, "numeric_project_id")) == \
        served(gce_server, "project/numeric-project-id")
    assert as_decimal_text(value_of(report, "instance_id")) == served(gce_server, "instance/id")
    # Scopes are a newline list, not JSON, so gcp-metadata returns the raw text.
    assert value_of(report, "scopes").split() == \
        served_lines(gce_server, "instance/service-accounts/default/scopes")
    recursive = value_of(report, "recursive_service_accounts")
    assert recursive["default"]["email"] == \
        served(gce_server, "instance/service-accounts/default/email")

    assert value_of(report, "auth_project_id") == project_id
    assert value_of(report, "auth_client_class") == "Compute"
    email = served(gce_server, "instance/service-accounts/default/email")
    assert value_of(report, "auth_email") == email
    # The server caches one token per account and scope set, so a client that
    # asked with the same scopes must hold exactly the token the server hands out.
    assert value_of(report, "auth_access_token") == \
        served_token(gce_server, [CLOUD_PLATFORM_SCOPE])["access_token"]
    claims = assert_valid_id_token(gce_server, value_of(report, "id_token"), AUDIENCE, email)
    assert_full_format_claims(gce_server, claims)


# Attribute values gcp-metadata must hand back as mds serves them (after its json-bigint
# parse of any body that is JSON): text, a number beyond 2**64, JSON, a multi-line script.
NODE_ATTRIBUTES = {
    "mds-node-text": "hello node",
    "mds-node-big": "123456789012345678901234",
    "mds-node-json": '{"nested": [1, "two", 18446744073709551557]}',
    "mds-node-script": "#!/bin/sh\necho node\n",
}
NODE_MISSING_ATTRIBUTE = "mds-node-never-defined"


def from_node(value):
    """A value reported by tests/node/gce_metadata.js, with json-bigint numbers as ints."""
    if isinstance(value, dict):
        if set(value) == {"bignumber"}:
            return int(value["bignumber"])
        return {key: from_node(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_node(item) for item in value]
    return value


def as_gcp_metadata_parses(body):
    """What gcp-metadata makes of a body: its JSON value if it is JSON, else the text."""
    try:
        return json.loads(body)
    except ValueError:
        return body


def big_ints(value, found=None):
    """Every integer in a JSON value too large for a JS number to hold exactly."""
    found = [] if found is None else found
    if isinstance(value, dict):
        for item in value.values():
            big_ints(item, found)
    elif isinstance(value, list):
        for item in value:
            big_ints(item, found)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 53:
        found.append(value)
    return found


def served_identity(server, audience, account="default"):
    return served(server, "instance/service-accounts/%s/identity" % account,
                  {"audience": audience, "format": "full"})


@ALL_VM_CONFIGS
def test_node_gcp_metadata_attributes_tags_bulk_and_recursive(gce_server, client_env):
    for name, value in NODE_ATTRIBUTES.items():
        gce_server.update("instance/attributes/" + name, value)
        gce_server.update("project/attributes/" + name, value + " (project)")
    instance_names = served_lines(gce_server, "instance/attributes/")
    project_names = served_lines(gce_server, "project/attributes/")
    for prefix in ("instance/attributes/", "project/attributes/"):
        status, _, _ = fetch(gce_server, "/computeMetadata/v1/" + prefix + NODE_MISSING_ATTRIBUTE)
        assert status == 404
    bulk_keys = ["instance/tags", "instance/id", "project/project-id",
                 "project/numeric-project-id", "instance/attributes/mds-node-json"]
    spec = {"instance_attributes": instance_names, "project_attributes": project_names,
            "missing": NODE_MISSING_ATTRIBUTE, "bulk": bulk_keys, "universe": True}
    report = run_node("gce_metadata.js", client_env(gce_server), ["report", json.dumps(spec)])

    for names, prefix, seen in ((instance_names, "instance/attributes/",
                                 report["instance_attributes"]),
                                (project_names, "project/attributes/",
                                 report["project_attributes"])):
        assert sorted(seen) == sorted(names)
        for name in names:
            assert "error" not in seen[name], "%s%s: %s" % (prefix, name, seen[name])
            body = served(gce_server, prefix + name)
            assert from_node(seen[name]["value"]) == as_gcp_metadata_parses(body), name
    # The 24-digit value is beyond 2**64: json-bigint keeps it exact as a BigNumber.
    big = report["instance_attributes"]["mds-node-big"]["value"]
    assert big == {"bignumber": served(gce_server, "instance/attributes/mds-node-big")}
    script = report["project_attributes"]["mds-node-script"]["value"]
    assert script == served(gce_server, "project/attributes/mds-node-script")
    # A missing key is the server's 404, surfaced as gaxios's error with that status and
    # the server's error page as its message.
    for name, prefix in (("missing_instance_attribute", "instance/attributes/"),
                         ("missing_project_attribute", "project/attributes/")):
        missing = report[name]
        assert "value" not in missing, missing
        assert missing["status"] == 404, missing
        assert missing["class"] == "GaxiosError", missing
        _, _, body = fetch(gce_server, "/computeMetadata/v1/" + prefix + NODE_MISSING_ATTRIBUTE)
        assert missing["error"] == body.decode("utf-8")

    tags = value_of(report, "tags")
    assert isinstance(tags, list)
    assert tags == json.loads(served(gce_server, "instance/tags"))
    bulk = value_of(report, "bulk")
    assert sorted(bulk) == sorted(bulk_keys)
    for key in bulk_keys:
        assert from_node(bulk[key]) == as_gcp_metadata_parses(served(gce_server, key)), key

    for name, path in (("recursive_instance", "instance/"), ("recursive_project", "project/")):
        expected = json.loads(served(gce_server, path, {"recursive": "true"}))
        seen = value_of(report, name)
        assert from_node(seen) == expected, name
    # 64-bit ids the server serves as JSON numbers come through as exact BigNumbers, not
    # as rounded JS numbers: the instance id above all.
    instance = value_of(report, "recursive_instance")
    served_instance = json.loads(served(gce_server, "instance/", {"recursive": "true"}))
    if isinstance(served_instance["id"], int) and served_instance["id"] > 2 ** 53:
        assert instance["id"] == {"bignumber": str(served_instance["id"])}
    assert str(from_node(instance["id"])) == served(gce_server, "instance/id")
    # Likewise every other integer past 2**53 (license ids, ...): found as BigNumber text.
    node_texts = set(re.findall(r'\{"bignumber": "(\d+)"\}', json.dumps(instance)))
    assert {str(number) for number in big_ints(served_instance)} <= node_texts

    universe = served(gce_server, "universe/universe-domain")
    assert value_of(report, "universe") == universe
    assert value_of(report, "auth_universe") == universe


@pytest.mark.parametrize("flavor", ["gce", "cloudrun"])
def test_node_google_auth_scoped_tokens_and_verified_id_tokens(mds_server_factory, client_env,
                                                               flavor):
    server = mds_server_factory(flavor=flavor)
    email = served(server, "instance/service-accounts/default/email")
    # Two scopes, in an order unlike the server's sorted cache key.
    scopes = [USERINFO_EMAIL_SCOPE, STORAGE_READ_SCOPE]
    spec = {"scopes": scopes, "accounts": [email], "audience": SECOND_AUDIENCE}
    report = run_node("gce_metadata.js", client_env(server), ["report", json.dumps(spec)])

    # GoogleAuth({scopes}) and Compute({serviceAccountEmail}) ask .../token?scopes=a,b:
    # both hold exactly the token the server hands out for those scopes.
    server_token = served_token(server, scopes)["access_token"]
    assert value_of(report, "auth_access_token") == server_token
    assert value_of(report["accounts"][email], "access_token") == \
        served_token(server, scopes, email)["access_token"]
    if flavor == "cloudrun":
        # Serverless mints a token per scope set: this proves ?scopes= reached the server.
        assert server_token != served_token(server)["access_token"]
    assert value_of(report, "auth_email") == email

    # fetchIdToken asks default/identity?format=full&audience=...; the server caches it.
    id_token = value_of(report, "id_token")
    assert id_token == served_identity(server, SECOND_AUDIENCE)
    claims = assert_valid_id_token(server, id_token, SECOND_AUDIENCE, email)
    # OAuth2Client.verifyIdToken, with its cert URLs pointed at the server, accepts it.
    assert value_of(report, "id_token_verified") == claims
    assert value_of(report["accounts"][email], "id_token") == \
        served_identity(server, SECOND_AUDIENCE, email)


@pytest.mark.parametrize("gce_server", [two_account_document()], ids=["two-accounts"],
                         indirect=True)
def test_node_compute_client_for_a_secondary_account(gce_server, client_env):
    default_email = served(gce_server, "instance/service-accounts/default/email")
    env = client_env(gce_server)
    for scopes in ([], [STORAGE_READ_SCOPE]):
        spec = {"scopes": scopes, "accounts": [SECONDARY_EMAIL, default_email],
                "audience": AUDIENCE}
        report = run_node("gce_metadata.js", env, ["report", json.dumps(spec)])
        secondary = report["accounts"][SECONDARY_EMAIL]
        # Compute({serviceAccountEmail}) reads instance/service-accounts/<email>/token.
        assert value_of(secondary, "access_token") == \
            served_token(gce_server, scopes, SECONDARY_EMAIL)["access_token"]
        assert value_of(secondary, "access_token") != \
            served_token(gce_server, scopes)["access_token"]
        assert value_of(report["accounts"][default_email], "access_token") == \
            served_token(gce_server, scopes, default_email)["access_token"]
        # GoogleAuth stays with the default account.
        assert value_of(report, "auth_access_token") == \
            served_token(gce_server, scopes)["access_token"]
        assert value_of(report, "auth_email") == default_email
        id_token = value_of(secondary, "id_token")
        assert id_token == served_identity(gce_server, AUDIENCE, SECONDARY_EMAIL)
        claims = assert_valid_id_token(gce_server, id_token, AUDIENCE, SECONDARY_EMAIL)
        assert_full_format_claims(gce_server, claims)
        assert value_of(report, "id_token_verified")["email"] == default_email


def test_node_metadata_server_detection(mds_server_factory, client_env):
    """isAvailable() under each METADATA_SERVER_DETECTION of gcp-metadata, live and dead."""
    server = mds_server_factory(flavor="gce")
    dead = mds_server_factory(flavor="gce")
    dead.stop()
    dead_env = {name: dead.env[name] for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP")}
    cases = [
        # (server env, detection, extra env, isAvailable, GoogleAuth's client or None)
        ({}, None, {}, True, "Compute"),
        ({}, "ping-only", {}, True, "Compute"),
        ({}, "assume-present", {}, True, "Compute"),
        ({}, "none", {}, False, ""),
        (dead_env, None, {}, False, ""),
        (dead_env, "ping-only", {}, False, ""),
        # Told the server is there, nothing pings it.
        (dead_env, "assume-present", {}, True, None),
        # bios-only takes a serverless environment's word for it, without a ping.
        (dead_env, "bios-only", {"K_SERVICE": "mds-test"}, True, None),
    ]
    for target, detection, extra, available, client in cases:
        env = client_env(server, METADATA_SERVER_DETECTION=detection, **target, **extra)
        args = ["detect"] if client is None else ["detect", "client"]
        report = run_node("gce_metadata.js", env, args)
        what = "%s server with %s" % ("dead" if target else "live", detection)
        assert value_of(report, "is_available") is available, what
        if "K_SERVICE" in extra:
            assert value_of(report, "residency") is True, what
        if client:
            assert value_of(report, "auth_client_class") == client, what
        elif client == "":
            # No server and no other credentials: ADC finds nothing.
            assert "Could not load the default credentials" in \
                report["auth_client_class"]["error"], what
    report = run_node("gce_metadata.js",
                      client_env(server, METADATA_SERVER_DETECTION="bogus"), ["detect"])
    assert report["is_available"]["class"] == "RangeError"
    assert "METADATA_SERVER_DETECTION" in report["is_available"]["error"]


@pytest.mark.parametrize("kind", ["instance", "project"])
def test_node_gcp_metadata_wait_for_change_sees_updates(gce_server, client_env, kind):
    property_name = "attributes/mds-node-watch"
    path = "%s/%s" % (kind, property_name)
    gce_server.update(path, "v1")
    node = require_tool("node")
    process = subprocess.Popen(
        [node, os.path.join(NODE_DIR, "gce_metadata.js"), "watch", kind, property_name, "stop"],
        env=client_env(gce_server), cwd=NODE_DIR, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        reader = LineReader(process.stdout)
        assert reader.next_json(20) == {"value": served(gce_server, path)}
        for value in ("v2", "v3 with spaces", "stop"):
            # Give the client time to park on its wait_for_change request, so the update
            # is delivered through the hanging GET, not a fresh read.
            time.sleep(0.5)
            gce_server.update(path, value)
            assert reader.next_json(20) == {"value": served(gce_server, path)}
        assert process.wait(timeout=20) == 0
    finally:
        stderr = end_client(process)
    assert stderr == "", stderr


@VM_CONFIGS
def test_go_compute_metadata_helpers(gce_server, client_env):
    report = run_go("gcemeta", client_env(gce_server), ["info"])

    assert report["on_gce"] is True
    assert value_of(report, "project_id") == served(gce_server, "project/project-id").strip()
    assert value_of(report, "numeric_project_id") == \
        served(gce_server, "project/numeric-project-id").strip()
    assert value_of(report, "instance_id") == served(gce_server, "instance/id").strip()
    assert value_of(report, "instance_name") == served(gce_server, "instance/name").strip()
    assert value_of(report, "hostname") == served(gce_server, "instance/hostname").strip()
    assert value_of(report, "zone") == \
        served(gce_server, "instance/zone").strip().rsplit("/", 1)[-1]
    assert value_of(report, "email") == \
        served(gce_server, "instance/service-accounts/default/email").strip()
    assert value_of(report, "scopes") == \
        served_lines(gce_server, "instance/service-accounts/default/scopes")
    assert value_of(report, "instance_tags") == json.loads(served(gce_server, "instance/tags"))
    assert value_of(report, "instance_attributes") == \
        [line.strip() for line in served(gce_server, "instance/attributes/").strip().split("\n")]
    assert value_of(report, "project_attributes") == \
        [line.strip() for line in served(gce_server, "project/attributes/").strip().split("\n")]
    assert value_of(report, "internal_ip") == \
        served(gce_server, "instance/network-interfaces/0/ip").strip()
    assert value_of(report, "external_ip") == \
        served(gce_server, "instance/network-interfaces/0/access-configs/0/external-ip").strip()
    assert report["missing_is_not_defined"] is True


# The helpers of cloud.google.com/go/compute/metadata that strings.TrimSpace the
# body of these paths; the Go program also reports each body untrimmed.
GO_TRIMMED_HELPERS = {
    "project_id": "project/project-id",
    "numeric_project_id": "project/numeric-project-id",
    "instance_id": "instance/id",
    "instance_name": "instance/name",
    "hostname": "instance/hostname",
    "internal_ip": "instance/network-interfaces/0/ip",
    "external_ip": "instance/network-interfaces/0/access-configs/0/external-ip",
    "email": "instance/service-accounts/default/email",
}
# Attribute values the Go test writes, each one a client might mangle.
GO_INSTANCE_ATTRIBUTES = {
    "mds-go-trailing-space": "kept as is \n\n",
    "mds-go-leading-space": "  \tleading",
    "mds-go-empty": "",
    "mds-go-unicode": "gr\u00fc\u00dfe \u2713",
}
GO_PROJECT_ATTRIBUTES = {"mds-go-project-trailing": "project value\n"}
GO_MISSING_ATTRIBUTE = "mds-go-never-defined"


@ALL_VM_CONFIGS
def test_go_attribute_values_accounts_and_trimming(gce_server, client_env):
    for name, value in GO_INSTANCE_ATTRIBUTES.items():
        gce_server.update("instance/attributes/" + name, value)
    for name, value in GO_PROJECT_ATTRIBUTES.items():
        gce_server.update("project/attributes/" + name, value)
    instance_names = served_lines(gce_server, "instance/attributes/")
    project_names = served_lines(gce_server, "project/attributes/")
    assert set(GO_INSTANCE_ATTRIBUTES) <= set(instance_names)
    for prefix in ("instance/attributes/", "project/attributes/"):
        status, _, _ = fetch(gce_server, "/computeMetadata/v1/" + prefix + GO_MISSING_ATTRIBUTE)
        assert status == 404
    # Every account the server lists (its default e-mail, "default", any other), and ""
    # for the library's own default.
    accounts = [line.rstrip("/") for line in served_lines(gce_server, "instance/service-accounts/")]
    args = ["info"]
    for name in instance_names + [GO_MISSING_ATTRIBUTE]:
        args += ["-instance-attr", name]
    for name in project_names + [GO_MISSING_ATTRIBUTE]:
        args += ["-project-attr", name]
    for name in accounts + [""]:
        args += ["-account", name]
    report = run_go("gcemeta", client_env(gce_server), args)

    assert value_of(report, "instance_attributes") == instance_names
    assert value_of(report, "project_attributes") == project_names
    # InstanceAttributeValue / ProjectAttributeValue hand back the body untouched: no
    # trimming, an empty value is a value, not an error.
    instance_values = report["instance_attribute_values"]
    for name in instance_names:
        assert instance_values[name] == {"value": served(gce_server, "instance/attributes/" + name)}
    for name, value in GO_INSTANCE_ATTRIBUTES.items():
        assert instance_values[name] == {"value": value}
    project_values = report["project_attribute_values"]
    for name in project_names:
        assert project_values[name] == {"value": served(gce_server, "project/attributes/" + name)}
    for name, value in GO_PROJECT_ATTRIBUTES.items():
        assert project_values[name] == {"value": value}
    # The server's 404 is the library's NotDefinedError, naming the path it asked for.
    for values, prefix in ((instance_values, "instance/attributes/"),
                           (project_values, "project/attributes/")):
        missing = values[GO_MISSING_ATTRIBUTE]
        assert missing["not_defined"] is True, missing
        assert missing["not_defined_suffix"] == prefix + GO_MISSING_ATTRIBUTE
        assert missing["value"] == ""

    # The server ends no leaf with whitespace, so the trimming helpers and a plain Get agree.
    for helper, path in GO_TRIMMED_HELPERS.items():
        body = served(gce_server, path)
        assert body == body.strip(), "%s ends in whitespace: %r" % (path, body)
        assert report["raw"][path] == {"value": body}
        assert value_of(report, helper) == body
    zone = served(gce_server, "instance/zone")
    assert report["raw"]["instance/zone"] == {"value": zone}
    assert value_of(report, "zone") == zone.rsplit("/", 1)[-1]

    seen = report["accounts"]
    for name in accounts + [""]:
        path = "instance/service-accounts/%s/" % (name or "default")
        assert value_of(seen[name], "email") == served(gce_server, path + "email")
        assert value_of(seen[name], "scopes") == served_lines(gce_server, path + "scopes")
    assert seen[""] == seen["default"]
    default_email = served(gce_server, "instance/service-accounts/default/email")
    assert seen[default_email] == seen["default"]
    if SECONDARY_EMAIL in accounts:
        assert value_of(seen[SECONDARY_EMAIL], "email") == SECONDARY_EMAIL
        assert value_of(seen[SECONDARY_EMAIL], "scopes") == SECONDARY_SCOPES


def test_go_get_with_a_raw_unicode_query_means_what_it_says(gce_server, client_env):
    # metadata.Get sends a hand-built suffix, query included, as written: an audience with
    # non-ASCII characters reaches the server as raw UTF-8, not percent-encoded.
    audience = "https://caf\u00e9.example/\u00fcber"
    suffix = "instance/service-accounts/default/identity?audience=" + audience
    report = run_go("gcemeta", client_env(gce_server), ["info", "-get", suffix])
    answer = report["get"][suffix]
    assert "error" not in answer, answer
    assert decode_jwt(answer["value"])[1]["aud"] == audience


def end_client(process):
    """Stop a client program if it still runs; return what it wrote on stderr."""
    if process.poll() is None:
        process.kill()
        process.wait()
    stderr = process.stderr.read().decode("utf-8", "replace")
    process.stdout.close()
    process.stderr.close()
    return stderr


class LineReader:
    """Reads a child's stdout lines on a thread so the test can wait with a timeout."""

    def __init__(self, stream):
        self.lines = queue.Queue()
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()

    def _pump(self, stream):
        for line in iter(stream.readline, b""):
            self.lines.put(line.decode("utf-8"))
        self.lines.put(None)

    def next_json(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no output from the subscriber within %ss" % timeout)
        assert line is not None, "subscriber exited early"
        return json.loads(line)


@pytest.mark.parametrize("path", ["instance/attributes/mds-subscribe-test",
                                  "project/attributes/mds-subscribe-test"])
def test_go_subscribe_sees_attribute_updates(gce_server, client_env, path):
    gce_server.update(path, "v1")
    assert served(gce_server, path) == "v1"

    process = start_go("gcemeta", client_env(gce_server), ["subscribe", path, "stop"])
    try:
        reader = LineReader(process.stdout)
        # Subscribe hands fn the body untrimmed, so "v1" also shows the server adds no newline.
        assert reader.next_json(20) == {"value": "v1", "ok": True}
        # Give the client time to park on its wait_for_change request, so the
        # update below is delivered through the hanging GET, not a fresh read.
        time.sleep(0.5)
        gce_server.update(path, "v2")
        assert reader.next_json(20) == {"value": served(gce_server, path), "ok": True}
        assert served(gce_server, path) == "v2"
        # Whitespace the value itself carries reaches the subscriber as written.
        spaced = "  v3 with spaces \n\n"
        gce_server.update(path, spaced)
        assert reader.next_json(20) == {"value": spaced, "ok": True}
        assert served(gce_server, path) == spaced
        gce_server.update(path, "stop")
        assert reader.next_json(20) == {"value": "stop", "ok": True}
        assert process.wait(timeout=20) == 0
    finally:
        stderr = end_client(process)
    assert "error" not in stderr.lower(), stderr


def test_go_subscribe_to_a_missing_attribute_is_not_defined(gce_server, client_env):
    path = "instance/attributes/" + GO_MISSING_ATTRIBUTE
    status, _, _ = fetch(gce_server, "/computeMetadata/v1/" + path)
    assert status == 404
    process = start_go("gcemeta", client_env(gce_server), ["subscribe", path, "never"])
    try:
        stdout, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # Subscribe's first read gets the 404 and returns the NotDefinedError at once.
    assert process.returncode == 1
    last = json.loads(stdout.decode("utf-8").strip().splitlines()[-1])
    assert last["not_defined"] is True, last
    assert path in last["error"]


def test_go_subscribe_reports_deletion(gce_server, client_env):
    path = "instance/attributes/mds-subscribe-delete"
    gce_server.update(path, "present")
    process = start_go("gcemeta", client_env(gce_server), ["subscribe", path, "never"])
    try:
        reader = LineReader(process.stdout)
        assert reader.next_json(20) == {"value": "present", "ok": True}
        time.sleep(0.5)
        gce_server.delete(path)
        # Subscribe maps the 404 of a deleted key to ok=false and returns.
        assert reader.next_json(20) == {"value": "", "ok": False}
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_go_subscribe_recursive_directory(gce_server, client_env):
    """Watching a whole directory, as the guest agent does, wakes on any change inside."""
    suffix = "instance/attributes/?recursive=true"
    process = start_go("gcemeta", client_env(gce_server), ["subscribe", suffix, "never-sent"])
    try:
        reader = LineReader(process.stdout)
        first = reader.next_json(20)
        assert first["ok"] is True
        assert json.loads(first["value"]) == \
            json.loads(served(gce_server, "instance/attributes/", {"recursive": "true"}))
        time.sleep(0.5)
        gce_server.update("instance/attributes/mds-recursive-watch", "changed")
        second = reader.next_json(20)
        assert second["ok"] is True
        seen = json.loads(second["value"])
        assert seen["mds-recursive-watch"] == "changed"
        assert seen == json.loads(served(gce_server, "instance/attributes/", {"recursive": "true"}))
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def test_clients_watching_for_preemption_and_maintenance_see_them(tmp_path, client_env):
    """mds run as a user runs it, with both events scheduled on the command line: Go's
    Subscribe (what the guest agent uses) and google-auth's wait_for_change see each change."""
    go_binary("gcemeta")          # built before the clock starts, so the events are still ahead
    cli = MdsCli(tmp_path, "--preempt-after", "4s", "--maintenance-event-after", "2s")
    watchers = []
    try:
        env = client_env(cli)
        for path, stop in (("instance/preempted", "TRUE"),
                           ("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")):
            process = start_go("gcemeta", env, ["subscribe", path, stop])
            watchers.append((process, LineReader(process.stdout)))
        python_report = run_python("py_gce_wait.py", env, ["instance/preempted", "TRUE"])
        seen = [[reader.next_json(20) for _ in range(2)] for _, reader in watchers]
        exits = [process.wait(timeout=20) for process, _ in watchers]
    finally:
        for process, _ in watchers:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()
        cli.stop()
    assert seen[0] == [{"value": "FALSE", "ok": True}, {"value": "TRUE", "ok": True}]
    # A Spot VM's host maintenance terminates it.
    assert seen[1] == [{"value": "NONE", "ok": True},
                       {"value": "TERMINATE_ON_HOST_MAINTENANCE", "ok": True}]
    assert exits == [0, 0]
    assert python_report == {"values": ["FALSE", "TRUE"]}


def assert_go_token(report, name, server_token):
    token = report[name]
    assert "error" not in token, "%s: %s" % (name, token["error"])
    assert token["access_token"] == server_token["access_token"]
    assert token["token_type"] == "Bearer"
    expected_expiry = time.time() + server_token["expires_in"]
    assert abs(token["expiry"] - expected_expiry) <= CLOCK_SLACK_SECONDS


@VM_CONFIGS
def test_go_oauth2_default_credentials_and_compute_token(gce_server, client_env):
    report = run_go("oauth2google", client_env(gce_server))
    assert "adc_error" not in report, report["adc_error"]
    assert report["adc_project_id"] == served(gce_server, "project/project-id").strip()

    # The Go program asks without scopes, so compare with the scope-less token.
    server_token = served_token(gce_server)
    for name in ("adc_token", "compute_token"):
        assert_go_token(report, name, server_token)


@pytest.mark.parametrize("flavor", ["gce", "cloudrun"])
def test_go_oauth2_compute_token_with_scopes(mds_server_factory, client_env, flavor):
    server = mds_server_factory(flavor=flavor)
    # Two scopes, in an order unlike the server's sorted cache key.
    scopes = [USERINFO_EMAIL_SCOPE, STORAGE_READ_SCOPE]
    report = run_go("oauth2google", client_env(server), scopes)
    assert "adc_error" not in report, report["adc_error"]
    # ComputeTokenSource("", scopes...) asks default/token?scopes=a,b; ADC on GCE builds
    # the same source, so both hold the token the server hands out for those scopes.
    server_token = served_token(server, scopes)
    assert_go_token(report, "compute_token", server_token)
    assert_go_token(report, "adc_token", server_token)
    if flavor == "cloudrun":
        # Serverless mints a token per scope set: this proves ?scopes= reached the server.
        assert report["compute_token"]["access_token"] != served_token(server)["access_token"]


@pytest.mark.parametrize("gce_server", [two_account_document()], ids=["two-accounts"],
                         indirect=True)
def test_go_oauth2_compute_token_for_other_accounts(gce_server, client_env):
    default_token = served_token(gce_server)["access_token"]
    default_email = served(gce_server, "instance/service-accounts/default/email")
    env = client_env(gce_server)
    for account, scopes in ((SECONDARY_EMAIL, []), (SECONDARY_EMAIL, [STORAGE_READ_SCOPE]),
                            (default_email, [])):
        report = run_go("oauth2google", env, ["-account", account] + scopes)
        # ComputeTokenSource(account, ...) reads instance/service-accounts/<account>/token.
        assert_go_token(report, "compute_token", served_token(gce_server, scopes, account))
        # ADC stays with the default account.
        assert_go_token(report, "adc_token", served_token(gce_server, scopes))
        if account == SECONDARY_EMAIL:
            assert report["compute_token"]["access_token"] != default_token


@VM_CONFIGS
def test_go_idtoken_from_the_identity_endpoint(gce_server, client_env):
    """google.golang.org/api/idtoken without a credentials file: NewTokenSource and
    NewClient read default/identity?audience=...&format=full; its Validator, pointed at
    the server's JWKS, accepts the token."""
    require_path(os.path.join(DEBIAN_GOPATH, "src", "google.golang.org", "api", "idtoken"),
                 "Debian package golang-google-api-dev")
    report = run_go("idtoken", client_env(gce_server), [AUDIENCE, SECOND_AUDIENCE])
    email = served(gce_server, "instance/service-accounts/default/email")

    token = report["token"]
    assert "error" not in token, token["error"]
    assert token["token"] == \
        served(gce_server, IDENTITY_PATH, {"audience": AUDIENCE, "format": "full"})
    assert token["token_type"] == "Bearer"
    claims = assert_valid_id_token(gce_server, token["token"], AUDIENCE, email)
    assert_full_format_claims(gce_server, claims)
    # The library assumes a lifetime shorter than the token's own.
    assert token["expiry"] <= claims["exp"]

    validated = report["validated"]
    assert "error" not in validated, validated["error"]
    assert validated["claims"] == claims
    assert (validated["iss"], validated["aud"], validated["exp"], validated["iat"],
            validated["sub"]) == (claims["iss"], AUDIENCE, claims["exp"], claims["iat"],
                                  claims["sub"])
    assert "audience provided does not match" in \
        report["validated_for_other_audience"].get("error", "")
    # Google's certificate URL, which the program answers from the server's /oauth2/v3/certs.
    assert report["validator_fetched"] == ["https://www.googleapis.com/oauth2/v3/certs"]

    # idtoken.NewClient sends the token for its audience as a bearer token.
    authorization = value_of(report, "client_authorization")
    assert authorization == "Bearer " + \
        served(gce_server, IDENTITY_PATH, {"audience": SECOND_AUDIENCE, "format": "full"})
    assert_valid_id_token(gce_server, authorization.split(" ", 1)[1], SECOND_AUDIENCE, email)


@VM_CONFIGS
def test_python_google_auth_and_storage(gce_server, client_env):
    report = run_python("py_gce_client.py", client_env(gce_server), [AUDIENCE])
    project_id = served(gce_server, "project/project-id")
    email = served(gce_server, "instance/service-accounts/default/email")

    assert report["blocked"] == [], "client tried to leave loopback"
    assert value_of(report, "ping") is True
    adc = value_of(report, "adc")
    assert adc["project_id"] == project_id
    assert adc["credentials_class"] == "google.auth.compute_engine.credentials.Credentials"
    assert value_of(report, "metadata_project_id") == project_id

    compute = value_of(report, "compute_token")
    assert compute["service_account_email"] == email
    vm_scopes = served_lines(gce_server, "instance/service-accounts/default/scopes")
    # google-auth adopts the VM's scopes and sends them back with the request.
    assert compute["scopes"] == vm_scopes
    server_token = served_token(gce_server, vm_scopes)
    assert compute["token"] == server_token["access_token"]
    assert abs(compute["expiry"] - (time.time() + server_token["expires_in"])) <= \
        CLOCK_SLACK_SECONDS

    claims = assert_valid_id_token(gce_server, value_of(report, "id_token"), AUDIENCE, email)
    assert_full_format_claims(gce_server, claims)

    storage = value_of(report, "storage_client")
    assert storage["project"] == project_id
    assert storage["credentials_class"] == "google.auth.compute_engine.credentials.Credentials"


@pytest.mark.parametrize("email, leaves", [
    (None, True),                                        # the built-in *.gserviceaccount.com
    ("app@mds-emulator.example", False),
])
def test_python_authorized_requests_and_the_regional_access_boundary_lookup(
        mds_server_factory, client_env, email, leaves):
    # README: google-auth looks up the account's regional access boundary at
    # iamcredentials.googleapis.com after an authorised request, unless the e-mail is outside
    # *.gserviceaccount.com.  The harness refuses and records every non-loopback attempt.
    config = None
    if email:
        config = {"computeMetadata": {"v1": {"instance": {"serviceAccounts": {
            email: {"email": email,
                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}}}}}}
    server = mds_server_factory(config=config)
    report = run_python("py_gce_client.py", client_env(server),
                        [AUDIENCE, "--authorized-get", server.url + "/computeMetadata/v1/"])
    assert value_of(report, "authorized_get") == 200
    if leaves:
        assert any("iamcredentials.googleapis.com" in what for what in report["blocked"]), \
            report["blocked"]
    else:
        assert report["blocked"] == []


@VM_CONFIGS
def test_python_id_token_credentials_from_the_identity_endpoint(gce_server, client_env):
    report = run_python("py_gce_client.py", client_env(gce_server),
                        [AUDIENCE, "--retarget-audience", SECOND_AUDIENCE])
    assert report["blocked"] == [], "client tried to leave loopback"
    email = served(gce_server, "instance/service-accounts/default/email")

    # IDTokenCredentials(use_metadata_identity_endpoint=True) always asks format=full; the
    # server caches a token per audience and format, so the client holds the one served.
    credentials = value_of(report, "id_token_credentials")
    assert credentials["service_account_email"] == email
    assert credentials["token"] == \
        served(gce_server, IDENTITY_PATH, {"audience": AUDIENCE, "format": "full"})
    claims = assert_valid_id_token(gce_server, credentials["token"], AUDIENCE, email)
    assert_full_format_claims(gce_server, claims)
    assert "license_id" not in claims["google"]["compute_engine"]
    # google-auth takes the expiry from the token's own exp claim.
    assert credentials["expiry"] == claims["exp"]

    retargeted = value_of(report, "id_token_credentials_retargeted")
    assert retargeted["token"] == \
        served(gce_server, IDENTITY_PATH, {"audience": SECOND_AUDIENCE, "format": "full"})
    assert retargeted["token"] != credentials["token"]
    retargeted_claims = assert_valid_id_token(gce_server, retargeted["token"],
                                              SECOND_AUDIENCE, email)
    assert_full_format_claims(gce_server, retargeted_claims)
    assert retargeted["expiry"] == retargeted_claims["exp"]

    # licenses=TRUE (through _metadata.get: the credentials class has no such option).
    with_licenses = value_of(report, "id_token_with_licenses")
    assert with_licenses == served(gce_server, IDENTITY_PATH,
                                   {"audience": AUDIENCE, "format": "full", "licenses": "TRUE"})
    license_claims = assert_valid_id_token(gce_server, with_licenses, AUDIENCE, email)
    assert_full_format_claims(gce_server, license_claims)
    served_licenses = json.loads(served(gce_server, "instance/licenses/", {"recursive": "true"}))
    assert served_licenses, "the VM configs under test all carry licenses"
    assert license_claims["google"]["compute_engine"]["license_id"] == \
        [entry["id"] for entry in served_licenses]


@VM_CONFIGS
def test_python_metadata_helpers_and_universe_domain(gce_server, client_env):
    report = run_python("py_gce_client.py", client_env(gce_server), [AUDIENCE])
    assert report["blocked"] == [], "client tried to leave loopback"

    assert value_of(report, "metadata_instance_recursive") == \
        json.loads(served(gce_server, "instance/", {"recursive": "true"}))
    assert value_of(report, "metadata_get_project_id") == \
        served(gce_server, "project/project-id")
    info = value_of(report, "metadata_service_account_info")
    assert info == json.loads(
        served(gce_server, "instance/service-accounts/default/", {"recursive": "true"}))
    assert info["email"] == served(gce_server, "instance/service-accounts/default/email")
    assert info["scopes"] == served_lines(gce_server, "instance/service-accounts/default/scopes")
    assert value_of(report, "universe_domain") == served(gce_server, "universe/universe-domain")


@pytest.mark.parametrize("flavor", ["gce", "cloudrun"])
def test_python_credentials_with_scopes(mds_server_factory, client_env, flavor):
    server = mds_server_factory(flavor=flavor)
    scopes = [STORAGE_READ_SCOPE]
    # Two scopes, in an order unlike the server's sorted cache key.
    other_scopes = [USERINFO_EMAIL_SCOPE, STORAGE_READ_SCOPE]
    report = run_python("py_gce_client.py", client_env(server),
                        [AUDIENCE, "--scopes", ",".join(scopes),
                         "--with-scopes", ",".join(other_scopes)])
    assert report["blocked"] == [], "client tried to leave loopback"

    scoped = value_of(report, "scoped_token")
    assert scoped["scopes"] == scopes          # the user's scopes are kept, not the VM's
    assert scoped["token"] == served_token(server, scopes)["access_token"]
    with_scopes = value_of(report, "with_scopes_token")
    assert with_scopes["scopes"] == other_scopes
    assert with_scopes["token"] == served_token(server, other_scopes)["access_token"]
    for token in (scoped, with_scopes):
        assert token["service_account_email"] == \
            served(server, "instance/service-accounts/default/email")
        expected_expiry = time.time() + served_token(server)["expires_in"]
        assert abs(token["expiry"] - expected_expiry) <= CLOCK_SLACK_SECONDS
    if flavor == "cloudrun":
        # Serverless mints a token per scope set, so these prove ?scopes= reached the
        # server; a VM applies its own scopes whatever is asked (test_gce_variants).
        unscoped = served_token(server)["access_token"]
        assert scoped["token"] != unscoped
        assert with_scopes["token"] != unscoped
        assert scoped["token"] != with_scopes["token"]


@pytest.mark.parametrize("gce_server", [two_account_document()], ids=["two-accounts"],
                         indirect=True)
def test_python_credentials_for_a_secondary_account(gce_server, client_env):
    """gcloud's credentials for a non-default VM account:
    compute_engine.Credentials(service_account_email=...)."""
    account_path = "instance/service-accounts/%s/" % SECONDARY_EMAIL
    assert served_lines(gce_server, "instance/service-accounts/") == \
        sorted([served(gce_server, "instance/service-accounts/default/email") + "/",
                "default/", SECONDARY_EMAIL + "/"])
    report = run_python("py_gce_client.py", client_env(gce_server),
                        [AUDIENCE, "--account", SECONDARY_EMAIL])
    assert report["blocked"] == [], "client tried to leave loopback"

    info = value_of(report, "account_info")
    assert info == json.loads(served(gce_server, account_path, {"recursive": "true"}))
    assert info["email"] == SECONDARY_EMAIL

    credentials = value_of(report, "account_token")
    assert credentials["service_account_email"] == SECONDARY_EMAIL
    # Without scopes of its own the credentials adopt the account's.
    assert credentials["scopes"] == served_lines(gce_server, account_path + "scopes") == \
        SECONDARY_SCOPES
    # google-auth (2.62) reads the account's info from its own path but always asks
    # default/token for the token itself, with the account's scopes.
    assert credentials["token"] == \
        served_token(gce_server, credentials["scopes"])["access_token"]

    # The account's own token, from its own token path.
    secondary_token = served_token(gce_server, account=SECONDARY_EMAIL)["access_token"]
    assert value_of(report, "account_direct_token") == secondary_token
    assert secondary_token != served_token(gce_server)["access_token"]

    # google-auth reads universe/universe-domain; gcloud does the same and sets it.
    assert value_of(report, "universe_domain") == \
        served(gce_server, "universe/universe-domain") == CUSTOM_UNIVERSE
    # The storage client, built for googleapis.com, refuses credentials from another universe.
    assert "universe domain found in the credentials (%s)" % CUSTOM_UNIVERSE in \
        report["storage_client"].get("error", "")


@pytest.mark.parametrize("gce_server", [custom_vm_document()], ids=["custom-vm"], indirect=True)
def test_python_google_auth_finds_the_server_through_the_legacy_gce_metadata_root(
        gce_server, client_env):
    """GCE_METADATA_ROOT is GCE_METADATA_HOST's original name; gcloud reads only it, and
    google-auth falls back to it when GCE_METADATA_HOST is unset."""
    # google-auth's detection ping reads GCE_METADATA_IP whatever the host variable is, so
    # only GCE_METADATA_HOST goes: every metadata read below has GCE_METADATA_ROOT alone to
    # go by, and without it would ask metadata.google.internal (refused by the harness).
    env = client_env(gce_server, GCE_METADATA_HOST=None)
    # Checked first: a client sent nowhere only fails after its retries run out.
    assert env.get("GCE_METADATA_ROOT") == gce_server.env["GCE_METADATA_HOST"]
    report = run_python("py_gce_client.py", env, [AUDIENCE])
    project_id = served(gce_server, "project/project-id")

    assert value_of(report, "metadata_get_project_id") == project_id
    assert value_of(report, "adc")["project_id"] == project_id
    compute = value_of(report, "compute_token")
    assert compute["service_account_email"] == \
        served(gce_server, "instance/service-accounts/default/email")
    assert compute["token"] == served_token(gce_server, compute["scopes"])["access_token"]
    assert report["blocked"] == [], "client tried to leave loopback"


def test_client_env_shields_clients_from_outer_environment(gce_server, client_env, monkeypatch):
    # Each of these, if it leaked into the client, would send ADC or the
    # metadata requests somewhere other than the server under test.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "leaked-project")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIALEAKED")
    env = client_env(gce_server)
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env
    assert "GOOGLE_CLOUD_PROJECT" not in env
    assert "AWS_ACCESS_KEY_ID" not in env
    assert "HTTP_PROXY" not in env
    assert env["GCE_METADATA_HOST"] == gce_server.env["GCE_METADATA_HOST"]
    assert os.listdir(env["HOME"]) == ["gcloud-config"]
    assert os.listdir(env["CLOUDSDK_CONFIG"]) == []

    report = run_python("py_gce_client.py", env, [AUDIENCE])
    assert value_of(report, "adc")["project_id"] == served(gce_server, "project/project-id")
