"""Google credential sources against a local fake Google (tests/fake_google.py).

Every token a test accepts was issued (and recorded) by the fake, and every assertion the
fake accepted had its RS256 signature checked with `cryptography` against the key the fake
generated, so these tests fail if signing, claims or the HTTP exchange are wrong.
"""

import base64
import copy
import gc
import http.client
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import weakref
import urllib.request

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

import mds
from clients import run_go, run_node, run_python
from fake_google import FakeGoogle, b64url_decode
from test_gce import FakeClock

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
STORAGE_READ = "https://www.googleapis.com/auth/devstorage.read_only"
PUBSUB = "https://www.googleapis.com/auth/pubsub"
FAST_RETRIES = (0.01, 0.02)


@pytest.fixture
def fake():
    with FakeGoogle() as google:
        yield google


@pytest.fixture
def key_file(fake, tmp_path):
    path, account = fake.write_key_file(tmp_path)
    return path, account


def jwt_parts(token):
    header, claims, _ = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


def verify_with_key(token, public_key):
    """Claims of an RS256 JWT whose signature `public_key` verifies (raises otherwise)."""
    head, body, signature = token.split(".")
    public_key.verify(b64url_decode(signature), (head + "." + body).encode("ascii"),
                      padding.PKCS1v15(), hashes.SHA256())
    return jwt_parts(token)


def assert_secret_free(text, *secret_values):
    for value in secret_values:
        if value:
            assert value not in text
    assert "BEGIN" not in text and "PRIVATE KEY" not in text
    assert "ya29." not in text
    assert "eyJ" not in text


def key_secrets(account):
    """Distinctive chunks of the private key's base64 body (a leak of any line is caught)."""
    body = [line for line in account.key_pem().splitlines() if "-----" not in line]
    return body[1:4]


# ---------------------------------------------------------------- key file, oauth mode


def test_key_file_access_token_is_the_one_google_issued(fake, key_file):
    path, account = key_file
    source = mds.KeyFileSource(path, retry_delays=FAST_RETRIES)
    assert source.email == account.email and source.project_id == account.project_id

    before = time.time()
    token = source.access_token((STORAGE_READ, PUBSUB))

    issued = fake.issued_tokens[token.value]
    assert issued == {"principal": account.email, "scopes": [STORAGE_READ, PUBSUB]}
    assert before + 3599 - 2 <= token.expiry <= time.time() + 3599
    # What the fake verified server-side, re-checked here claim by claim.
    header, claims = fake.last_assertion
    assert header["alg"] == "RS256" and header["kid"] == account.key_id
    assert claims["iss"] == account.email
    assert claims["aud"] == fake.token_uri
    assert claims["scope"] == STORAGE_READ + " " + PUBSUB
    assert "target_audience" not in claims
    assert abs(claims["iat"] - before) <= 5 and claims["exp"] - claims["iat"] <= 3600
    # And the signature against the account's public key, independently of the fake.
    sent = fake.last_request["token:jwt-bearer"]
    assert sent["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    verify_with_key(sent["assertion"], account.private_key.public_key())
    assert fake.count("token:jwt-bearer") == 1


def test_key_file_pkcs1_key_and_inline_dict(fake, tmp_path):
    account = fake.add_service_account()
    info = fake.service_account_key_info(account, pkcs1=True)
    assert "BEGIN RSA PRIVATE KEY" in info["private_key"]
    source = mds.KeyFileSource(info)
    token = source.access_token((CLOUD_PLATFORM,))
    assert fake.issued_tokens[token.value]["principal"] == account.email


def test_key_file_without_scopes_asks_for_cloud_platform(fake, key_file):
    source = mds.KeyFileSource(key_file[0])
    token = source.access_token(())
    assert fake.issued_tokens[token.value]["scopes"] == [CLOUD_PLATFORM]


def test_key_file_id_token_is_google_signed(fake, key_file):
    path, account = key_file
    source = mds.KeyFileSource(path)
    token = source.id_token("https://service.example.com/x?y=1", fmt="full",
                            compute_claims={"instance_id": "1"})

    claims = verify_with_key(token.value, fake.google_key.public_key())[1]
    assert claims["aud"] == "https://service.example.com/x?y=1"
    assert claims["email"] == account.email and claims["sub"] == account.unique_id
    assert token.expiry == claims["exp"]
    assert "google" not in claims  # upstream id tokens cannot carry compute claims
    _, assertion = fake.last_assertion
    assert assertion["target_audience"] == "https://service.example.com/x?y=1"
    assert "scope" not in assertion


def test_fake_rejects_an_assertion_signed_by_another_key(fake, tmp_path):
    """The fake really verifies signatures: a key file whose key Google does not know fails."""
    path, account = fake.write_key_file(tmp_path)
    info = json.load(open(path))
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = stranger.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    source = mds.KeyFileSource(info, retry_delays=FAST_RETRIES)
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert caught.value.status == 403
    assert "invalid_grant" in str(caught.value)
    assert "Invalid JWT Signature" in str(caught.value)
    assert fake.count("token:jwt-bearer") == 1  # a client error is not retried


# ---------------------------------------------------------------- key file, self-signed


def _fake_cert_for(fake, account):
    url = fake.url + "/service_accounts/v1/metadata/x509/" + account.email
    with urllib.request.urlopen(url) as response:
        return json.load(response)


def test_self_signed_access_token_is_offline_and_google_auth_decodes_it(fake, key_file):
    import google.auth.jwt

    path, account = key_file
    fake.stop()  # no network at all
    source = mds.KeyFileSource(path, token_mode="self-signed")
    token = source.access_token((STORAGE_READ,))
    fake.start()
    certs = _fake_cert_for(fake, account)

    claims = google.auth.jwt.decode(token.value, certs=certs)
    assert claims["iss"] == claims["sub"] == account.email
    assert claims["scope"] == STORAGE_READ and "aud" not in claims
    assert claims["exp"] - claims["iat"] == 3600 and token.expiry == claims["exp"]
    assert jwt_parts(token.value)[0] == {"alg": "RS256", "kid": account.key_id, "typ": "JWT"}
    assert fake.count() == 0


def test_self_signed_access_token_with_audience_when_no_scopes(fake, key_file):
    import google.auth.jwt

    path, account = key_file
    source = mds.KeyFileSource(path, token_mode="self-signed",
                               self_signed_audience="https://pubsub.googleapis.com/")
    claims = google.auth.jwt.decode(source.access_token(()).value,
                                    certs=_fake_cert_for(fake, account),
                                    audience="https://pubsub.googleapis.com/")
    assert claims["aud"] == "https://pubsub.googleapis.com/" and "scope" not in claims
    # With scopes asked for, `scope` wins (as in google-auth's _create_self_signed_jwt).
    claims = google.auth.jwt.decode(source.access_token((PUBSUB,)).value,
                                    certs=_fake_cert_for(fake, account))
    assert claims["scope"] == PUBSUB and "aud" not in claims


def test_self_signed_id_token_verifies_against_the_published_key_cert(fake, key_file):
    import google.auth.transport.requests
    import google.oauth2.id_token

    path, account = key_file
    source = mds.KeyFileSource(path, token_mode="self-signed")
    compute = {"instance_id": "4340508760561261530", "project_number": 716149158341,
               "zone": "us-central1-a"}
    token = source.id_token("https://api.example.com", fmt="full", compute_claims=compute)

    claims = google.oauth2.id_token.verify_token(
        token.value, google.auth.transport.requests.Request(),
        audience="https://api.example.com",
        certs_url=fake.url + "/service_accounts/v1/metadata/x509/" + account.email)
    assert claims["iss"] == "https://accounts.google.com"
    assert claims["azp"] == claims["sub"] == account.unique_id
    assert claims["email"] == account.email and claims["email_verified"] is True
    assert claims["google"] == {"compute_engine": compute}
    assert token.expiry == claims["exp"] == claims["iat"] + 3600
    standard = source.id_token("https://api.example.com")
    assert "google" not in jwt_parts(standard.value)[1]
    assert fake.count() == 0


# ---------------------------------------------------------------- key file failures


@pytest.mark.parametrize("mode, status, words", [
    ("invalid_grant", 403, ["invalid_grant", "Invalid JWT Signature"]),
    (401, 403, ["HTTP 401", "unauthorized_client"]),
    (403, 403, ["HTTP 403", "unauthorized_client"]),
])
def test_key_file_client_errors_name_the_cause_without_secrets(
        fake, key_file, caplog, mode, status, words):
    path, account = key_file
    source = mds.KeyFileSource(path, retry_delays=FAST_RETRIES)
    fake.fail_next(1, mode)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    message = str(caught.value)
    assert caught.value.status == status
    for word in words:
        assert word in message
    assert account.email in message and fake.url in message
    assertion = fake.last_request["token:jwt-bearer"]["assertion"]
    for text in (message, caplog.text):
        assert_secret_free(text, assertion, *key_secrets(account))
    assert fake.count("token:jwt-bearer") == 1
    # Recovery: the next request succeeds.
    assert source.access_token((CLOUD_PLATFORM,)).value in fake.issued_tokens


def test_redaction_keeps_endpoint_names_but_not_secrets_in_them():
    iam = ("http://127.0.0.1:4545/v1/projects/-/serviceAccounts/sa-name@fake-project.iam."
           "gserviceaccount.com:generateAccessToken")
    text = mds._redact("error reaching %s?access_token=ya29.%s: boom; proxy "
                       "http://bob:hunter2hunter2@proxy:3128/ and %s" % (iam, "x" * 50, "Q" * 60))
    assert iam in text and "boom" in text
    assert "ya29" not in text and "hunter2" not in text and "Q" * 40 not in text
    assert "eyJ" not in mds._redact("https://host/p/eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln")
    # A URL ends at a quote or comma: what follows it in JSON is not part of its host.
    quoted = mds._redact('{"aud":"https://sts.googleapis.com","token":"ya29.a0AfH6secret"}')
    assert "https://sts.googleapis.com" in quoted and "a0AfH6secret" not in quoted
    assert "secret9" not in mds._redact("https://iam.googleapis.com,token=ya29.secret9")
    # An OAuth client secret is shorter than the catch-all for long runs: its prefix names it.
    client_secret = "GOCSPX-" + "aB3dE5fG7hI9jK1lM2nO4pQ6rS8t"
    assert client_secret[7:] not in mds._redact("invalid_client: %s rejected" % client_secret)
    # A known secret is masked however it was encoded: percent-escapes in either case,
    # JSON string escapes.
    secret = "se+cr/et=\u00e9\"99"
    for form in (urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret, safe="").lower(),
                 json.dumps(secret)[1:-1], secret):
        assert mds._redact("echo: %s." % form, secrets=[secret]) == "echo: [redacted].", form
    # The query is dropped whole, however short its values.
    assert "S3cr" not in mds._redact("see https://h.example/v1/x?sig=S3cr&x=1 done")


