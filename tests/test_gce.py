"""Wire tests for the GCE flavour: every rule of the core issue's "Wire behaviour" and "Tokens"
sections, written from the issue and spec/gce.md (sections 2-11 and 14), not from mds.py.

Requests go through `http.client` (and raw sockets where framing matters) so that no client
library normalises headers, follows redirects or decodes bodies on our behalf.
"""

import base64
import collections
import copy
import gc
import http.client
import ipaddress
import json
import re
import socket
import threading
import time
import urllib.parse
import weakref

import pytest

import mds
from clients import MdsCli

V1 = "/computeMetadata/v1/"
GOOGLE = {"Metadata-Flavor": "Google"}
COMMON_HEADERS = {
    "Metadata-Flavor": "Google",
    "Server": "Metadata Server for VM",
    "X-XSS-Protection": "0",
    "X-Frame-Options": "SAMEORIGIN",
}
ETAG_SHAPE = re.compile(r"[0-9a-f]{16}")

PRIMARY = "app-sa@my-proj.iam.gserviceaccount.com"
SECONDARY = "other-sa@my-proj.iam.gserviceaccount.com"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
USERINFO = "https://www.googleapis.com/auth/userinfo.email"
READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"
# 2**64 - 1 and 2**53 + 1: neither survives a trip through a float.
INSTANCE_ID = 18446744073709551615
PROJECT_NUMBER = 9007199254740993

DOCUMENT = {"computeMetadata": {"v1": {
    "instance": {
        "attributes": {"Zed": "upper", "alpha": "first", "beta-key": "second",
                       "ssh-keys": "alice:ssh-rsa AAA\nbob:ssh-rsa BBB"},
        "cpuPlatform": "Intel Cascade Lake",
        "description": "",
        "disks": [{"deviceName": "boot", "index": 0, "interface": "SCSI",
                   "mode": "READ_WRITE", "type": "PERSISTENT"},
                  {"deviceName": "data", "index": 1, "interface": "NVME",
                   "mode": "READ_ONLY", "type": "PERSISTENT-BALANCED"}],
        "hostname": "vm-1.c.my-proj.internal",
        "id": INSTANCE_ID,
        "image": "projects/debian-cloud/global/images/debian-12",
        "licenses": [{"id": "1000201"}, {"id": "1000202"}],
        "machineType": "projects/%d/machineTypes/e2-small" % PROJECT_NUMBER,
        "maintenanceEvent": "NONE",
        "name": "vm-1",
        "networkInterfaces": [{
            "accessConfigs": [{"externalIp": "34.1.2.3", "type": "ONE_TO_ONE_NAT"}],
            "dnsServers": ["169.254.169.254", "8.8.8.8"],
            "forwardedIps": [],
            "gateway": "10.0.0.1",
            "ip": "10.0.0.2",
            "ipAliases": [],
            "mac": "42:01:0a:00:00:02",
            "mtu": 1460,
            "network": "projects/%d/networks/default" % PROJECT_NUMBER,
            "subnetmask": "255.255.240.0",
            "targetInstanceIps": []}],
        "preempted": "FALSE",
        "scheduling": {"automaticRestart": "TRUE", "onHostMaintenance": "MIGRATE",
                       "preemptible": "FALSE"},
        "serviceAccounts": {
            "default": {"aliases": ["default"], "email": PRIMARY,
                        "scopes": [CLOUD_PLATFORM, USERINFO]},
            PRIMARY: {"aliases": ["default"], "email": PRIMARY,
                      "scopes": [CLOUD_PLATFORM, USERINFO]},
            SECONDARY: {"aliases": [], "email": SECONDARY, "scopes": [READ_ONLY]},
        },
        "tags": ["web", "blue"],
        "zone": "projects/%d/zones/europe-west1-b" % PROJECT_NUMBER,
    },
    "project": {
        "attributes": {"myCamelAttr": "kept", "google-compute-default-region": "europe-west1"},
        "numericProjectId": PROJECT_NUMBER,
        "projectId": "my-proj",
    },
}}}


class Reply:
    """What came back on the wire: status, headers (case-insensitive) and the raw body."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        return self.headers.get(name)

    @property
    def media_type(self):
        return (self.header("Content-Type") or "").split(";")[0].strip().lower()

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "Reply(%d, %r, %r)" % (self.status, dict(self.headers), self.body[:200])


def fetch(server, path, method="GET", headers=None, flavor=True, body=None, timeout=10):
    """One request on a fresh connection; returns a Reply."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        sent = dict(GOOGLE) if flavor else {}
        sent.update(headers or {})
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, response.msg, response.read())
    finally:
        connection.close()


def get(server, path, **kwargs):
    reply = fetch(server, path, **kwargs)
    assert reply.status == 200, reply
    return reply


def assert_common_headers(reply):
    for name, value in COMMON_HEADERS.items():
        assert reply.headers.get_all(name) == [value], (name, reply)
    assert int(reply.header("Content-Length")) == len(reply.body), reply


def read_until_closed(sock):
    """Every byte the server sends until it closes the connection."""
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk


def b64url_json(segment):
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def jwt_parts(token):
    header, payload, signature = token.split(".")
    return b64url_json(header), b64url_json(payload), signature


def primary_source(server):
    """The credential source behind the primary service account (as mds.py attaches it)."""
    return server.store.tree.accounts["default"].source


@pytest.fixture
def server(mds_server_factory):
    return mds_server_factory(config=copy.deepcopy(DOCUMENT))


@pytest.fixture(scope="module")
def shared_server():
    """A server for read-only tests; nothing here changes its tree."""
    instance = mds.MetadataServer(config=copy.deepcopy(DOCUMENT), port=0)
    instance.start()
    yield instance
    instance.stop()


# ---- root, flavor header, proxies ----------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Metadata-Flavor": "Not Google"}, GOOGLE])
@pytest.mark.parametrize("path", ["/", "/?", "/?foo=bar"])
def test_root_answers_with_or_without_the_flavor_header(shared_server, headers, path):
    reply = fetch(shared_server, path, headers=headers, flavor=False)
    assert reply.status == 200, reply
    assert reply.body == b"0.1/\ncomputeMetadata/\n"
    assert reply.media_type == "application/text"
    assert_common_headers(reply)


@pytest.mark.parametrize("value", [None, "", "google", "GOOGLE", "Something-Else", "Googl"])
def test_metadata_paths_need_the_exact_flavor_header(shared_server, value):
    headers = {} if value is None else {"Metadata-Flavor": value}
    reply = fetch(shared_server, V1 + "instance/name", headers=headers, flavor=False)
    assert reply.status == 403, reply
    assert reply.header("Content-Type").lower() == "text/html; charset=utf-8"
    text = reply.body.decode("utf-8")
    assert "Missing Metadata-Flavor:Google header." in text
    assert "<title>Error 403 (Forbidden)!!1</title>" in text
    assert "<code>/computeMetadata/v1/instance/name</code>" in text
    assert_common_headers(reply)


def test_the_vm_server_hangs_up_after_a_403(shared_server):
    # The real 403 says `Connection: Close` and means it (spec 5.2); a 200 keeps the connection.
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        request = "GET %s HTTP/1.1\r\nHost: metadata.google.internal\r\n%s\r\n"
        sock.sendall((request % (V1 + "project/project-id", "Metadata-Flavor: Google\r\n") +
                      request % (V1 + "project/project-id", "")).encode())
        received = read_until_closed(sock)
    first, _, second = received.partition(b"HTTP/1.1 403")
    assert first.startswith(b"HTTP/1.1 200") and b"Connection" not in first, first
    head = second.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"\r\nConnection: Close\r\n" in head, second[:400]


@pytest.mark.parametrize("value", ["Google ", "Google\t", " Google"])
def test_whitespace_around_the_flavor_value_is_not_part_of_it(shared_server, value):
    # HTTP excludes the whitespace around a field value from the value (RFC 9110 5.5).
    reply = fetch(shared_server, V1 + "instance/name", headers={"Metadata-Flavor": value},
                  flavor=False)
    assert reply.status == 200 and reply.body == b"vm-1", reply


@pytest.mark.parametrize("path", [V1 + "instance/name", V1 + "instance/service-accounts/"
                                  "default/token", "/"])
def test_x_forwarded_for_is_forbidden_even_with_the_flavor_header(shared_server, path):
    reply = fetch(shared_server, path, headers={"X-Forwarded-For": "10.1.2.3"})
    assert reply.status == 403, reply
    assert reply.media_type == "text/html"
    assert b"access_token" not in reply.body
    assert_common_headers(reply)


@pytest.mark.parametrize("path", [V1 + "instance", V1 + "no/such/key", V1 + "project/project-id/",
                                  V1 + "instance/service-accounts/default/token"])
def test_the_flavor_check_comes_before_path_resolution(shared_server, path):
    reply = fetch(shared_server, path, flavor=False)
    assert reply.status == 403, reply
    assert b"access_token" not in reply.body


# ---- headers and content types on every status ----------------------------------------------


@pytest.mark.parametrize("method,path,flavor,status", [
    ("GET", V1 + "project/project-id", True, 200),
    ("GET", V1 + "instance/service-accounts/default/token", True, 200),
    ("GET", V1 + "instance/service-accounts/default/identity?audience=x", True, 200),
    ("GET", V1 + "instance", True, 301),
    ("GET", V1 + "project/?alt=json", True, 400),
    ("GET", V1 + "instance/service-accounts/default/identity", True, 400),
    ("GET", V1 + "project/project-id?wait_for_change=true&timeout_sec=soon", True, 400),
    ("GET", V1 + "project/project-id", False, 403),
    ("GET", V1 + "no/such/key", True, 404),
    ("POST", V1 + "project/project-id", True, 405),
    ("DELETE", V1 + "project/project-id", True, 405),
])
def test_every_status_carries_the_common_headers(shared_server, method, path, flavor, status):
    reply = fetch(shared_server, path, method=method, flavor=flavor)
    assert reply.status == status, reply
    assert_common_headers(reply)
    if status >= 400:                   # error pages are HTML (spec 4.1)
        assert reply.header("Content-Type").replace(" ", "").lower() == \
            "text/html;charset=utf-8", reply


