"""A local stand-in for AWS STS (AssumeRole, GetSessionToken) on 127.0.0.1.

It checks every request the way STS does before answering: the Authorization header is
parsed and the SigV4 signature is re-derived with botocore's own signer (an implementation
independent of mds's), the credential scope must name the expected region and service
"sts", the timestamp must be within 5 minutes, and a session token, when the key has one,
must be sent and signed. Failures get STS's XML error document and status. It counts the
calls it answered, records what it saw, and can be told to fail on demand.
"""

import datetime
import http.server
import secrets
import threading
import time
import urllib.parse
from xml.sax.saxutils import escape

import botocore.auth
import botocore.awsrequest
import botocore.credentials

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
SIGV4_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_CLOCK_SKEW_SECONDS = 300


def _error_document(code, message):
    return ('<ErrorResponse xmlns="%s">\n  <Error>\n    <Type>Sender</Type>\n'
            '    <Code>%s</Code>\n    <Message>%s</Message>\n  </Error>\n'
            '  <RequestId>%s</RequestId>\n</ErrorResponse>\n'
            % (STS_NAMESPACE, escape(code), escape(message), _request_id())).encode("utf-8")


def _request_id():
    token = secrets.token_hex(16)
    return "-".join((token[:8], token[8:12], token[12:16], token[16:20], token[20:]))


def _credentials_xml(access_key, secret_key, token, expiration):
    return ("    <Credentials>\n      <AccessKeyId>%s</AccessKeyId>\n"
            "      <SecretAccessKey>%s</SecretAccessKey>\n"
            "      <SessionToken>%s</SessionToken>\n"
            "      <Expiration>%s</Expiration>\n    </Credentials>\n"
            % (access_key, escape(secret_key), escape(token),
               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiration))))