def test_key_file_transient_errors_are_retried(fake, key_file, caplog):
    source = mds.KeyFileSource(key_file[0], retry_delays=FAST_RETRIES)
    fake.fail_next(1, 503)
    fake.fail_next(1, "close")
    caplog.set_level(logging.WARNING)
    token = source.access_token((CLOUD_PLATFORM,))
    assert token.value in fake.issued_tokens
    assert fake.count("token:jwt-bearer") == 3
    assert "retrying" in caplog.text
    assert_secret_free(caplog.text, token.value)


def test_key_file_persistent_5xx_gives_502_after_bounded_retries(fake, key_file, caplog):
    source = mds.KeyFileSource(key_file[0], retry_delays=FAST_RETRIES)
    fake.fail_next(10, 500)
    with pytest.raises(mds.CredentialError) as caught:
        source.id_token("https://aud.example")
    assert caught.value.status == 502
    assert "HTTP 500" in str(caught.value) and "UNAVAILABLE" in str(caught.value)
    assert fake.count("token:jwt-bearer") == 3
    assert_secret_free(str(caught.value) + caplog.text,
                       fake.last_request["token:jwt-bearer"]["assertion"])


def test_network_down_then_recovery(fake, key_file, caplog):
    path, account = key_file
    source = mds.KeyFileSource(path, retry_delays=FAST_RETRIES)
    port = fake.port
    fake.stop()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert caught.value.status == 502
    assert "network error" in str(caught.value)
    assert "refused" in str(caught.value).lower()
    assert_secret_free(str(caught.value) + caplog.text, *key_secrets(account))
    fake.start(port)
    assert source.access_token((CLOUD_PLATFORM,)).value in fake.issued_tokens


def test_a_slow_google_gets_one_attempt_within_the_mint_deadline(fake, key_file, caplog):
    """Per-attempt timeouts alone would let a hanging Google hold a waiting client for three
    10 s attempts; one deadline per mint turns it into a prompt 502 naming the cause."""
    source = mds.KeyFileSource(key_file[0], retry_delays=FAST_RETRIES, budget=0.5)
    fake.delay = 2.0
    caplog.set_level(logging.WARNING)
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert caught.value.status == 502
    assert "timed out" in str(caught.value) and "no time left to retry" in str(caught.value)
    assert "retrying" not in caplog.text
    fake.delay = 0.0
    assert source.access_token((CLOUD_PLATFORM,)).value in fake.issued_tokens


@pytest.mark.parametrize("trickling", ["trickle", "trickle-headers"])
@pytest.mark.parametrize("kind", ["key-file", "impersonate"])
def test_an_answer_that_trickles_in_ends_at_the_mint_deadline(fake, key_file, user_credentials,
                                                              caplog, kind, trickling):
    """Each byte, of the body or of the headers, arrives inside the socket timeout, so only a
    deadline on the whole answer stops the wait: a 502 naming the endpoint, with one upstream
    call.  Key files read it with mds's own POST, impersonation through google-auth's
    transport."""
    caplog.set_level(logging.DEBUG)
    if kind == "key-file":
        source = mds.KeyFileSource(key_file[0], retry_delays=FAST_RETRIES, budget=1.0)
        endpoint = "token:jwt-bearer"
    else:
        source = mds.ImpersonatedSource(fake.add_service_account().email,
                                        source_credentials=user_credentials,
                                        iam_endpoint_override=fake.url,
                                        retry_delays=FAST_RETRIES, budget=1.0)
        endpoint = "iam:generateAccessToken"
    fake.fail_next(1, mode=trickling, endpoint=endpoint)
    began = time.monotonic()
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert time.monotonic() - began < 5, "the budget is 1 s; the trickle lasts 30 s"
    message = str(caught.value)
    assert caught.value.status == 502
    assert "timed out: no complete answer" in message, message
    assert "no time left to retry" in message
    assert "127.0.0.1:%d" % fake.port in message
    assert fake.count(endpoint) == 1
    assert_secret_free(message + caplog.text, *key_secrets(key_file[1]))
    token = source.access_token((CLOUD_PLATFORM,))
    assert token.value in fake.issued_tokens


def _serve_once_in_background(handle):
    """A one-connection server on 127.0.0.1 running `handle(connection)`; returns its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        with listener:
            connection, _ = listener.accept()
            with connection:
                handle(connection)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def _post(url, timeout=1.0):
    return mds.post_upstream(url, "token", b"x=1", {"Content-Type": "text/plain"},
                             mds._describe_upstream_error, mds._status_for_upstream,
                             timeout=timeout)


def test_an_upstream_that_cannot_be_reached_in_time_is_a_network_error():
    # A listener whose backlog is full drops further connection attempts, as a firewall
    # that swallows egress does: the cause is reaching the upstream, not a slow answer.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            with pytest.raises(mds.CredentialError) as caught:
                _post("http://127.0.0.1:%d/token" % port, timeout=0.5)
    assert caught.value.status == 502
    assert "network error, unreachable" in str(caught.value), str(caught.value)


def test_a_redirect_urllib_does_not_follow_is_a_failure_not_an_answer():
    def redirect(connection):
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\n"
                           b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    port = _serve_once_in_background(redirect)
    with pytest.raises(mds.CredentialError) as caught:
        _post("http://127.0.0.1:%d/token" % port)
    assert "HTTP 307" in str(caught.value) and caught.value.status == 502


def test_a_proxy_trickling_its_tunnel_answer_ends_at_the_deadline(monkeypatch):
    """The deadline covers an HTTPS proxy's CONNECT exchange too (the only way through, for
    many corporate networks); here the proxy sends its answer a byte every 50 ms."""
    def trickle(connection):
        connection.recv(65536)
        for byte in b"HTTP/1.1 200 Connection established\r\n" + b"X-Slow: 1\r\n" * 100:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.05)

    port = _serve_once_in_background(trickle)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:%d" % port)
    began = time.monotonic()
    with pytest.raises(mds.CredentialError) as caught:
        _post("https://oauth2.mds-test.example/token", timeout=1.0)
    assert time.monotonic() - began < 3, "the budget is 1 s; the proxy trickles for 60 s"
    assert "timed out" in str(caught.value) and caught.value.status == 502


def _pem(key, fmt=serialization.PrivateFormat.PKCS8, password=None):
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode()


@pytest.mark.parametrize("broken, words", [
    ({"private_key": "encrypted"}, ["unusable private_key", "encrypt"]),
    ({"private_key": "ec"}, ["unusable private_key"]),
    ({"private_key": "garbage"}, ["unusable private_key"]),
    ({"private_key": None}, ["has no private_key"]),
    ({"client_email": None}, ["has no client_email"]),
    ({"type": "authorized_user"}, ["not a service-account key"]),
])
def test_bad_key_files_fail_fast_with_a_clear_line(fake, tmp_path, caplog, broken, words):
    path, account = fake.write_key_file(tmp_path)
    info = json.load(open(path))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    replacements = {
        "encrypted": _pem(rsa_key, password=b"hunter2"),
        "ec": _pem(ec.generate_private_key(ec.SECP256R1())),
        "garbage": "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    }
    for field, value in broken.items():
        info[field] = replacements.get(value, value)
    with open(path, "w") as handle:
        json.dump(info, handle)
    with pytest.raises(mds.CredentialError) as caught:
        mds.KeyFileSource(path)
    message = str(caught.value)
    assert path in message
    for word in words:
        assert word.lower() in message.lower()
    assert_secret_free(message + caplog.text, *key_secrets(account))
    if isinstance(info.get("private_key"), str):
        body = [l for l in info["private_key"].splitlines() if "-----" not in l]
        assert_secret_free(message, *body[:3])


@pytest.mark.parametrize("private_key", ["hello world", "bm90IGEga2V5" * 20])
def test_a_key_without_a_pem_block_keeps_its_hint(fake, private_key):
    """The hint says what the key should look like; redaction, which masks PEM blocks in
    upstream text, must not turn mds's own hint into "[redacted]"."""
    info = fake.service_account_key_info(fake.add_service_account())
    info["private_key"] = private_key
    with pytest.raises(mds.CredentialError) as caught:
        mds.KeyFileSource(info)
    message = str(caught.value)
    assert 'no PEM block found (expected a "BEGIN PRIVATE KEY" PEM block)' in message, message
    assert "[redacted]" not in message and private_key not in message


