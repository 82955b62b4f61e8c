"""Real AWS clients against the EC2 flavor: boto3/botocore (credential chain, IMDS region
lookup, container provider), the AWS SDK for JavaScript v3 (fromInstanceMetadata,
fromContainerMetadata, fromHttp), the AWS SDKs for Go v1 and v2 (IMDS clients, EC2 role
and container credential providers), the `ec2-metadata` package and cloud-init's EC2
datasource.

Every client runs in a child process with an isolated environment (tests/clients.py) so that
it sees only the server under test.
"""

import http.client
import json
import os
import subprocess
import sys

import pytest

import clients
import mds
from fake_sts import FakeSts
from clients import BUILD_DIR, TESTS_DIR, require_path, run_node, run_python

CLIENT_TIMEOUT = 60

# botocore's credential chain, run in a fresh interpreter. Any WARNING botocore logs (e.g.
# its "credential expiration extension" when served credentials are too close to expiry) is
# reported so the test can insist there is none.
BOTOCORE_CREDENTIALS = r"""
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("botocore").addHandler(Keep(level=logging.WARNING))
logging.getLogger("botocore").setLevel(logging.WARNING)
import boto3, botocore.session
report = {}
try:
    session = botocore.session.Session()
    creds = session.get_credentials()
    if creds is None:
        report["error"] = "no credentials"
    else:
        frozen = creds.get_frozen_credentials()
        report.update(method=creds.method, access_key=frozen.access_key,
                      secret_key=frozen.secret_key, token=frozen.token,
                      expiry=str(getattr(creds, "_expiry_time", "")))
    b3 = boto3.Session().get_credentials()
    report["boto3_access_key"] = b3.get_frozen_credentials().access_key if b3 else None
except Exception as exc:
    report["error"] = "%s: %s" % (type(exc).__name__, exc)
report["warnings"] = records
print(json.dumps(report))
"""

BOTOCORE_REGION = r"""
import json
import botocore.session
from botocore.utils import IMDSRegionProvider
session = botocore.session.Session()
print(json.dumps({"region": IMDSRegionProvider(session).provide()}))
"""

# ec2-metadata hard-codes http://169.254.169.254/latest/ in EC2Metadata.__init__ and has no
# setting for it; the URLs it builds are plain instance attributes, so an instance is
# re-pointed at the server by setting those four attributes (nothing else is patched).
EC2_METADATA = r"""
import json, sys
from ec2_metadata import EC2Metadata
base = sys.argv[1].rstrip("/") + "/latest/"
md = EC2Metadata()
md.service_url = base
md.dynamic_url = base + "dynamic/"
md.metadata_url = base + "meta-data/"
md.userdata_url = base + "user-data/"
interfaces = {}
for mac, nic in md.network_interfaces.items():
    interfaces[mac] = {"private_ipv4s": nic.private_ipv4s, "public_ipv4s": nic.public_ipv4s,
                       "subnet_id": nic.subnet_id, "vpc_id": nic.vpc_id,
                       "ipv4_associations": nic.ipv4_associations,
                       "security_groups": nic.security_groups,
                       "vpc_ipv4_cidr_blocks": nic.vpc_ipv4_cidr_blocks}
spot = md.spot_instance_action
try:
    tags = dict(md.tags)
except Exception:  # the library raises on the 404 that means "tags not enabled"
    tags = None
print(json.dumps({
    "region": md.region, "availability_zone": md.availability_zone,
    "availability_zone_id": md.availability_zone_id, "instance_id": md.instance_id,
    "instance_type": md.instance_type, "account_id": md.account_id, "ami_id": md.ami_id,
    "private_ipv4": md.private_ipv4, "public_ipv4": md.public_ipv4, "mac": md.mac,
    "private_hostname": md.private_hostname, "public_hostname": md.public_hostname,
    "instance_profile_name": md.instance_profile_name,
    "instance_profile_arn": md.instance_profile_arn,
    "iam_security_credentials": md.iam_security_credentials,
    "user_data": md.user_data.decode("utf-8") if md.user_data is not None else None,
    "tags": tags, "security_groups": md.security_groups,
    "partition": md.partition, "domain": md.domain,
    "public_keys": {name: key.openssh_key for name, key in md.public_keys.items()},
    "network_interfaces": interfaces,
    "spot": [spot.action, spot.time.isoformat()] if spot else None,
    "lifecycle": md.autoscaling_target_lifecycle_state,
}))
"""


