"""The metadata server's token and identity endpoints with the account's key held in a real
software TPM (swtpm): every way test_tpm.py gets a key into a TPM, served over HTTP by a real
mds.MetadataServer (and once by `python3 mds.py --tpm ...`), in self-signed mode (signatures
checked with `cryptography` against the known public key) and in oauth mode against the local
fake Google token endpoint (which verifies the TPM-signed assertion itself)."""

import collections
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse

import pytest

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

import mds
import tpm_support  # tests/ is on sys.path via conftest.py
from clients import MdsCli
from fake_google import b64url_decode
from tpm_support import pytss_import_key
from tpm_support import swtpm, swtpm_process  # noqa: F401,F811  (pytest fixtures)
from test_tpm import fake_google, tools, verify  # noqa: F401,F811  (fixtures + RS256 check)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCOUNT_PATH = "/computeMetadata/v1/instance/service-accounts/default/"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
ACCOUNT_SCOPES = [CLOUD_PLATFORM, "https://www.googleapis.com/auth/userinfo.email"]
# Distinctive VM identity, so the format=full claims provably come from this config.
INSTANCE_ID = 7345100000000000123
PROJECT_NUMBER = 418877001234
CREATED_AT = 1700000123

Provisioned = collections.namedtuple("Provisioned", "options public_key proxy")


# -- the key cases: each puts the account's key into the TPM the way test_tpm.py does -----------
# A case returns the TpmSigner.from_options keywords (tpm_path excluded), the public key to
# verify against when it is not the account's known key, and a recording proxy if the case
# checks what crosses the TPM "bus".

def _persistent_handle(tools, tcti_process, key_path):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent)
    tools.persist(parent, pub, prv, 0x81010002)
    return Provisioned({"tpm_persistent_handle": "0x81010002"}, None, None)


def _tss2_pem_tpm2_tools(tools, tcti_process, key_path):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent)
    return Provisioned({"tpm_key_file": tools.encode(parent, pub, prv, "tools.tss.pem")},
                       None, None)


def _tss2_pem_tpm2_pytss(tools, tcti_process, key_path):
    with open(key_path, "rb") as handle:
        pem = pytss_import_key(tcti_process.tcti, handle.read())
    path = tools.path("pytss.tss.pem")
    with open(path, "wb") as handle:
        handle.write(pem)
    return Provisioned({"tpm_key_file": path}, None, None)


def _generated_in_tpm(tools, tcti_process, key_path):
    parent = tools.h2_primary()
    pub, prv = tools.create_key(parent)
    # the public half the user uploads to Google (gcloud iam service-accounts keys upload)
    public_key = serialization.load_pem_public_key(
        tools.run("tpm2_print", "-t", "TPM2B_PUBLIC", "-f", "pem", tools.path(pub)))
    return Provisioned({"tpm_key_file": tools.encode(parent, pub, prv, "generated.tss.pem")},
                       public_key, None)


def _key_password(tools, tcti_process, key_path):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent, key_password="s3cret-pw")
    return Provisioned({"tpm_key_file": tools.encode(parent, pub, prv, "pw.tss.pem"),
                        "tpm_key_pass": "s3cret-pw"}, None, None)


def _pcr_policy(tools, tcti_process, key_path):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent, policy=tools.pcr_policy("sha256:23"))
    return Provisioned({"tpm_key_file": tools.encode(parent, pub, prv, "pcr.tss.pem"),
                        "tpm_pcrs": "23"}, None, None)


def _ek_parent(tools, tcti_process, key_path):
    ek_ctx, ek_pub, _ = tools.create_ek()
    pub, dpriv, seed = tools.duplicate_for_parent(ek_pub, key_path, key_password="bar")
    prv = tools.import_under_ek(ek_ctx, pub, dpriv, seed)
    return Provisioned({"tpm_key_file": tools.encode(ek_ctx, pub, prv, "ek.tss.pem"),
                        "tpm_ek_parent": True, "tpm_key_pass": "bar"}, None, None)


def _session_encryption(tools, tcti_process, key_path):
    _, _, ek_name = tools.create_ek()
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent, key_password="pw-sekrit-123")
    tools.persist(parent, pub, prv, 0x81010005)
    proxy = tpm_support.RecordingProxy(tcti_process.port).start()
    return Provisioned({"tpm_persistent_handle": 0x81010005, "tpm_key_pass": "pw-sekrit-123",
                        "tpm_session_encrypt_with_name": ek_name}, None, proxy)