def test_missing_key_file_names_the_path(tmp_path):
    with pytest.raises(mds.CredentialError) as caught:
        mds.KeyFileSource(str(tmp_path / "nope.json"))
    assert "nope.json" in str(caught.value)


def test_injected_signer_uses_only_email_and_token_uri_from_config(fake):
    account = fake.add_service_account()

    class ExternalSigner:
        """Stands in for the TPM signer: any object with sign/public_numbers/key_id."""
        key_id = account.key_id

        def sign(self, message):
            return account.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())

        def public_numbers(self):
            numbers = account.private_key.public_key().public_numbers()
            return numbers.n, numbers.e

    source = mds.build_credential_source(
        {"type": "key-file", "client_email": account.email, "token_uri": fake.token_uri},
        signer=ExternalSigner())
    token = source.access_token((CLOUD_PLATFORM,))
    assert fake.issued_tokens[token.value]["principal"] == account.email
    assert fake.last_assertion[0]["kid"] == account.key_id


# ---------------------------------------------------------------- impersonation


@pytest.fixture
def user_credentials(fake, tmp_path):
    """The user's ADC as `gcloud auth application-default login` leaves it. google-auth always
    sends authorized-user refreshes to oauth2.googleapis.com (it ignores the file's
    token_uri), so the test redirects this one object to the fake; everything else is the
    real google-auth refresh-token flow."""
    import google.oauth2.credentials

    path = fake.write_authorized_user_file(tmp_path)
    credentials = google.oauth2.credentials.Credentials.from_authorized_user_file(
        path, scopes=[CLOUD_PLATFORM])
    return credentials.with_token_uri(fake.token_uri)


def test_impersonation_access_token_via_iam(fake, user_credentials):
    target = fake.add_service_account()
    source = mds.ImpersonatedSource(target.email, source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url,
                                    retry_delays=FAST_RETRIES)
    assert source.honours_scopes
    token = source.access_token((STORAGE_READ,))
    assert fake.issued_tokens[token.value] == {"principal": target.email,
                                               "scopes": [STORAGE_READ]}
    assert abs(token.expiry - (time.time() + 3600)) < 5
    request = fake.last_request["iam:generateAccessToken"]
    assert request["_email"] == target.email and request["lifetime"] == "3600s"
    # The ADC refresh token was used once; its access token is reused for the next mint.
    token2 = source.access_token((PUBSUB,))
    assert fake.issued_tokens[token2.value]["scopes"] == [PUBSUB]
    assert fake.count("token:refresh") == 1
    assert fake.count("iam:generateAccessToken") == 2



def test_an_unusable_google_answer_is_reported_without_its_body(fake, user_credentials, caplog):
    from fake_google import UNPARSEABLE_200_TOKEN

    target = fake.add_service_account()
    source = mds.ImpersonatedSource(target.email, source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url, retry_delays=FAST_RETRIES)
    fake.fail_next(1, mode="unparseable-200", endpoint="iam:generateAccessToken")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(mds.CredentialError) as caught:
            source.access_token((STORAGE_READ,))
    assert UNPARSEABLE_200_TOKEN not in str(caught.value)
    assert all(UNPARSEABLE_200_TOKEN not in record.getMessage() for record in caplog.records)

