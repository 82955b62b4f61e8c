"""A local stand-in for the Google endpoints the credential sources talk to.

One real HTTP server on 127.0.0.1 plays:
  * the OAuth 2.0 token endpoint (`/token`): JWT-bearer grants (signature verified with
    `cryptography` against the service-account key it generated, every claim checked) and
    refresh-token grants for an authorized-user (ADC) file;
  * the IAM Credentials API (`/v1/projects/-/serviceAccounts/{email}:generateAccessToken`
    and `:generateIdToken`), checking the caller's bearer token;
  * STS (`/v1/token`) token exchange for external-account (workload identity federation)
    configurations with a file-sourced subject token;
  * Google's public keys: `/oauth2/v3/certs` (JWKS) and `/oauth2/v1/certs` (PEM certs) for
    the id tokens it signs, `/service_accounts/v1/metadata/x509/{email}` for account keys.

It counts calls per endpoint, can fail the next N calls (HTTP status or a dropped
connection), can slow down answers, and records the last verified assertion for tests.
"""

import base64
import datetime
import http.server
import json
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections import Counter

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
# Google rejects assertions with exp - iat above one hour; it tolerates a little clock skew.
MAX_ASSERTION_LIFETIME = 3600
CLOCK_SKEW = 300


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _self_signed_cert(private_key, common_name):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(private_key, hashes.SHA256()))


class FakeServiceAccount:
    """A service account the fake knows: e-mail, numeric id and its (generated) key."""

    def __init__(self, email, project_id, unique_id, private_key, key_id):
        self.email = email
        self.project_id = project_id
        self.unique_id = unique_id
        self.private_key = private_key
        self.key_id = key_id

    def key_pem(self, pkcs1=False):
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL if pkcs1
            else serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode("ascii")

    def cert_pem(self):
        return _self_signed_cert(self.private_key, self.email).public_bytes(
            serialization.Encoding.PEM).decode("ascii")


class GrantRejected(Exception):
    """The fake refuses a request the way Google does (status + JSON body)."""

    def __init__(self, status, body):
        Exception.__init__(self, body)
        self.status = status
        self.body = body


UNPARSEABLE_200_TOKEN = "plain-secret-7f3a"


def oauth_error(description, error="invalid_grant", status=400):
    return GrantRejected(status, {"error": error, "error_description": description})


def api_error(status, code_name, message):
    return GrantRejected(status, {"error": {"code": status, "message": message,
                                            "status": code_name}})


