"""The Java Google auth library (Debian's libgoogle-auth-java, google-auth-library 0.18)
against a running mds server: GCE, Cloud Run (`--flavor cloudrun`) and GKE.

tests/java/GceClient.java is compiled once per session against the packaged jars and
run with only GCE_METADATA_HOST pointing at the server. Every expectation is read back
from the server (its tree, token and identity endpoints, its JWKS) or is a value the
test put into the config, as in test_gce_clients.py.
"""

import copy
import http.server
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import mds
from clients import MdsCli, compile_java, run_java
from test_gce_clients import (assert_full_format_claims, custom_vm_document, decode_jwt,
                              fetch, served, served_token, verify_signature)

# Characters that need escaping in a query, so the library's URL encoding is exercised.
AUDIENCE = "https://java-client.mds-test.example/run?x=1&y=a b"
VARIANT_ACCOUNT = "java-robot@variant-project.mds-test.example"
VARIANT_PROJECT = "variant-project-7"
COMPUTE_CREDENTIALS = "com.google.auth.oauth2.ComputeEngineCredentials"
# Both the token's expires_in and the library's expiry derive from one server-side
# expiry; they differ by whole-second truncation and the time between two clock reads.
EXPIRY_SLACK_SECONDS = 5
ALL_STEPS = ["adc", "token", "account", "metadata",
             "idtoken", AUDIENCE, "standard", "idtoken", AUDIENCE, "full"]


@pytest.fixture(scope="session")
def java_client(tmp_path_factory):
    """GceClient compiled into a session temp dir: (java, classpath) for run_java."""
    return compile_java("GceClient", tmp_path_factory.mktemp("java-classes"))


def run_client(java_client, env, steps):
    return run_java(java_client, "GceClient", env, steps)


def java_env(client_env, server, host=None):
    """Only GCE_METADATA_HOST names the server (or `host`): no GCE_METADATA_IP/ROOT and
    no NO_GCE_CHECK, so ADC has to detect the metadata server itself."""
    env = client_env(server, GCE_METADATA_IP=None, GCE_METADATA_ROOT=None)
    if host is not None:
        env["GCE_METADATA_HOST"] = host
    assert env["GCE_METADATA_HOST"] == (host or server.env["GCE_METADATA_HOST"])
    assert not {"NO_GCE_CHECK", "GCE_METADATA_IP", "GCE_METADATA_ROOT"} & set(env)
    return env


def value_of(report, name):
    entry = report[name]
    assert "error" not in entry, "%s failed in the Java client: %s" % (name, entry["error"])
    return entry["value"]


def error_of(report, name):
    entry = report[name]
    assert "error" in entry, "%s unexpectedly succeeded: %r" % (name, entry.get("value"))
    return entry["error"]


def served_id_token(server, audience, fmt):
    query = {"audience": audience}
    if fmt != "standard":
        query["format"] = fmt
    status, _, body = fetch(server, "/computeMetadata/v1/instance/service-accounts/default/"
                            "identity", query)
    assert status == 200, body[:200]
    return body.decode("ascii")


@pytest.fixture(params=["gce", "cloudrun", "gke"])
def java_target(request, mds_server_factory, tmp_path):
    """(flavor, server, e-mail the test configured for the default account)."""
    flavor = request.param
    if flavor == "gce":
        document = custom_vm_document()
        email = document["computeMetadata"]["v1"]["instance"]["serviceAccounts"]["default"][
            "email"]
        yield flavor, mds_server_factory(config=copy.deepcopy(document), flavor="gce"), email
        return
    # The variants as a user starts them, with the account and project set on the command line.
    cli = MdsCli(tmp_path, "--flavor", flavor, "--service-account", VARIANT_ACCOUNT,
                 "--project-id", VARIANT_PROJECT)
    try:
        yield flavor, cli, VARIANT_ACCOUNT
    finally:
        cli.stop()