@pytest.mark.parametrize("path,media_type", [
    ("project/project-id", "application/text"),
    ("project/", "application/text"),
    ("instance/service-accounts/default/scopes", "application/text"),
    ("project/?recursive=true", "application/json"),
    ("project/?recursive=true&alt=json", "application/json"),
    ("project/?recursive=true&alt=text", "application/text"),
    ("project/project-id?alt=json", "application/json"),
    ("project/project-id?alt=text", "application/text"),
    ("instance/tags", "application/json"),
    ("instance/service-accounts/default/token", "application/json"),
])
def test_content_types_follow_spec_4_1(shared_server, path, media_type):
    assert get(shared_server, V1 + path).media_type == media_type


def test_identity_token_is_not_served_as_json(shared_server):
    reply = get(shared_server, V1 + "instance/service-accounts/default/identity?audience=a")
    assert "json" not in reply.media_type
    assert reply.media_type


def test_the_built_in_vm_has_what_the_issue_lists(gce_server):
    # `python mds.py` with no configuration: a project, an instance in a zone, one default
    # service account with scopes, attributes, a network interface and a disk.
    def read(path):
        return get(gce_server, V1 + path).body.decode()

    assert read("project/project-id") and read("project/numeric-project-id").isdigit()
    assert re.fullmatch(r"projects/%s/zones/[a-z]+-[a-z]+[0-9]-[a-z]"
                        % read("project/numeric-project-id"), read("instance/zone"))
    assert read("instance/id").isdigit() and read("instance/name")
    accounts = read("instance/service-accounts/").split()
    assert len(accounts) == 2 and "default/" in accounts, accounts
    email_address = [a for a in accounts if a != "default/"][0].rstrip("/")
    assert read("instance/service-accounts/default/email") == email_address
    scopes = read("instance/service-accounts/default/scopes").split()
    assert scopes and all(s.startswith("https://www.googleapis.com/auth/") for s in scopes)
    assert read("instance/attributes/").split() and read("project/attributes/").split()
    ipaddress.IPv4Address(read("instance/network-interfaces/0/ip"))
    ipaddress.IPv4Address(read("instance/network-interfaces/0/access-configs/0/external-ip"))
    assert read("instance/disks/0/device-name") and read("instance/disks/0/type")


# ---- leaf values, lists, listings -----------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("project/project-id", b"my-proj"),
    ("project/numeric-project-id", str(PROJECT_NUMBER).encode()),
    ("instance/id", str(INSTANCE_ID).encode()),
    ("instance/description", b""),
    ("instance/zone", b"projects/%d/zones/europe-west1-b" % PROJECT_NUMBER),
    ("instance/attributes/ssh-keys", b"alice:ssh-rsa AAA\nbob:ssh-rsa BBB"),
    ("instance/network-interfaces/0/mtu", b"1460"),
    ("instance/service-accounts/default/email", PRIMARY.encode()),
])
def test_text_leaves_have_no_trailing_newline(shared_server, path, body):
    assert get(shared_server, V1 + path).body == body


@pytest.mark.parametrize("path,body", [
    ("instance/service-accounts/default/scopes",
     (CLOUD_PLATFORM + "\n" + USERINFO + "\n").encode()),
    ("instance/service-accounts/default/aliases", b"default\n"),
    ("instance/service-accounts/%s/aliases" % PRIMARY, b"default\n"),
    ("instance/network-interfaces/0/dns-servers", b"169.254.169.254\n8.8.8.8\n"),
])
def test_list_leaves_put_each_element_on_its_own_line(shared_server, path, body):
    assert get(shared_server, V1 + path).body == body


def test_tags_are_json_by_default(shared_server):
    reply = get(shared_server, V1 + "instance/tags")
    assert reply.media_type == "application/json"
    assert reply.json() == ["web", "blue"]


@pytest.mark.parametrize("path,body", [
    ("project/", b"attributes/\nnumeric-project-id\nproject-id\n"),
    # Byte-wise order: upper case sorts before lower case.
    ("instance/attributes/", b"Zed\nalpha\nbeta-key\nssh-keys\n"),
    ("instance/disks/", b"0/\n1/\n"),
    ("instance/disks/1/", b"device-name\nindex\ninterface\nmode\ntype\n"),
    ("instance/network-interfaces/0/forwarded-ips/", b""),
    ("instance/scheduling/", b"automatic-restart\non-host-maintenance\npreemptible\n"),
    ("instance/service-accounts/",
     "".join(n + "/\n" for n in sorted(["default", PRIMARY, SECONDARY])).encode()),
    ("instance/service-accounts/default/", b"aliases\nemail\nidentity\nscopes\ntoken\n"),
    ("instance/service-accounts/%s/" % PRIMARY, b"aliases\nemail\nidentity\nscopes\ntoken\n"),
])
def test_listings_are_sorted_with_a_slash_on_directories(shared_server, path, body):
    reply = get(shared_server, V1 + path)
    assert reply.body == body
    assert reply.media_type == "application/text"


def test_version_listing_has_the_top_level_directories(shared_server):
    lines = get(shared_server, V1).body.decode().splitlines()
    assert lines == sorted(lines, key=lambda line: line.encode())
    for directory in ("instance/", "project/", "universe/"):
        assert directory in lines


def test_instance_listing_uses_dash_case_names(shared_server):
    lines = get(shared_server, V1 + "instance/").body.decode().splitlines()
    for name in ("network-interfaces/", "service-accounts/", "machine-type", "cpu-platform",
                 "maintenance-event", "attributes/", "disks/", "licenses/", "scheduling/",
                 "id", "zone", "tags"):
        assert name in lines
    assert not [line for line in lines if re.search("[A-Z]", line)]


def test_empty_path_segments_are_ignored(shared_server):
    assert get(shared_server, V1 + "project//project-id").body == b"my-proj"


def test_a_bare_question_mark_is_no_query(shared_server):
    assert get(shared_server, V1 + "instance/id?").body == str(INSTANCE_ID).encode()
    assert get(shared_server, V1 + "project/?").body.startswith(b"attributes/\n")


@pytest.mark.parametrize("value,is_json", [("true", True), ("TRUE", True), ("True", True),
                                           ("false", False), ("xyz", False)])
def test_recursive_is_a_case_insensitive_boolean(shared_server, value, is_json):
    reply = get(shared_server, V1 + "project/?recursive=" + value)
    assert (reply.media_type == "application/json") is is_json
    if is_json:
        assert reply.json()["projectId"] == "my-proj"
    else:
        assert reply.body == b"attributes/\nnumeric-project-id\nproject-id\n"


def test_unknown_query_parameters_are_ignored(shared_server):
    assert get(shared_server, V1 + "project/project-id?foo=blah").body == b"my-proj"


# ---- redirects and not-found ----------------------------------------------------------------


@pytest.mark.parametrize("path,query", [
    ("/computeMetadata/v1/instance/service-accounts", ""),
    ("/computeMetadata/v1/instance", ""),
    ("/computeMetadata/v1", "recursive=true"),
    ("/computeMetadata", ""),
    ("/computeMetadata/v1/instance/disks/0", "alt=json&recursive=true"),
])
def test_directory_without_slash_redirects_to_an_absolute_location(shared_server, path, query):
    target = path + "/"
    request_path = path + ("?" + query if query else "")
    reply = fetch(shared_server, request_path, headers={"Host": "metadata.google.internal"})
    assert reply.status == 301, reply
    expected = "http://metadata.google.internal" + target + ("?" + query if query else "")
    assert reply.header("Location") == expected
    assert reply.body == (target + "\n").encode()
    assert reply.media_type == "text/html"
    assert_common_headers(reply)


def test_redirect_location_keeps_the_host_port_and_can_be_followed(shared_server):
    authority = "127.0.0.1:%d" % shared_server.port
    reply = fetch(shared_server, V1 + "instance/service-accounts", headers={"Host": authority})
    assert reply.header("Location") == "http://%s%sinstance/service-accounts/" % (authority, V1)
    assert len(reply.body) == 47
    location = urllib.parse.urlsplit(reply.header("Location"))
    assert b"default/\n" in get(shared_server, location.path).body


@pytest.mark.parametrize("path", ["project/project-id/", "instance/service-accounts/default/token/",
                                  "instance/service-accounts/default/email/",
                                  "instance/tags/"])
def test_leaf_with_trailing_slash_is_not_found(shared_server, path):
    reply = fetch(shared_server, V1 + path)
    assert reply.status == 404, reply


@pytest.mark.parametrize("path", [
    "no-such-key", "instance/no-such-key", "instance/disks/2/", "instance/disks/x/",
    "instance/service-accounts/default/scopes/0", "instance/attributes/missing",
    "instance/service-accounts/nobody@example.com/email", "universe/universe_domain",
    "instance/network-interfaces/0/access-configs/1/external-ip",
])
def test_unknown_paths_get_the_google_404_page(shared_server, path):
    reply = fetch(shared_server, V1 + path)
    assert reply.status == 404, reply
    text = reply.body.decode("utf-8")
    assert "<title>Error 404 (Not Found)!!1</title>" in text
    assert "was not found on this server" in text
    assert "<code>%s</code>" % (V1 + path) in text
    assert reply.header("Content-Type").replace(" ", "").lower() == "text/html;charset=utf-8"
    assert_common_headers(reply)


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH", "PUT", "OPTIONS"])
def test_other_methods_get_405_with_allow(shared_server, method):
    reply = fetch(shared_server, V1 + "project/project-id", method=method, body=b"x")
    assert reply.status == 405, reply
    assert "GET" in [m.strip() for m in reply.header("Allow").split(",")]
    assert_common_headers(reply)