KEY_CASES = {
    "persistent-handle": _persistent_handle,
    "tss2-pem-tpm2-tools": _tss2_pem_tpm2_tools,
    "tss2-pem-tpm2-pytss": _tss2_pem_tpm2_pytss,
    "generated-in-tpm": _generated_in_tpm,
    "key-password": _key_password,
    "pcr-policy": _pcr_policy,
    "ek-parent": _ek_parent,
    "session-encryption": _session_encryption,
}


# -- helpers -------------------------------------------------------------------------------------

class _UploadedPublicKey:
    """Stands in for a FakeServiceAccount's private key when only the public half was
    uploaded to Google (a TPM-generated key): the fake verifies assertions with public_key()."""

    def __init__(self, public_key):
        self._public_key = public_key

    def public_key(self):
        return self._public_key


def write_account_key(account, directory):
    path = os.path.join(str(directory), "account-key.pem")
    with open(path, "w") as handle:
        handle.write(account.key_pem())
    return path


def vm_config(account, credentials=None):
    """A GCE document whose default account is `account`, with its keyId (the JWT kid) and
    uniqueId in the "mds" section, and optionally per-account credentials there."""
    entry = {"aliases": ["default"], "email": account.email, "scopes": list(ACCOUNT_SCOPES)}
    options = {"keyId": account.key_id, "uniqueId": account.unique_id}
    if credentials:
        options["credentials"] = credentials
    return {
        "computeMetadata": {"v1": {
            "instance": {
                "id": INSTANCE_ID,
                "name": "tpm-vm",
                "hostname": "tpm-vm.europe-west4-b.c.tpm-project.internal",
                "zone": "projects/%d/zones/europe-west4-b" % PROJECT_NUMBER,
                "serviceAccounts": {"default": dict(entry), account.email: dict(entry)},
            },
            "project": {"projectId": "tpm-project", "numericProjectId": PROJECT_NUMBER},
        }},
        "mds": {"instanceCreationTimestamp": CREATED_AT,
                "serviceAccounts": {account.email: options}},
    }


def get(port, endpoint, **query):
    """GET an endpoint of the default account as a client library does: (status, body)."""
    url = ACCOUNT_PATH + endpoint
    if query:
        url += "?" + urllib.parse.urlencode(query)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", url, headers={"Metadata-Flavor": "Google"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def verified_jwt(token, public_key):
    """(header, claims) of a compact RS256 JWT whose signature `public_key` verifies."""
    head, body, signature = token.split(".")
    signing_input = (head + "." + body).encode()
    verify(public_key, b64url_decode(signature), signing_input)
    with pytest.raises(InvalidSignature):  # the check can fail: a changed payload is refused
        verify(public_key, b64url_decode(signature), signing_input + b"x")
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(body))


def signed_digest(token):
    """SHA-256 of a JWT's signing input: the digest TPM2_Sign received for it."""
    head, body, _ = token.split(".")
    return hashlib.sha256((head + "." + body).encode()).digest()


def check_access_jwt(body, public_key, account, scopes):
    payload = json.loads(body)
    assert payload["token_type"] == "Bearer"
    header, claims = verified_jwt(payload["access_token"], public_key)
    assert header["alg"] == "RS256" and header["kid"] == account.key_id
    assert claims["iss"] == claims["sub"] == account.email
    assert sorted(claims["scope"].split()) == sorted(scopes)
    assert claims["exp"] - claims["iat"] == 3600
    assert 0 < payload["expires_in"] <= 3600
    assert abs(claims["exp"] - (time.time() + payload["expires_in"])) <= 5
    return payload["access_token"]


def check_identity_jwt(token, public_key, account, audience, full=True):
    header, claims = verified_jwt(token, public_key)
    assert header["alg"] == "RS256" and header["kid"] == account.key_id
    assert claims["aud"] == audience
    assert claims["iss"] == "https://accounts.google.com"
    assert claims["email"] == account.email and claims["email_verified"] is True
    assert claims["sub"] == claims["azp"]
    assert claims["exp"] - claims["iat"] == 3600
    if not full:
        assert "google" not in claims
        return claims
    assert claims["google"]["compute_engine"] == {
        "instance_creation_timestamp": CREATED_AT,
        "instance_id": str(INSTANCE_ID),
        "instance_name": "tpm-vm",
        "project_id": "tpm-project",
        "project_number": PROJECT_NUMBER,
        "zone": "europe-west4-b",
    }
    return claims