def run_python_code(code, env, args=()):
    """Run `code` in a fresh interpreter with `env`; return the JSON it printed last."""
    completed = subprocess.run([sys.executable, "-c", code] + [str(a) for a in args],
                               env=env, cwd=TESTS_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=CLIENT_TIMEOUT)
    stdout = completed.stdout.decode("utf-8", "replace")
    assert completed.returncode == 0, "exit %d\n%s\n%s" % (
        completed.returncode, stdout, completed.stderr.decode("utf-8", "replace"))
    return json.loads([line for line in stdout.splitlines() if line.strip()][-1])


@pytest.fixture
def ec2(mds_server_factory):
    def start(config=None, **options):
        return mds_server_factory(config=config, flavor="ec2", options=options)
    return start


def served_credentials(server, role=None, source=None):
    """What the server serves right now (raw HTTP), to compare with what a client got."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                      source_address=(source, 0) if source else None)
    conn.request("PUT", "/latest/api/token",
                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = conn.getresponse().read().decode()
    headers = {"X-aws-ec2-metadata-token": token}
    if role is None:
        conn.request("GET", "/latest/meta-data/iam/security-credentials/", headers=headers)
        role = conn.getresponse().read().decode()
    conn.request("GET", "/latest/meta-data/iam/security-credentials/" + role, headers=headers)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


# ---------------------------------------------------------------------------
# botocore / boto3
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["v1-allowed", "v1-disabled", "imdsv2-required"])
def test_botocore_credential_chain(ec2, client_env, mode):
    server = ec2(imdsv2_required=(mode == "imdsv2-required"))
    extra = {"AWS_EC2_METADATA_V1_DISABLED": "true"} if mode == "v1-disabled" else {}
    report = run_python_code(BOTOCORE_CREDENTIALS, client_env(server, **extra))
    assert "error" not in report, report
    assert report["method"] == "iam-role"
    served = served_credentials(server)
    assert report["access_key"] == served["AccessKeyId"]
    assert report["secret_key"] == served["SecretAccessKey"]
    assert report["token"] == served["Token"]
    assert report["boto3_access_key"] == served["AccessKeyId"]
    assert report["expiry"].startswith(served["Expiration"][:10])
    assert report["warnings"] == []


def test_botocore_sees_no_credentials_when_the_endpoint_is_wrong(ec2, client_env):
    """Sanity check of the harness: pointed elsewhere, botocore must come back empty."""
    server = ec2()
    env = client_env(server, AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9/",
                     AWS_METADATA_SERVICE_TIMEOUT="1")
    report = run_python_code(BOTOCORE_CREDENTIALS, env)
    assert report.get("error") == "no credentials"


def test_botocore_static_and_assume_role_sources(ec2, client_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASERVERSIDE000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "server-side-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "server-side-token")
    server = ec2(static_credentials=True)
    report = run_python_code(BOTOCORE_CREDENTIALS, client_env(server))
    assert (report["access_key"], report["secret_key"], report["token"]) == (
        "AKIASERVERSIDE000001", "server-side-secret", "server-side-token")
    # AssumeRole, signed with those keys, against a local STS: botocore gets the session STS
    # issued, with no expiry warning.
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with FakeSts({"AKIASERVERSIDE000001": ("server-side-secret", None)},
                 region="eu-central-1") as sts:
        server = ec2(role_arn="arn:aws:iam::210987654321:role/app-role", sts_endpoint=sts.url,
                     sts_region="eu-central-1")
        report = run_python_code(BOTOCORE_CREDENTIALS, client_env(server))
        assert "error" not in report, report
        issued = sts.issued[-1]
        assert (report["access_key"], report["secret_key"], report["token"]) == issued[:3]
        assert report["method"] == "iam-role" and report["warnings"] == []


def test_botocore_imds_region_lookup(ec2, client_env):
    server = ec2(config={"ec2": {"meta-data": {"placement": {
        "availability-zone": "eu-west-3b"}}}})
    assert run_python_code(BOTOCORE_REGION, client_env(server)) == {"region": "eu-west-3"}
    required = ec2(imdsv2_required=True, config={"ec2": {"meta-data": {"placement": {
        "region": "ap-south-1"}}}})
    assert run_python_code(BOTOCORE_REGION, client_env(required)) == {"region": "ap-south-1"}


def test_botocore_container_provider(ec2, client_env, tmp_path):
    server = ec2(ecs_auth_token="Bearer ecs-token")
    env = client_env(server, **server.flavor.ecs_env())
    # The container provider comes before IMDS in botocore's chain.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    report = run_python_code(BOTOCORE_CREDENTIALS, env)
    assert "error" not in report, report
    assert report["method"] == "container-role"
    assert report["access_key"] == served_credentials(server)["AccessKeyId"]

    # EKS Pod Identity hands the token over in a file, which botocore prefers to the variable.
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("Bearer ecs-token")
    from_file = dict(env, AWS_CONTAINER_AUTHORIZATION_TOKEN="Bearer wrong",
                     AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file))
    report = run_python_code(BOTOCORE_CREDENTIALS, from_file)
    assert "error" not in report, report
    assert report["access_key"] == served_credentials(server)["AccessKeyId"]

    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "Bearer wrong"
    env["AWS_METADATA_SERVICE_NUM_ATTEMPTS"] = "1"
    report = run_python_code(BOTOCORE_CREDENTIALS, env)
    # Refused for the token, not for anything else.
    assert "403" in report["error"] and "AccessDenied" in report["error"], report


def test_botocore_per_client_role_via_ecs_and_source_address(ec2, client_env):
    # botocore cannot pick its source address, so per-client isolation is proven with raw
    # sockets in test_ec2.py; here the default client (127.0.0.1) gets the default role.
    server = ec2(config={"ec2": {}, "mds": {"ec2": {
        "role": "shared", "clients": {"127.0.0.2": "other"}}}})
    report = run_python_code(BOTOCORE_CREDENTIALS, client_env(server))
    assert report["access_key"] == served_credentials(server, "shared")["AccessKeyId"]
    assert report["access_key"] != served_credentials(server, "other",
                                                      source="127.0.0.2")["AccessKeyId"]


# ---------------------------------------------------------------------------
# AWS SDK for JavaScript v3
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["v1-allowed", "v1-disabled", "imdsv2-required"])
def test_js_from_instance_metadata(ec2, client_env, mode):
    server = ec2(imdsv2_required=(mode == "imdsv2-required"))
    extra = {"AWS_EC2_METADATA_V1_DISABLED": "true"} if mode == "v1-disabled" else {}
    report = run_node("aws_imds.js", client_env(server, **extra), ["twice", "chain"])
    assert report["ok"], report
    served = served_credentials(server)
    for key in ("first", "second", "chain"):
        assert report[key]["accessKeyId"] == served["AccessKeyId"]
        assert report[key]["secretAccessKey"] == served["SecretAccessKey"]
        assert report[key]["sessionToken"] == served["Token"]
        assert report[key]["expiration"].replace(".000Z", "Z") == served["Expiration"]
    # No static-stability warning: the credentials were fresh.
    assert report["warnings"] == []


def test_js_from_instance_metadata_fails_on_bad_credentials(ec2, client_env, monkeypatch,
                                                            tmp_path):
    """With nothing to serve, the SDK must not be handed credentials (error JSON form)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    server = ec2(static_credentials=True)
    report = run_node("aws_imds.js", client_env(server))
    assert not report["ok"]