def test_impersonated_scope_sets_do_not_queue_behind_each_other(fake, user_credentials):
    """Each mint runs on its own credentials: with a slow IAM, three scope sets asked for at
    once all finish inside one mint's deadline (one after another, the third would not)."""
    target = fake.add_service_account()
    source = mds.ImpersonatedSource(target.email, source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url, retry_delays=FAST_RETRIES)
    fake.delay = 3.5
    results = {}

    def mint(name, call):
        try:
            results[name] = call()
        except mds.CredentialError as exc:
            results[name] = exc

    calls = {"storage": lambda: source.access_token((STORAGE_READ,)),
             "pubsub": lambda: source.access_token((PUBSUB,)),
             "identity": lambda: source.id_token("https://run.example.com")}
    threads = [threading.Thread(target=mint, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(value, mds.Token) for value in results.values()), results
    assert fake.count("token:refresh") == 1      # the shared ADC was refreshed once


def test_impersonation_uses_application_default_credentials(fake, tmp_path, monkeypatch):
    # ADC here is a service-account key (google-auth honours its token_uri); the target is
    # another account that this one may impersonate.
    adc_key, caller = fake.write_key_file(tmp_path)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", adc_key)
    target = fake.add_service_account()
    source = mds.build_credential_source({"type": "impersonate", "target": target.email,
                                          "iam_endpoint": fake.url})
    assert isinstance(source, mds.ImpersonatedSource)
    token = source.access_token(())
    assert fake.issued_tokens[token.value] == {"principal": target.email,
                                               "scopes": [CLOUD_PLATFORM]}
    # The key's access token serves the next mints too: google-auth would re-scope a copy of
    # a service-account source, and mint a new source token each time.
    for scopes in ((STORAGE_READ,), (PUBSUB,)):
        assert fake.issued_tokens[source.access_token(scopes).value]["scopes"] == list(scopes)
    source.id_token("https://run.example.com")
    assert fake.count("token:jwt-bearer") == 1
    assert fake.count("iam:generateAccessToken") == 3


@pytest.fixture
def metadata_server_adc(fake, tmp_path, monkeypatch, mds_server_factory):
    """Application Default Credentials that are a metadata server's, as on a VM: a second mds
    plays the VM's server, serving the tokens of its account (from a key file the fake knows).
    google-auth read GCE_METADATA_HOST when it was imported, so its copy is redirected."""
    from google.auth.compute_engine import _metadata

    vm_key, vm_account = fake.write_key_file(tmp_path, email="vm@fake-project.mds-test.example")
    vm = mds_server_factory(config=vm_document(
        {vm_account.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": vm_key})}))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    for name, value in vm.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", vm.authority)
    return vm


def test_impersonation_with_a_metadata_servers_credentials(fake, metadata_server_adc,
                                                           mds_server_factory):
    """mds on a VM (or GKE, Cloud Run, beside another mds): google-auth's compute-engine
    credentials are the source, and they read the token answer's headers by lower-case name."""
    target = fake.add_service_account("target@fake-project.mds-test.example")
    server = mds_server_factory(config=vm_document({target.email: (
        [CLOUD_PLATFORM], {"type": "impersonate", "iam_endpoint": fake.url})}))
    source = server.store.tree.accounts["default"].source
    assert type(source._source).__module__ == "google.auth.compute_engine.credentials"
    status, body = metadata_get(server, "instance/service-accounts/default/token",
                                {"scopes": STORAGE_READ})
    assert status == 200, body
    assert fake.issued_tokens[json.loads(body)["access_token"]] == {
        "principal": target.email, "scopes": [STORAGE_READ]}
    # The VM's server minted the source token from its key, once, and IAM accepted it.
    assert fake.count("token:jwt-bearer") == 1
    assert fake.count("iam:generateAccessToken") == 1
    status, body = metadata_get(server, "instance/service-accounts/default/identity",
                                {"audience": AUDIENCE})
    assert status == 200, body
    assert verify_with_key(body, fake.google_key.public_key())[1]["email"] == target.email
    assert fake.count("token:jwt-bearer") == 1


def test_metadata_server_adc_that_are_this_server_are_refused(fake, tmp_path, monkeypatch,
                                                              mds_server_factory, caplog):
    """mds started in a shell that points GCE_METADATA_HOST at it, with no other ADC: google-auth
    finds "a metadata server" - mds itself - and every impersonated mint would wait on one
    asking mds again.  A reload adding such a source is refused, saying why."""
    from google.auth.compute_engine import _metadata

    target = fake.add_service_account("target@fake-project.mds-test.example")
    document = vm_document({target.email: ([CLOUD_PLATFORM], None)})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document))
    server = mds_server_factory(config=str(config), poll_interval=3600)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", server.authority)
    document["mds"]["serviceAccounts"][target.email]["credentials"] = {
        "type": "impersonate", "iam_endpoint": fake.url}
    config.write_text(json.dumps(document))
    caplog.set_level(logging.WARNING)
    assert not server.reload()
    assert "Application Default Credentials are this metadata server itself" in caplog.text
    assert "GOOGLE_APPLICATION_CREDENTIALS" in caplog.text
    assert server.offline()               # the last good tree keeps serving
    assert metadata_get(server, "instance/service-accounts/default/token")[0] == 200
    assert fake.count() == 0
    # Another address is another server: the same host on another port is not refused.
    assert server.serves_address(server.authority)
    assert server.serves_address("localhost:%d" % server.port)
    assert not server.serves_address("127.0.0.1:%d" % (server.port + 1))
    assert not server.serves_address("192.0.2.1:%d" % server.port)


def test_adc_pointed_at_a_metadata_server_not_yet_answering_are_explained(
        tmp_path, monkeypatch):
    """At startup mds is not listening yet, so ADC that would be mds itself fail as "no
    credentials": the error says where google-auth looked and what to unset."""
    with socket.socket() as probe:                # a port nothing answers on
        probe.bind(("127.0.0.1", 0))
        authority = "127.0.0.1:%d" % probe.getsockname()[1]
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    monkeypatch.setenv("GCE_METADATA_HOST", authority)
    monkeypatch.setenv("GCE_METADATA_IP", authority)
    monkeypatch.setenv("GCE_METADATA_TIMEOUT", "1")
    with pytest.raises(mds.CredentialError) as caught:
        mds.ImpersonatedSource("target@fake-project.mds-test.example")
    assert "needs Application Default Credentials" in str(caught.value)
    assert "metadata server at %s (GCE_METADATA_IP" % authority in str(caught.value)
    assert "unset GCE_METADATA_HOST and GCE_METADATA_IP where mds runs" in str(caught.value)
    # An ADC file that is at fault has nothing to do with a metadata server.
    broken = tmp_path / "adc.json"
    broken.write_text(json.dumps({"type": "no-such-type"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(broken))
    with pytest.raises(mds.CredentialError) as caught:
        mds.ImpersonatedSource("target@fake-project.mds-test.example")
    assert "needs Application Default Credentials" in str(caught.value)
    assert "GCE_METADATA_IP" not in str(caught.value)


def test_impersonation_id_token(fake, user_credentials):
    target = fake.add_service_account()
    source = mds.ImpersonatedSource(target.email, delegates=("chain@p.iam.gserviceaccount.com",),
                                    source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url)
    token = source.id_token("https://run.example.com")
    claims = verify_with_key(token.value, fake.google_key.public_key())[1]
    assert claims["aud"] == "https://run.example.com" and claims["email"] == target.email
    assert token.expiry == claims["exp"]
    request = fake.last_request["iam:generateIdToken"]
    assert request["includeEmail"] is True
    assert request["delegates"] == ["projects/-/serviceAccounts/chain@p.iam.gserviceaccount.com"]
    source.access_token(())
    assert fake.last_request["iam:generateAccessToken"]["delegates"] == request["delegates"]


@pytest.mark.parametrize("kind", ["access", "id"])
def test_an_impersonated_token_shares_one_deadline_across_its_two_calls(fake, user_credentials,
                                                                        kind):
    """The source-token refresh and the IAM call each fit the budget; together they do not,
    so the second call is cut short instead of starting its own clock.  Access tokens go
    through google-auth's transport, id tokens through mds's own POST."""
    target = fake.add_service_account()
    source = mds.ImpersonatedSource(target.email, source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url, retry_delays=FAST_RETRIES,
                                    budget=1.5)

    def mint():
        if kind == "access":
            return source.access_token((STORAGE_READ,))
        return source.id_token("https://run.example.com")

    fake.delay = 1.0
    with pytest.raises(mds.CredentialError) as caught:
        mint()
    assert caught.value.status == 502
    assert "timed out" in str(caught.value) and "no time left to retry" in str(caught.value)
    assert target.email in str(caught.value)
    assert fake.count("token:refresh") == 1
    fake.delay = 0.0
    token = mint()
    if kind == "access":
        assert fake.issued_tokens[token.value]["principal"] == target.email
    else:
        claims = verify_with_key(token.value, fake.google_key.public_key())[1]
        assert claims["email"] == target.email


def test_impersonation_denied_then_recovers(fake, user_credentials, caplog):
    target = fake.add_service_account()
    source = mds.ImpersonatedSource(target.email, source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url,
                                    retry_delays=FAST_RETRIES)
    caplog.set_level(logging.DEBUG)
    fake.fail_next(1, 403, endpoint="iam:generateAccessToken")
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert caught.value.status == 403
    assert "PERMISSION_DENIED" in str(caught.value) and target.email in str(caught.value)
    source_token = [t for t, i in fake.issued_tokens.items() if i["principal"].startswith("user:")]
    refresh_token = next(iter(fake.authorized_users))
    assert_secret_free(str(caught.value) + caplog.text, refresh_token, *source_token)

    fake.fail_next(1, 503, endpoint="iam:generateAccessToken")  # transient: retried
    token = source.access_token((CLOUD_PLATFORM,))
    assert fake.issued_tokens[token.value]["principal"] == target.email
    assert fake.count("iam:generateAccessToken") == 3


def test_impersonation_of_an_unknown_account(fake, user_credentials):
    source = mds.ImpersonatedSource("ghost@p.iam.gserviceaccount.com",
                                    source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url)
    with pytest.raises(mds.CredentialError) as caught:
        source.id_token("aud")
    assert caught.value.status == 403 and "NOT_FOUND" in str(caught.value)


def test_impersonation_with_revoked_adc(fake, user_credentials):
    fake.authorized_users.clear()  # Google forgot the refresh token
    source = mds.ImpersonatedSource(fake.add_service_account().email,
                                    source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url)
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert caught.value.status == 403 and "invalid_grant" in str(caught.value)
    assert "1//" not in str(caught.value)


def assert_none_quoted(secrets, texts):
    for secret in secrets:
        for form in (secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)):
            for text in texts:
                assert form not in text, (form, text)


def test_an_upstream_that_echoes_the_adc_secrets_is_masked(fake, user_credentials, caplog):
    # The client secret is short and plain (no pattern can know it is one): the source's
    # own secrets are masked wherever, and however encoded, an error quotes them.
    source = mds.ImpersonatedSource(fake.add_service_account().email,
                                    source_credentials=user_credentials,
                                    iam_endpoint_override=fake.url, retry_delays=FAST_RETRIES)
    fake.fail_next(1, mode="echo-secrets", endpoint="token:refresh")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(mds.CredentialError) as caught:
            source.access_token((CLOUD_PLATFORM,))
    message = str(caught.value)
    assert "HTTP 401: invalid_client" in message and "https://fake.example/e/" in message
    secrets = [user_credentials.client_secret, user_credentials.refresh_token]
    assert len(user_credentials.client_secret) < 40
    assert_none_quoted(secrets, [message] + [r.getMessage() for r in caplog.records])
    # The IAM call echoing its bearer (the source's access token) and body.
    fake.fail_next(1, mode="echo-secrets", endpoint="iam:generateAccessToken")
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((CLOUD_PLATFORM,))
    assert "invalid_client" in str(caught.value)
    assert_none_quoted([user_credentials.token], [str(caught.value)])


def test_a_federation_upstream_that_echoes_the_subject_token_is_masked(fake, tmp_path):
    config, token_path = fake.write_external_account_file(tmp_path)
    with open(token_path, "w") as handle:
        handle.write("opaque-Sub.tok/1234")        # not a JWT; too short for the catch-all
    source = mds.FederatedSource(config, retry_delays=FAST_RETRIES)
    fake.fail_next(1, mode="echo-secrets", endpoint="sts")
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token((STORAGE_READ,))
    assert "invalid_client" in str(caught.value)
    assert_none_quoted(["opaque-Sub.tok/1234"], [str(caught.value)])


@pytest.mark.parametrize("mode, status, words", [
    # Masking secrets in it once took minutes, holding the GIL: every client waited.
    ("token-shaped-flood", 403, ["HTTP 400: invalid_grant", "[redacted]"]),
    ("oversized", 502, ["more than 1024 KiB"]),
    # Past the JSON parser's depth: a RecursionError, which was a 500.
    ("deeply-nested", 403, ["HTTP 400"]),
])
def test_a_hostile_upstream_answer_is_refused_and_the_server_keeps_serving(
        fake, tmp_path, mds_server_factory, mode, status, words):
    server, _, _, _ = key_file_server(fake, tmp_path, mds_server_factory)
    fake.fail_next(1, mode, endpoint="token:jwt-bearer")
    token_status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert token_status == status, body
    for word in words:
        assert word in body, (word, body)
    assert len(body) < 2000, body
    assert metadata_get(server, "project/project-id")[0] == 200


def test_key_material_given_as_a_file_name_is_not_quoted(fake, tmp_path):
    key_path, _ = fake.write_key_file(tmp_path)
    with open(key_path) as handle:
        key_json = handle.read()
    private_key = json.loads(key_json)["private_key"]
    body = private_key.splitlines()[1]
    attempts = [
        lambda: mds.build_credential_source({"type": "key-file", "key": key_json}),
        lambda: mds.build_credential_source({"type": "key-file", "path": private_key}),
        lambda: mds.FederatedSource(key_json),
        lambda: mds.ImpersonatedSource("t@p.iam.gserviceaccount.com",
                                       source_credentials_file=key_json),
        lambda: mds.SigningKey(private_key),
    ]
    for attempt in attempts:
        with pytest.raises((mds.CredentialError, mds.ConfigError)) as caught:
            attempt()
        assert "looks like a file's content" in str(caught.value)
        assert body not in str(caught.value) and "private_key" not in str(caught.value)


def test_impersonation_sends_the_source_credentials_quota_project(fake, user_credentials):
    source = mds.ImpersonatedSource(fake.add_service_account().email,
                                    source_credentials=user_credentials.with_quota_project(
                                        "billing-project-7"),
                                    iam_endpoint_override=fake.url, retry_delays=FAST_RETRIES)
    source.access_token((CLOUD_PLATFORM,))
    assert fake.last_headers["iam:generateAccessToken"].get("x-goog-user-project") == \
        "billing-project-7"


def test_source_credentials_may_come_through_a_pipe(fake, user_credentials, tmp_path):
    # `--impersonate-source-file <(vault read ...)`: a FIFO, not a regular file.
    adc = fake.write_authorized_user_file(tmp_path)
    fifo = str(tmp_path / "adc.fifo")
    os.mkfifo(fifo)

    def feed():
        with open(adc) as source, open(fifo, "w") as pipe:
            pipe.write(source.read())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    source = mds.ImpersonatedSource(fake.add_service_account().email,
                                    source_credentials_file=fifo,
                                    iam_endpoint_override=fake.url)
    writer.join(5)
    assert source.describe().startswith("impersonating ")


def test_missing_google_extra_is_a_clear_error(monkeypatch):
    for name in list(sys.modules):
        if name == "google.auth" or name.startswith("google.auth."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "google.auth", None)
    with pytest.raises(mds.CredentialError) as caught:
        mds.ImpersonatedSource("a@b.iam.gserviceaccount.com")
    assert str(caught.value) == ('impersonation needs the "google" extra: pip install '
                                 'google-auth (in a checkout of mds: pip install ".[google]")')
    with pytest.raises(mds.CredentialError) as caught:
        mds.FederatedSource({"type": "external_account"})
    assert 'pip install google-auth' in str(caught.value)


# ---------------------------------------------------------------- workload federation


def test_federation_without_impersonation_returns_the_sts_token(fake, tmp_path):
    config, _ = fake.write_external_account_file(tmp_path)
    source = mds.FederatedSource(config, retry_delays=FAST_RETRIES)
    token = source.access_token((STORAGE_READ,))
    issued = fake.issued_tokens[token.value]
    assert issued["principal"].startswith("principal://") and issued["scopes"] == [STORAGE_READ]
    sent = fake.last_request["sts"]
    assert sent["subject_token"] in fake.subject_tokens
    assert fake.count("sts") == 1 and fake.count("iam:generateAccessToken") == 0
    with pytest.raises(mds.CredentialError) as caught:
        source.id_token("https://aud.example")
    assert caught.value.status == 403 and "impersonate" in str(caught.value)


def test_federation_impersonating_an_account(fake, tmp_path):
    target = fake.add_service_account()
    config, _ = fake.write_external_account_file(tmp_path, impersonate=target.email)
    source = mds.build_credential_source({"type": "federate", "config": config})
    assert source.email == target.email
    token = source.access_token((PUBSUB,))
    assert fake.issued_tokens[token.value] == {"principal": target.email, "scopes": [PUBSUB]}
    assert fake.count("sts") == 1 and fake.count("iam:generateAccessToken") == 1

    id_token = source.id_token("https://aud.example")
    claims = verify_with_key(id_token.value, fake.google_key.public_key())[1]
    assert claims["email"] == target.email and claims["aud"] == "https://aud.example"


def test_federation_impersonate_option_overrides_the_file(fake, tmp_path):
    first, second = fake.add_service_account(), fake.add_service_account()
    config, _ = fake.write_external_account_file(tmp_path, impersonate=first.email)
    source = mds.FederatedSource(config, impersonate_email=second.email)
    token = source.access_token(())
    assert fake.issued_tokens[token.value]["principal"] == second.email


def test_federation_failures(fake, tmp_path, caplog):
    config, token_path = fake.write_external_account_file(tmp_path)
    subject_token = open(token_path).read()
    source = mds.FederatedSource(config, retry_delays=FAST_RETRIES)
    caplog.set_level(logging.DEBUG)
    fake.fail_next(1, "invalid_grant", endpoint="sts")
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token(())
    assert caught.value.status == 403 and "invalid_grant" in str(caught.value)
    assert_secret_free(str(caught.value) + caplog.text, subject_token)
    # An unreadable subject token names the problem, not the token.
    os.remove(token_path)
    with pytest.raises(mds.CredentialError) as caught:
        source.access_token(())
    assert "subject-token.jwt" in str(caught.value) or "File" in str(caught.value)


@pytest.mark.parametrize("kind", ["access", "id"])
def test_a_hanging_federation_executable_ends_at_the_mint_deadline(fake, tmp_path, monkeypatch,
                                                                  caplog, kind):
    """google-auth lets an executable run for its timeout_millis (here 30 s); the mint's own
    deadline cuts it short, and the 502 names the program but never what it printed."""
    monkeypatch.setenv("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1")
    target = fake.add_service_account()
    path, token_path = fake.write_external_account_file(tmp_path, impersonate=target.email)
    subject_token = open(token_path).read()
    script = tmp_path / "subject-token.sh"
    script.write_text("#!/bin/sh\necho printed-by-the-executable\nexec sleep 30\n")
    script.chmod(0o755)
    config = json.loads(open(path).read())
    config["credential_source"] = {"executable": {"command": str(script),
                                                  "timeout_millis": 30000}}
    source = mds.FederatedSource(config, retry_delays=FAST_RETRIES, budget=1.0)
    caplog.set_level(logging.DEBUG)

    def mint():
        if kind == "access":
            return source.access_token(())
        return source.id_token("https://run.example.com")

    with pytest.raises(mds.CredentialError) as caught:
        mint()
    message = str(caught.value)
    assert caught.value.status == 502, message
    assert "subject-token.sh did not finish in time" in message
    assert "printed-by-the-executable" not in message + caplog.text
    assert fake.count("sts") == 0
    # An executable that answers in time is still run, with the time that is left.
    script.write_text("#!/bin/sh\necho '%s'\n" % json.dumps({
        "version": 1, "success": True, "token_type": "urn:ietf:params:oauth:token-type:jwt",
        "id_token": subject_token, "expiration_time": int(time.time()) + 3600}))
    token = mint()
    if kind == "access":
        assert fake.issued_tokens[token.value]["principal"] == target.email
    else:
        assert verify_with_key(token.value, fake.google_key.public_key())[1]["email"] == \
            target.email


def test_federation_rejects_non_external_account(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"type": "service_account"}))
    with pytest.raises(mds.CredentialError) as caught:
        mds.FederatedSource(str(path))
    assert "not an external-account configuration" in str(caught.value)