@pytest.mark.parametrize("path", ["project/numericProjectId", "universe/universeDomain",
                                  "instance/networkInterfaces/0/ip", "instance/machineType",
                                  "instance/serviceAccounts/default/email"])
def test_camel_case_spellings_exist_only_in_recursive_json(shared_server, path):
    # A key copied from the recursive JSON into a URL is a 404 on a real VM, so here too.
    reply = fetch(shared_server, V1 + path)
    assert reply.status == 404, reply
    dashed = re.sub(r"(?<=[a-z])([A-Z])", lambda m: "-" + m.group(1).lower(), path)
    assert fetch(shared_server, V1 + dashed).status == 200, dashed


# ---- recursive and alt ----------------------------------------------------------------------


def test_recursive_instance_round_trips_the_document(shared_server):
    reply = get(shared_server, V1 + "instance/?recursive=true")
    assert reply.media_type == "application/json"
    assert reply.json() == DOCUMENT["computeMetadata"]["v1"]["instance"]


def test_recursive_json_keeps_64_bit_ids_as_exact_numbers(shared_server):
    instance = get(shared_server, V1 + "instance/?recursive=true").body
    assert re.search(rb'"id":\s*%d\s*[,}]' % INSTANCE_ID, instance)
    project = get(shared_server, V1 + "project/?recursive=true")
    assert re.search(rb'"numericProjectId":\s*%d\s*[,}]' % PROJECT_NUMBER, project.body)
    assert project.json()["numericProjectId"] == PROJECT_NUMBER
    assert get(shared_server, V1 + "instance/id?alt=json").body.strip() == \
        str(INSTANCE_ID).encode()


def test_recursive_json_uses_camel_case_for_google_keys_only(shared_server):
    body = get(shared_server, V1 + "?recursive=true").json()
    instance = body["instance"]
    assert {"machineType", "networkInterfaces", "serviceAccounts", "cpuPlatform",
            "maintenanceEvent"} <= set(instance)
    assert not [key for key in instance if "-" in key]
    assert instance["networkInterfaces"][0]["accessConfigs"][0]["externalIp"] == "34.1.2.3"
    assert instance["disks"][1]["deviceName"] == "data"
    assert instance["scheduling"]["automaticRestart"] == "TRUE"
    assert set(instance["attributes"]) == {"Zed", "alpha", "beta-key", "ssh-keys"}
    assert set(instance["serviceAccounts"]) == {"default", PRIMARY, SECONDARY}
    assert body["project"]["attributes"]["myCamelAttr"] == "kept"
    assert "google-compute-default-region" in body["project"]["attributes"]
    assert body["universe"] == {"universeDomain": "googleapis.com"}


def test_recursive_json_leaves_out_token_and_identity(shared_server):
    accounts = get(shared_server, V1 + "instance/service-accounts/?recursive=true").json()
    for entry in accounts.values():
        assert set(entry) == {"aliases", "email", "scopes"}
    single = get(shared_server, V1 + "instance/service-accounts/default/?recursive=true")
    assert single.json() == {"aliases": ["default"], "email": PRIMARY,
                             "scopes": [CLOUD_PLATFORM, USERINFO]}


def test_recursive_json_is_compact(shared_server):
    body = get(shared_server, V1 + "project/?recursive=true").body
    assert b'": ' not in body and b'", ' not in body


def test_recursive_on_a_leaf_is_ignored(shared_server):
    reply = get(shared_server, V1 + "project/project-id?recursive=true")
    assert reply.body == b"my-proj"
    assert reply.media_type == "application/text"


@pytest.mark.parametrize("path,value", [
    ("project/project-id", "my-proj"),
    ("project/numeric-project-id", PROJECT_NUMBER),
    ("instance/service-accounts/default/scopes", [CLOUD_PLATFORM, USERINFO]),
    ("instance/network-interfaces/0/mtu", 1460),
    ("instance/description", ""),
])
def test_alt_json_on_a_leaf_encodes_the_value(shared_server, path, value):
    reply = get(shared_server, V1 + path + "?alt=json")
    assert reply.media_type == "application/json"
    assert reply.json() == value
    # The ETag is the node's, whatever form it is read in (spec §4.5): a waiter may pass the
    # one it got with alt=json as last_etag of a plain read.
    assert reply.header("ETag") == get(shared_server, V1 + path).header("ETag")


def test_alt_text_on_a_leaf_is_the_plain_value(shared_server):
    assert get(shared_server, V1 + "instance/tags?alt=text").media_type == "application/text"
    assert get(shared_server, V1 + "project/project-id?alt=text").body == b"my-proj"


def test_recursive_alt_text_renders_one_line_per_leaf(shared_server):
    reply = get(shared_server, V1 + "project/?recursive=true&alt=text")
    assert sorted(reply.body.decode().splitlines(True)) == sorted([
        "attributes/google-compute-default-region europe-west1\n",
        "attributes/myCamelAttr kept\n",
        "numeric-project-id %d\n" % PROJECT_NUMBER,
        "project-id my-proj\n",
    ])


def test_recursive_alt_text_repeats_list_paths_and_indexes_object_lists(shared_server):
    reply = get(shared_server, V1 + "instance/network-interfaces/?recursive=true&alt=text")
    lines = reply.body.decode().splitlines(True)
    assert reply.body.endswith(b"\n")
    for line in ("0/ip 10.0.0.2\n", "0/dns-servers 169.254.169.254\n", "0/dns-servers 8.8.8.8\n",
                 "0/access-configs/0/external-ip 34.1.2.3\n", "0/mtu 1460\n"):
        assert line in lines
    assert not [line for line in lines if re.search("[A-Z]", line.split(" ")[0])]


@pytest.mark.parametrize("query", ["alt=json", "alt=text"])
@pytest.mark.parametrize("path", ["project/", "instance/attributes/", ""])
def test_alt_on_a_non_recursive_directory_is_a_bad_request(shared_server, path, query):
    reply = fetch(shared_server, V1 + path + "?" + query)
    assert reply.status == 400, reply
    assert reply.body
    assert_common_headers(reply)


# ---- universe -------------------------------------------------------------------------------


def test_universe_domain_hyphen_is_served_and_underscore_is_404(shared_server):
    reply = get(shared_server, V1 + "universe/universe-domain")
    assert reply.body == b"googleapis.com"
    assert reply.media_type == "application/text"
    missing = fetch(shared_server, V1 + "universe/universe_domain")
    assert missing.status == 404
    assert missing.header("Metadata-Flavor") == "Google"


def test_universe_domain_is_served_by_the_built_in_default(gce_server):
    assert get(gce_server, V1 + "universe/universe-domain").body == b"googleapis.com"
    assert fetch(gce_server, V1 + "universe/universe_domain").status == 404


# ---- service accounts -----------------------------------------------------------------------


@pytest.mark.parametrize("account", ["default", PRIMARY])
def test_primary_account_is_reachable_as_default_and_by_email(shared_server, account):
    base = V1 + "instance/service-accounts/%s/" % account
    assert get(shared_server, base + "email").body == PRIMARY.encode()
    assert get(shared_server, base + "aliases").body == b"default\n"
    assert get(shared_server, base + "scopes").body == \
        (CLOUD_PLATFORM + "\n" + USERINFO + "\n").encode()
    assert get(shared_server, base + "token").json()["access_token"]


def test_secondary_account_has_its_own_email_scopes_and_token(shared_server):
    base = V1 + "instance/service-accounts/%s/" % SECONDARY
    assert get(shared_server, base + "email").body == SECONDARY.encode()
    assert get(shared_server, base + "scopes").body == (READ_ONLY + "\n").encode()
    secondary = get(shared_server, base + "token").json()["access_token"]
    primary = get(shared_server, V1 + "instance/service-accounts/default/token")
    assert secondary != primary.json()["access_token"]
    claims = jwt_parts(get(shared_server, base + "identity?audience=aud").body.decode())[1]
    assert claims["email"] == SECONDARY


def test_default_and_email_share_one_cached_token(shared_server):
    by_alias = get(shared_server, V1 + "instance/service-accounts/default/token").json()
    by_email = get(shared_server, V1 + "instance/service-accounts/%s/token" % PRIMARY).json()
    assert by_alias["access_token"] == by_email["access_token"]


def test_a_vm_without_service_accounts(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = {}
    started = mds_server_factory(config=document)
    assert get(started, V1 + "instance/service-accounts/").body == b""
    for leaf in ("email", "token", "identity?audience=x", "scopes"):
        reply = fetch(started, V1 + "instance/service-accounts/default/" + leaf)
        assert reply.status == 404, (leaf, reply)
        assert reply.header("Metadata-Flavor") == "Google"


# ---- ETag -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["project/project-id", "project/", "?recursive=true",
                                  "instance/?recursive=true&alt=json", "instance/tags"])
def test_reads_carry_a_16_hex_etag_that_is_stable(shared_server, path):
    first = get(shared_server, V1 + path).header("ETag")
    assert first and ETAG_SHAPE.fullmatch(first), first
    assert get(shared_server, V1 + path).header("ETag") == first


def etags(server, paths):
    return {path: get(server, V1 + path).header("ETag") for path in paths}