@pytest.mark.parametrize("provider", ["container", "http"])
def test_js_container_providers(ec2, client_env, provider):
    server = ec2(ecs_auth_token="js-ecs-token")
    env = client_env(server, **server.flavor.ecs_env())
    report = run_node("aws_container.js", env, [provider])
    assert report["ok"], report
    served = served_credentials(server)
    assert report["accessKeyId"] == served["AccessKeyId"]
    assert report["sessionToken"] == served["Token"]
    assert report["expiration"].replace(".000Z", "Z") == served["Expiration"]

    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "wrong"
    report = run_node("aws_container.js", env, [provider])
    assert not report["ok"]
    # fromHttp names the status; fromContainerMetadata only says the service answered an error.
    assert ("status: 403" if provider == "http" else "Error response") in report["error"], report


# ---------------------------------------------------------------------------
# AWS SDK for Go v2 (Debian's golang-github-aws-aws-sdk-go-v2-dev, built offline)
# ---------------------------------------------------------------------------

def run_go_imds(env):
    require_path(os.path.join(clients.DEBIAN_GOPATH, "src", "github.com", "aws",
                              "aws-sdk-go-v2", "feature", "ec2", "imds"),
                 "Debian package golang-github-aws-aws-sdk-go-v2-dev")
    require_path(os.path.join(clients.GO_DIR, "awsimds", "main.go"),
                 "tests/go/awsimds (the AWS SDK for Go v2 client program)")
    return clients.run_go("awsimds", env)


