"""The command line: flags documented in the README, the example config, identity overrides,
key-file adoption and one-line startup failures."""

import http.client
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import mds
from clients import MdsCli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MDS_PY = os.path.join(REPO_ROOT, "mds.py")
V1 = "/computeMetadata/v1/"
GOOGLE = {"Metadata-Flavor": "Google"}


def get(server, path, headers=GOOGLE):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def parser_flags():
    return {option for action in mds.build_parser()._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def test_readme_flag_table_lists_exactly_the_flags_the_parser_has():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Flags", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)", section, re.M))
    assert documented == parser_flags()


def test_every_flag_the_readme_mentions_exists():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", readme))
    # Flags of other programs quoted in the README (gcloud, tpm2-tools, openssl, curl, ...).
    foreign = {"--project", "--member", "--role", "--iam-account", "--service-account",
               "--credential-source-file", "--output-file", "--impersonate-service-account",
               "--audiences", "--tpm2", "--server", "--ctrl", "--tpmstate", "--flags",
               "--policy-session", "--no-tips", "--violations", "--target"}
    unknown = {flag for flag in mentioned - parser_flags() - foreign - {"--help"}
               if not flag.startswith("--tpm2")}
    assert not unknown, "README mentions flags mds does not have: %s" % sorted(unknown)


def test_readme_starts_with_the_run_and_test_commands():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    head = "\n".join(readme.splitlines()[:8])
    assert "python3 mds.py" in head and "bash tests/run.sh" in head
    assert head.index("python3 mds.py") < head.index("bash tests/run.sh"), "run it, then test it"


@pytest.mark.parametrize("flavor", ["gce", "ec2"])
def test_the_example_config_is_served(mds_server_factory, flavor):
    path = os.path.join(REPO_ROOT, "config.example.json")
    document = json.load(open(path, encoding="utf-8"))
    server = mds_server_factory(config=path, flavor=flavor)
    if flavor == "gce":
        instance = document["computeMetadata"]["v1"]["instance"]
        assert get(server, V1 + "instance/attributes/startup-script") == \
            (200, instance["attributes"]["startup-script"])
        assert get(server, V1 + "instance/my-team/owner") == (200, instance["myTeam"]["owner"])
        batch = [e for e in instance["serviceAccounts"] if e.startswith("batch-worker")][0]
        status, body = get(server, V1 + "instance/service-accounts/%s/token" % batch)
        static = document["mds"]["serviceAccounts"][batch]["credentials"]["access_token"]
        assert status == 200 and json.loads(body)["access_token"] == static
    else:
        tags = document["ec2"]["meta-data"]["tags"]["instance"]
        assert get(server, "/latest/meta-data/tags/instance/env", {}) == (200, tags["env"])
        assert get(server, "/latest/meta-data/placement/availability-zone", {}) == \
            (200, document["ec2"]["meta-data"]["placement"]["availability-zone"])
        assert get(server, "/latest/user-data", {}) == (200, document["ec2"]["user-data"])


def start_from_args(mds_server_factory, argv, environ=None, config=None):
    args = mds.build_parser().parse_args(argv)
    spec, signer, identity = mds.credentials_from_args(args, environ or {})
    return mds_server_factory(config=config, credentials=spec, signer=signer, identity=identity)


def test_flags_override_project_and_account(mds_server_factory):
    server = start_from_args(mds_server_factory, [
        "--project-id", "flag-project", "--numeric-project-id", "42",
        "--service-account", "runner@flag-project.iam.gserviceaccount.com"])
    assert get(server, V1 + "project/project-id") == (200, "flag-project")
    assert get(server, V1 + "project/numeric-project-id") == (200, "42")
    assert get(server, V1 + "instance/service-accounts/default/email") == \
        (200, "runner@flag-project.iam.gserviceaccount.com")
    status, listing = get(server, V1 + "instance/service-accounts/")
    assert listing.splitlines() == ["default/", "runner@flag-project.iam.gserviceaccount.com/"]


def test_go_emulator_environment_variables_are_honoured(mds_server_factory):
    environ = {"GOOGLE_PROJECT_ID": "env-project", "GOOGLE_NUMERIC_PROJECT_ID": "7",
               "GOOGLE_SERVICE_ACCOUNT": "env-sa@env-project.iam.gserviceaccount.com",
               "GOOGLE_ACCESS_TOKEN": "ya29.from-the-environment"}
    server = start_from_args(mds_server_factory, [], environ)
    assert get(server, V1 + "project/project-id") == (200, "env-project")
    assert get(server, V1 + "instance/service-accounts/default/email")[1] == \
        environ["GOOGLE_SERVICE_ACCOUNT"]
    token = json.loads(get(server, V1 + "instance/service-accounts/default/token")[1])
    assert token["access_token"] == environ["GOOGLE_ACCESS_TOKEN"]