def test_java_adc_tokens_account_and_id_tokens(java_target, java_client, client_env):
    flavor, server, email = java_target
    started = time.time()
    report = run_client(java_client, java_env(client_env, server), ALL_STEPS)

    # ADC found the metadata server from GCE_METADATA_HOST alone.
    assert value_of(report, "adc") == COMPUTE_CREDENTIALS

    # 0.18 asks without ?scopes=, and the server caches one token per account and scope
    # set, so the library must hold exactly the token the server hands out unscoped.
    server_token = served_token(server)
    token = value_of(report, "token")
    assert token["token"] == server_token["access_token"]
    assert abs(token["expiry_ms"] / 1000 - (time.time() + server_token["expires_in"])) \
        <= EXPIRY_SLACK_SECONDS
    assert value_of(report, "metadata") == ["Bearer " + server_token["access_token"]]

    assert value_of(report, "account") == email
    assert served(server, "instance/service-accounts/default/email") == email
    if flavor != "gce":
        assert served(server, "project/project-id") == VARIANT_PROJECT

    for fmt in ("standard", "full"):
        id_token = value_of(report, "idtoken/" + fmt)
        # Cached per audience and format too: what the server serves for the same query.
        assert id_token["token"] == served_id_token(server, AUDIENCE, fmt), fmt
        assert id_token["authorization"] == ["Bearer " + id_token["token"]]
        header, claims, signing_input, signature = decode_jwt(id_token["token"])
        verify_signature(server, header, signing_input, signature)
        assert claims["aud"] == AUDIENCE
        assert claims["email"] == email
        # The library read its expiry from the token's exp claim.
        assert id_token["expiry_ms"] == claims["exp"] * 1000
        assert started - EXPIRY_SLACK_SECONDS <= claims["iat"] <= time.time() + 1
        if flavor == "gce" and fmt == "full":
            assert_full_format_claims(server, claims)
        else:
            # Only a VM's full token describes the VM: Cloud Run's and GKE's never do.
            assert "google" not in claims


class _FlavorStrippingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to the mds server at `target`, dropping its Metadata-Flavor header."""

    target = None

    def do_GET(self):
        request = urllib.request.Request(self.target + self.path, headers={
            name: value for name, value in self.headers.items()
            if name.lower() not in ("host", "connection")})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            response = opener.open(request, timeout=10)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            body = response.read()
            self.send_response(response.status)
            for name, value in response.headers.items():
                if name.lower() not in ("metadata-flavor", "content-length", "connection",
                                        "server", "date", "transfer-encoding"):
                    self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flavorless_proxy(gce_server):
    handler = type("Handler", (_FlavorStrippingProxy,), {"target": gce_server.url})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield "127.0.0.1:%d" % proxy.server_address[1]
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)


def test_java_adc_needs_the_servers_metadata_flavor_answer(gce_server, flavorless_proxy,
                                                           java_client, client_env):
    """The same server behind a proxy that drops Metadata-Flavor: Google from its answers
    is not a metadata server to ADC, though the token endpoint itself still works."""
    env = java_env(client_env, gce_server, host=flavorless_proxy)
    report = run_client(java_client, env, ["adc", "token"])
    assert "Application Default Credentials are not available" in error_of(report, "adc")
    assert value_of(report, "token")["token"] == served_token(gce_server)["access_token"]


def test_java_reports_a_closed_metadata_port(gce_server, java_client, client_env):
    with socket.socket() as probe:      # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = java_env(client_env, gce_server, host="127.0.0.1:%d" % port)
    report = run_client(java_client, env, ["adc", "token", "account"])
    assert "Application Default Credentials are not available" in error_of(report, "adc")
    assert "java.net.ConnectException" in error_of(report, "token")
    assert "java.net.ConnectException" in error_of(report, "account")


def vm_without_service_accounts():
    document = mds.default_gce_document()
    document["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = {}
    return document


@pytest.mark.parametrize("gce_server", [vm_without_service_accounts()], ids=["no-accounts"],
                         indirect=True)
def test_java_on_a_vm_without_a_service_account(gce_server, java_client, client_env):
    report = run_client(java_client, java_env(client_env, gce_server),
                        ["adc", "token", "account", "idtoken", AUDIENCE, "standard"])
    # The metadata server is still found; every credential call fails as the server does.
    assert value_of(report, "adc") == COMPUTE_CREDENTIALS
    accounts = "/computeMetadata/v1/instance/service-accounts/"
    status, _, _ = fetch(gce_server, accounts + "default/token")
    assert status == 404
    assert "Error code %d trying to get security access token" % status \
        in error_of(report, "token")
    # getAccount reads the recursive listing, which has no "default" entry here.
    status, _, body = fetch(gce_server, accounts, {"recursive": "true"})
    assert status == 200 and "default" not in json.loads(body)
    assert "Expected value default not found" in error_of(report, "account")
    status, _, _ = fetch(gce_server, accounts + "default/identity", {"audience": AUDIENCE})
    assert status == 404
    # 0.18 does not look at the identity answer's status: it fails decoding the error page
    # as a JWT, so the error names neither the status nor the account.
    error_of(report, "idtoken/standard")