@pytest.mark.parametrize("required", [False, True], ids=["v1-allowed", "imdsv2-required"])
def test_go_sdk_v2_imds_and_role_credentials(ec2, client_env, required):
    # Go is the strictest client: it needs the TTL header on the PUT, Code "Success", an
    # RFC 3339 pendingTime, and answers within its 500 ms header timeout.
    server = ec2(imdsv2_required=required, config={"ec2": {"meta-data": {
        "placement": {"availability-zone": "eu-west-2b"}}}})
    report = run_go_imds(client_env(server))
    errors = {k: v for k, v in report.items() if k.endswith("_error")}
    assert not errors, errors
    document = json.loads(served_document(server))
    assert report["region"] == "eu-west-2"
    assert report["availability_zone"] == "eu-west-2b"
    assert report["instance_id"] == report["metadata_instance_id"] == document["instanceId"]
    assert report["pending_time"] == document["pendingTime"]
    assert report["instance_profile_arn"].endswith("/" + mds.DEFAULT_ROLE_NAME)
    served = served_credentials(server)
    assert report["access_key_id"] == served["AccessKeyId"]
    assert report["secret_access_key"] == served["SecretAccessKey"]
    assert report["session_token"] == served["Token"]
    assert report["can_expire"] is True
    assert report["source"] == "EC2RoleProvider"


# ---------------------------------------------------------------------------
# AWS SDK for Go v1 (Debian's golang-github-aws-aws-sdk-go-dev, built offline)
# ---------------------------------------------------------------------------

def run_go_v1(env, mode):
    require_path(os.path.join(clients.DEBIAN_GOPATH, "src", "github.com", "aws",
                              "aws-sdk-go", "aws", "ec2metadata"),
                 "Debian package golang-github-aws-aws-sdk-go-dev")
    require_path(os.path.join(clients.GO_DIR, "awsimdsv1", "main.go"),
                 "tests/go/awsimdsv1 (the AWS SDK for Go v1 client program)")
    return clients.run_go("awsimdsv1", env, [mode])


def served_imds(server, path):
    """GET /latest/<path> with an IMDSv2 token (raw HTTP); the body as text."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("PUT", "/latest/api/token",
                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = conn.getresponse().read().decode()
    conn.request("GET", "/latest/" + path, headers={"X-aws-ec2-metadata-token": token})
    response = conn.getresponse()
    body = response.read().decode("utf-8")
    conn.close()
    assert response.status == 200, (path, response.status, body)
    return body


def served_ecs(server, token):
    """The ECS endpoint's (status, JSON body) for Authorization `token` (raw HTTP)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", server.flavor.ecs_env()["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                 headers={"Authorization": token})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    return response.status, body


def assert_go_v1_credentials(report, prefix, served, provider):
    assert report[prefix + "_provider"] == provider
    assert report[prefix + "_access_key_id"] == served["AccessKeyId"]
    assert report[prefix + "_secret_access_key"] == served["SecretAccessKey"]
    assert report[prefix + "_session_token"] == served["Token"]


@pytest.mark.parametrize("required", [False, True], ids=["v1-allowed", "imdsv2-required"])
def test_go_sdk_v1_imds_and_role_credentials(ec2, client_env, required):
    user_data = "#!/bin/sh\necho 'go sdk v1'\n"
    server = ec2(imdsv2_required=required, config={"ec2": {
        "meta-data": {"placement": {"availability-zone": "ap-southeast-2c"}},
        "user-data": user_data}})
    report = run_go_v1(client_env(server), "imds")
    errors = {k: v for k, v in report.items() if k.endswith("_error")}
    assert not errors, errors
    assert report["available"] is True

    document_raw = served_imds(server, "dynamic/instance-identity/document")
    document = json.loads(document_raw)
    assert report["document_raw"] == document_raw
    assert report["document"] == {key: document[key] for key in report["document"]}
    assert report["instance_id"] == served_imds(server, "meta-data/instance-id") \
        == document["instanceId"]
    assert report["availability_zone"] \
        == served_imds(server, "meta-data/placement/availability-zone") \
        == document["availabilityZone"] == "ap-southeast-2c"
    assert report["region"] == document["region"] == "ap-southeast-2"
    served_info = json.loads(served_imds(server, "meta-data/iam/info"))
    assert report["iam_info"] == {key: served_info[key] for key in report["iam_info"]}
    assert report["user_data"] == served_imds(server, "user-data") == user_data

    role = served_imds(server, "meta-data/iam/security-credentials/")
    assert report["role_list"] == role == mds.DEFAULT_ROLE_NAME
    served = served_credentials(server, role)
    assert_go_v1_credentials(report, "role", served, "EC2RoleProvider")
    assert report["role_expires"] == served["Expiration"]
    # The default chain ends in the same EC2 role provider (with its own expiry window).
    assert_go_v1_credentials(report, "chain", served, "EC2RoleProvider")