def test_etag_changes_exactly_where_the_content_changed(server):
    changed_paths = ["instance/attributes/alpha", "instance/attributes/",
                     "instance/attributes/?recursive=true", "instance/?recursive=true", "",
                     "?recursive=true"]
    unchanged_paths = ["instance/attributes/beta-key", "project/", "project/?recursive=true",
                       "project/project-id", "instance/disks/?recursive=true"]
    before = etags(server, changed_paths + unchanged_paths)
    server.update("instance/attributes/alpha", "first-changed")
    after = etags(server, changed_paths + unchanged_paths)
    for path in changed_paths:
        assert after[path] != before[path], path
    for path in unchanged_paths:
        assert after[path] == before[path], path


def test_etag_does_not_change_when_a_value_is_rewritten_unchanged(server):
    before = etags(server, ["instance/attributes/alpha", "instance/attributes/", ""])
    server.update("instance/attributes/alpha", "first")
    assert etags(server, list(before)) == before


def test_etag_comes_back_when_the_content_comes_back(server):
    before = get(server, V1 + "instance/attributes/").header("ETag")
    server.update("instance/attributes/alpha", "other")
    assert get(server, V1 + "instance/attributes/").header("ETag") != before
    server.update("instance/attributes/alpha", "first")
    assert get(server, V1 + "instance/attributes/").header("ETag") == before


# ---- wait_for_change ------------------------------------------------------------------------


class Waiter(threading.Thread):
    """A hanging GET running in the background; `.reply` once it is answered."""

    def __init__(self, server, path, timeout=30):
        super().__init__(daemon=True)
        self.server, self.path, self.timeout = server, path, timeout
        self.reply = None
        self.error = None
        self.started_at = self.finished_at = None

    def run(self):
        self.started_at = time.monotonic()
        try:
            self.reply = fetch(self.server, self.path, timeout=self.timeout)
        except Exception as exc:   # reported by the test through .error
            self.error = exc
        self.finished_at = time.monotonic()

    def result(self, timeout=20):
        self.join(timeout)
        assert not self.is_alive(), "waiter still hanging: %s" % self.path
        assert self.error is None, self.error
        return self.reply


def parked_waiter(server, query_path, settle=0.5):
    """A hanging GET, started and checked to be still hanging a moment later."""
    waiter = Waiter(server, query_path)
    waiter.start()
    waiter.join(settle)
    assert waiter.is_alive(), "answered before anything changed: %r" % waiter.reply
    return waiter


def wait_for_update(server, query_path, key, value):
    """Park a hanging GET, make the update, return the answer."""
    waiter = parked_waiter(server, query_path)
    server.update(key, value)
    return waiter.result()


def test_wait_on_a_leaf_returns_the_new_value_after_an_update(server):
    path = V1 + "instance/attributes/alpha"
    etag = get(server, path).header("ETag")
    waiter = Waiter(server, path + "?wait_for_change=true&last_etag=" + etag)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "answered before anything changed: %r" % waiter.reply
    server.update("instance/attributes/alpha", "woken")
    reply = waiter.result()
    assert reply.status == 200
    assert reply.body == b"woken"
    assert reply.header("ETag") != etag
    assert reply.header("ETag") == get(server, path).header("ETag")
    assert_common_headers(reply)


def test_wait_without_last_etag_waits_for_the_next_change(server):
    waiter = Waiter(server, V1 + "project/attributes/myCamelAttr?wait_for_change=true")
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()
    server.update("project/attributes/myCamelAttr", "changed")
    assert waiter.result().body == b"changed"


def test_wait_with_a_stale_last_etag_answers_at_once(shared_server):
    reply = fetch(shared_server, V1 + "project/project-id?wait_for_change=true"
                  "&last_etag=0000000000000000", timeout=5)
    assert reply.status == 200
    assert reply.body == b"my-proj"
    assert reply.header("ETag") == get(shared_server, V1 + "project/project-id").header("ETag")


def test_wait_on_a_recursive_directory_wakes_on_a_change_below_it(server):
    path = V1 + "instance/?recursive=true"
    etag = get(server, path).header("ETag")
    waiter = Waiter(server, path + "&wait_for_change=true&last_etag=" + etag)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()
    server.update("instance/network-interfaces/0/ip", "10.0.0.99")
    reply = waiter.result()
    assert reply.media_type == "application/json"
    assert reply.json()["networkInterfaces"][0]["ip"] == "10.0.0.99"
    assert reply.header("ETag") != etag


def test_wait_on_a_directory_ignores_changes_elsewhere(server):
    path = V1 + "project/?recursive=true"
    before = get(server, path)
    etag = before.header("ETag")
    waiter = Waiter(server, path + "&wait_for_change=true&timeout_sec=2&last_etag=" + etag)
    waiter.start()
    waiter.join(0.5)
    server.update("instance/attributes/alpha", "unrelated")
    reply = waiter.result()
    assert reply.status == 200
    assert reply.header("ETag") == etag
    assert reply.body == before.body
    assert waiter.finished_at - waiter.started_at >= 1.9, "returned before timeout_sec"


def test_wait_times_out_with_the_unchanged_value(shared_server):
    path = V1 + "project/project-id"
    etag = get(shared_server, path).header("ETag")
    reply = fetch(shared_server, path + "?wait_for_change=true&timeout_sec=1&last_etag=" + etag)
    assert reply.status == 200
    assert reply.body == b"my-proj"
    assert reply.header("ETag") == etag


def test_wait_with_timeout_zero_answers_the_current_value(shared_server):
    path = V1 + "project/project-id"
    etag = get(shared_server, path).header("ETag")
    reply = fetch(shared_server, path + "?wait_for_change=true&timeout_sec=0&last_etag=" + etag,
                  timeout=10)
    assert reply.status == 200
    assert reply.body == b"my-proj"
    assert reply.header("ETag") == etag


def test_wait_with_alt_json_on_a_leaf(server):
    path = V1 + "instance/attributes/alpha"
    etag = get(server, path).header("ETag")
    waiter = Waiter(server, path + "?alt=json&wait_for_change=true&last_etag=" + etag)
    waiter.start()
    waiter.join(0.3)
    server.update("instance/attributes/alpha", "json-now")
    reply = waiter.result()
    assert reply.media_type == "application/json"
    assert reply.json() == "json-now"


def test_wait_on_a_directory_needs_recursive(shared_server):
    reply = fetch(shared_server, V1 + "project/?wait_for_change=true&timeout_sec=1")
    assert reply.status == 400, reply
    assert reply.body
    assert_common_headers(reply)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "10s"])
def test_bad_timeout_sec_is_a_bad_request_with_a_reason(shared_server, value):
    reply = fetch(shared_server, V1 + "project/project-id?wait_for_change=true&timeout_sec="
                  + urllib.parse.quote(value))
    assert reply.status == 400, reply
    assert b"timeout_sec" in reply.body
    assert_common_headers(reply)


@pytest.mark.parametrize("digits", ["9" * 12, "9" * 400, "9" * 5000])
def test_an_enormous_timeout_sec_waits_for_the_change(server, digits):
    # Read as "wait until it changes", never a 5xx (which clients retry) or a 400.
    path = V1 + "instance/attributes/alpha"
    assert fetch(server, path + "?timeout_sec=" + digits).body == b"first"
    etag = get(server, path).header("ETag")
    reply = wait_for_update(server, path + "?wait_for_change=true&timeout_sec=" + digits
                            + "&last_etag=" + etag, "instance/attributes/alpha", "changed")
    assert reply.status == 200 and reply.body == b"changed", reply


def test_timeout_sec_with_leading_zeros_is_its_number(shared_server):
    path = V1 + "project/project-id"
    etag = get(shared_server, path).header("ETag")
    reply = fetch(shared_server, path + "?wait_for_change=true&timeout_sec=" + "0" * 30 + "1"
                  + "&last_etag=" + etag)
    assert reply.status == 200 and reply.body == b"my-proj", reply


@pytest.mark.parametrize("other_changes", [0, 20])
def test_a_change_undone_at_once_wakes_the_waiter_however_many_changes_follow(server,
                                                                             other_changes):
    path = V1 + "instance/attributes/alpha"
    etag = get(server, path).header("ETag")
    waiter = parked_waiter(server, path + "?wait_for_change=true&timeout_sec=20&last_etag="
                           + etag)
    # Holding the store's lock keeps the waiter from running until all of these are out,
    # as busy writers would: it must still see the change to its own key.
    with server.store.changed:
        server.update("instance/attributes/alpha", "pulse")
        server.update("instance/attributes/alpha", "first")      # back before the waiter ran
        for index in range(other_changes):
            server.update("instance/attributes/other-%d" % index, "x")
    reply = waiter.result()
    assert reply.body == b"pulse", reply        # a waiter that timed out would get "first"


def test_a_waiter_that_shut_down_its_sending_side_gets_no_false_change(server):
    path = V1 + "instance/attributes/alpha"
    etag = get(server, path).header("ETag")
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    try:
        connection.sendall(("GET %s?wait_for_change=true&last_etag=%s HTTP/1.1\r\n"
                            "Host: x\r\nMetadata-Flavor: Google\r\n\r\n"
                            % (path, etag)).encode())
        connection.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        server.update("instance/attributes/other", "wakes every waiter")
        # The waiter notices its client hung up and ends the connection without an answer:
        # a 200 with the unchanged value would read as a change.
        assert connection.recv(1024) == b""
    finally:
        connection.close()