# ---------------------------------------------------------------- static


def _unsigned_jwt(claims):
    enc = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()
    return enc({"alg": "RS256", "typ": "JWT"}) + "." + enc(claims) + ".c2ln"


def test_static_source_from_env_matches_the_go_emulator_variables():
    exp = int(time.time()) + 1234
    id_token = _unsigned_jwt({"aud": "x", "exp": exp})
    source = mds.static_source_from_env({"GOOGLE_ACCESS_TOKEN": "ya29.static",
                                         "GOOGLE_ID_TOKEN": id_token})
    assert source.honours_scopes is False
    token = source.access_token(("ignored-scope",))
    assert token.value == "ya29.static" and token.expiry > time.time() + 3500
    token = source.id_token("any-audience", fmt="full", compute_claims={"a": 1})
    assert token.value == id_token and token.expiry == exp
    assert "ya29" not in source.describe()
    assert mds.static_source_from_env({"GOOGLE_PROJECT_ID": "p"}) is None


def test_static_source_missing_or_expired_tokens():
    only_id = mds.StaticSource(id_token=_unsigned_jwt({"exp": int(time.time()) - 10}))
    with pytest.raises(mds.CredentialError) as caught:
        only_id.access_token(())
    assert caught.value.status == 404 and "GOOGLE_ACCESS_TOKEN" in str(caught.value)
    with pytest.raises(mds.CredentialError) as caught:
        only_id.id_token("aud")
    assert "expired" in str(caught.value) and "eyJ" not in str(caught.value)
    opaque = mds.build_credential_source({"type": "static", "id_token": "opaque",
                                          "expiry": time.time() + 60})
    assert opaque.id_token("aud").value == "opaque"