def write_key_file(tmp_path, email, project):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": "abc123",
        "private_key": pem, "client_email": email, "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token"}))
    return str(path)


def test_key_file_lends_its_email_and_project_to_the_default_vm(mds_server_factory, tmp_path):
    key_file = write_key_file(tmp_path, "keyed@key-project.iam.gserviceaccount.com",
                              "key-project")
    server = start_from_args(mds_server_factory, ["--service-account-file", key_file,
                                                  "--token-mode", "self-signed"])
    assert get(server, V1 + "project/project-id") == (200, "key-project")
    assert get(server, V1 + "instance/service-accounts/default/email") == \
        (200, "keyed@key-project.iam.gserviceaccount.com")
    token = json.loads(get(server, V1 + "instance/service-accounts/default/token")[1])
    header, claims = mds.jwt_decode_unverified(token["access_token"])
    assert header["kid"] == "abc123" and claims["iss"] == "keyed@key-project.iam.gserviceaccount.com"


def test_key_file_for_another_account_than_the_configs_fails_at_startup(tmp_path):
    key_file = write_key_file(tmp_path, "other@p.iam.gserviceaccount.com", "p")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"computeMetadata": {"v1": {"instance": {"serviceAccounts": {
        "default": {"email": "configured@p.iam.gserviceaccount.com"}}}}}}))
    result = subprocess.run([sys.executable, MDS_PY, "--port", "0", "--config", str(config),
                             "--service-account-file", key_file], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("mds: error:") and "other@p" in lines[-1] \
        and "configured@p" in lines[-1]
    assert "Traceback" not in result.stderr
    assert "PRIVATE KEY" not in result.stderr


@pytest.mark.parametrize("argv, reason", [
    (["--config", "/nonexistent/config.json"], "cannot read"),
    (["--service-account-file", "/nonexistent/sa.json"], "sa.json"),
    (["--token-mode", "self-signed"], "needs --service-account-file or --tpm"),
    (["--access-token", "x", "--impersonate"], "choose one"),
    # A flag of another flavor is refused, not silently ignored.
    (["--flavor", "ec2", "--preempt-after", "1m"], "--preempt-after does not apply to --flavor ec2"),
    (["--spot-interruption-after", "1m"], "--spot-interruption-after does not apply to --flavor gce"),
    (["--flavor", "cloudrun", "--maintenance-event-after", "1m"], "Compute Engine"),
    (["--preempt-after", "soon"], "not a duration"),
    (["--flavor", "ec2", "--access-token", "x"], "--access-token does not apply to --flavor ec2"),
    (["--flavor", "ec2", "--tpm", "--tpm-path", "/nonexistent"], "--tpm does not apply"),
    (["--flavor", "ec2", "--tpm-pcrs", "23"], "--tpm-pcrs does not apply to --flavor ec2"),
    # TPM details without --tpm would be ignored and the account left offline.
    (["--tpm-key-file", "/nonexistent.tss.pem", "--tpm-key-pass", "x"],
     "--tpm-key-file needs --tpm"),
    (["--tpm-path", "swtpm:port=2321"], "--tpm-path needs --tpm"),
])
def test_bad_startup_options_fail_with_one_clear_line(argv, reason):
    result = subprocess.run([sys.executable, MDS_PY, "--port", "0"] + argv,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mds: error:") and reason in last, result.stderr


def test_the_startup_log_warns_of_offline_mode_and_its_verify_urls_work(tmp_path):
    server = MdsCli(tmp_path)
    try:
        log = server.stderr()
        token_path = V1 + "instance/service-accounts/default/identity?audience=log"
        status, token = get(server, token_path)
        assert status == 200
        warning = [line for line in log.splitlines()
                   if " WARNING " in line and "OFFLINE" in line]
        assert len(warning) == 1, log
        assert "Google will reject" in warning[0]
        assert "config: built-in default" in log and "credentials " in log
        assert "serving the gce metadata server at %s" % server.url in log
        urls = re.findall(r"(http://\S+/oauth2/v[13]/certs)", warning[0])
        assert sorted(url.rsplit("/", 2)[1] for url in urls) == ["v1", "v3"]
        # google-auth verifies against the PEM URL the log names first.
        from google.auth.transport.requests import Request
        from google.oauth2 import id_token
        claims = id_token.verify_token(token, Request(), audience="log", certs_url=urls[0])
        assert claims["aud"] == "log"
        keys = json.loads(urllib.request.urlopen(urls[1], timeout=10).read())["keys"]
        assert [key["kid"] for key in keys]
    finally:
        server.stop()
