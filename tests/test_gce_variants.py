"""The Cloud Run (`--flavor cloudrun`) and GKE (`--flavor gke`) variants of the GCE flavor:
their headers, root, error shapes and smaller trees (spec sections 12 and 13), checked on the
wire and through the real Python, Go and Node clients.
"""

import base64
import http.client
import json
import re

import pytest

import mds
from clients import run_go, run_node, run_python

V1 = "/computeMetadata/v1/"
GOOGLE = {"Metadata-Flavor": "Google"}
AUDIENCE = "https://variants.example/endpoint"
STORAGE_READ = "https://www.googleapis.com/auth/devstorage.read_only"


def call(server, path, headers=GOOGLE):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.msg, response.read()
    finally:
        connection.close()


def text(server, path):
    status, _, body = call(server, V1 + path)
    assert status == 200, (path, status, body)
    return body.decode("utf-8")


@pytest.fixture(params=["cloudrun", "gke"])
def variant(request, mds_server_factory):
    return request.param, mds_server_factory(flavor=request.param)


# ---- headers, root and error shapes -----------------------------------------------------------


@pytest.mark.parametrize("flavor, server_header", [
    ("cloudrun", "Metadata Server for Serverless"), ("gke", "GKE Metadata Server")])
def test_each_variant_names_its_server(mds_server_factory, flavor, server_header):
    server = mds_server_factory(flavor=flavor)
    status, headers, _ = call(server, V1 + "project/project-id")
    assert status == 200
    assert headers["Server"] == server_header and headers["Metadata-Flavor"] == "Google"
    # The real GKE answers carry no browser-protection headers; the serverless ones do.
    assert ("X-Frame-Options" in headers) == (flavor == "cloudrun")


@pytest.mark.parametrize("flavor, etag_name", [("gce", "ETag"), ("cloudrun", "ETag"),
                                               ("gke", "Etag")])
def test_the_etag_header_is_named_as_each_server_writes_it(mds_server_factory, flavor,
                                                           etag_name):
    # The GKE server is written in Go, which canonicalises header names to `Etag` (spec 13).
    server = mds_server_factory(flavor=flavor)
    for path in ("project/project-id", "instance/service-accounts/default/token",
                 "instance/service-accounts/default/identity?audience=a"):
        status, headers, _ = call(server, V1 + path)
        assert status == 200
        names = [name for name, _ in headers.items() if name.lower() == "etag"]
        assert names == [etag_name], (path, names)


def test_gke_needs_the_flavor_header_even_at_the_root(mds_server_factory):
    server = mds_server_factory(flavor="gke")
    status, headers, body = call(server, "/", headers={})
    assert status == 403
    assert body == b'GKE Metadata Server encountered an error: Missing required header ' \
                   b'"Metadata-Flavor": "Google"\n'
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "Metadata-Flavor" not in headers
    assert call(server, "/")[2] == b"computeMetadata/\n"
    status, _, body = call(server, V1 + "no/such/key")
    assert (status, body) == (404, b"Not Found\n")
    # Refused for another reason, it says that reason in the same shape.
    status, _, body = call(server, V1 + "project/project-id",
                           headers=dict(GOOGLE, **{"X-Forwarded-For": "10.0.0.1"}))
    assert status == 403 and b"Missing required header" not in body, body


def test_cloud_run_refuses_without_the_flavor_header_and_without_its_own(mds_server_factory):
    server = mds_server_factory(flavor="cloudrun")
    status, headers, body = call(server, V1 + "project/project-id", headers={})
    assert status == 403 and b"Missing Metadata-Flavor:Google header." in body
    assert "Metadata-Flavor" not in headers
    assert call(server, "/", headers={})[0] == 200


# ---- the smaller trees ----------------------------------------------------------------------


def test_cloud_run_serves_an_instance_of_id_region_zone_and_accounts(mds_server_factory):
    server = mds_server_factory(flavor="cloudrun")
    assert text(server, "instance/") == "id\nregion\nservice-accounts/\nzone\n"
    assert re.fullmatch(r"[0-9a-f]{128}", text(server, "instance/id"))
    number = text(server, "project/numeric-project-id")
    assert re.fullmatch(r"projects/%s/regions/[a-z]+-[a-z]+\d" % number,
                        text(server, "instance/region"))
    region = text(server, "instance/region").rsplit("/", 1)[-1]
    assert text(server, "instance/zone") == "projects/%s/zones/%s-1" % (number, region)
    instance = json.loads(call(server, V1 + "instance/?recursive=true")[2])
    assert isinstance(instance["id"], str)          # a JSON string, not a number


def test_gke_serves_the_cluster_subset(mds_server_factory):
    server = mds_server_factory(flavor="gke")
    assert text(server, "instance/") == "attributes/\nhostname\nid\nservice-accounts/\nzone\n"
    assert text(server, "instance/attributes/") == \
        "cluster-location\ncluster-name\ncluster-uid\n"
    assert call(server, V1 + "instance/name")[0] == 404