def test_requests_sent_behind_a_waiter_before_a_half_close_are_still_answered(server):
    path = V1 + "instance/attributes/alpha"
    reply = get(server, path)
    etag, value = reply.header("ETag"), reply.body
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    try:
        connection.sendall((
            "GET %s?wait_for_change=true&timeout_sec=1&last_etag=%s HTTP/1.1\r\nHost: x\r\n"
            "Metadata-Flavor: Google\r\n\r\n"
            "GET %s HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n"
            "Connection: close\r\n\r\n" % (path, etag, V1 + "project/project-id")).encode())
        connection.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        server.update("instance/attributes/other", "wakes every waiter")
        answer = read_until_closed(connection)
    finally:
        connection.close()
    # Both answered, in order: the waiter when its timeout ran out (its value unchanged).
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert answer.split(b"HTTP/1.1 200 OK")[1].endswith(b"\r\n\r\n" + value)
    assert answer.endswith(b"\r\n\r\n" + get(server, V1 + "project/project-id").body)


def test_waiters_are_told_the_server_is_stopping_not_that_the_value_changed(
        mds_server_factory):
    server = mds_server_factory(config=copy.deepcopy(DOCUMENT))
    path = V1 + "instance/attributes/alpha"
    etag = get(server, path).header("ETag")
    waiters = [Waiter(server, path + "?wait_for_change=true&last_etag=" + etag)
               for _ in range(50)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)
    server.stop()
    for waiter in waiters:
        waiter.join(10)
        assert not waiter.is_alive()
        # A 503, delivered before the connections close: never a 200 a watcher would act on.
        assert waiter.error is None and waiter.reply.status == 503, (waiter.error,
                                                                     waiter.reply)


def test_waiters_whose_clients_left_end_while_other_keys_keep_changing(server):
    import socket as socket_module

    def handler_threads():
        return [t for t in threading.enumerate() if "process_request" in t.name]

    before = len(handler_threads())
    for _ in range(10):
        sock = socket_module.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET " + V1.encode() + b"instance/attributes/alpha?wait_for_change=true"
                     b" HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n")
        time.sleep(0.05)
        sock.close()
    deadline = time.monotonic() + 10
    number = 0
    while time.monotonic() < deadline and len(handler_threads()) > before:
        number += 1
        server.update("instance/attributes/beta-key", "tick-%d" % number)   # another key
        time.sleep(0.2)
    assert len(handler_threads()) <= before, "waiters of departed clients live on"


def test_deleting_the_waited_on_key_answers_404(server):
    path = V1 + "instance/attributes/beta-key"
    etag = get(server, path).header("ETag")
    waiter = Waiter(server, path + "?wait_for_change=true&last_etag=" + etag)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()
    server.delete("instance/attributes/beta-key")
    reply = waiter.result()
    assert reply.status == 404, reply
    assert reply.header("Metadata-Flavor") == "Google"


def test_guest_agent_style_whole_tree_wait(shared_server):
    # The guest agent's first request: last_etag=NONE never matches, so it answers at once.
    reply = fetch(shared_server, V1 + "?alt=json&last_etag=NONE&recursive=true&timeout_sec=60"
                  "&wait_for_change=true", timeout=10)
    assert reply.status == 200
    assert reply.json()["instance"]["id"] == INSTANCE_ID


# ---- guest attributes -----------------------------------------------------------------------


def test_the_guest_agent_puts_guest_attributes(server):
    path = V1 + "instance/guest-attributes/hostkeys/ssh-ed25519"
    reply = fetch(server, path, method="PUT", body=b"AAAAC3Nz key")
    assert reply.status == 200, reply
    assert get(server, path).body == b"AAAAC3Nz key"
    assert get(server, V1 + "instance/guest-attributes/hostkeys/").body == b"ssh-ed25519\n"


@pytest.mark.parametrize("rest", ["a%2Fb/key", "ns/k%2Fey", "ns", "ns/key/extra"])
def test_a_guest_attribute_is_a_namespace_and_a_key(server, rest):
    listing = V1 + "instance/guest-attributes/?recursive=true"
    before = fetch(server, listing)
    reply = fetch(server, V1 + "instance/guest-attributes/" + rest, method="PUT", body=b"x")
    assert reply.status == 400, reply
    after = fetch(server, listing)
    assert (after.status, after.body) == (before.status, before.body)


def test_a_body_cut_short_is_not_stored(server):
    path = V1 + "instance/guest-attributes/ns/cut"
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        connection.sendall(("PUT %s HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n"
                            "Content-Length: 100\r\n\r\nabc" % path).encode())
        connection.shutdown(socket.SHUT_WR)        # a client killed mid-upload
        assert connection.recv(1024) == b""
    finally:
        connection.close()
    assert fetch(server, path).status == 404


def test_guest_attributes_are_bounded_in_size_and_count(server):
    base = V1 + "instance/guest-attributes/"
    too_big = b"v" * (mds.GUEST_VALUE_LIMIT + 1)
    reply = fetch(server, base + "ns/big", method="PUT", body=too_big)
    assert reply.status == 400 and b"limited to" in reply.body, reply
    assert fetch(server, base + "ns/big").status == 404
    # Values that each fit, until their total does not: the last one is refused and the
    # ones before it stay.
    value = b"v" * (mds.GUEST_TOTAL_LIMIT // 4 - 16)          # room for the names too
    statuses = [fetch(server, base + "ns/k%d" % n, method="PUT", body=value).status
                for n in range(5)]
    assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 400, statuses
    assert get(server, base + "ns/k0").body == value
    # Rewriting an existing key within the total is fine.
    assert fetch(server, base + "ns/k0", method="PUT", body=b"small").status == 200


def test_guest_attribute_limits_hold_against_concurrent_puts(server):
    base = V1 + "instance/guest-attributes/"
    value = b"v" * (mds.GUEST_TOTAL_LIMIT // 4 - 16)          # four fit, not five
    statuses = []

    def put(number):
        statuses.append(fetch(server, base + "ns/k%d" % number, method="PUT",
                              body=value).status)

    threads = [threading.Thread(target=put, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200] * 4 + [400] * 8, statuses
    # Counted in bytes: 30 characters would still fit in the 44-48 bytes left; 60 bytes not.
    wide = ("\u00e9" * 30).encode("utf-8")
    assert fetch(server, base + "ns/wide", method="PUT", body=wide).status == 400


def test_guest_attributes_are_bounded_in_count(server):
    base = V1 + "instance/guest-attributes/"
    statuses = collections.Counter(
        fetch(server, base + "many/k%d" % n, method="PUT", body=b"x").status
        for n in range(mds.GUEST_COUNT_LIMIT + 1))
    assert statuses == {200: mds.GUEST_COUNT_LIMIT, 400: 1}, statuses


# ---- timed events: preemption and maintenance ---------------------------------------------


def document_with_events(events, **instance_changes):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"].update(instance_changes)
    document["mds"] = {"events": events}
    return document


def wait_for_next(server, path, etag):
    """The answer of a wait_for_change from `etag`, parked before the event came."""
    return parked_waiter(server, path + "?wait_for_change=true&last_etag=" + etag,
                         settle=0.3).result()


def test_preemption_turns_preempted_true_and_wakes_a_waiter(mds_server_factory):
    server = mds_server_factory(config=document_with_events(
        {"preemption": {"at": time.time() + 2}}))
    path = V1 + "instance/preempted"
    before = get(server, path)
    assert before.body == b"FALSE"
    # Only a Spot VM is preempted, and GCE gives it these scheduling options.
    assert get(server, V1 + "instance/scheduling/?recursive=true").json() == {
        "automaticRestart": "FALSE", "onHostMaintenance": "TERMINATE", "preemptible": "TRUE"}
    reply = wait_for_next(server, path, before.header("ETag"))
    assert reply.status == 200 and reply.body == b"TRUE"
    assert reply.header("ETag") != before.header("ETag")
    assert get(server, path).body == b"TRUE"
    assert get(server, V1 + "instance/?recursive=true").json()["preempted"] == "TRUE"


def test_maintenance_event_begins_and_ends_and_the_etag_comes_back(mds_server_factory):
    server = mds_server_factory(config=document_with_events(
        {"maintenance": {"at": time.time() + 1.5, "duration": 1}}))
    path = V1 + "instance/maintenance-event"
    before = get(server, path)
    assert before.body == b"NONE"
    during = wait_for_next(server, path, before.header("ETag"))
    assert during.body == b"MIGRATE_ON_HOST_MAINTENANCE"    # the VM's onHostMaintenance
    after = wait_for_next(server, path, during.header("ETag"))
    assert after.body == b"NONE"
    assert after.header("ETag") == before.header("ETag")


@pytest.mark.parametrize("events, scheduling, expected", [
    ({"maintenance": {"after": 0}},
     {"automaticRestart": "TRUE", "onHostMaintenance": "TERMINATE", "preemptible": "FALSE"},
     "TERMINATE_ON_HOST_MAINTENANCE"),
    ({"maintenance": {"after": 0}, "preemption": {"after": 3600}},
     {"automaticRestart": "TRUE", "onHostMaintenance": "MIGRATE", "preemptible": "FALSE"},
     "TERMINATE_ON_HOST_MAINTENANCE"),
    ({"maintenance": [{"after": 3600}, {"after": 0, "event": "TERMINATE_ON_HOST_MAINTENANCE"}]},
     {"automaticRestart": "TRUE", "onHostMaintenance": "MIGRATE", "preemptible": "FALSE"},
     "TERMINATE_ON_HOST_MAINTENANCE"),
    ({"maintenance": True},
     {"automaticRestart": "TRUE", "onHostMaintenance": "MIGRATE", "preemptible": "FALSE"},
     "MIGRATE_ON_HOST_MAINTENANCE"),
])
def test_the_maintenance_event_follows_the_host_maintenance_policy(mds_server_factory, events,
                                                                   scheduling, expected):
    server = mds_server_factory(config=document_with_events(events, scheduling=scheduling))
    assert get(server, V1 + "instance/maintenance-event").body == expected.encode()


def test_event_keys_are_served_even_when_the_config_omits_them(mds_server_factory):
    document = document_with_events({"preemption": {"after": 3600}})
    instance = document["computeMetadata"]["v1"]["instance"]
    del instance["preempted"], instance["maintenanceEvent"]
    server = mds_server_factory(config=document)
    assert get(server, V1 + "instance/preempted").body == b"FALSE"
    assert get(server, V1 + "instance/maintenance-event").body == b"NONE"


def test_the_timeline_holds_across_updates_and_reloads(mds_server_factory, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document_with_events({"preemption": {"after": 0}})))
    server = mds_server_factory(config=str(config))
    path = V1 + "instance/preempted"
    assert get(server, path).body == b"TRUE"
    server.update("instance/attributes/alpha", "unrelated edit")
    assert get(server, path).body == b"TRUE"
    # The config describes the timeline: moving the event later un-preempts the VM ...
    config.write_text(json.dumps(document_with_events({"preemption": {"after": 3600}})))
    assert server.reload()
    before = get(server, path)
    assert before.body == b"FALSE"
    # ... and a reload that brings it near wakes the clock, which publishes it on time.
    waiter = Waiter(server, path + "?wait_for_change=true&last_etag=" + before.header("ETag"))
    waiter.start()
    config.write_text(json.dumps(document_with_events(
        {"preemption": {"at": time.time() + 1}})))
    assert server.reload()
    assert get(server, path).body == b"FALSE"
    assert waiter.result().body == b"TRUE"


def test_an_event_centuries_away_does_not_stop_the_clock(mds_server_factory, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document_with_events(
        {"maintenance": [{"at": "9999-12-31T23:59:59Z"}]})))
    server = mds_server_factory(config=str(config))
    time.sleep(0.3)                      # the clock has gone to sleep on the far event
    path = V1 + "instance/preempted"
    before = get(server, path)
    config.write_text(json.dumps(document_with_events(
        {"maintenance": [{"at": "9999-12-31T23:59:59Z"}],
         "preemption": {"at": time.time() + 1.5}})))
    assert server.reload()
    reply = fetch(server, path + "?wait_for_change=true&timeout_sec=15&last_etag="
                  + before.header("ETag"), timeout=30)
    assert reply.body == b"TRUE", reply


@pytest.mark.parametrize("events, reason", [
    ({"reboot": {"after": 1}}, "unknown event(s) in \"mds\".\"events\": reboot"),
    ({"preemption": "soon"}, "mds.events.preemption must be true or an object"),
    ({"preemption": {"after": "soon"}}, "mds.events.preemption.after"),
    ({"preemption": {"at": "tomorrow"}}, "mds.events.preemption.at"),
    ({"maintenance": {"event": "REBOOT"}}, "MIGRATE_ON_HOST_MAINTENANCE or"),
    ({"maintenance": {"duration": "long"}}, "mds.events.maintenance.duration"),
    (["preemption"], '"mds"."events" must be an object'),
])
def test_bad_event_settings_are_refused_with_the_reason(events, reason):
    with pytest.raises(mds.ConfigError) as caught:
        mds.MetadataServer(config=document_with_events(events))
    assert reason in str(caught.value)


def test_a_bad_event_on_reload_keeps_the_timeline_serving(mds_server_factory, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document_with_events({"preemption": {"after": 0}})))
    server = mds_server_factory(config=str(config))
    config.write_text(json.dumps(document_with_events({"preemption": {"after": "never"}})))
    assert not server.reload()
    assert get(server, V1 + "instance/preempted").body == b"TRUE"