def test_describe_names_the_source_without_secrets(fake, tmp_path, user_credentials):
    path, account = fake.write_key_file(tmp_path)
    config, subject_path = fake.write_external_account_file(tmp_path, impersonate=account.email)
    sources = [
        mds.KeyFileSource(path),
        mds.KeyFileSource(path, token_mode="self-signed"),
        mds.ImpersonatedSource(account.email, source_credentials=user_credentials,
                               iam_endpoint_override=fake.url),
        mds.FederatedSource(config),
        mds.StaticSource(access_token="ya29.secret-static", id_token=_unsigned_jwt({})),
    ]
    for source in sources:
        line = source.describe()
        assert "\n" not in line and line
        assert_secret_free(line, "ya29.secret-static", open(subject_path).read(),
                           *key_secrets(account))
    assert account.email in sources[0].describe() and "self-signed" in sources[1].describe()


def test_cli_flags_and_go_emulator_variables_become_specs(tmp_path):
    assert mds.credentials_spec_from_cli(environ={}) is None
    assert mds.credentials_spec_from_cli(service_account_file="sa.json",
                                         token_mode="self-signed", environ={}) == {
        "type": "key-file", "path": "sa.json", "token_mode": "self-signed"}
    assert mds.credentials_spec_from_cli(impersonate=True, environ={}) == {"type": "impersonate"}
    assert mds.credentials_spec_from_cli(
        federate=True, environ={"GOOGLE_APPLICATION_CREDENTIALS": "wif.json"}) == {
        "type": "federate", "config": "wif.json"}
    assert mds.credentials_spec_from_cli(environ={"GOOGLE_ACCESS_TOKEN": "ya29.x"}) == {
        "type": "static", "access_token": "ya29.x", "id_token": None}
    for bad in ({"federate": True}, {"token_mode": "self-signed"},
                {"service_account_file": "sa.json", "impersonate": True}):
        with pytest.raises(mds.CredentialError) as caught:
            mds.credentials_spec_from_cli(environ={}, **bad)
        assert "--" in str(caught.value) or "choose one" in str(caught.value)



def test_federate_with_impersonate_impersonates_the_configs_account(fake, tmp_path,
                                                                      mds_server_factory):
    # `--federate --impersonate` is one source (issue 3), not two rival ones.
    target = fake.add_service_account()
    config, _ = fake.write_external_account_file(tmp_path)      # the file impersonates nobody
    args = mds.build_parser().parse_args(["--federate", "--impersonate"])
    spec, signer, identity = mds.credentials_from_args(
        args, {"GOOGLE_APPLICATION_CREDENTIALS": config})
    assert spec == {"type": "federate", "config": config, "impersonate": True}
    spec["iam_endpoint"] = fake.url          # the fake plays the IAM Credentials API
    document = {"computeMetadata": {"v1": {"instance": {"serviceAccounts": {
        "default": {"aliases": ["default"], "email": target.email, "scopes": [PUBSUB]}}}}}}
    server = mds_server_factory(config=document, credentials=spec)
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    issued = fake.issued_tokens[json.loads(body)["access_token"]]
    assert issued["principal"] == target.email

@pytest.mark.parametrize("kind", ["impersonate", "federate"])
def test_a_command_line_source_without_a_config_serves_its_own_account(fake, tmp_path,
                                                                       mds_server_factory,
                                                                       kind):
    # `--impersonate EMAIL` or `--federate` with a file that impersonates an account, and no
    # --config: that account is the VM's default one, as a key file's is.
    target = fake.add_service_account()
    if kind == "impersonate":
        caller_key, _ = fake.write_key_file(tmp_path)
        spec = {"type": "impersonate", "target": target.email, "iam_endpoint": fake.url,
                "source_credentials_file": caller_key}
    else:
        config, _ = fake.write_external_account_file(tmp_path, impersonate=target.email)
        spec = {"type": "federate", "config": config}
    server = mds_server_factory(credentials=spec)
    assert metadata_get(server, "instance/service-accounts/default/email") == (200, target.email)
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert fake.issued_tokens[json.loads(body)["access_token"]]["principal"] == target.email


def test_impersonate_spec_without_target_uses_the_account(fake, tmp_path, monkeypatch):
    adc_key, _ = fake.write_key_file(tmp_path)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", adc_key)
    target = fake.add_service_account()
    source = mds.build_credential_source({"type": "impersonate", "iam_endpoint": fake.url},
                                         account_email=target.email)
    assert source.email == target.email
    assert fake.issued_tokens[source.access_token(()).value]["principal"] == target.email


def test_unknown_credentials_type():
    with pytest.raises(mds.CredentialError) as caught:
        mds.build_credential_source({"type": "magic"})
    assert "key-file" in str(caught.value) and "magic" in str(caught.value)


@pytest.mark.parametrize("step", [3 * 3600, -3600])
def test_failure_backoff_is_timed_by_the_monotonic_clock(step):
    """The wall clock steps (NTP, a suspended laptop) while a mint fails: a step forward
    must not read as an hours-long failed mint, nor a step back as an hour still to wait.
    Expiries stay on the wall clock."""
    wall, ticks = FakeClock(1_700_000_000.0), FakeClock(500.0)
    cache = mds.TokenCache(clock=wall, monotonic=ticks)
    calls = []

    def failing_mint():
        calls.append(wall.now)
        if len(calls) == 1:
            wall.now += step                 # the step happens while the upstream is asked
        ticks.now += 0.2
        raise mds.CredentialError("upstream down", 502)

    with pytest.raises(mds.CredentialError):
        cache.get("key", failing_mint)
    ticks.now += 0.5                          # inside the 1 s back-off: the failure again
    with pytest.raises(mds.CredentialError):
        cache.get("key", failing_mint)
    assert len(calls) == 1
    ticks.now += 0.6                          # past it: one more try
    token = cache.get("key", lambda: mds.Token("fresh", wall.now + 3600))
    assert token.value == "fresh"
    assert cache.get("key", failing_mint).value == "fresh"
    wall.now += 3600                          # expired on the wall clock: minted again
    with pytest.raises(mds.CredentialError):
        cache.get("key", failing_mint)
    assert len(calls) == 2


# ---------------------------------------------------------------- through mds.MetadataServer

AUDIENCE = "https://creds-test.example/endpoint?x=1"
# Outside *.gserviceaccount.com so google-auth starts no regional-access-boundary lookup.
CLIENT_EMAIL = "robot@fake-project.mds-test.example"


def vm_document(accounts, default=None):
    """The default VM with `accounts` ({email: (scopes, credentials spec)}) attached; the
    first (or `default`) is the primary account."""
    document = mds.default_gce_document()
    default = default or next(iter(accounts))
    attached, settings = {}, {}
    for email, (scopes, spec) in accounts.items():
        entry = {"email": email, "scopes": list(scopes),
                 "aliases": ["default"] if email == default else []}
        attached[email] = entry
        settings[email] = {"credentials": spec}
    attached["default"] = dict(attached[default])
    document["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = attached
    document["mds"] = {"serviceAccounts": settings}
    return document


def key_file_server(fake, tmp_path, mds_server_factory, **options):
    """A server whose primary account gets its tokens from a fresh key file, its config in a
    file it reloads on request: (server, config path, document, the key's account)."""
    key_path, keyed = fake.write_key_file(tmp_path)
    document = vm_document({keyed.email: ([CLOUD_PLATFORM], {"type": "key-file",
                                                               "path": key_path})})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document))
    server = mds_server_factory(config=str(config), poll_interval=3600, **options)
    return server, config, document, keyed


def metadata_get(server, path, query=None):
    url = server.url + "/computeMetadata/v1/" + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("endpoint", ["token", "identity"])