@pytest.mark.parametrize("required", [False, True], ids=["v1-allowed", "imdsv2-required"])
def test_go_sdk_v1_container_credentials(ec2, client_env, required):
    token = "Bearer go-v1-ecs-token"
    server = ec2(imdsv2_required=required, ecs_auth_token=token)
    env = client_env(server, **server.flavor.ecs_env())
    assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] == token
    # Only the container endpoint may answer: no fallback to the IMDS role.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    report = run_go_v1(env, "ecs")
    errors = {k: v for k, v in report.items() if k.endswith("_error")}
    assert not errors, errors
    status, served = served_ecs(server, token)
    assert status == 200, served
    assert_go_v1_credentials(report, "ecs", served, "CredentialsEndpointProvider")
    assert report["ecs_expires"] == served["Expiration"]
    assert_go_v1_credentials(report, "chain", served, "CredentialsEndpointProvider")

    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "Bearer wrong"
    report = run_go_v1(env, "ecs")
    status, refusal = served_ecs(server, "Bearer wrong")
    assert status == 403
    assert refusal["Code"] in report["ecs_error"], report
    assert refusal["Message"] in report["ecs_error"], report
    assert "ecs_access_key_id" not in report
    assert "chain_error" in report and "chain_access_key_id" not in report, report


# ---------------------------------------------------------------------------
# ec2-metadata (adamchainz)
# ---------------------------------------------------------------------------

def test_ec2_metadata_package(ec2, client_env):
    server = ec2(spot_interruption_after=0, config={
        "ec2": {"meta-data": {"placement": {"availability-zone": "us-west-2c"},
                              "tags": {"instance": {"Name": "web-1"}},
                              "public-keys": {"deploy": "ssh-ed25519 AAAAC3 deploy"}},
                "user-data": "#cloud-config\n"},
        "mds": {"ec2": {"role": "web-role", "events": {"autoscaling": {"after": 0}}}}})
    report = run_python_code(EC2_METADATA, client_env(server), [server.url])
    assert report["region"] == "us-west-2"
    assert report["availability_zone"] == "us-west-2c"
    assert report["availability_zone_id"].startswith("usw2-")
    assert report["instance_profile_name"] == "web-role"
    creds = report["iam_security_credentials"]
    assert creds["AccessKeyId"] == served_credentials(server, "web-role")["AccessKeyId"]
    assert report["user_data"] == "#cloud-config\n"
    assert report["tags"] == {"Name": "web-1"}
    assert report["public_keys"] == {"deploy": "ssh-ed25519 AAAAC3 deploy"}
    assert report["partition"] == "aws" and report["domain"] == "amazonaws.com"
    nic = report["network_interfaces"][report["mac"]]
    assert nic["private_ipv4s"] == [report["private_ipv4"]]
    assert nic["public_ipv4s"] == [report["public_ipv4"]]
    assert nic["ipv4_associations"] == {report["public_ipv4"]: [report["private_ipv4"]]}
    assert nic["subnet_id"].startswith("subnet-") and nic["vpc_id"].startswith("vpc-")
    assert report["spot"][0] == "terminate"
    assert report["lifecycle"] == "Terminated"
    assert report["account_id"] == "123456789012"


def test_ec2_metadata_package_with_imdsv2_required(ec2, client_env):
    server = ec2(imdsv2_required=True)
    report = run_python_code(EC2_METADATA, client_env(server), [server.url])
    document = json.loads(served_document(server))
    assert report["instance_id"] == document["instanceId"]
    assert report["region"] == document["region"] == "us-east-1"
    assert report["instance_profile_name"] == mds.DEFAULT_ROLE_NAME
    assert report["iam_security_credentials"]["AccessKeyId"] == \
        served_credentials(server)["AccessKeyId"]
    # Absent categories are 404, which the library maps to None / empty.
    assert report["user_data"] is None
    assert report["spot"] is None and report["lifecycle"] is None
    assert report["tags"] is None
    assert report["public_keys"] == {}