def check_self_signed(port, public_key, account, proxy=None):
    """Token (asked-for scopes and the account's own) and format=full identity endpoints."""
    wanted = [CLOUD_PLATFORM, "https://www.googleapis.com/auth/devstorage.read_only"]
    status, body = get(port, "token", scopes=",".join(wanted))
    assert status == 200, body
    tokens = [check_access_jwt(body, public_key, account, wanted)]
    status, body = get(port, "token")
    assert status == 200, body
    tokens.append(check_access_jwt(body, public_key, account, ACCOUNT_SCOPES))
    status, body = get(port, "identity", audience="https://service.example", format="full")
    assert status == 200, body
    check_identity_jwt(body, public_key, account, "https://service.example")
    tokens.append(body)
    if proxy is not None:
        assert proxy.sent, "the recording proxy saw no TPM traffic"
        for token in tokens:
            assert signed_digest(token) not in bytes(proxy.sent), \
                "a JWT's digest crossed the TPM bus in clear despite session encryption"


def check_oauth(port, google, account):
    """The TPM signs the JWT-bearer assertion; the fake Google verifies it and issues tokens."""
    google.reset_counts()
    status, body = get(port, "token", scopes=CLOUD_PLATFORM)
    assert status == 200, body
    access_token = json.loads(body)["access_token"]
    assert google.issued_tokens[access_token] == {"principal": account.email,
                                                  "scopes": [CLOUD_PLATFORM]}
    assert google.count("token:jwt-bearer") == 1
    header, claims = google.last_assertion  # recorded only after its signature verified
    assert header["kid"] == account.key_id
    assert claims["iss"] == account.email and claims["scope"] == CLOUD_PLATFORM
    status, body = get(port, "identity", audience="https://oauth.example")
    assert status == 200, body
    _, id_claims = verified_jwt(body, google.google_key.public_key())  # Google-signed
    assert id_claims["aud"] == "https://oauth.example" and id_claims["email"] == account.email
    assert google.count("token:jwt-bearer") == 2
    assert google.last_assertion[1]["target_audience"] == "https://oauth.example"
    return google.last_request["token:jwt-bearer"]["assertion"]


def check_pcr_policy_breaks_and_recovers(port, tools, public_key, account):
    """Extend PCR 23: fresh token requests answer a 5xx naming the PCR policy; a reset brings
    them back.  Audiences/scopes never fetched while the PCR held, so no cached token can
    hide the failure."""
    tools.pcr_extend(23)
    status, body = get(port, "identity", audience="https://after-extend.example")
    assert 500 <= status < 600, (status, body)
    assert "PCR policy does not hold" in body and "sha256:23" in body
    status, body = get(port, "token", scopes="https://www.googleapis.com/auth/pubsub")
    assert 500 <= status < 600, (status, body)
    assert "PCR policy does not hold" in body
    tools.pcr_reset(23)
    status, body = get(port, "identity", audience="https://after-reset.example")
    assert status == 200, body
    check_identity_jwt(body, public_key, account, "https://after-reset.example", full=False)
    # The requests that failed recover too, once the shared cache's failure back-off (1 s
    # after a first failure) has passed: the failure is not remembered for good.
    deadline = time.time() + 5
    while True:
        status, body = get(port, "token", scopes="https://www.googleapis.com/auth/pubsub")
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, body
    check_access_jwt(body, public_key, account, ["https://www.googleapis.com/auth/pubsub"])