def test_fifty_concurrent_cold_requests_make_one_upstream_call(
        fake, tmp_path, mds_server_factory, endpoint):
    path, account = fake.write_key_file(tmp_path)
    server = mds_server_factory(config=vm_document(
        {account.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": path})}))
    fake.delay = 0.5  # every request arrives while the one upstream call is in flight
    query = {"audience": AUDIENCE} if endpoint == "identity" else None
    barrier = threading.Barrier(50)
    answers = []

    def client():
        barrier.wait()
        answers.append(metadata_get(server, "instance/service-accounts/default/" + endpoint,
                                    query))

    threads = [threading.Thread(target=client) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 50 and {status for status, _ in answers} == {200}
    assert len({body for _, body in answers}) == 1
    assert fake.count("token:jwt-bearer") == 1
    body = answers[0][1]
    if endpoint == "token":
        token = json.loads(body)
        assert fake.issued_tokens[token["access_token"]]["principal"] == account.email
        assert 3500 < token["expires_in"] <= 3599 and token["token_type"] == "Bearer"
    else:
        claims = verify_with_key(body, fake.google_key.public_key())[1]
        assert claims["aud"] == AUDIENCE and claims["email"] == account.email


def test_several_accounts_each_with_their_own_source(fake, tmp_path, mds_server_factory):
    key_path, keyed = fake.write_key_file(tmp_path)
    caller_key, _ = fake.write_key_file(tmp_path)  # ADC that may impersonate `target`
    target = fake.add_service_account()
    static_email = "static@fake-project.mds-test.example"
    server = mds_server_factory(config=vm_document({
        keyed.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": key_path}),
        target.email: ([STORAGE_READ], {"type": "impersonate", "target": target.email,
                                        "iam_endpoint": fake.url,
                                        "source_credentials_file": caller_key}),
        static_email: ([CLOUD_PLATFORM], {"type": "static", "access_token": "ya29.static-one"}),
    }))
    tokens = {}
    for name in ("default", keyed.email, target.email, static_email):
        status, body = metadata_get(server, "instance/service-accounts/%s/token" % name)
        assert status == 200, body
        tokens[name] = json.loads(body)["access_token"]
    assert tokens["default"] == tokens[keyed.email]
    assert fake.issued_tokens[tokens[keyed.email]] == {"principal": keyed.email,
                                                       "scopes": [CLOUD_PLATFORM]}
    assert fake.issued_tokens[tokens[target.email]] == {"principal": target.email,
                                                        "scopes": [STORAGE_READ]}
    assert tokens[static_email] == "ya29.static-one"
    assert len(set(tokens.values())) == 3

    # ?scopes= is honoured by sources that can, ignored by the static one.
    status, body = metadata_get(server, "instance/service-accounts/%s/token" % target.email,
                                {"scopes": PUBSUB})
    assert fake.issued_tokens[json.loads(body)["access_token"]]["scopes"] == [PUBSUB]
    status, body = metadata_get(server, "instance/service-accounts/%s/token" % static_email,
                                {"scopes": PUBSUB})
    assert json.loads(body)["access_token"] == "ya29.static-one"

    status, body = metadata_get(server, "instance/service-accounts/%s/identity" % target.email,
                                {"audience": AUDIENCE})
    claims = verify_with_key(body, fake.google_key.public_key())[1]
    assert claims["email"] == target.email


def test_upstream_failures_answer_with_the_cause_and_recover(
        fake, tmp_path, mds_server_factory, caplog):
    path, account = fake.write_key_file(tmp_path)
    server = mds_server_factory(config=vm_document(
        {account.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": path})}))
    caplog.set_level(logging.DEBUG)
    fake.fail_next(1, "invalid_grant")
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 403
    assert "invalid_grant" in body and account.email in body
    assertion = fake.last_request["token:jwt-bearer"]["assertion"]
    assert_secret_free(body + caplog.text, assertion, *key_secrets(account))
    # Other endpoints keep serving meanwhile.
    assert metadata_get(server, "project/project-id")[0] == 200

    # The cache backs off for a second after a failure, then the next refresh recovers.
    deadline = time.time() + 10
    while True:
        status, body = metadata_get(server, "instance/service-accounts/default/token")
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.3)
    assert status == 200
    assert json.loads(body)["access_token"] in fake.issued_tokens

    fake.stop()
    status, body = metadata_get(server, "instance/service-accounts/default/identity",
                                {"audience": AUDIENCE})
    assert status == 502 and "network error" in body
    assert_secret_free(body + caplog.text, *key_secrets(account))


def test_a_self_signed_audience_serves_requests_without_scopes(fake, tmp_path,
                                                              mds_server_factory):
    import google.auth.jwt

    path, account = fake.write_key_file(tmp_path)
    audience = "https://pubsub.googleapis.com/"
    server = mds_server_factory(config=vm_document({account.email: (
        [CLOUD_PLATFORM], {"type": "key-file", "path": path, "token_mode": "self-signed",
                           "self_signed_audience": audience})}))
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    claims = google.auth.jwt.decode(json.loads(body)["access_token"],
                                    certs=_fake_cert_for(fake, account), audience=audience)
    assert claims["aud"] == audience and "scope" not in claims
    status, body = metadata_get(server, "instance/service-accounts/default/token",
                                {"scopes": PUBSUB})
    claims = google.auth.jwt.decode(json.loads(body)["access_token"],
                                    certs=_fake_cert_for(fake, account))
    assert claims["scope"] == PUBSUB and "aud" not in claims
    assert fake.count() == 0


def test_an_unusable_expires_in_from_google_is_a_502_that_backs_off(fake, tmp_path,
                                                                   mds_server_factory):
    path, account = fake.write_key_file(tmp_path)
    server = mds_server_factory(config=vm_document(
        {account.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": path})}))
    fake.access_token_lifetime = float("inf")          # sent as JSON Infinity
    for _ in range(3):
        status, body = metadata_get(server, "instance/service-accounts/default/token")
        assert status == 502 and "expires_in" in body, body
    assert fake.count("token:jwt-bearer") == 1


def test_a_lifetime_beyond_twelve_hours_is_not_believed(fake, tmp_path, mds_server_factory):
    path, account = fake.write_key_file(tmp_path)
    server = mds_server_factory(config=vm_document(
        {account.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": path})}))
    fake.access_token_lifetime = 10 ** 13
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert 43000 < json.loads(body)["expires_in"] <= 43200


def test_a_short_lived_upstream_token_is_reused_for_half_its_life(fake, tmp_path,
                                                                 mds_server_factory):
    path, account = fake.write_key_file(tmp_path)
    server = mds_server_factory(config=vm_document(
        {account.email: ([CLOUD_PLATFORM], {"type": "key-file", "path": path})}))
    fake.access_token_lifetime = 250                 # shorter than the 5-minute margin
    tokens = {json.loads(metadata_get(server, "instance/service-accounts/default/token")[1])
              ["access_token"] for _ in range(10)}
    assert len(tokens) == 1
    assert fake.count("token:jwt-bearer") == 1


def test_a_relative_key_path_is_read_from_the_configs_folder(fake, tmp_path,
                                                            mds_server_factory, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    path, account = fake.write_key_file(str(folder))
    config = folder / "config.json"
    config.write_text(json.dumps(vm_document({account.email: (
        [CLOUD_PLATFORM], {"type": "key-file", "path": os.path.basename(path)})})))
    monkeypatch.chdir(str(tmp_path))          # started from elsewhere, as a service would be
    server = mds_server_factory(config=str(config))
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert fake.issued_tokens[json.loads(body)["access_token"]]["principal"] == account.email


def _rotate_key(fake, account, path):
    """A new key for `account`, written over its key file in place; Google (the fake) now
    refuses assertions signed by the old one."""
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    old_key_id = account.key_id
    account.private_key = rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
    account.key_id = "rotated-" + old_key_id[:20]
    with open(path, "w") as handle:
        json.dump(fake.service_account_key_info(account), handle)


@pytest.mark.parametrize("kind", ["key-file", "impersonate"])
def test_a_key_file_rotated_in_place_is_used_after_a_reload(fake, tmp_path, mds_server_factory,
                                                            kind):
    key_path, keyed = fake.write_key_file(tmp_path)
    if kind == "key-file":
        email, spec = keyed.email, {"type": "key-file", "path": key_path}
    else:                 # the key is the impersonation's source credentials
        email = fake.add_service_account().email
        spec = {"type": "impersonate", "iam_endpoint": fake.url,
                "source_credentials_file": key_path}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(vm_document({email: ([CLOUD_PLATFORM], spec)})))
    server = mds_server_factory(config=str(config), poll_interval=3600)
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert fake.count("token:jwt-bearer") == 1

    _rotate_key(fake, keyed, key_path)
    assert server.reload()
    status, body = metadata_get(server, "instance/service-accounts/default/token",
                                {"scopes": STORAGE_READ})
    assert status == 200, body
    assert fake.issued_tokens[json.loads(body)["access_token"]]["principal"] == email
    assert fake.count("token:jwt-bearer") == 2
    assert fake.last_assertion[0]["kid"] == keyed.key_id
    # An unchanged file keeps its source (and the source its token) across reloads.
    assert server.reload()
    metadata_get(server, "instance/service-accounts/default/token", {"scopes": PUBSUB})
    assert fake.count("token:jwt-bearer") == (3 if kind == "key-file" else 2)


def test_a_key_given_inline_in_the_config_serves_tokens(fake, tmp_path, mds_server_factory):
    key_path, keyed = fake.write_key_file(tmp_path)
    with open(key_path) as handle:
        inline = json.load(handle)
    os.remove(key_path)
    server = mds_server_factory(config=vm_document({keyed.email: (
        [CLOUD_PLATFORM], {"type": "key-file", "key": inline})}))
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert fake.issued_tokens[json.loads(body)["access_token"]]["principal"] == keyed.email


def test_a_source_taken_out_of_the_config_is_forgotten_with_its_tokens(fake, tmp_path,
                                                                      mds_server_factory):
    """A key taken out of the config must not stay in memory for the life of the process:
    after the reload neither its source nor the tokens it minted are held any more."""
    server, config, document, keyed = key_file_server(fake, tmp_path, mds_server_factory)
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    held = weakref.ref(server.store.tree.accounts[keyed.email].source)

    credentials = document["mds"]["serviceAccounts"][keyed.email].pop("credentials")
    config.write_text(json.dumps(document))
    assert server.reload() and server.offline()
    gc.collect()
    assert held() is None, "the removed key file's source is still held"

    # Put back, it is read and minted from anew.
    document["mds"]["serviceAccounts"][keyed.email]["credentials"] = credentials
    config.write_text(json.dumps(document))
    assert server.reload() and not server.offline()
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert fake.count("token:jwt-bearer") == 2


def test_a_refused_reload_keeps_the_sources_and_tokens_still_serving(fake, tmp_path,
                                                                     mds_server_factory):
    """A document of the wrong shape is compiled only to say why it is refused; that must not
    cost the tree still serving its sources or cached tokens."""
    server, config, document, _ = key_file_server(fake, tmp_path, mds_server_factory,
                                                  identity={"project_id": "flag-project"})
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    cached = json.loads(body)["access_token"]
    broken = copy.deepcopy(document)
    broken["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = None
    del broken["mds"]                 # so that the compile itself succeeds, with no account
    config.write_text(json.dumps(broken))
    assert not server.reload()
    status, body = metadata_get(server, "instance/service-accounts/default/token")
    assert status == 200, body
    assert json.loads(body)["access_token"] == cached
    assert fake.count("token:jwt-bearer") == 1


def test_credentials_without_a_type_are_refused_and_going_offline_is_logged(
        fake, tmp_path, mds_server_factory, caplog):
    server, config, document, account = key_file_server(fake, tmp_path, mds_server_factory)
    path = document["mds"]["serviceAccounts"][account.email]["credentials"]["path"]
    assert not server.offline()
    caplog.set_level(logging.INFO)
    settings = document["mds"]["serviceAccounts"][account.email]
    for spec, seen in (({"path": path}, "path"), ({"Type": "key-file", "path": path},
                                                  "Type, path")):
        settings["credentials"] = spec
        config.write_text(json.dumps(document))
        caplog.clear()
        assert not server.reload()
        assert 'credentials for %s have no "type" (keys given: %s)' % (account.email, seen) \
            in caplog.text
        assert not server.offline()                  # the key file still serves
        with pytest.raises(mds.ConfigError) as caught:
            mds.MetadataServer(config=document)
        assert account.email in str(caught.value) and seen in str(caught.value)
    # Removing the credentials is allowed, but said out loud.
    settings.pop("credentials")
    config.write_text(json.dumps(document))
    caplog.clear()
    assert server.reload() and server.offline()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(account.email in w and "offline tokens" in w for w in warnings), warnings
    caplog.clear()
    assert server.reload()                           # offline before: nothing to say
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def client_server(fake, tmp_path, mds_server_factory):
    """A server whose primary account gets real (fake-)Google tokens from a key file."""
    path, account = fake.write_key_file(tmp_path, email=CLIENT_EMAIL)
    server = mds_server_factory(config=vm_document(
        {account.email: ([CLOUD_PLATFORM, STORAGE_READ], {"type": "key-file", "path": path})}))
    return server, account


def _served_token(server, scopes=None):
    status, body = metadata_get(server, "instance/service-accounts/default/token",
                                {"scopes": ",".join(scopes)} if scopes else None)
    assert status == 200, body
    return json.loads(body)["access_token"]


def test_python_google_auth_receives_the_token_google_issued(fake, client_server, client_env):
    server, account = client_server
    report = run_python("py_gce_client.py", client_env(server), [AUDIENCE])
    assert report["blocked"] == []
    compute = report["compute_token"]["value"]
    assert fake.issued_tokens[compute["token"]]["principal"] == account.email
    assert compute["token"] == _served_token(server, compute["scopes"])
    claims = verify_with_key(report["id_token"]["value"], fake.google_key.public_key())[1]
    assert claims["aud"] == AUDIENCE and claims["email"] == account.email


def test_python_google_auth_hears_why_when_google_hangs(fake, client_server, client_env):
    """google-auth gives the metadata server 3 s per attempt over about 30 s of retries.  A
    Google that hangs must reach it as mds's 502 naming the cause within those attempts, not
    as a timeout of its own that says nothing about why."""
    server, account = client_server
    fake.delay = 13.0
    report = run_python("py_gce_token.py", client_env(server))
    assert "token" not in report, report
    error = report["error"]
    assert "Status: 502" in error, error
    assert "access token for %s" % account.email in error
    assert "127.0.0.1:%d" % fake.port in error
    assert "timed out" in error and "no time left to retry" in error
    # Recovery once Google answers again and the back-off (as long as the failed mint took,
    # about 10 s) has passed.
    fake.delay = 0.0
    deadline = time.monotonic() + 30
    while "token" not in report and time.monotonic() < deadline:
        time.sleep(1)
        report = run_python("py_gce_token.py", client_env(server))
    assert fake.issued_tokens[report["token"]]["principal"] == account.email


def test_node_google_auth_library_hears_why_when_google_is_down(fake, client_server,
                                                                client_env):
    """gcp-metadata retries a 502 a few times within short timeouts; the cause must survive."""
    server, account = client_server
    port = fake.port
    fake.stop()
    report = run_node("gce_token.js", client_env(server))
    assert "token" not in report, report
    error = report["error"]
    assert "access token for %s" % account.email in error, error
    assert "127.0.0.1:%d" % port in error and "refused" in error.lower()
    fake.start(port)
    deadline = time.monotonic() + 30
    while "token" not in report and time.monotonic() < deadline:
        time.sleep(1)
        report = run_node("gce_token.js", client_env(server))
    assert fake.issued_tokens[report["token"]]["principal"] == account.email


def test_node_google_auth_library_receives_the_token_google_issued(
        fake, client_server, client_env):
    server, account = client_server
    report = run_node("gce.js", client_env(server), [AUDIENCE])
    token = report["auth_access_token"]["value"]
    assert fake.issued_tokens[token] == {"principal": account.email, "scopes": [CLOUD_PLATFORM]}
    assert token == _served_token(server, [CLOUD_PLATFORM])
    claims = verify_with_key(report["id_token"]["value"], fake.google_key.public_key())[1]
    assert claims["aud"] == AUDIENCE and claims["email"] == account.email


def test_go_oauth2_google_receives_the_token_google_issued(fake, client_server, client_env):
    server, account = client_server
    report = run_go("oauth2google", client_env(server))
    token = report["compute_token"]["access_token"]
    # Go sends no scopes, so the account's configured scopes were asked of Google.
    assert fake.issued_tokens[token] == {"principal": account.email,
                                         "scopes": [CLOUD_PLATFORM, STORAGE_READ]}
    assert report["adc_token"]["access_token"] == token == _served_token(server)
    assert fake.count("token:jwt-bearer") == 1


def test_accounts_sharing_one_signer_each_keep_their_key_id(mds_server_factory):
    """A TPM key shared by two accounts: each account's tokens carry its own kid and sub."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    shared = mds.RsaKey.generate(1024)
    first, second = "one@p.iam.gserviceaccount.com", "two@p.iam.gserviceaccount.com"
    spec = {"type": "key-file", "tpm": True, "token_mode": "self-signed"}
    config = {
        "computeMetadata": {"v1": {"instance": {"serviceAccounts": {
            first: {"aliases": ["default"], "email": first, "scopes": ["s"]},
            second: {"email": second, "scopes": ["s"]}}}}},
        "mds": {"serviceAccounts": {
            first: {"credentials": spec, "keyId": "kid-one", "uniqueId": "111"},
            second: {"credentials": spec, "keyId": "kid-two", "uniqueId": "222"}}}}
    server = mds_server_factory(config=config, signer=shared)
    n, e = shared.public_numbers()
    public = rsa_keys.RSAPublicNumbers(e, n).public_key()
    seen = {}
    for account in (first, second):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/computeMetadata/v1/instance/service-accounts/%s/identity"
                           "?audience=https://aud.example" % account,
                           headers={"Metadata-Flavor": "Google"})
        token = connection.getresponse().read().decode()
        connection.close()
        header, claims = mds.jwt_decode_unverified(token)
        signing_input, signature = token.rsplit(".", 1)
        public.verify(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
                      signing_input.encode(), rsa_padding.PKCS1v15(), hashes.SHA256())
        seen[account] = (header["kid"], claims["sub"], claims["email"])
    assert seen == {first: ("kid-one", "111", first), second: ("kid-two", "222", second)}