def test_both_serve_only_the_projects_ids(variant):
    _, server = variant
    assert text(server, "project/") == "numeric-project-id\nproject-id\n"
    assert "oslogin/" not in text(server, "")


def test_a_config_of_settings_only_keeps_the_variants_tree(variant, tmp_path,
                                                           mds_server_factory):
    flavor, default = variant
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mds": {}}))
    server = mds_server_factory(flavor=flavor, config=str(config))
    assert text(server, "instance/") == text(default, "instance/")
    assert text(server, "project/") == text(default, "project/")


def test_neither_variant_takes_guest_attributes(variant):
    # Guest attributes belong to VMs: the variants have no guest-attributes/ to write into.
    _, server = variant
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("PUT", V1 + "instance/guest-attributes/ns/key", body=b"value",
                           headers=GOOGLE)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 405
    assert "guest-attributes/" not in text(server, "instance/")
    assert "guestAttributes" not in json.loads(call(server, V1 + "instance/?recursive=true")[2])


def test_full_identity_tokens_of_the_variants_carry_no_vm_claims(variant):
    # Serverless and Workload Identity tokens have no google.compute_engine claim even with
    # format=full (only VMs have one); a verifier of VM identity must refuse them.
    _, server = variant
    path = (V1 + "instance/service-accounts/default/identity?audience=" + AUDIENCE
            + "&format=full&licenses=TRUE")
    status, _, body = call(server, path)
    assert status == 200, body
    payload = body.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    assert claims["aud"] == AUDIENCE and claims["email_verified"] is True
    assert "google" not in claims


# ---- tokens ---------------------------------------------------------------------------------


def token(server, scopes=None):
    path = V1 + "instance/service-accounts/default/token"
    if scopes:
        path += "?scopes=" + ",".join(scopes)
    status, _, body = call(server, path)
    assert status == 200, body
    return json.loads(body)["access_token"]


def test_cloud_run_honours_scopes_where_a_vm_applies_its_own(mds_server_factory):
    # Serverless mints a token for the scopes asked for (spec 9.4); a VM's token carries the
    # VM's scopes whatever the client asks, so asking differently changes nothing there.
    serverless = mds_server_factory(flavor="cloudrun")
    assert token(serverless, [STORAGE_READ]) != token(serverless)
    assert token(serverless, [STORAGE_READ]) == token(serverless, [STORAGE_READ])
    vm = mds_server_factory(flavor="gce")
    assert token(vm, [STORAGE_READ]) == token(vm)


# ---- real clients ---------------------------------------------------------------------------


def test_python_google_auth_works_on_both(variant, client_env):
    _, server = variant
    report = run_python("py_gce_client.py", client_env(server), [AUDIENCE])
    assert report["blocked"] == []
    project_id = text(server, "project/project-id")
    assert report["ping"]["value"] is True
    assert report["adc"]["value"]["project_id"] == project_id
    assert report["metadata_project_id"]["value"] == project_id
    compute = report["compute_token"]["value"]
    assert compute["token"] == token(server, compute["scopes"])
    claims = json.loads(mds.b64url_decode(report["id_token"]["value"].split(".")[1]))
    assert claims["aud"] == AUDIENCE
    assert claims["email"] == text(server, "instance/service-accounts/default/email")


def test_go_compute_metadata_works_on_both(variant, client_env):
    _, server = variant
    report = run_go("gcemeta", client_env(server), ["info"])
    assert report["on_gce"] is True
    assert report["project_id"]["value"] == text(server, "project/project-id")
    assert report["instance_id"]["value"] == text(server, "instance/id")
    assert report["zone"]["value"] == text(server, "instance/zone").rsplit("/", 1)[-1]
    assert report["email"]["value"] == text(server, "instance/service-accounts/default/email")
    assert report["missing_is_not_defined"] is True


def test_node_clients_work_on_both(variant, client_env):
    flavor, server = variant
    report = run_node("gce.js", client_env(server), [AUDIENCE])
    assert report["is_available"]["value"] is True
    assert report["auth_project_id"]["value"] == text(server, "project/project-id")
    assert report["auth_email"]["value"] == \
        text(server, "instance/service-accounts/default/email")
    assert report["auth_access_token"]["value"] == \
        token(server, ["https://www.googleapis.com/auth/cloud-platform"])
    claims = json.loads(mds.b64url_decode(report["id_token"]["value"].split(".")[1]))
    assert claims["aud"] == AUDIENCE
    # Cloud Run's hex id stays a string; GKE's numeric one is a big number.
    assert report["instance_id_type"] == ("string" if flavor == "cloudrun" else "object")