class StsRejection(Exception):
    """A request STS would refuse: carries the HTTP status and STS error code."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class FakeSts(object):
    """Fake STS server. `keys` maps access key id -> (secret key, session token or None).

    Attributes tests read: `url`, `calls` (successful AssumeRole/GetSessionToken answers),
    `started` (requests received, answered or not), `requests` (dicts: action, params, access_key, accepted, error_code, headers).
    Knobs: `fail_next(count, status, code)`, `failing` (status, code) for every call,
    `lifetime` (seconds until the issued credentials expire; default DurationSeconds),
    `delay` (seconds to wait before answering).
    """

    def __init__(self, keys, region="us-east-1", lifetime=None, account_id="123456789012"):
        self.keys = dict(keys)
        self.region = region
        self.lifetime = lifetime
        self.account_id = account_id
        self.failing = None
        self.delay = 0.0
        self.calls = 0
        self.started = 0
        self.requests = []
        self.issued = []
        self._fail_budget = []
        self._lock = threading.Lock()
        self._httpd = None
        self._thread = None

    # ---- lifecycle ----
    def start(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, payload = fake._handle(self.command, self.path, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("x-amzn-RequestId", _request_id())
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                payload = _error_document("InvalidAction", "STS only accepts POST here")
                self.send_response(400)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        return "http://127.0.0.1:%d/" % self._httpd.server_address[1]

    # ---- knobs ----
    def fail_next(self, count=1, status=400, code="Throttling",
                  message="Failure requested by the test"):
        with self._lock:
            self._fail_budget.extend([(status, code, message)] * count)

    # ---- request handling ----
    def _verify_signature(self, method, path, headers, body):
        authorization = headers.get("Authorization") or ""
        if not authorization.startswith("AWS4-HMAC-SHA256 "):
            raise StsRejection(403, "MissingAuthenticationToken",
                               "Request is missing Authentication Token")
        fields = {}
        for part in authorization[len("AWS4-HMAC-SHA256 "):].split(","):
            name, _, value = part.strip().partition("=")
            fields[name] = value
        try:
            access_key, datestamp, region, service, terminator = fields["Credential"].split("/")
            signed_headers = fields["SignedHeaders"].split(";")
            signature = fields["Signature"]
        except (KeyError, ValueError):
            raise StsRejection(400, "IncompleteSignature", "Authorization header is malformed")
        if access_key not in self.keys:
            raise StsRejection(403, "InvalidClientTokenId",
                               "The security token included in the request is invalid.")
        secret_key, session_token = self.keys[access_key]
        amz_date = headers.get("X-Amz-Date") or ""
        try:
            signed_at = datetime.datetime.strptime(amz_date, SIGV4_DATE_FORMAT).replace(
                tzinfo=datetime.timezone.utc)
        except ValueError:
            raise StsRejection(400, "IncompleteSignature", "X-Amz-Date is missing or malformed")
        skew = abs((datetime.datetime.now(datetime.timezone.utc) - signed_at).total_seconds())
        if skew > MAX_CLOCK_SKEW_SECONDS:
            raise StsRejection(403, "SignatureDoesNotMatch", "Signature expired")
        if datestamp != amz_date[:8] or terminator != "aws4_request" or service != "sts":
            raise StsRejection(403, "SignatureDoesNotMatch", "Credential scope is wrong")
        if region != self.region:
            raise StsRejection(403, "SignatureDoesNotMatch",
                               "Credential should be scoped to a valid region, not %r" % region)
        for required in ("host", "x-amz-date"):
            if required not in signed_headers:
                raise StsRejection(403, "SignatureDoesNotMatch",
                                   "Header %s must be signed" % required)
        if session_token is not None:
            if headers.get("X-Amz-Security-Token") != session_token:
                raise StsRejection(403, "InvalidClientTokenId",
                                   "The security token included in the request is invalid.")
            if "x-amz-security-token" not in signed_headers:
                raise StsRejection(403, "SignatureDoesNotMatch",
                                   "x-amz-security-token must be signed")
        # Re-derive with botocore's signer over exactly the headers the client said it signed.
        request = botocore.awsrequest.AWSRequest(method=method, data=body)
        request.url = "http://%s%s" % (headers.get("Host"), path)
        for name in signed_headers:
            values = headers.get_all(name) or []
            if not values:
                raise StsRejection(403, "SignatureDoesNotMatch",
                                   "Signed header %s is absent" % name)
            for value in values:
                # HTTPHeaders is an email Message: item assignment appends, keeping duplicates.
                request.headers[name] = value
        request.context["timestamp"] = amz_date
        auth = botocore.auth.SigV4Auth(
            botocore.credentials.Credentials(access_key, secret_key, session_token), "sts",
            region)
        canonical = auth.canonical_request(request)
        expected = auth.signature(auth.string_to_sign(request, canonical), request)
        if expected != signature:
            raise StsRejection(403, "SignatureDoesNotMatch",
                               "The request signature we calculated does not match the "
                               "signature you provided.")
        return access_key, session_token

    def _handle(self, method, path, headers, body):
        with self._lock:
            self.started += 1
        if self.delay:
            time.sleep(self.delay)
        params = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                             keep_blank_values=True))
        record = {"action": params.get("Action"), "params": params, "access_key": None,
                  "accepted": False, "error_code": None, "headers": dict(headers.items())}
        with self._lock:
            self.requests.append(record)
        try:
            access_key, session_token = self._verify_signature(method, path, headers, body)
            record["access_key"] = access_key
            with self._lock:
                forced = self._fail_budget.pop(0) if self._fail_budget else self.failing
            if forced:
                message = forced[2] if len(forced) > 2 else "Failure requested by the test"
                raise StsRejection(forced[0], forced[1], message)
            if params.get("Version") != "2011-06-15":
                raise StsRejection(400, "InvalidAction", "Unsupported Version")
            action = params.get("Action")
            if action == "AssumeRole":
                payload = self._assume_role(params)
            elif action == "GetSessionToken":
                if session_token is not None:
                    raise StsRejection(403, "AccessDenied",
                                       "Cannot call GetSessionToken with session credentials")
                payload = self._get_session_token(params)
            else:
                raise StsRejection(400, "InvalidAction", "Could not find operation %s" % action)
        except StsRejection as rejection:
            record["error_code"] = rejection.code
            return rejection.status, _error_document(rejection.code, rejection.message)
        record["accepted"] = True
        with self._lock:
            self.calls += 1
        return 200, payload

    def _issue(self, duration):
        lifetime = self.lifetime if self.lifetime is not None else duration
        issued = ("ASIA" + secrets.token_hex(8).upper(),
                  secrets.token_urlsafe(30), "FwoGZXIvYXdzE" + secrets.token_urlsafe(200),
                  time.time() + lifetime)
        with self._lock:
            self.issued.append(issued)
        return issued

    def _assume_role(self, params):
        role_arn = params.get("RoleArn", "")
        session = params.get("RoleSessionName", "")
        if not role_arn.startswith("arn:aws:iam::") or ":role/" not in role_arn:
            raise StsRejection(400, "ValidationError", "RoleArn is not a role ARN")
        if not (2 <= len(session) <= 64):
            raise StsRejection(400, "ValidationError", "RoleSessionName length is invalid")
        duration = int(params.get("DurationSeconds") or 3600)
        if not 900 <= duration <= 43200:
            raise StsRejection(400, "ValidationError", "DurationSeconds is out of range")
        access_key, secret_key, token, expiration = self._issue(duration)
        account = role_arn.split(":")[4]
        role_name = role_arn.rsplit("/", 1)[-1]
        return ('<AssumeRoleResponse xmlns="%s">\n  <AssumeRoleResult>\n'
                '    <AssumedRoleUser>\n'
                '      <Arn>arn:aws:sts::%s:assumed-role/%s/%s</Arn>\n'
                '      <AssumedRoleId>AROA%s:%s</AssumedRoleId>\n'
                '    </AssumedRoleUser>\n%s  </AssumeRoleResult>\n'
                '  <ResponseMetadata><RequestId>%s</RequestId></ResponseMetadata>\n'
                '</AssumeRoleResponse>\n'
                % (STS_NAMESPACE, account, escape(role_name), escape(session),
                   secrets.token_hex(8).upper(), escape(session),
                   _credentials_xml(access_key, secret_key, token, expiration),
                   _request_id())).encode("utf-8")

    def _get_session_token(self, params):
        duration = int(params.get("DurationSeconds") or 43200)
        access_key, secret_key, token, expiration = self._issue(duration)
        return ('<GetSessionTokenResponse xmlns="%s">\n  <GetSessionTokenResult>\n%s'
                '  </GetSessionTokenResult>\n'
                '  <ResponseMetadata><RequestId>%s</RequestId></ResponseMetadata>\n'
                '</GetSessionTokenResponse>\n'
                % (STS_NAMESPACE, _credentials_xml(access_key, secret_key, token, expiration),
                   _request_id())).encode("utf-8")