@pytest.mark.parametrize("flavor", ["cloudrun", "gke"])
def test_serverless_and_gke_have_no_timed_events(flavor):
    with pytest.raises(mds.ConfigError) as caught:
        mds.MetadataServer(flavor=flavor, options={"preempt_after": 60})
    assert "Compute Engine" in str(caught.value)


@pytest.mark.parametrize("flavor, options, words", [
    ("gce", {"preempt_aftr": 5}, ["unknown option 'preempt_aftr' for flavor gce",
                                  "preempt_after"]),
    ("gce", {"flavor": "ec2"}, ["unknown option 'flavor'", "MetadataServer(flavor=...)"]),
    ("ec2", {"preempt_after": 5, "role": "x"}, ["unknown options 'preempt_after', 'role'",
                                                "role_name"]),
])
def test_an_option_the_flavor_does_not_know_is_refused(flavor, options, words):
    # Ignored, a misspelt option would look like a feature that does not work.
    with pytest.raises(mds.ConfigError) as caught:
        mds.MetadataServer(flavor=flavor, options=options)
    for word in words:
        assert word in str(caught.value)


def test_options_schedule_events_like_the_command_line(mds_server_factory):
    server = mds_server_factory(options={"preempt_after": 3600, "maintenance_event_after": 0})
    assert get(server, V1 + "instance/preempted").body == b"FALSE"
    assert get(server, V1 + "instance/scheduling/preemptible").body == b"TRUE"
    assert get(server, V1 + "instance/maintenance-event").body == \
        b"TERMINATE_ON_HOST_MAINTENANCE"


def test_account_settings_name_an_account_by_email_or_default(mds_server_factory):
    static = {"credentials": {"type": "static", "access_token": "ya29.from-settings"}}
    server = mds_server_factory(config={"mds": {"serviceAccounts": {"default": static}}})
    body = get(server, V1 + "instance/service-accounts/default/token").body
    assert json.loads(body)["access_token"] == "ya29.from-settings"
    email = get(server, V1 + "instance/service-accounts/default/email").body.decode()
    for settings, words in (({"typo-" + email: static}, "typo-" + email),
                            ({"default": static, email: static}, "both"),
                            ({email: {"credentials": "offline"}}, "must be an object"),
                            ({email: ["not", "settings"]}, "must be an object")):
        with pytest.raises(mds.ConfigError) as caught:
            mds_server_factory(config={"mds": {"serviceAccounts": settings}})
        assert words in str(caught.value)


def test_a_flag_moves_a_configured_event_whatever_its_time_says(mds_server_factory):
    # README: the flag overrides "after" or "at"; of several windows it moves the first.
    server = mds_server_factory(
        config={"mds": {"events": {
            "preemption": {"at": "2030-01-01T00:00:00Z"},
            "maintenance": [{"at": "2030-01-01T00:00:00Z", "duration": 600},
                            {"at": "2031-01-01T00:00:00Z", "duration": 60,
                             "event": "TERMINATE_ON_HOST_MAINTENANCE"}]}}},
        options={"preempt_after": 0, "maintenance_event_after": 0})
    assert get(server, V1 + "instance/preempted").body == b"TRUE"
    assert get(server, V1 + "instance/maintenance-event").body != b"NONE"
    timeline = [(round(start), value) for start, _, key, value in server.store.tree.events
                if key == "maintenanceEvent"]
    assert timeline[-1] == (1924992000, "TERMINATE_ON_HOST_MAINTENANCE")   # 2031 stays


def test_cli_flags_schedule_events_and_the_log_says_when(tmp_path):
    cli = MdsCli(tmp_path, "--preempt-after", "1h", "--maintenance-event-after", "30m")
    try:
        log_text = cli.stderr()
        status, body = None, None
        connection = http.client.HTTPConnection("127.0.0.1", cli.port, timeout=10)
        connection.request("GET", V1 + "instance/scheduling/preemptible", headers=GOOGLE)
        response = connection.getresponse()
        status, body = response.status, response.read()
        connection.close()
    finally:
        cli.stop()
    assert (status, body) == (200, b"TRUE")
    assert re.search(r"event: instance/preempted is TRUE from \d{4}-\d\d-\d\dT", log_text)
    assert re.search(r"event: instance/maintenance-event is TERMINATE_ON_HOST_MAINTENANCE "
                     r"from \S+ until \S+", log_text)


# ---- tokens ---------------------------------------------------------------------------------


def test_token_json_shape(shared_server):
    reply = get(shared_server, V1 + "instance/service-accounts/default/token")
    assert reply.media_type == "application/json"
    token = reply.json()
    assert set(token) == {"access_token", "expires_in", "token_type"}
    assert token["token_type"] == "Bearer"
    assert isinstance(token["access_token"], str) and token["access_token"]
    assert type(token["expires_in"]) is int
    assert 0 < token["expires_in"] <= 3600


def test_same_token_and_expires_in_counts_down(server):
    path = V1 + "instance/service-accounts/default/token"
    first = get(server, path).json()
    time.sleep(1.1)
    second = get(server, path).json()
    assert second["access_token"] == first["access_token"]
    assert second["expires_in"] < first["expires_in"]
    assert second["expires_in"] > 3000


@pytest.mark.parametrize("query", [
    "?scopes=" + urllib.parse.quote(CLOUD_PLATFORM + "," + USERINFO, safe=""),
    "?scopes=" + CLOUD_PLATFORM + "," + USERINFO,
    "?scopes=" + urllib.parse.quote(READ_ONLY, safe=""),
    "?scopes=",
])
def test_scopes_parameter_is_accepted(shared_server, query):
    token = get(shared_server, V1 + "instance/service-accounts/default/token" + query).json()
    assert token["access_token"] and token["expires_in"] > 0


def test_token_alt_text(shared_server):
    reply = get(shared_server, V1 + "instance/service-accounts/default/token?alt=text")
    lines = reply.body.decode().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["access_token", "expires_in", "token_type"]
    assert lines[2] == "token_type Bearer"