def verify_rs256(token, public_key):
    """(header, claims) of a compact RS256 JWS whose signature `public_key` verifies."""
    parts = token.split(".")
    if len(parts) != 3:
        raise oauth_error("Invalid JWT: Token must be a short-lived token and in a "
                          "reasonable timeframe")
    header = json.loads(b64url_decode(parts[0]))
    claims = json.loads(b64url_decode(parts[1]))
    if header.get("alg") != "RS256":
        raise oauth_error("Invalid JWT: unsupported alg")
    try:
        public_key.verify(b64url_decode(parts[2]), (parts[0] + "." + parts[1]).encode("ascii"),
                          padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise oauth_error("Invalid JWT Signature.")
    return header, claims


class FakeGoogle:
    """The fake Google server (see the module docstring). Use as a context manager."""

    def __init__(self, access_token_lifetime=3599):
        self.access_token_lifetime = access_token_lifetime
        self.google_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.google_key_id = secrets.token_hex(20)
        self.accounts = {}  # email -> FakeServiceAccount
        self.authorized_users = {}  # refresh_token -> (client_id, client_secret)
        self.subject_tokens = {}  # subject token -> workload pool audience
        # Issued access tokens -> {"principal", "scopes"}: IAM checks callers against these.
        self.issued_tokens = {}
        self.calls = Counter()
        self.last_assertion = None  # (header, claims) of the last accepted JWT-bearer grant
        self.last_request = {}  # endpoint -> decoded request body (for tests)
        self.last_headers = {}   # endpoint -> the headers of its latest request
        self.delay = 0.0
        self._failures = []  # list of [endpoint or None, remaining, mode]
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # ---- lifecycle ----

    def start(self, port=0):
        """Serve on 127.0.0.1:`port` (0 = any free port; pass the old port to restart)."""
        fake = self

        class Handler(_FakeGoogleHandler):
            google = fake

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def token_uri(self):
        return self.url + "/token"

    @property
    def sts_url(self):
        return self.url + "/v1/token"

    @property
    def iam_url(self):
        return self.url

    # ---- control ----

    def fail_next(self, count, mode=500, endpoint=None):
        """Fail the next `count` calls (to `endpoint`, or any) with an HTTP status (500, 503,
        401, 403, or "invalid_grant" for Google's 400), "close" (drop the connection),
        "unparseable-200" (a token google-auth cannot use), "trickle" (a 200 whose body
        arrives a byte at a time, for 30 s), "trickle-headers" (the same, for its headers) or "echo-secrets" (a 401 whose
        description quotes the credentials the request carried: its bearer token, client
        secret, refresh token, assertion or subject token, plainly, percent-encoded and
        inside a URL, as a careless upstream might), "token-shaped-flood" (a 400 whose
        description is 900 KB of "eyJ"), "oversized" (a 2 MiB token answer) or
        "deeply-nested" (a 400 whose body is JSON nested 100,000 deep)."""
        with self._lock:
            self._failures.append([endpoint, count, mode])

    def count(self, endpoint=None):
        with self._lock:
            if endpoint is None:
                return sum(self.calls.values())
            return self.calls[endpoint]

    def reset_counts(self):
        with self._lock:
            self.calls.clear()

    def _take_failure(self, endpoint):
        with self._lock:
            for entry in self._failures:
                if entry[1] > 0 and entry[0] in (None, endpoint):
                    entry[1] -= 1
                    return entry[2]
        return None

    # ---- identities and files ----

    def add_service_account(self, email=None, project_id="fake-project"):
        email = email or "sa-%s@%s.iam.gserviceaccount.com" % (secrets.token_hex(3), project_id)
        account = FakeServiceAccount(
            email, project_id, str(10 ** 20 + secrets.randbelow(10 ** 20)),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            secrets.token_hex(20))
        self.accounts[email] = account
        return account

    def service_account_key_info(self, account, pkcs1=False):
        return {
            "type": "service_account",
            "project_id": account.project_id,
            "private_key_id": account.key_id,
            "private_key": account.key_pem(pkcs1=pkcs1),
            "client_email": account.email,
            "client_id": account.unique_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": self.url + "/service_accounts/v1/metadata/x509/"
            + urllib.parse.quote(account.email),
            "universe_domain": "googleapis.com",
        }

    def write_key_file(self, directory, email=None, pkcs1=False):
        """A service-account key file (PKCS#8 unless pkcs1) whose token_uri is this fake.
        Returns (path, FakeServiceAccount)."""
        account = self.accounts.get(email) or self.add_service_account(email)
        path = os.path.join(str(directory), "sa-%s.json" % account.key_id[:8])
        with open(path, "w") as handle:
            json.dump(self.service_account_key_info(account, pkcs1=pkcs1), handle, indent=2)
        return path, account

    def write_authorized_user_file(self, directory):
        """An ADC file as `gcloud auth application-default login` writes it, except that
        token_uri points here. Returns its path."""
        client_id = "%d-fake.apps.googleusercontent.com" % secrets.randbelow(10 ** 12)
        client_secret = "d-" + secrets.token_urlsafe(18)
        refresh_token = "1//" + secrets.token_urlsafe(40)
        self.authorized_users[refresh_token] = (client_id, client_secret)
        path = os.path.join(str(directory), "application_default_credentials.json")
        with open(path, "w") as handle:
            json.dump({"type": "authorized_user", "client_id": client_id,
                       "client_secret": client_secret, "refresh_token": refresh_token,
                       "token_uri": self.token_uri, "universe_domain": "googleapis.com"},
                      handle, indent=2)
        return path

    def write_external_account_file(self, directory, impersonate=None):
        """An external-account config (as `gcloud iam workload-identity-pools
        create-cred-config` writes it) with a file-sourced OIDC subject token, STS at this
        fake, and optional service-account impersonation via this fake's IAM API.
        Returns (config path, subject-token path)."""
        audience = ("//iam.googleapis.com/projects/123456789/locations/global/"
                    "workloadIdentityPools/fake-pool/providers/fake-provider")
        subject_token = "eyJhbGciOiJub25lIn0." + b64url(json.dumps(
            {"sub": "ci-runner", "nonce": secrets.token_hex(8)}).encode()) + "."
        self.subject_tokens[subject_token] = audience
        token_path = os.path.join(str(directory), "subject-token.jwt")
        with open(token_path, "w") as handle:
            handle.write(subject_token)
        config = {"type": "external_account", "audience": audience,
                  "subject_token_type": JWT_SUBJECT_TOKEN_TYPE,
                  "token_url": self.sts_url,
                  "credential_source": {"file": token_path},
                  "universe_domain": "googleapis.com"}
        if impersonate:
            config["service_account_impersonation_url"] = (
                "%s/v1/projects/-/serviceAccounts/%s:generateAccessToken"
                % (self.iam_url, impersonate))
        path = os.path.join(str(directory), "external-account.json")
        with open(path, "w") as handle:
            json.dump(config, handle, indent=2)
        return path, token_path

    # ---- token minting ----

    def _issue_access_token(self, principal, scopes, lifetime=None):
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self.issued_tokens[token] = {"principal": principal, "scopes": list(scopes)}
        return token, lifetime or self.access_token_lifetime

    def issue_id_token(self, account, audience, include_email=True):
        now = int(time.time())
        claims = {"iss": "https://accounts.google.com", "aud": audience,
                  "azp": account.unique_id, "sub": account.unique_id, "iat": now,
                  "exp": now + 3600}
        if include_email:
            claims["email"] = account.email
            claims["email_verified"] = True
        header = {"alg": "RS256", "kid": self.google_key_id, "typ": "JWT"}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(
            json.dumps(claims).encode())
        signature = self.google_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(),
                                         hashes.SHA256())
        return signing_input + "." + b64url(signature)

    def google_cert_pem(self):
        return _self_signed_cert(self.google_key, "fake-google").public_bytes(
            serialization.Encoding.PEM).decode("ascii")

    def jwks(self):
        numbers = self.google_key.public_key().public_numbers()
        as_bytes = lambda n: n.to_bytes((n.bit_length() + 7) // 8, "big")
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.google_key_id,
                          "n": b64url(as_bytes(numbers.n)), "e": b64url(as_bytes(numbers.e))}]}

    # ---- endpoint logic (called by the handler; raise GrantRejected to refuse) ----

    def token_endpoint(self, form):
        grant = form.get("grant_type")
        if grant == JWT_BEARER_GRANT:
            return "token:jwt-bearer", self._jwt_bearer(form)
        if grant == "refresh_token":
            return "token:refresh", self._refresh_grant(form)
        raise oauth_error("Invalid grant_type: %s" % grant, error="unsupported_grant_type")

    def _jwt_bearer(self, form):
        assertion = form.get("assertion") or ""
        try:
            header = json.loads(b64url_decode(assertion.split(".")[0]))
            unverified = json.loads(b64url_decode(assertion.split(".")[1]))
        except (ValueError, IndexError):
            raise oauth_error("Invalid JWT: not a JWT")
        account = self.accounts.get(unverified.get("iss"))
        if account is None:
            raise oauth_error("Invalid grant: account not found")
        if header.get("kid") != account.key_id:
            raise oauth_error("Invalid JWT Signature.")
        header, claims = verify_rs256(assertion, account.private_key.public_key())
        now = time.time()
        # Google accepts its canonical token endpoint as audience whatever URL was POSTed to
        # (google-auth's own service-account flow always sends it); mds sends token_uri.
        if claims.get("aud") not in (self.token_uri, "https://oauth2.googleapis.com/token"):
            raise oauth_error("Invalid JWT: Failed audience check.")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            raise oauth_error("Invalid JWT: iat and exp must be integers")
        if abs(iat - now) > CLOCK_SKEW or exp <= now or exp - iat > MAX_ASSERTION_LIFETIME:
            raise oauth_error("Invalid JWT: Token must be a short-lived token (60 minutes) and "
                              "in a reasonable timeframe. Check your iat and exp values")
        scope, audience = claims.get("scope"), claims.get("target_audience")
        if bool(scope) == bool(audience):
            raise oauth_error("Invalid JWT: exactly one of scope and target_audience",
                              error="invalid_scope")
        self.last_assertion = (header, claims)
        if audience:
            return {"id_token": self.issue_id_token(account, audience)}
        token, lifetime = self._issue_access_token(account.email, scope.split())
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}

    def _refresh_grant(self, form):
        client = self.authorized_users.get(form.get("refresh_token"))
        if client is None or client != (form.get("client_id"), form.get("client_secret")):
            raise oauth_error("Token has been expired or revoked.")
        scopes = (form.get("scope") or "https://www.googleapis.com/auth/cloud-platform").split()
        token, lifetime = self._issue_access_token("user:" + client[0], scopes)
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer",
                "scope": " ".join(scopes)}

    def sts_endpoint(self, form):
        if form.get("grant_type") != TOKEN_EXCHANGE_GRANT:
            raise oauth_error("Invalid grant_type", error="invalid_request")
        audience = self.subject_tokens.get(form.get("subject_token"))
        if audience is None or audience != form.get("audience"):
            raise oauth_error("The subject token is invalid or does not match the audience")
        if form.get("subject_token_type") != JWT_SUBJECT_TOKEN_TYPE:
            raise oauth_error("Invalid subject_token_type", error="invalid_request")
        if form.get("requested_token_type") != ACCESS_TOKEN_TYPE:
            raise oauth_error("Invalid requested_token_type", error="invalid_request")
        scopes = (form.get("scope") or "").split()
        token, lifetime = self._issue_access_token("principal://" + audience, scopes)
        return {"access_token": token, "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer", "expires_in": lifetime}

    def iam_endpoint(self, email, method, body, authorization):
        caller = None
        if authorization and authorization.startswith("Bearer "):
            with self._lock:
                caller = self.issued_tokens.get(authorization[len("Bearer "):])
        if caller is None:
            raise api_error(401, "UNAUTHENTICATED", "Request had invalid authentication "
                            "credentials. Expected OAuth 2 access token.")
        # Users and service accounts need cloud-platform (or iam) scope to call IAM; STS
        # tokens are accepted whatever scope google-auth asked STS for.
        if not caller["principal"].startswith("principal://") and not {
                "https://www.googleapis.com/auth/cloud-platform",
                "https://www.googleapis.com/auth/iam"} & set(caller["scopes"]):
            raise api_error(403, "PERMISSION_DENIED", "Request had insufficient scopes.")
        account = self.accounts.get(email)
        if account is None:
            raise api_error(404, "NOT_FOUND", "Requested entity was not found.")
        if method == "generateAccessToken":
            scopes = body.get("scope")
            if not isinstance(scopes, list) or not scopes:
                raise api_error(400, "INVALID_ARGUMENT", "scope must be a non-empty list")
            lifetime = int(str(body.get("lifetime", "3600s")).rstrip("s"))
            if lifetime > 3600:
                raise api_error(400, "INVALID_ARGUMENT", "lifetime above 3600s")
            token, lifetime = self._issue_access_token(email, scopes, lifetime)
            expire = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
                seconds=lifetime)
            return {"accessToken": token, "expireTime": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        if method == "generateIdToken":
            if not body.get("audience"):
                raise api_error(400, "INVALID_ARGUMENT", "audience is required")
            return {"token": self.issue_id_token(account, body["audience"],
                                                 bool(body.get("includeEmail")))}
        raise api_error(404, "NOT_FOUND", "unknown method")


class _FakeGoogleHandler(http.server.BaseHTTPRequestHandler):
    """Routes requests to FakeGoogle; answers JSON like Google does."""

    google = None  # set on the per-server subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    def _answer(self, status, document, content_type="application/json"):
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endpoint(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/token":
            return "token", None
        if path == "/v1/token":
            return "sts", None
        prefix = "/v1/projects/-/serviceAccounts/"
        if path.startswith(prefix) and ":" in path[len(prefix):]:
            email, method = path[len(prefix):].rsplit(":", 1)
            return "iam:" + method, urllib.parse.unquote(email)
        return None, None

    def _injected_failure(self, endpoint_names, sent=()):
        for name in endpoint_names:
            mode = self.google._take_failure(name)
            if mode is not None:
                break
        else:
            return False
        if mode == "close":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if mode in ("trickle", "trickle-headers"):
            # A byte every 50 ms, of the body after the headers or of the headers themselves:
            # every read the client makes returns well inside any socket timeout, so only a
            # bound on the whole answer stops it waiting (for 30 s, here).
            body = b'{"error": "still arriving"}' + b" " * 600
            head = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    "X-Padding: %s\r\nContent-Length: %d\r\n\r\n" % ("x" * 600, len(body)))
            slow, at_once = (body, head.encode()) if mode == "trickle" else (head.encode(), b"")
            self.close_connection = True
            try:
                self.wfile.write(at_once)
                for index in range(len(slow)):
                    self.wfile.write(slow[index:index + 1])
                    time.sleep(0.05)
            except OSError:                # the client gave up
                pass
            return True
        if mode == "unparseable-200":
            # A 200 that google-auth cannot use (a token beside a bad expiry): google-auth's
            # RefreshError then carries this whole body. The token is short and plain so that
            # only quoting discipline, not pattern redaction, can keep it out of messages.
            self._answer(200, {"accessToken": UNPARSEABLE_200_TOKEN, "expireTime": "soon"})
            return True
        if mode == "echo-secrets":
            bearer = (self.headers.get("Authorization") or "").partition(" ")[2]
            quoted = [value for value in list(sent) + [bearer] if value]
            self._answer(401, {"error": "invalid_client", "error_description": " ".join(
                "got %s (%s), see https://fake.example/e/%s?v=%s" % (
                    value, urllib.parse.quote(value, safe=""), value,
                    urllib.parse.quote(value, safe="")) for value in quoted)})
            return True
        if mode == "token-shaped-flood":
            # 900 KB of "eyJ" with no dot: text a secret-masking pattern tries at every
            # "eyJ" costs time quadratic in its length.
            self._answer(400, {"error": "invalid_grant", "error_description": "eyJ" * 300000})
            return True
        if mode == "oversized":
            self._answer(200, {"access_token": "ya29.big", "expires_in": 3599,
                               "token_type": "Bearer", "padding": "x" * (2 << 20)})
            return True
        if mode == "deeply-nested":
            self.close_connection = True
            body = b"[" * 100000
            self.wfile.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                             + body)
            return True
        if mode == "invalid_grant":
            self._answer(400, {"error": "invalid_grant",
                               "error_description": "Invalid JWT Signature."})
        elif mode in (401, 403) and endpoint_names[0].startswith("iam"):
            self._answer(mode, {"error": {"code": mode, "status": "PERMISSION_DENIED",
                                          "message": "Permission 'iam.serviceAccounts."
                                          "getAccessToken' denied on resource"}})
        elif mode in (401, 403):
            self._answer(mode, {"error": "unauthorized_client",
                                "error_description": "Client is unauthorized to retrieve "
                                "access tokens using this method."})
        else:
            self._answer(int(mode), {"error": {"code": int(mode), "status": "UNAVAILABLE",
                                               "message": "The service is currently "
                                               "unavailable."}})
        return True

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        google = self.google
        if path == "/oauth2/v3/certs":
            return self._answer(200, google.jwks())
        if path == "/oauth2/v1/certs":
            return self._answer(200, {google.google_key_id: google.google_cert_pem()})
        prefix = "/service_accounts/v1/metadata/x509/"
        if path.startswith(prefix):
            account = google.accounts.get(urllib.parse.unquote(path[len(prefix):]))
            if account is not None:
                return self._answer(200, {account.key_id: account.cert_pem()})
        self._answer(404, {"error": {"code": 404, "status": "NOT_FOUND",
                                     "message": "Not Found"}})

    def do_POST(self):
        google = self.google
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        endpoint, email = self._endpoint()
        if endpoint is None:
            return self._answer(404, {"error": {"code": 404, "status": "NOT_FOUND",
                                                "message": "Not Found"}})
        if google.delay:
            time.sleep(google.delay)
        try:
            if endpoint in ("token", "sts"):
                form = {k: v[0] for k, v in urllib.parse.parse_qs(
                    raw.decode("ascii"), keep_blank_values=True).items()}
                counted = endpoint
                if endpoint == "token":
                    grant = form.get("grant_type")
                    counted = {"refresh_token": "token:refresh",
                               JWT_BEARER_GRANT: "token:jwt-bearer"}.get(grant, "token")
                with google._lock:
                    google.calls[counted] += 1
                    google.last_request[counted] = form
                sent = [form.get(name) for name in (
                    "client_secret", "refresh_token", "assertion", "subject_token")]
                if self._injected_failure([counted, endpoint], sent):
                    return None
                if endpoint == "token":
                    _, answer = google.token_endpoint(form)
                else:
                    answer = google.sts_endpoint(form)
            else:
                body = json.loads(raw or b"{}")
                with google._lock:
                    google.calls[endpoint] += 1
                    google.last_request[endpoint] = dict(body, _email=email)
                    google.last_headers[endpoint] = {k.lower(): v for k, v in self.headers.items()}
                if self._injected_failure([endpoint]):
                    return None
                answer = google.iam_endpoint(email, endpoint.split(":", 1)[1], body,
                                             self.headers.get("Authorization"))
        except GrantRejected as rejected:
            return self._answer(rejected.status, rejected.body)
        self._answer(200, answer)