# -- the endpoints, per key case -------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(KEY_CASES))
def test_endpoints_sign_in_tpm(case, tools, swtpm_process, fake_google, mds_server_factory,
                               tmp_path):
    account = fake_google.add_service_account()
    key_path = write_account_key(account, tmp_path)
    provisioned = KEY_CASES[case](tools, swtpm_process, key_path)
    os.remove(key_path)  # from here on the private key exists only inside the TPM
    public_key = provisioned.public_key or account.private_key.public_key()
    if provisioned.public_key is not None:  # a TPM-generated key: "upload" its public half
        account.private_key = _UploadedPublicKey(provisioned.public_key)
    proxy = provisioned.proxy
    signer = mds.TpmSigner.from_options(
        tpm=True, tpm_path=proxy.tcti if proxy else swtpm_process.tcti, **provisioned.options)
    try:
        # The key id is the config's keyId, not the signer's default (SHA-1 of the SPKI).
        assert signer.key_id != account.key_id
        # self-signed: the primary account's spec given as the command line gives it
        self_signed = mds_server_factory(
            config=vm_config(account), signer=signer,
            credentials={"type": "key-file", "tpm": True, "token_mode": "self-signed",
                         "token_uri": fake_google.token_uri})
        check_self_signed(self_signed.port, public_key, account, proxy)
        if case == "pcr-policy":
            check_pcr_policy_breaks_and_recovers(self_signed.port, tools, public_key, account)
        assert fake_google.count() == 0  # self-signed mode is fully offline
        # oauth: the spec attached to the account in the config's "mds" section
        oauth = mds_server_factory(config=vm_config(account, credentials={
            "type": "key-file", "tpm": True, "token_mode": "oauth",
            "token_uri": fake_google.token_uri}), signer=signer)
        assertion = check_oauth(oauth.port, fake_google, account)
        if proxy is not None:
            assert signed_digest(assertion) not in bytes(proxy.sent)
    finally:
        signer.close()
        if proxy is not None:
            proxy.stop()


def test_self_signed_identity_sub_is_the_numeric_unique_id(tools, swtpm, fake_google,
                                                           mds_server_factory, tmp_path):
    account = fake_google.add_service_account()
    key_file = _tpm_key_file(tools, account, tmp_path)
    with mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm, tpm_key_file=key_file) as signer:
        server = mds_server_factory(
            config=vm_config(account), signer=signer,
            credentials={"type": "key-file", "tpm": True, "token_mode": "self-signed"})
        status, body = get(server.port, "identity", audience="https://sub.example")
    assert status == 200, body
    claims = check_identity_jwt(body, account.private_key.public_key(), account,
                                "https://sub.example", full=False)
    # the config's "uniqueId" for the account (what the offline source would use too)
    assert claims["sub"] == claims["azp"] == account.unique_id


# -- the command line ------------------------------------------------------------------------------

def _tpm_key_file(tools, account, tmp_path, key_password=None):
    key_path = write_account_key(account, tmp_path)
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent, key_password=key_password)
    os.remove(key_path)
    return tools.encode(parent, pub, prv, "cli.tss.pem")


def _write_config(account, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(vm_config(account)))
    return str(path)


def test_cli_serves_tpm_signed_tokens(tools, swtpm, fake_google, tmp_path):
    account = fake_google.add_service_account()
    key_file = _tpm_key_file(tools, account, tmp_path)
    server = MdsCli(tmp_path, "--tpm", "--tpm-path", swtpm, "--tpm-key-file", key_file,
                    "--token-mode", "self-signed", "--config", _write_config(account, tmp_path))
    try:
        port = server.port
        status, body = get(port, "token", scopes=CLOUD_PLATFORM)
        assert status == 200, body
        access_token = check_access_jwt(body, account.private_key.public_key(), account,
                                        [CLOUD_PLATFORM])
        status, identity = get(port, "identity", audience="https://cli.example", format="full")
        assert status == 200, identity
        check_identity_jwt(identity, account.private_key.public_key(), account,
                           "https://cli.example")
        assert server.process.poll() is None
    finally:
        server.stop()
    log = server.stderr()
    assert access_token not in log and identity not in log  # tokens never reach the log
    assert fake_google.count() == 0
    # The startup log names the TPM key by its public fingerprint, never by key material.
    spki = account.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "fingerprint sha256:" + hashlib.sha256(spki).hexdigest() in log, log


def test_cli_wrong_key_password_fails_startup(tools, swtpm, fake_google, tmp_path):
    account = fake_google.add_service_account()
    key_file = _tpm_key_file(tools, account, tmp_path, key_password="s3cret-pw")
    result = subprocess.run(
        [sys.executable, "mds.py", "--tpm", "--tpm-path", swtpm, "--tpm-key-file", key_file,
         "--tpm-key-pass", "n0t-the-Pa55", "--token-mode", "self-signed", "--port", "0",
         "--config", _write_config(account, tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mds: error: ")
    assert "wrong TPM key password" in lines[0] and "TPM_RC_AUTH_FAIL" in lines[0]
    assert "Traceback" not in result.stderr and "n0t-the-Pa55" not in result.stderr
    assert "s3cret-pw" not in result.stderr
    # the same refusal in-process: the signer fails at construction, before any server
    with pytest.raises(mds.TpmError, match="wrong TPM key password"):
        mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm, tpm_key_file=key_file,
                                   tpm_key_pass="n0t-the-Pa55")