class FakeClock:
    """A settable clock for the token cache."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


class CountingMint:
    """A mint function that counts its calls and optionally takes its time."""

    def __init__(self, clock, lifetime=3600, delay=0.0):
        self.clock, self.lifetime, self.delay = clock, lifetime, delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            number = self.calls
        time.sleep(self.delay)
        return mds.Token("token-%d" % number, self.clock() + self.lifetime)


def settle_background_refreshes(timeout=5):
    """Give any background refresh the cache started time to finish."""
    time.sleep(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("mds-refresh")]:
            return
        time.sleep(0.01)


def test_cache_hands_out_the_same_token_until_five_minutes_remain():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock)
    first = cache.get("key", mint)
    for remaining in (3000, 1800, 900, 599, 301, 300):
        clock.now = first.expiry - remaining
        assert cache.get("key", mint).value == first.value, remaining
        settle_background_refreshes()
        assert cache.get("key", mint).value == first.value, remaining
    # (A next token may be minted ahead of time; it must not be handed out before the mark.)
    clock.now = first.expiry - 299
    second = cache.get("key", mint)
    assert second.value != first.value
    assert second.expiry - clock.now >= 300
    assert cache.get("key", mint).value == second.value
    assert mint.calls == 2


def test_cache_keeps_one_entry_per_key():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock)
    a = cache.get(("acct-a", ("s1",)), mint)
    b = cache.get(("acct-a", ("s2",)), mint)
    c = cache.get(("acct-b", ("s1",)), mint)
    assert len({a.value, b.value, c.value}) == 3
    assert cache.get(("acct-a", ("s1",)), mint).value == a.value
    assert mint.calls == 3


def test_cache_refreshes_an_expiring_entry_once_under_concurrency():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock, delay=0.3)
    first = cache.get("key", mint)
    clock.now = first.expiry - 100
    barrier = threading.Barrier(50)
    results = []

    def worker():
        barrier.wait()
        results.append(cache.get("key", mint).value)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 50
    assert mint.calls == 2
    assert set(results) == {"token-2"}



def test_a_failing_background_refresh_backs_off_like_a_failing_mint():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock)
    first = cache.get("key", mint)
    calls = []

    def failing_mint():
        calls.append(clock())
        raise mds.CredentialError("upstream down", 502)

    clock.now = first.expiry - 500            # inside the refresh-ahead window
    for _ in range(20):
        assert cache.get("key", failing_mint).value == first.value
        settle_background_refreshes()
    assert len(calls) == 1, "every request started another refresh of a failing upstream"
    clock.now += 1.5                          # past the first back-off
    assert cache.get("key", failing_mint).value == first.value
    settle_background_refreshes()
    assert len(calls) == 2


def test_a_token_staged_after_its_key_was_forgotten_lapses_like_any_other():
    """A background refresh that ends after its key was forgotten (a reload dropped the source)
    stages a token nobody will swap in; it must lapse at its expiry, releasing the source."""

    class Source:
        pass

    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    source = Source()
    key = ("access", source, "a@example.com", ())
    first = cache.get(key, CountingMint(clock))
    started, release = threading.Event(), threading.Event()

    def slow_mint():
        started.set()
        release.wait(10)
        return mds.Token("late", clock() + 3600)

    clock.now = first.expiry - 500            # inside the refresh-ahead window
    assert cache.get(key, slow_mint).value == first.value
    assert started.wait(5)
    cache.forget(lambda k: k[0] == "access")
    release.set()
    settle_background_refreshes()
    held = weakref.ref(source)
    del source, key, slow_mint
    clock.now += 3601                         # the late token has expired
    cache.get("another key", CountingMint(clock))      # the cache tidies up as it goes
    gc.collect()
    assert held() is None, "the forgotten source is still held by a staged token"


def test_a_cached_token_still_valid_is_served_while_the_upstream_is_down():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    first = cache.get("key", CountingMint(clock))

    def failing_mint():
        raise mds.CredentialError("upstream down", 502)

    clock.now = first.expiry - 200           # past the 5-minute mark: due for a new token
    assert cache.get("key", failing_mint).value == first.value
    clock.now = first.expiry - 30            # too close to expiry to hand out
    with pytest.raises(mds.CredentialError) as failed:
        cache.get("key", failing_mint)
    assert failed.value.status == 502 and "upstream down" in str(failed.value)


def test_a_mint_that_hung_is_not_restarted_for_as_long_as_it_took():
    """The back-off counts from when the mint failed and lasts at least as long as the mint
    took: client retries queued behind a mint that used its whole deadline get its failure
    at once instead of each starting another long mint and timing out themselves."""
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    calls = []

    def slow_failing_mint():
        calls.append(clock())
        clock.now += 10                       # the upstream hung for the whole deadline
        raise mds.CredentialError("upstream timed out", 502)

    for wait in (0, 1.5, 4, 4):               # client retries over the next 9.5 s
        clock.now += wait
        with pytest.raises(mds.CredentialError) as failed:
            cache.get("key", slow_failing_mint)
        assert failed.value.status == 502 and "timed out" in str(failed.value)
    assert len(calls) == 1
    clock.now += 1                            # 10.5 s after the failure: one more try
    with pytest.raises(mds.CredentialError):
        cache.get("key", slow_failing_mint)
    assert len(calls) == 2


def test_a_quick_failure_backs_off_one_second_then_doubles():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    calls = []

    def refused():
        calls.append(clock())
        raise mds.CredentialError("connection refused", 502)

    for wait, tries in ((0, 1), (0.5, 1), (0.6, 2), (1.5, 2), (0.6, 3)):
        clock.now += wait
        with pytest.raises(mds.CredentialError):
            cache.get("key", refused)
        assert len(calls) == tries, (wait, calls)



def test_a_request_at_the_mark_waits_for_the_refresh_already_running():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock, delay=0.5)
    first = cache.get("key", mint)
    clock.now = first.expiry - 500             # starts the background refresh
    assert cache.get("key", mint).value == first.value
    time.sleep(0.1)
    clock.now = first.expiry - 299             # past the mark while it is still running
    assert cache.get("key", mint).value == "token-2"
    settle_background_refreshes()
    assert mint.calls == 2


def test_expired_entries_and_idle_locks_are_dropped():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock, lifetime=600)
    for number in range(100):
        cache.get(("identity", "audience-%d" % number), mint)
    assert cache._locks == {}                  # a key's lock lives only while it is used
    clock.now += 3600
    cache.get(("identity", "one-more"), mint)
    assert list(cache._tokens) == [("identity", "one-more")]


def test_the_cache_is_bounded_in_entries_failures_and_key_size():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    mint = CountingMint(clock)
    for number in range(cache.MAX_ENTRIES + 200):
        cache.get(("identity", "audience-%d" % number), mint)
    assert len(cache._tokens) == cache.MAX_ENTRIES

    def refused():
        raise mds.CredentialError("HTTP 400: invalid_grant", 403)

    for number in range(cache.MAX_ENTRIES + 200):
        with pytest.raises(mds.CredentialError, match="invalid_grant"):
            cache.get(("access", "scope-%d" % number), refused)
    assert len(cache._failures) <= cache.MAX_ENTRIES
    # What a failure keeps is its message and status, not the exception and its traceback.
    assert not [f for f in cache._failures.values()
                if any(isinstance(part, BaseException) for part in f)]

    # A key the caller says not to keep is minted for each request.
    before = mint.calls
    assert cache.get("huge", mint, cache=False).value != \
        cache.get("huge", mint, cache=False).value
    assert mint.calls == before + 2 and "huge" not in cache._tokens


def test_an_audience_or_scope_list_too_large_to_keep_is_minted_each_time(server):
    account = V1 + "instance/service-accounts/default/"
    huge = "https://aud.example/" + "x" * mds.TokenCache.MAX_KEY_CHARS
    for _ in range(2):
        assert get(server, account + "identity?audience=" + huge).body.count(b".") == 2
    assert get(server, account + "identity?audience=https://small.example").status == 200
    kept = [key for key in server.tokens._tokens if key[0] == "identity"]
    assert [key[3] for key in kept] == ["https://small.example"], kept


def test_an_unexpected_mint_failure_is_a_500_that_backs_off():
    clock = FakeClock()
    cache = mds.TokenCache(clock=clock)
    calls = []

    def broken():
        calls.append(clock())
        raise OverflowError("cannot convert float infinity to integer")

    for _ in range(3):
        with pytest.raises(mds.CredentialError) as failed:
            cache.get("key", broken)
        assert failed.value.status == 500 and "OverflowError" in str(failed.value)
    assert len(calls) == 1


def test_an_unexpected_mint_failure_does_not_quote_tokens_it_carries():
    # A library's own exception may carry what it was handling: the 500's text is redacted.
    cache = mds.TokenCache(clock=FakeClock())
    secret = "ya29.a0AfH6SMBsecretsecretsecretsecretsecret"

    def broken():
        raise KeyError({"access_token": secret, "id_token": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIi.c2ln"})

    with pytest.raises(mds.CredentialError) as failed:
        cache.get("key", broken)
    assert failed.value.status == 500 and "KeyError" in str(failed.value)
    assert secret not in str(failed.value) and "eyJhbGciOiJSUzI1NiJ9" not in str(failed.value)


def test_fifty_concurrent_cold_token_requests_mint_exactly_once(server):
    source = primary_source(server)
    original = source.access_token
    calls = []
    guard = threading.Lock()

    def slow_counting_access_token(scopes):
        with guard:
            calls.append(scopes)
        time.sleep(0.5)
        return original(scopes)

    source.access_token = slow_counting_access_token
    barrier = threading.Barrier(50)
    tokens, errors = [], []

    def worker():
        try:
            barrier.wait()
            tokens.append(get(server, V1 + "instance/service-accounts/default/token",
                              timeout=30).json()["access_token"])
        except Exception as exc:   # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert not errors, errors[:3]
    assert len(tokens) == 50
    assert len(calls) == 1, "minted %d times" % len(calls)
    assert len(set(tokens)) == 1


# ---- identity tokens ------------------------------------------------------------------------


def identity(server, query, account="default"):
    reply = get(server, V1 + "instance/service-accounts/%s/identity?%s" % (account, query))
    return reply.body.decode("ascii")


@pytest.mark.parametrize("query", ["", "?audience=", "?format=full"])
def test_identity_needs_an_audience(shared_server, query):
    reply = fetch(shared_server, V1 + "instance/service-accounts/default/identity" + query)
    assert reply.status == 400, reply
    assert b"audience" in reply.body
    assert_common_headers(reply)


def test_identity_token_claims(shared_server):
    before = int(time.time())
    token = identity(shared_server, "audience=" + urllib.parse.quote("https://svc.example/x",
                                                                    safe=""))
    after = int(time.time())
    assert not token.endswith("\n")
    header, claims, _ = jwt_parts(token)
    assert header["alg"] == "RS256" and header["typ"] == "JWT" and header["kid"]
    assert claims["aud"] == "https://svc.example/x"
    assert claims["iss"] == "https://accounts.google.com"
    assert claims["email"] == PRIMARY
    assert claims["email_verified"] is True
    assert claims["sub"] == claims["azp"] and re.fullmatch(r"\d+", claims["sub"])
    assert type(claims["iat"]) is int and type(claims["exp"]) is int
    assert before - 5 <= claims["iat"] <= after + 5
    assert claims["exp"] == claims["iat"] + 3600
    assert "google" not in claims


def test_identity_accepts_an_unencoded_audience(shared_server):
    # Node sends the audience raw in the query.
    claims = jwt_parts(identity(shared_server, "audience=https://svc.example/raw"))[1]
    assert claims["aud"] == "https://svc.example/raw"


def test_identity_format_full_adds_compute_engine_claims(shared_server):
    claims = jwt_parts(identity(shared_server, "audience=a&format=full"))[1]
    engine = claims["google"]["compute_engine"]
    assert engine["instance_id"] == str(INSTANCE_ID)
    assert engine["instance_name"] == "vm-1"
    assert engine["project_id"] == "my-proj"
    assert engine["project_number"] == PROJECT_NUMBER
    assert engine["zone"] == "europe-west1-b"
    assert type(engine["instance_creation_timestamp"]) is int
    assert engine["instance_creation_timestamp"] <= time.time() + 5
    assert "license_id" not in engine


@pytest.mark.parametrize("licenses", ["TRUE", "true"])
def test_identity_licenses_true_adds_license_ids(shared_server, licenses):
    claims = jwt_parts(identity(shared_server, "audience=a&format=full&licenses=" + licenses))[1]
    assert claims["google"]["compute_engine"]["license_id"] == ["1000201", "1000202"]


def test_identity_licenses_false_has_no_license_ids(shared_server):
    claims = jwt_parts(identity(shared_server, "audience=a&format=full&licenses=FALSE"))[1]
    assert "license_id" not in claims["google"]["compute_engine"]


def test_full_identity_tokens_follow_a_reload(mds_server_factory, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(DOCUMENT))
    server = mds_server_factory(config=str(config))
    engine = jwt_parts(identity(server, "audience=a&format=full"))[1]["google"]["compute_engine"]
    assert (engine["project_id"], engine["instance_name"]) == ("my-proj", "vm-1")
    renamed = copy.deepcopy(DOCUMENT)
    renamed["computeMetadata"]["v1"]["instance"]["name"] = "vm-2"
    renamed["computeMetadata"]["v1"]["project"]["projectId"] = "other-proj"
    renamed.setdefault("mds", {})["instanceCreationTimestamp"] = 1600000000
    config.write_text(json.dumps(renamed))
    assert server.reload()
    engine = jwt_parts(identity(server, "audience=a&format=full"))[1]["google"]["compute_engine"]
    assert (engine["project_id"], engine["instance_name"]) == ("other-proj", "vm-2")
    assert engine["instance_creation_timestamp"] == 1600000000     # "mds" settings too


@pytest.mark.parametrize("instance_changes, project_number, license_ids", [
    ({"licenses": None}, PROJECT_NUMBER, []),
    ({"licenses": ["1000301", {"id": "1000302"}]}, PROJECT_NUMBER, ["1000301", "1000302"]),
    ({}, str(PROJECT_NUMBER), ["1000201", "1000202"]),
])
def test_full_identity_claims_keep_their_types_whatever_the_config_holds(
        mds_server_factory, instance_changes, project_number, license_ids):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"].update(instance_changes)
    document["computeMetadata"]["v1"]["project"]["numericProjectId"] = project_number
    server = mds_server_factory(config=document)
    engine = jwt_parts(identity(server, "audience=a&format=full&licenses=TRUE"))[1][
        "google"]["compute_engine"]
    assert engine["project_number"] == PROJECT_NUMBER      # a number, as verifiers expect
    assert engine["license_id"] == license_ids


def google_request():
    import google.auth.transport.requests
    import requests
    session = requests.Session()
    session.trust_env = False   # never route 127.0.0.1 through a proxy from the environment
    return google.auth.transport.requests.Request(session=session)


def test_identity_token_verifies_against_the_jwks(shared_server):
    from google.oauth2 import id_token as google_id_token
    token = identity(shared_server, "audience=https://svc.example/verify&format=full")
    claims = google_id_token.verify_token(token, google_request(),
                                          audience="https://svc.example/verify",
                                          certs_url=shared_server.url + "/oauth2/v3/certs")
    assert claims["email"] == PRIMARY


def test_jwks_is_served_without_the_flavor_header(shared_server):
    reply = fetch(shared_server, "/oauth2/v3/certs", flavor=False)
    assert reply.status == 200
    keys = reply.json()["keys"]
    assert keys and all(key["kty"] == "RSA" for key in keys)


def test_identity_token_signature_checks_with_cryptography(shared_server):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    token = identity(shared_server, "audience=crypto")
    header, _, signature = jwt_parts(token)
    jwks = fetch(shared_server, "/oauth2/v3/certs", flavor=False).json()
    jwk = next(key for key in jwks["keys"] if key["kid"] == header["kid"])

    def number(field):
        return int.from_bytes(base64.urlsafe_b64decode(field + "=" * (-len(field) % 4)), "big")

    public_key = rsa.RSAPublicNumbers(number(jwk["e"]), number(jwk["n"])).public_key()
    signed, _, _ = token.rpartition(".")
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    public_key.verify(raw_signature, signed.encode(), padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        public_key.verify(raw_signature, signed.encode() + b"x", padding.PKCS1v15(),
                          hashes.SHA256())


def test_identity_token_verifies_against_the_v1_pem_certs(shared_server):
    reply = fetch(shared_server, "/oauth2/v1/certs", flavor=False)
    assert reply.status == 200, reply           # README's verify_token example uses it
    from google.oauth2 import id_token as google_id_token
    token = identity(shared_server, "audience=pem-check")
    claims = google_id_token.verify_token(token, google_request(), audience="pem-check",
                                          certs_url=shared_server.url + "/oauth2/v1/certs")
    assert claims["aud"] == "pem-check"


def test_jwks_and_pem_certs_publish_the_same_key(shared_server):
    from cryptography import x509
    pem_reply = fetch(shared_server, "/oauth2/v1/certs", flavor=False)
    assert pem_reply.status == 200, pem_reply
    jwks = fetch(shared_server, "/oauth2/v3/certs", flavor=False).json()
    pems = pem_reply.json()
    assert set(pems) == {key["kid"] for key in jwks["keys"]}
    for key in jwks["keys"]:
        certificate = x509.load_pem_x509_certificate(pems[key["kid"]].encode())
        n_field = key["n"]
        n = int.from_bytes(base64.urlsafe_b64decode(n_field + "=" * (-len(n_field) % 4)), "big")
        assert certificate.public_key().public_numbers().n == n


# ---- --signing-key --------------------------------------------------------------------------


def test_a_deferred_key_is_generated_at_once_when_first_needed():
    """The server defers key generation past its startup burst; an identity request must not
    wait out that delay."""
    key = mds.SigningKey()
    key.start(delay=3600)
    assert isinstance(key.get(timeout=60), mds.RsaKey)


def test_a_key_still_deferred_when_its_server_stops_is_never_generated(mds_server_factory):
    """Short-lived servers (tests, CI jobs) spend no CPU on a key nobody asked for."""
    server = mds_server_factory()
    server.stop()
    with pytest.raises(mds.CredentialError) as stopped:
        server.signing_key.get(timeout=60)
    assert "stopped" in str(stopped.value)


@pytest.mark.parametrize("pem_format", ["PKCS8", "TraditionalOpenSSL"])
def test_signing_key_pem_is_honoured(tmp_path, pem_format):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem_path = tmp_path / "signing.pem"
    pem_path.write_bytes(private_key.private_bytes(
        serialization.Encoding.PEM, getattr(serialization.PrivateFormat, pem_format),
        serialization.NoEncryption()))
    cli = MdsCli(tmp_path, "--signing-key", pem_path)
    try:
        class Endpoint:
            port = cli.port

        token = get(Endpoint, V1 + "instance/service-accounts/default/identity?audience=k")
        token = token.body.decode()
        signed, _, signature = token.rpartition(".")
        raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        private_key.public_key().verify(raw_signature, signed.encode(), padding.PKCS1v15(),
                                        hashes.SHA256())
        jwks = fetch(Endpoint, "/oauth2/v3/certs", flavor=False).json()
        n_field = jwks["keys"][0]["n"]
        served_n = int.from_bytes(base64.urlsafe_b64decode(n_field + "=" * (-len(n_field) % 4)),
                                  "big")
        assert served_n == private_key.public_key().public_numbers().n
    finally:
        cli.stop()