def served_document(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("PUT", "/latest/api/token",
                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = conn.getresponse().read().decode()
    conn.request("GET", "/latest/dynamic/instance-identity/document",
                 headers={"X-aws-ec2-metadata-token": token})
    body = conn.getresponse().read().decode()
    conn.close()
    return body


def test_the_ecs_startup_line_warns_where_botocore_would_refuse_the_uri(ec2):
    # botocore takes an http:// FULL_URI only on a few hosts; where mds listens on another,
    # the export line it prints would fail, and the startup log says so.
    from botocore.utils import ContainerMetadataFetcher
    fetcher = ContainerMetadataFetcher()
    server = ec2()
    bound = server.host
    try:
        for host in ("127.0.0.1", "127.3.4.5", "::1", "169.254.170.2", "169.254.170.23",
                     "fd00:ec2::23", "169.254.169.254", "10.0.0.5", "192.168.1.7", "fd00::1"):
            server.host = host                          # the printed URL derives from it
            warned = any("refuse an http FULL_URI" in line
                         for line in server.flavor.startup_lines())
            try:
                fetcher._validate_allowed_url(server.url + "/mds/ecs/credentials")
                accepted = True
            except ValueError:
                accepted = False
            assert warned == (not accepted), host
    finally:
        server.host = bound


# ---------------------------------------------------------------------------
# cloud-init (Debian's, unpacked by tests/run.sh)
# ---------------------------------------------------------------------------

CLOUD_INIT_PACKAGES = os.path.join(BUILD_DIR, "cloud-init", "usr", "lib", "python3",
                                   "dist-packages")


def served_listing(server, path):
    return served_imds(server, path).split("\n")


@pytest.mark.parametrize("mode", ["default", "imdsv2-required", "with-events"])
def test_cloud_init_crawls_the_whole_instance(ec2, client_env, mode):
    # At boot cloud-init fetches every leaf listed under meta-data/ and, on AWS, drops the
    # whole crawl (meta-data {}) if any of them fails: a listed leaf that 404s breaks it.
    require_path(os.path.join(CLOUD_INIT_PACKAGES, "cloudinit"), "Debian's cloud-init")
    config = {"ec2": {"user-data": "#cloud-config\nhostname: web-1\n",
                      "meta-data": {"tags": {"instance": {"Name": "web-1"}},
                                    "public-keys": {"deploy": "ssh-ed25519 AAAAC3 deploy"}}}}
    server = ec2(config=config, imdsv2_required=(mode == "imdsv2-required"))
    if mode == "with-events":
        server.flavor.schedule_event("maintenance", 0, code="system-reboot", starts_in=600)
        server.flavor.schedule_event("spot", 0, action="stop")
        server.flavor.schedule_event("rebalance", 0)
    env = client_env(server, PYTHONPATH=CLOUD_INIT_PACKAGES)
    report = run_python("py_cloud_init_ec2.py", env, [server.url])
    crawled = report["crawled"]
    meta = crawled["meta-data"]
    assert sorted(meta) == sorted(entry.rstrip("/") for entry in
                                  served_listing(server, "meta-data/"))
    assert meta["instance-id"] == served_imds(server, "meta-data/instance-id")
    assert meta["tags"]["instance"]["Name"] == "web-1"
    assert meta["public-keys"]["deploy"] == "ssh-ed25519 AAAAC3 deploy"
    maintenance = meta["events"]["maintenance"]

    def leaf_text(value):            # cloud-init hands a multi-line leaf back as its lines
        return "\n".join(value) if isinstance(value, list) else value
    scheduled = json.loads(leaf_text(maintenance["scheduled"]))
    if mode == "with-events":
        assert [event["Code"] for event in scheduled] == ["system-reboot"]
        assert meta["spot"]["instance-action"]["action"] == "stop"
        assert "noticeTime" in meta["events"]["recommendations"]["rebalance"]
    else:
        assert scheduled == [] and json.loads(maintenance["history"]) == []
    assert crawled["user-data"] == config["ec2"]["user-data"]
    document = crawled["dynamic"]["instance-identity"]["document"]
    assert document["instanceId"] == meta["instance-id"]
    assert report["warnings"] == []
