#!/usr/bin/env python3
"""mds: a cloud metadata server emulator in one file.

mds answers the Google Compute Engine metadata API (and its Cloud Run and GKE variants) and the
AWS EC2 instance metadata service closely enough that client libraries cannot tell it from the
real thing, so code that uses Application Default Credentials or the AWS credential chain runs
unchanged on a laptop, in CI, in a container or on a bare VM.

Run it::

    python mds.py                                  # a plausible GCE VM on 127.0.0.1:8080
    python mds.py --port 8080 --config config.json # serve your own tree
    python mds.py --flavor ec2                     # an EC2 instance (IMDSv1/v2)

then point clients at it (the startup log prints these lines)::

    export GCE_METADATA_HOST=127.0.0.1:8080 GCE_METADATA_IP=127.0.0.1:8080

Or embed it in tests::

    with mds.MetadataServer(config={...}, port=0) as server:
        os.environ.update(server.env)

Only the standard library is needed (Python 3.8+). Optional extras are imported when a feature
that needs them is used: google-auth (impersonation, workload identity federation) and
tpm2-pytss (keys held in a TPM).
"""

import argparse
import base64
import copy
import datetime
import email.utils
import hashlib
import hmac
import http.server
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse

__version__ = "0.1.0"

log = logging.getLogger("mds")


class ConfigError(ValueError):
    """A configuration document or option that cannot be served, with the reason."""


# ---- metadata tree ---------------------------------------------------------------------------
#
# The configuration document is the real server's `?recursive=true` JSON (camelCase Google keys,
# user keys verbatim).  A flavor compiles it into an immutable tree of `Node`s keyed by URL name;
# every change compiles a new tree and swaps it in under the store's condition, which is what
# `wait_for_change` sleeps on.


def dash_case(key):
    """`numericProjectId` -> `numeric-project-id` (the URL spelling of a Google-defined key)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", key).lower()


def camel_case(key):
    """`numeric-project-id` -> `numericProjectId` (the recursive-JSON spelling)."""
    head, *rest = key.split("-")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def short_hash(data):
    """16 lowercase hex characters, the shape of a real metadata ETag."""
    return hashlib.md5(data).hexdigest()[-16:]


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Node:
    """One path of a compiled tree: a directory, a leaf value, or a computed endpoint.

    Nodes never change after compilation; rendered bodies are memoised on the node because a
    change to the document builds a whole new tree.
    """

    __slots__ = ("name", "json_key", "kind", "value", "children", "hidden", "indexed",
                 "json_default", "etag", "account", "_rendered")

    def __init__(self, name, json_key, kind, value=None, children=None, indexed=False,
                 json_default=False, account=None):
        self.name = name                  # URL spelling
        self.json_key = json_key          # recursive-JSON spelling
        self.kind = kind                  # "dir" | "leaf" | a computed kind such as "token"
        self.value = value
        self.children = children if children is not None else {}
        self.hidden = {}                  # extra spellings that resolve but are not listed
        self.indexed = indexed            # a list served as 0/, 1/, ...
        self.json_default = json_default  # served as JSON without alt=json (instance/tags)
        self.account = account
        self.etag = ""
        self._rendered = {}

    @property
    def is_dir(self):
        return self.kind == "dir"

    def child(self, name):
        node = self.children.get(name)
        return node if node is not None else self.hidden.get(name)

    def finish(self):
        """Compute the ETag: a content hash, so it changes exactly when the content does."""
        if self.kind == "dir":
            parts = ["%s=%s" % (n, c.etag) for n, c in sorted(self.children.items())]
            self.etag = short_hash(("dir:" + ";".join(parts)).encode())
        elif self.kind == "leaf":
            self.etag = short_hash(canonical_json(self.value).encode())
        else:
            self.etag = short_hash(self.kind.encode())
        return self

    def rendered(self, form, render):
        body = self._rendered.get(form)
        if body is None:
            body = self._rendered[form] = render(self)
        return body

    def to_json(self):
        """The value as the recursive listing shows it (computed endpoints are left out)."""
        if self.kind == "leaf":
            return self.value
        items = [(c.json_key, c.to_json()) for n, c in sorted(self.children.items())
                 if c.kind in ("dir", "leaf")]
        if self.indexed:
            return [v for _, v in sorted(items, key=lambda kv: int(kv[0]))]
        return dict(items)


def resolve(root, segments):
    node = root
    for segment in segments:
        if not node.is_dir:
            return None
        node = node.child(segment)
        if node is None:
            return None
    return node


class MetadataStore:
    """The served document, its compiled tree, and the condition that change-waiters sleep on.

    `compile` turns a document into a tree (raising ConfigError for a document it cannot
    serve); a failed compile leaves the previous tree serving.
    """

    def __init__(self, document, compile):
        self._compile = compile
        self.changed = threading.Condition()
        self.document = document
        self.tree = compile(document)
        self.generation = 0

    def replace(self, document):
        tree = self._compile(document)
        with self.changed:
            self.document, self.tree = document, tree
            self.generation += 1
            self.changed.notify_all()

    def edit(self, keys, value=None, delete=False):
        """Set (or delete) the value at a document key path and publish the new tree."""
        with self.changed:
            document = copy.deepcopy(self.document)
            parent = document
            for i, key in enumerate(keys[:-1]):
                following = keys[i + 1]
                if isinstance(parent, list):
                    parent = parent[key]
                    continue
                if key not in parent or not isinstance(parent[key], (dict, list)):
                    if delete:
                        raise KeyError("/".join(map(str, keys)))
                    parent[key] = [] if isinstance(following, int) else {}
                parent = parent[key]
            last = keys[-1]
            if delete:
                del parent[last]
            elif isinstance(parent, list) and last == len(parent):
                parent.append(value)
            else:
                parent[last] = value
            self.replace(document)

    def wake(self):
        with self.changed:
            self.changed.notify_all()


# ---- HTTP handling ---------------------------------------------------------------------------


class Request:
    """One HTTP request as a flavor sees it."""

    __slots__ = ("method", "path", "raw_query", "query", "headers", "client_ip", "host", "body",
                 "_socket")

    def __init__(self, method, path, raw_query, headers, client_ip, host, body=b"", sock=None):
        self.method = method
        self.path = path
        self.raw_query = raw_query
        self.query = {}
        if raw_query:
            for key, values in urllib.parse.parse_qs(raw_query, keep_blank_values=True).items():
                self.query[key] = values[0]   # repeated parameters: the first one wins
        self.headers = headers
        self.client_ip = client_ip
        self.host = host
        self.body = body
        self._socket = sock

    def client_gone(self):
        """True once the client has closed its side (so a hanging GET can give up)."""
        if self._socket is None:
            return False
        try:
            readable, _, _ = select.select([self._socket], [], [], 0)
            if not readable:
                return False
            return self._socket.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class Response:
    """Status, body and headers a flavor hands back to the HTTP layer."""

    __slots__ = ("status", "body", "content_type", "headers", "bare")

    def __init__(self, status, body=b"", content_type=None, headers=(), bare=False):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = list(headers)
        self.bare = bare            # True: leave out the flavor's common headers


_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Turns socket traffic into `Request`s for the server's flavor and writes `Response`s."""

    protocol_version = "HTTP/1.1"       # keep-alive; every response carries Content-Length
    wbufsize = -1                       # headers and body leave in one write
    disable_nagle_algorithm = True      # without TCP_NODELAY keep-alive clients stall ~40 ms
    timeout = 300                       # idle keep-alive connections do not live forever

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout, OSError) as exc:
            log.debug("client %s went away: %s", self.client_address[0], exc)

    def _dispatch(self):
        mds = self.server.mds
        length = self.headers.get("Content-Length")
        try:
            body = self.rfile.read(int(length)) if length else b""
        except ValueError:
            body = b""
        path, _, raw_query = self.path.partition("?")
        request = Request(self.command, path, raw_query, self.headers, self.client_address[0],
                          self.headers.get("Host") or mds.authority, body, self.connection)
        try:
            response = mds.flavor.respond(request)
        except Exception:                # a bug must cost one request, not the server
            log.exception("internal error answering %s %s", self.command, path)
            response = Response(500, "Internal error in mds; see the server log.\n",
                                "text/plain; charset=utf-8")
        self._write(response, mds)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _dispatch

    def _write(self, response, mds):
        flavor = mds.flavor
        body = response.body
        lines = ["HTTP/1.1 %d %s" % (response.status, _REASONS.get(response.status, "")),
                 "Server: " + flavor.server_header,
                 "Date: " + mds.http_date()]
        if response.content_type:
            lines.append("Content-Type: " + response.content_type)
        lines.append("Content-Length: %d" % len(body))
        if not response.bare:
            lines.extend(mds.common_header_lines())
        for name, value in response.headers:
            lines.append("%s: %s" % (name, value))
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        log.debug("%s %s %s -> %d", self.client_address[0], self.command, self.path,
                  response.status)

    def send_error(self, code, message=None, explain=None):
        # Malformed requests are answered by the stdlib parser; keep our headers on them too.
        self.close_connection = True
        reason = message or _REASONS.get(code, "error")
        self._write(Response(code, reason + "\n", "text/plain; charset=utf-8"), self.server.mds)

    def version_string(self):
        return self.server.mds.flavor.server_header

    def log_message(self, format, *args):
        log.debug("%s " + format, self.client_address[0], *args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    """The listener: one daemon thread per connection, a deep accept backlog."""

    daemon_threads = True
    block_on_close = False       # never wait for hanging GETs on shutdown
    request_queue_size = 1024    # with the default of 5, a burst of waiters gets reset
    allow_reuse_address = True

    def __init__(self, address, mds):
        self.mds = mds
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            log.debug("client %s went away: %s", client_address[0], exc)
        else:
            log.exception("error serving %s", client_address[0])


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def http_error_page(code, title, message):
    """Google's error page, shortened: status + title matter to clients, the prose to people."""
    return (
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
        "  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n"
        "  <title>Error %d (%s)!!1</title>\n"
        "  <style>*{margin:0;padding:0}html,code{font:15px/22px arial,sans-serif}html{background:"
        "#fff;color:#222;padding:15px}body{margin:7%% auto 0;max-width:390px;min-height:180px;"
        "padding:30px 0 15px}p{margin:11px 0 22px;overflow:hidden}ins{color:#777;"
        "text-decoration:none}</style>\n"
        "  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n"
        "  <p><b>%d.</b> <ins>That\u2019s an error.</ins>\n"
        "  <p>%s  <ins>That\u2019s all we know.</ins>\n" % (code, title, code, message)
    ).encode("utf-8")


def html_escape(text):
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def true_param(value):
    """Query booleans as Google's emulator read them: true/on/yes/1, any case."""
    return value is not None and value.lower() in ("true", "on", "yes", "1")


# ---- GCE flavor ------------------------------------------------------------------------------

# Containers whose keys belong to the user and keep their spelling (document key paths; "*"
# matches any key).  Everything else is Google-defined: camelCase in the document, dash-case in
# URLs.
USER_KEY_CONTAINERS = (
    ("instance", "attributes"), ("project", "attributes"), ("instance", "serviceAccounts"),
    ("instance", "guestAttributes"), ("instance", "guestAttributes", "*"),
    ("instance", "partnerAttributes"), ("instance", "partnerAttributes", "*"),
    ("oslogin", "authenticate", "sessions"),
)
# Lists served as directories of indexes even when empty (disks/0/, forwarded-ips/0, ...).
INDEXED_LISTS = frozenset(("disks", "licenses", "networkInterfaces", "accessConfigs",
                           "forwardedIps", "ipAliases", "forwardedIpv6s"))
JSON_BY_DEFAULT = (("instance", "tags"),)
SERVICE_ACCOUNT_ENDPOINTS = ("token", "identity")

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_SCOPES = [CLOUD_PLATFORM, "https://www.googleapis.com/auth/userinfo.email"]


def _user_container(path):
    for pattern in USER_KEY_CONTAINERS:
        if len(pattern) == len(path) and all(p in ("*", k) for p, k in zip(pattern, path)):
            return True
    return False


def default_gce_document(now=None):
    """A plausible VM: what `python mds.py` serves with no configuration."""
    number = 717215637524
    project = "mds-emulator"
    email_address = "%d-compute@developer.gserviceaccount.com" % number
    zone = "us-central1-a"
    account = {"aliases": ["default"], "email": email_address, "scopes": list(DEFAULT_SCOPES)}
    return {"computeMetadata": {"v1": {
        "instance": {
            "attributes": {"enable-oslogin": "FALSE"},
            "cpuPlatform": "Intel Broadwell",
            "description": "",
            "disks": [{"deviceName": "instance-1", "index": 0, "interface": "SCSI",
                       "mode": "READ_WRITE", "type": "PERSISTENT-BALANCED"}],
            "guestAttributes": {},
            "hostname": "instance-1.%s.c.%s.internal" % (zone, project),
            "id": 4520031799277581759,
            "image": "projects/debian-cloud/global/images/debian-12-bookworm-v20241112",
            "licenses": [{"id": "2147286739765738111"}],
            "machineType": "projects/%d/machineTypes/e2-medium" % number,
            "maintenanceEvent": "NONE",
            "name": "instance-1",
            "networkInterfaces": [{
                "accessConfigs": [{"externalIp": "34.123.45.67", "type": "ONE_TO_ONE_NAT"}],
                "dnsServers": ["169.254.169.254"], "forwardedIps": [],
                "gateway": "10.128.0.1", "ip": "10.128.0.2", "ipAliases": [],
                "mac": "42:01:0a:80:00:02", "mtu": 1460,
                "network": "projects/%d/networks/default" % number,
                "subnetmask": "255.255.240.0", "targetInstanceIps": []}],
            "partnerAttributes": {},
            "preempted": "FALSE",
            "remainingCpuTime": -1,
            "scheduling": {"automaticRestart": "TRUE", "onHostMaintenance": "MIGRATE",
                           "preemptible": "FALSE"},
            "serviceAccounts": {"default": dict(account), email_address: dict(account)},
            "tags": ["http-server"],
            "virtualClock": {"driftToken": "0"},
            "zone": "projects/%d/zones/%s" % (number, zone),
        },
        "oslogin": {"authenticate": {"sessions": {}}},
        "project": {
            "attributes": {"google-compute-default-region": "us-central1",
                           "google-compute-default-zone": zone},
            "numericProjectId": number,
            "projectId": project,
        },
        "universe": {"universeDomain": "googleapis.com"},
    }}}


class Account:
    """A service account attached to the instance and where its tokens come from."""

    def __init__(self, email, scopes, aliases, unique_id, source):
        self.email = email
        self.scopes = tuple(scopes)
        self.aliases = list(aliases)
        self.unique_id = unique_id
        self.source = source


def unique_id_for(email_address):
    """A stable 21-digit numeric id, the shape of a service account's `sub` claim."""
    digest = int(hashlib.sha256(email_address.encode()).hexdigest(), 16)
    return "1" + str(digest % 10 ** 20).zfill(20)


class GceFlavor:
    """The Compute Engine metadata server: /computeMetadata/v1/... with Metadata-Flavor: Google.

    `variant` selects the Cloud Run ("serverless") or GKE differences in headers and the root.
    """

    name = "gce"
    SERVER_HEADERS = {"gce": "Metadata Server for VM", "serverless": "Metadata Server for Serverless",
                      "gke": "GKE Metadata Server"}

    def __init__(self, server, variant="gce"):
        self.server = server
        self.variant = variant
        self.server_header = self.SERVER_HEADERS[variant]
        self.common_headers = [("Metadata-Flavor", "Google"), ("X-XSS-Protection", "0"),
                               ("X-Frame-Options", "SAMEORIGIN")]

    # -- the document -----------------------------------------------------------------------

    def default_document(self):
        document = default_gce_document()
        v1 = document["computeMetadata"]["v1"]
        number = v1["project"]["numericProjectId"]
        if self.variant == "serverless":
            # Cloud Run: a hex instance id, a region, a synthetic zone, and little else (spec 12).
            v1["instance"] = {
                "id": hashlib.sha512(b"mds-cloud-run-instance").hexdigest(),
                "region": "projects/%d/regions/us-central1" % number,
                "serviceAccounts": v1["instance"]["serviceAccounts"],
                "zone": "projects/%d/zones/us-central1-1" % number,
            }
            v1.pop("oslogin", None)
        elif self.variant == "gke":
            # The GKE metadata server exposes a subset, with the cluster in the attributes (13).
            instance = v1["instance"]
            v1["instance"] = {key: instance[key] for key in
                              ("hostname", "id", "serviceAccounts", "zone")}
            v1["instance"]["attributes"] = {"cluster-location": "us-central1",
                                            "cluster-name": "mds-cluster",
                                            "cluster-uid": "4b5f1c3e9d2a4e7f8c6b1a0d3e5f7a9b"}
        return document

    def compile(self, document):
        """Build the served tree; raises ConfigError naming what is wrong with the document."""
        if not isinstance(document, dict):
            raise ConfigError("the document must be a JSON object")
        top = document.get("computeMetadata")
        if top is None:
            top = default_gce_document()["computeMetadata"]
        if not isinstance(top, dict) or not isinstance(top.get("v1"), dict):
            raise ConfigError('expected {"computeMetadata": {"v1": {...}}}')
        v1 = dict(top["v1"])
        v1.setdefault("universe", {"universeDomain": "googleapis.com"})
        for section in ("instance", "project"):
            if section in v1 and not isinstance(v1[section], dict):
                raise ConfigError("computeMetadata.v1.%s must be an object" % section)
        settings = document.get("mds") or {}
        if not isinstance(settings, dict):
            raise ConfigError('"mds" settings must be an object')
        accounts = self._accounts(v1, settings)
        version = self._compile_dict("v1", "v1", v1, (), accounts)
        top_node = Node("computeMetadata", "computeMetadata", "dir", children={"v1": version})
        root = Node("", "", "dir", children={"computeMetadata": top_node.finish()})
        return _GceTree(root.finish(), accounts, v1)

    def _accounts(self, v1, settings):
        instance = v1.get("instance") or {}
        raw = instance.get("serviceAccounts") or {}
        if not isinstance(raw, dict):
            raise ConfigError("instance.serviceAccounts must be an object keyed by email")
        per_account = settings.get("serviceAccounts") or {}
        accounts, primary = {}, None
        for key, entry in raw.items():
            if not isinstance(entry, dict):
                raise ConfigError("instance.serviceAccounts.%s must be an object" % key)
            address = entry.get("email") or (key if key != "default" else None)
            if not address:
                raise ConfigError("instance.serviceAccounts.default needs an \"email\"")
            if address not in accounts:
                options = per_account.get(address) or {}
                scopes = entry.get("scopes") or list(DEFAULT_SCOPES)
                accounts[address] = Account(
                    address, scopes, entry.get("aliases") or [],
                    str(options.get("uniqueId") or unique_id_for(address)),
                    self.server.source_for(address, options.get("credentials")))
            if key == "default" or "default" in (entry.get("aliases") or []):
                primary = primary or accounts[address]
        if accounts and primary is None:
            primary = next(iter(accounts.values()))
        if primary is not None:
            primary.aliases = ["default"]
        return {"default": primary, **accounts} if primary else {}

    def _compile_dict(self, name, json_key, value, path, accounts, raw=False):
        # Below a user-defined key (an attribute holding an object, say) nothing is Google's.
        raw = raw or _user_container(path)
        node = Node(name, json_key, "dir")
        if path == ("instance", "serviceAccounts"):
            for url_name, account in accounts.items():
                node.children[url_name] = self._account_node(url_name, account,
                                                             value.get(url_name) or {})
            return node.finish()
        for key, child_value in value.items():
            key = str(key)
            if raw:
                url_name, child_json = key, key
            else:
                url_name = dash_case(key)
                child_json = key if "-" not in key else camel_case(key)
            child = self._compile_value(url_name, child_json, child_value, path + (child_json,),
                                        accounts, raw)
            node.children[url_name] = child
            if url_name != key:
                node.hidden[key] = child
        return node.finish()

    def _compile_value(self, name, json_key, value, path, accounts, raw=False):
        if isinstance(value, dict):
            return self._compile_dict(name, json_key, value, path, accounts, raw)
        if isinstance(value, list) and (json_key in INDEXED_LISTS or
                                        (value and all(isinstance(v, dict) for v in value))):
            node = Node(name, json_key, "dir", indexed=True)
            for index, item in enumerate(value):
                node.children[str(index)] = self._compile_value(str(index), str(index), item,
                                                                path + ("*",), accounts, raw)
            return node.finish()
        return Node(name, json_key, "leaf", value=value,
                    json_default=path in JSON_BY_DEFAULT).finish()

    def _account_node(self, url_name, account, entry):
        node = Node(url_name, url_name, "dir")
        fields = {"aliases": account.aliases, "email": account.email,
                  "scopes": list(account.scopes)}
        for key, value in entry.items():          # custom per-account keys are served too
            if key not in fields and key not in SERVICE_ACCOUNT_ENDPOINTS:
                fields[key] = value
        for key, value in fields.items():
            node.children[dash_case(key)] = Node(dash_case(key), key, "leaf", value=value).finish()
        for endpoint in SERVICE_ACCOUNT_ENDPOINTS:
            node.children[endpoint] = Node(endpoint, endpoint, endpoint, account=account).finish()
        return node.finish()

    def document_keys(self, path):
        """Map a URL path under /computeMetadata/v1/ to a key path in the document."""
        document = self.server.store.document
        if "computeMetadata" not in document:
            document = default_gce_document()
        keys, node, doc_path = ["computeMetadata", "v1"], document["computeMetadata"]["v1"], ()
        for segment in [s for s in path.strip("/").split("/") if s]:
            if isinstance(node, list):
                keys.append(int(segment))
                node = node[int(segment)] if int(segment) < len(node) else None
                doc_path += ("*",)
                continue
            node = node if isinstance(node, dict) else {}
            if doc_path == ("instance", "serviceAccounts") and segment == "default" \
                    and "default" not in node:
                segment = next((k for k, v in node.items()
                                if "default" in (v or {}).get("aliases", [])), segment)
            if _user_container(doc_path) or segment in node:
                key = segment
            else:
                key = next((k for k in node if dash_case(str(k)) == segment), camel_case(segment))
            keys.append(key)
            doc_path += (key,)
            node = node.get(key)
        return keys

    # -- requests ---------------------------------------------------------------------------

    def respond(self, request):
        if request.headers.get("X-Forwarded-For") is not None:
            # The issue asks for 403 on any proxied request, the root included: the real server
            # refuses what a proxy forwards (envoyproxy/envoy#4924).
            return self.forbidden(request, "Requests carrying X-Forwarded-For are refused.")
        path = request.path
        flavor_ok = request.headers.get("Metadata-Flavor") == "Google"
        if path == "/":
            if self.variant == "gke" and not flavor_ok:
                return self.forbidden(request)
            listing = "computeMetadata/\n" if self.variant == "gke" else "0.1/\ncomputeMetadata/\n"
            return Response(200, listing, "application/text")
        if path in ("/oauth2/v3/certs", "/oauth2/v1/certs"):
            return self.server.certs_response(path)
        if not flavor_ok:
            return self.forbidden(request)
        if request.method != "GET":
            if request.method == "PUT" and "/guest-attributes/" in path:
                return self.put_guest_attribute(request)
            return Response(405, "Method %s is not allowed here.\n" % request.method,
                            "text/html; charset=UTF-8", [("Allow", "GET")])
        segments = [urllib.parse.unquote(s) for s in path.split("/") if s]
        tree = self.server.store.tree
        node = resolve(tree.root, segments)
        if node is None or (path.endswith("/") and not node.is_dir) or \
                segments[:2] != ["computeMetadata", "v1"] and len(segments) > 1:
            return self.not_found(path)
        if node.is_dir and not path.endswith("/"):
            return self.redirect(request)
        try:
            return self.read(request, segments, node, tree)
        except BadRequest as exc:
            return Response(400, "Bad request: %s\n" % exc, "text/html; charset=UTF-8")

    def read(self, request, segments, node, tree):
        query = request.query
        alt = query.get("alt")
        if alt not in (None, "json", "text"):
            raise BadRequest("alt must be json or text, not %r" % alt)
        recursive = true_param(query.get("recursive"))
        if node.kind in SERVICE_ACCOUNT_ENDPOINTS:
            return self.token(request, node) if node.kind == "token" else \
                self.identity(request, node, tree)
        if node.is_dir and not recursive and alt is not None:
            raise BadRequest("alt=%s needs recursive=true on a directory" % alt)
        timeout = query.get("timeout_sec")
        if timeout is not None:
            if not re.fullmatch(r"\d+", timeout.strip()):
                raise BadRequest("timeout_sec must be a non-negative integer number of seconds,"
                                 " not %r" % timeout)
            timeout = int(timeout)
        if true_param(query.get("wait_for_change")):
            if node.is_dir and not recursive:
                raise BadRequest("wait_for_change on a directory needs recursive=true")
            node = self.wait_for_change(request, segments, node, query.get("last_etag"), timeout)
            if node is None:
                return self.not_found(request.path)
        return self.render(node, alt, recursive)

    def wait_for_change(self, request, segments, node, last_etag, timeout):
        """Block until the node's ETag differs from `last_etag` (or its current one)."""
        if last_etag is not None and last_etag != node.etag:
            return node
        etag = node.etag
        store = self.server.store
        deadline = None if timeout is None else time.monotonic() + timeout
        with store.changed:
            while True:
                current = resolve(store.tree.root, segments)
                if current is None or current.etag != etag or self.server.stopping:
                    return current
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return current
                # Wake up now and then to notice clients that hung up, so their threads end.
                store.changed.wait(30.0 if remaining is None else min(remaining, 30.0))
                if request.client_gone():
                    return current

    def render(self, node, alt, recursive):
        headers = [("ETag", node.etag)]
        if node.is_dir and recursive:
            if alt == "text":
                return Response(200, node.rendered("rtext", _render_text), "application/text",
                                headers)
            return Response(200, node.rendered("rjson", _render_json), "application/json",
                            headers)
        if node.is_dir:
            return Response(200, node.rendered("list", _render_listing), "application/text",
                            headers)
        if alt == "json" or (alt is None and node.json_default):
            return Response(200, node.rendered("json", _render_json), "application/json",
                            headers)
        return Response(200, node.rendered("text", _render_leaf_text), "application/text",
                        headers)

    # -- service-account endpoints ----------------------------------------------------------

    def token(self, request, node):
        account = node.account
        requested = tuple(sorted({s.strip() for s in re.split(r"[,\s]+",
                                                               request.query.get("scopes", ""))
                                  if s.strip()}))
        source = account.source
        scopes = requested if requested and source.honours_scopes else account.scopes
        try:
            token = self.server.tokens.get(("access", source, account.email, scopes),
                                           lambda: source.access_token(scopes))
        except CredentialError as exc:
            return self.credential_failure(exc, account)
        payload = {"access_token": token.value,
                   "expires_in": max(1, int(token.expiry - time.time())),
                   "token_type": "Bearer"}
        if request.query.get("alt") == "text":
            body = "".join("%s %s\n" % item for item in payload.items())
            return Response(200, body, "application/text", [("ETag", short_hash(body.encode()))])
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Response(200, body, "application/json", [("ETag", short_hash(body))])

    def identity(self, request, node, tree):
        audience = request.query.get("audience")
        if not audience:
            raise BadRequest("non-empty audience parameter required")
        fmt = (request.query.get("format") or "standard").lower()
        if fmt not in ("standard", "full"):
            raise BadRequest("format must be standard or full, not %r" % fmt)
        licenses = fmt == "full" and true_param(request.query.get("licenses"))
        claims = self.compute_engine_claims(tree, licenses) if fmt == "full" else None
        account = node.account
        source = account.source
        try:
            token = self.server.tokens.get(
                ("identity", source, account.email, audience, fmt, licenses),
                lambda: source.id_token(audience, fmt, claims))
        except CredentialError as exc:
            return self.credential_failure(exc, account)
        body = token.value.encode()
        return Response(200, body, "text/html; charset=utf-8", [("ETag", short_hash(body))])

    def compute_engine_claims(self, tree, licenses):
        """The `google.compute_engine` claims of a format=full identity token (spec 10.2)."""
        instance = tree.v1.get("instance") or {}
        project = tree.v1.get("project") or {}
        claims = {
            "instance_creation_timestamp": int(self.server.settings.get(
                "instanceCreationTimestamp", self.server.started_at)),
            "instance_id": str(instance.get("id", "")),
            "instance_name": instance.get("name", ""),
            "project_id": project.get("projectId", ""),
            "project_number": project.get("numericProjectId", 0),
            "zone": str(instance.get("zone", "")).rsplit("/", 1)[-1],
        }
        if licenses:
            claims["license_id"] = [str(item.get("id")) for item in instance.get("licenses", [])
                                    if isinstance(item, dict)]
        return claims

    def credential_failure(self, exc, account):
        log.warning("token for %s failed: %s", account.email, exc)
        return Response(exc.status, "Could not get a token for %s: %s\n" % (account.email, exc),
                        "text/plain; charset=utf-8")

    # -- writes and errors ------------------------------------------------------------------

    def put_guest_attribute(self, request):
        """The guest agent's PUT of instance/guest-attributes/<namespace>/<key>."""
        prefix = "/computeMetadata/v1/instance/guest-attributes/"
        rest = request.path[len(prefix):].strip("/").split("/") \
            if request.path.startswith(prefix) else []
        if len(rest) != 2 or not all(rest):
            return Response(400, "Bad request: guest attributes are set at "
                            "instance/guest-attributes/<namespace>/<key>\n",
                            "text/html; charset=UTF-8")
        namespace, key = (urllib.parse.unquote(part) for part in rest)
        self.server.update("instance/guest-attributes/%s/%s" % (namespace, key),
                           request.body.decode("utf-8", "replace"))
        return Response(200, b"", "application/text")

    def forbidden(self, request, reason="Missing Metadata-Flavor:Google header."):
        if self.variant == "gke":
            return Response(403, 'GKE Metadata Server encountered an error: Missing required '
                            'header "Metadata-Flavor": "Google"\n', "text/plain; charset=utf-8",
                            [("X-Content-Type-Options", "nosniff")], bare=True)
        message = ("Your client does not have permission to get URL <code>%s</code> from this "
                   "server. %s" % (html_escape(request.path), reason))
        # Cloud Run's 403 carries no Metadata-Flavor header (spec 12); the VM's does (5.2).
        return Response(403, http_error_page(403, "Forbidden", message),
                        "text/html; charset=UTF-8", bare=self.variant == "serverless")

    def not_found(self, path):
        if self.variant == "gke":
            return Response(404, "Not Found\n", "text/plain; charset=utf-8")
        message = ("The requested URL <code>%s</code> was not found on this server."
                   % html_escape(path))
        return Response(404, http_error_page(404, "Not Found", message),
                        "text/html; charset=UTF-8")

    def redirect(self, request):
        # Location is built from the Host header, then the query is re-appended (spec §14.15).
        target = request.path + "/"
        location = "http://%s%s" % (request.host, target)
        if request.raw_query:
            location += "?" + request.raw_query
        return Response(301, target + "\n", "text/html", [("Location", location)])


class BadRequest(ValueError):
    """A query the metadata server refuses with 400 and this reason."""


class _GceTree:
    """A compiled GCE document: the node tree, the service accounts and the raw v1 section."""

    __slots__ = ("root", "accounts", "v1")

    def __init__(self, root, accounts, v1):
        self.root, self.accounts, self.v1 = root, accounts, v1


def _text_value(value):
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def _render_leaf_text(node):
    value = node.value
    if isinstance(value, list):
        return "".join(_text_value(item) + "\n" for item in value).encode("utf-8")
    return _text_value(value).encode("utf-8")


def _render_listing(node):
    names = sorted(node.children, key=lambda n: n.encode("utf-8"))
    return "".join(n + ("/\n" if node.children[n].is_dir else "\n") for n in names).encode()


def _render_json(node):
    return json.dumps(node.to_json(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _render_text(node):
    lines = []

    def walk(current, prefix):
        if current.kind == "leaf":
            values = current.value if isinstance(current.value, list) else [current.value]
            for value in values:
                lines.append("%s %s\n" % (prefix, _text_value(value)))
        elif current.kind == "dir":
            for name in sorted(current.children):
                walk(current.children[name], prefix + "/" + name if prefix else name)

    walk(node, "")
    return "".join(lines).encode("utf-8")


FLAVORS = {
    "gce": lambda server: GceFlavor(server, "gce"),
    "cloudrun": lambda server: GceFlavor(server, "serverless"),
    "gke": lambda server: GceFlavor(server, "gke"),
}


# ---- EC2 flavor ------------------------------------------------------------------------------


# ---- credential sources and the token cache --------------------------------------------------


class CredentialError(Exception):
    """A token could not be had; `status` is the HTTP status the endpoint answers with.

    The message names the cause and never contains a token, assertion or key.
    """

    def __init__(self, message, status=502):
        super().__init__(message)
        self.status = status


class Token:
    """A bearer credential and the epoch second it expires at."""

    __slots__ = ("value", "expiry")

    def __init__(self, value, expiry):
        self.value = value
        self.expiry = expiry

    def __repr__(self):
        return "Token(<redacted>, expiry=%d)" % self.expiry


class TokenCache:
    """One cache for every credential source, keyed by (kind, source, account, ...).

    A token is handed out unchanged until fewer than `margin` seconds remain (the real server's
    5 minutes).  Before that, once fewer than `refresh_ahead` seconds remain, the next token is
    fetched in the background and kept aside, so the swap at the 5-minute mark never waits on
    an upstream.  At most one mint per key is in flight, however many requests arrive cold.
    """

    def __init__(self, margin=300, refresh_ahead=600, clock=time.time):
        self.margin = margin
        self.refresh_ahead = refresh_ahead
        self.clock = clock
        self._tokens = {}
        self._staged = {}
        self._locks = {}
        self._failures = {}
        self._refreshing = set()
        self._guard = threading.Lock()

    def _lock(self, key):
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    def get(self, key, mint):
        token = self._tokens.get(key)
        now = self.clock()
        if token is not None and token.expiry - now >= self.margin:
            if token.expiry - now < self.refresh_ahead and key not in self._staged:
                self._refresh_in_background(key, mint)
            return token
        with self._lock(key):
            token = self._tokens.get(key)
            now = self.clock()
            if token is not None and token.expiry - now >= self.margin:
                return token
            staged = self._staged.pop(key, None)
            if staged is not None and staged.expiry - now >= self.margin:
                self._tokens[key] = staged
                return staged
            failure = self._failures.get(key)
            if failure is not None and now < failure[0]:
                return self._fallback(token, now, failure[2])
            try:
                fresh = mint()
            except CredentialError as exc:
                tries = failure[1] + 1 if failure else 1
                # Back off (1 s, 2 s, 4 s ... 30 s) so a dead upstream is not hammered.
                self._failures[key] = (now + min(30, 2 ** (tries - 1)), tries, exc)
                return self._fallback(token, now, exc)
            self._failures.pop(key, None)
            self._tokens[key] = fresh
            return fresh

    def _fallback(self, token, now, exc):
        # A cached token that still works beats an error while the upstream recovers.
        if token is not None and token.expiry - now > 60:
            return token
        raise exc

    def _refresh_in_background(self, key, mint):
        with self._guard:
            if key in self._refreshing:
                return
            self._refreshing.add(key)

        def refresh():
            try:
                fresh = mint()
                with self._lock(key):
                    self._staged[key] = fresh
            except CredentialError as exc:
                log.warning("background token refresh failed (will retry): %s", exc)
            finally:
                with self._guard:
                    self._refreshing.discard(key)

        threading.Thread(target=refresh, name="mds-refresh", daemon=True).start()


class OfflineSource:
    """Tokens minted locally, without Google: opaque access tokens and identity tokens signed by
    the server's own key (published at /oauth2/v3/certs).  Google rejects both; applications
    under test accept them.
    """

    honours_scopes = False     # as on GCE, the VM's scopes apply whatever the client asks
    lifetime = 3600

    def __init__(self, email_address, unique_id, signing_key):
        self.email = email_address
        self.unique_id = unique_id
        self.signing_key = signing_key

    def access_token(self, scopes):
        value = "ya29.mds-offline." + secrets.token_urlsafe(96)
        return Token(value, time.time() + self.lifetime)

    def id_token(self, audience, fmt="standard", compute_claims=None):
        now = int(time.time())
        claims = {"aud": audience, "azp": self.unique_id, "email": self.email,
                  "email_verified": True, "exp": now + self.lifetime, "iat": now,
                  "iss": "https://accounts.google.com", "sub": self.unique_id}
        if compute_claims is not None:
            claims["google"] = {"compute_engine": compute_claims}
        signer = self.signing_key.get()
        return Token(jwt_encode(claims, signer), now + self.lifetime)

    def describe(self):
        return "offline (locally minted tokens for %s; Google will reject them)" % self.email


class SigningKey:
    """The server's RSA key for identity tokens: loaded from a PEM file, or generated in the
    background at startup so that serving never waits for prime generation.
    """

    def __init__(self, pem_path=None):
        self._key = None
        self._error = None
        self._ready = threading.Event()
        self._pem_path = pem_path
        self._started = False
        self._guard = threading.Lock()
        if pem_path:
            try:
                with open(pem_path, "r", encoding="utf-8") as handle:
                    self._key = RsaKey.from_pem(handle.read())
            except (OSError, ValueError) as exc:
                raise ConfigError("--signing-key %s: %s" % (pem_path, exc))
            self._ready.set()

    def start(self):
        with self._guard:
            if self._started or self._ready.is_set():
                return
            self._started = True
        threading.Thread(target=self._generate, name="mds-keygen", daemon=True).start()

    def _generate(self):
        try:
            self._key = RsaKey.generate(2048)
            log.debug("identity-token signing key ready: %s", self._key.fingerprint())
        except Exception as exc:   # never leave id-token requests waiting forever
            self._error = exc
            log.exception("could not generate the signing key")
        finally:
            self._ready.set()

    def get(self, timeout=60):
        self.start()
        if not self._ready.wait(timeout):
            raise CredentialError("the signing key is still being generated", 503)
        if self._key is None:
            raise CredentialError("no signing key: %s" % self._error, 500)
        return self._key


# ---- crypto: DER, RSA, JWT, X.509, PKCS#7, SigV4 ---------------------------------------------

# Just enough DER to read RSA private keys and write SubjectPublicKeyInfo, X.509 v3
# self-signed certificates and CMS SignedData, plus RS256 (RSASSA-PKCS1-v1_5, SHA-256)
# signing with CRT and a fault check.  Hand-written so mds.py needs nothing installed.

class KeyFormatError(ValueError):
    """A key (or PEM/DER blob) we cannot use, with a message telling a human what to do.

    Messages name the kind of input found, never any of its content.
    """


# ---- DER reader / writer ----

TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_OCTET_STRING = 0x04
TAG_NULL = 0x05
TAG_OID = 0x06
TAG_UTF8_STRING = 0x0C
TAG_PRINTABLE_STRING = 0x13
TAG_UTC_TIME = 0x17
TAG_GENERALIZED_TIME = 0x18
TAG_SEQUENCE = 0x30
TAG_SET = 0x31

OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_PKCS7_DATA = "1.2.840.113549.1.7.1"
OID_PKCS7_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_COMMON_NAME = "2.5.4.3"
OID_SUBJECT_KEY_IDENTIFIER = "2.5.29.14"
OID_KEY_USAGE = "2.5.29.15"
OID_BASIC_CONSTRAINTS = "2.5.29.19"

# Key algorithms we recognise only to name them in error messages.
_FOREIGN_KEY_ALGORITHMS = (
    ("1.2.840.10045.2.1", "EC"),
    ("1.3.101.112", "Ed25519"),
    ("1.3.101.113", "Ed448"),
    ("1.3.101.110", "X25519"),
    ("1.3.101.111", "X448"),
    ("1.2.840.10040.4.1", "DSA"),
    ("1.2.840.113549.1.3.1", "DH"),
    ("1.2.840.10046.2.1", "DH (X9.42)"),
    ("1.2.156.10197.1.301", "SM2"),
)


def der_read(data, offset=0):
    """Read one TLV at `offset`; return (tag, value_bytes, next_offset).

    Only low-tag-number forms and definite lengths exist in DER, so anything else is rejected.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if offset + 2 > len(data):
        raise ValueError("DER: truncated element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("DER: high tag numbers are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise ValueError("DER: indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > len(data):
            raise ValueError("DER: bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("DER: element runs past the end of its container")
    return tag, data[pos:end], end


def der_items(data):
    """Split concatenated TLVs (e.g. a SEQUENCE's value) into a list of (tag, value)."""
    items = []
    offset = 0
    while offset < len(data):
        tag, value, offset = der_read(data, offset)
        items.append((tag, value))
    return items


def der_items_raw(data):
    """Like der_items, but (tag, value, raw_tlv_bytes): callers that re-emit an element
    verbatim (issuer Name, serial) need its exact encoding."""
    items = []
    offset = 0
    while offset < len(data):
        start = offset
        tag, value, offset = der_read(data, offset)
        items.append((tag, value, data[start:offset]))
    return items


def der_unwrap(data, expected_tag):
    """Return the value of the single TLV `data`, which must carry `expected_tag` and
    nothing after it."""
    tag, value, end = der_read(data, 0)
    if tag != expected_tag:
        raise ValueError("DER: expected tag 0x%02x, found 0x%02x" % (expected_tag, tag))
    if end != len(data):
        raise ValueError("DER: trailing data after element")
    return value


def der_decode_integer(value):
    """Two's-complement big-endian INTEGER value -> int."""
    if not value:
        raise ValueError("DER: empty INTEGER")
    return int.from_bytes(value, "big", signed=True)


def der_decode_bit_string(value):
    """BIT STRING value -> bytes; only whole-byte strings occur in the structures we read."""
    if not value or value[0] != 0:
        raise ValueError("DER: BIT STRING with unused bits")
    return value[1:]


def oid_decode(value):
    """OBJECT IDENTIFIER value bytes -> dotted string."""
    if not value or value[-1] & 0x80:
        raise ValueError("DER: malformed OID")
    arcs = []
    current = 0
    for byte in value:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    first = arcs[0]
    if first < 40:
        head = [0, first]
    elif first < 80:
        head = [1, first - 40]
    else:
        head = [2, first - 80]
    return ".".join(str(arc) for arc in head + arcs[1:])


def oid_encode(dotted):
    """Dotted string -> OBJECT IDENTIFIER value bytes (without tag and length)."""
    arcs = [int(part) for part in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError("invalid OID %r" % dotted)
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


def der_tlv(tag, value):
    """Encode one TLV with a minimal definite length."""
    length = len(value)
    if length < 0x80:
        header = bytes([tag, length])
    else:
        length_bytes = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([tag, 0x80 | len(length_bytes)]) + length_bytes
    return header + value


def der_integer(number):
    """INTEGER in minimal two's complement."""
    magnitude = number if number >= 0 else ~number
    length = magnitude.bit_length() // 8 + 1  # +1 keeps room for the sign bit
    return der_tlv(TAG_INTEGER, number.to_bytes(length, "big", signed=True))


def der_sequence(*encoded_items):
    return der_tlv(TAG_SEQUENCE, b"".join(encoded_items))


def der_set(*encoded_items):
    # DER orders the members of a SET OF by their encodings; signatures over signed
    # attributes depend on it.
    return der_tlv(TAG_SET, b"".join(sorted(encoded_items)))


def der_octet_string(value):
    return der_tlv(TAG_OCTET_STRING, bytes(value))


def der_bit_string(value):
    return der_tlv(TAG_BIT_STRING, b"\x00" + bytes(value))


def der_null():
    return b"\x05\x00"


def der_oid(dotted):
    return der_tlv(TAG_OID, oid_encode(dotted))


def der_boolean(flag):
    return b"\x01\x01\xff" if flag else b"\x01\x01\x00"


def der_utf8_string(text):
    return der_tlv(TAG_UTF8_STRING, text.encode("utf-8"))


def der_context(number, value, constructed=True):
    """Context-specific tag [number]: EXPLICIT when `value` is a full TLV and constructed,
    IMPLICIT when the caller passes the bare contents of the underlying type."""
    return der_tlv((0xA0 if constructed else 0x80) | number, value)


def _as_utc(moment):
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc).replace(microsecond=0)


def der_time(moment):
    """RFC 5280 Time: UTCTime for 1950-2049, GeneralizedTime otherwise (naive = UTC)."""
    moment = _as_utc(moment)
    if 1950 <= moment.year < 2050:
        return der_tlv(TAG_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der_tlv(TAG_GENERALIZED_TIME,
                   ("%04d" % moment.year + moment.strftime("%m%d%H%M%SZ")).encode("ascii"))


def der_algorithm(oid, null_parameters=True):
    """AlgorithmIdentifier; RSA algorithms carry an explicit NULL, SHA-2 digests omit it
    (RFC 4055 / RFC 5754)."""
    if null_parameters:
        return der_sequence(der_oid(oid), der_null())
    return der_sequence(der_oid(oid))


def der_name_common_name(common_name):
    """X.501 Name with a single CN attribute."""
    return der_sequence(der_set(der_sequence(der_oid(OID_COMMON_NAME),
                                             der_utf8_string(common_name))))


# ---- PEM and base64url ----

_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def pem_encode(label, der):
    """DER -> PEM text with 64-character lines and a trailing newline."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def _pem_text(text):
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    # Keys pasted from JSON or env vars often carry literal "\n" escapes instead of newlines.
    if "-----BEGIN" in text and "\n" not in text.strip() and "\\n" in text:
        text = text.replace("\\n", "\n")
    return text


def _pem_blocks(text):
    """Yield (label, headers_dict, der) for each PEM block in `text`."""
    for match in _PEM_BLOCK.finditer(_pem_text(text)):
        label, inner = match.group(1), match.group(2)
        headers = {}
        body_lines = []
        for line in inner.splitlines():
            line = line.strip()
            if not body_lines and ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            elif line:
                body_lines.append(line)
        yield label, headers, "".join(body_lines)


def _pem_body_to_der(label, body):
    try:
        return base64.b64decode(body, validate=True)
    except ValueError:
        raise KeyFormatError("the PEM %s block is not valid base64" % label)


def pem_decode(text, labels):
    """Return (label, der) of the first PEM block whose label is in `labels` (a string or an
    iterable of strings). Encrypted blocks and missing blocks raise KeyFormatError."""
    if isinstance(labels, str):
        labels = (labels,)
    found = []
    for label, headers, body in _pem_blocks(text):
        found.append(label)
        if label not in labels:
            continue
        if "ENCRYPTED" in headers.get("proc-type", "").upper():
            raise KeyFormatError(
                "encrypted PEM (Proc-Type: 4,ENCRYPTED) is not supported: decrypt it first "
                "with `openssl pkey -in key.pem -out plain.pem`")
        return label, _pem_body_to_der(label, body)
    if not found:
        raise KeyFormatError("no PEM block found (expected -----BEGIN %s-----)" % labels[0])
    raise KeyFormatError("no PEM block labelled %s found (found: %s)"
                         % (" or ".join(labels), ", ".join(found)))


def b64url_encode(data):
    """base64url without padding (JWS / JWK style)."""
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """base64url, padding optional."""
    if isinstance(text, str):
        text = text.encode("ascii")
    text = text.strip()
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


# ---- RSA ----

# DigestInfo prefix for SHA-256 (RFC 8017 section 9.2 note 1).
_SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def _small_primes(limit):
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
    return tuple(i for i, flag in enumerate(sieve) if flag)


_SMALL_PRIMES = _small_primes(2000)
# One gcd against the product replaces ~300 trial divisions per candidate.
_SMALL_PRIMES_PRODUCT = math.prod(_SMALL_PRIMES)


def _miller_rabin_rounds(bits):
    # For random candidates FIPS 186 asks for fewer rounds than these; extra rounds only cost
    # time on the one candidate that is prime (composites fail the first round).
    if bits >= 1024:
        return 12
    if bits >= 512:
        return 16
    return 40


def _is_probable_prime(candidate, rounds):
    if candidate < 2:
        return False
    for prime in _SMALL_PRIMES:
        if candidate % prime == 0:
            return candidate == prime
    odd_part = candidate - 1
    twos = 0
    while not odd_part & 1:
        odd_part >>= 1
        twos += 1
    for _ in range(rounds):
        base = 2 + secrets.randbelow(candidate - 3)
        x = pow(base, odd_part, candidate)
        if x == 1 or x == candidate - 1:
            continue
        for _ in range(twos - 1):
            x = x * x % candidate
            if x == candidate - 1:
                break
        else:
            return False
    return True


def _random_prime(bits, public_exponent):
    """Random prime with its top two bits set (so two of them multiply to exactly 2*bits or
    2*bits-1 bits as planned by the caller) and p-1 coprime to e."""
    top_bits = 3 << (bits - 2)
    rounds = _miller_rabin_rounds(bits)
    while True:
        candidate = secrets.randbits(bits) | top_bits | 1
        if math.gcd(candidate, _SMALL_PRIMES_PRODUCT) != 1:
            continue
        if math.gcd(candidate - 1, public_exponent) != 1:
            continue
        if _is_probable_prime(candidate, rounds):
            return candidate


def _int_to_bytes(number, length=None):
    if length is None:
        length = max(1, (number.bit_length() + 7) // 8)
    return number.to_bytes(length, "big")


def _emsa_pkcs1_v15_sha256(message, length):
    """EMSA-PKCS1-v1_5 encoding (RFC 8017 9.2) of SHA-256(message) into `length` bytes."""
    digest_info = _SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(message).digest()
    padding = length - len(digest_info) - 3
    if padding < 8:
        raise ValueError("RSA modulus too short for a SHA-256 PKCS#1 v1.5 signature")
    return b"\x00\x01" + b"\xff" * padding + b"\x00" + digest_info


def rsa_public_key_der(n, e):
    """PKCS#1 RSAPublicKey DER."""
    return der_sequence(der_integer(n), der_integer(e))


def rsa_subject_public_key_info(n, e):
    """SubjectPublicKeyInfo DER (what `openssl pkey -pubout -outform DER` prints)."""
    return der_sequence(der_algorithm(OID_RSA_ENCRYPTION), der_bit_string(rsa_public_key_der(n, e)))


def rsa_verify(n, e, message, signature):
    """True when `signature` is a valid RSASSA-PKCS1-v1_5 SHA-256 signature of `message`."""
    length = (n.bit_length() + 7) // 8
    if len(signature) != length:
        return False
    number = int.from_bytes(signature, "big")
    if number >= n:
        return False
    try:
        expected = _emsa_pkcs1_v15_sha256(message, length)
    except ValueError:
        return False
    return hmac.compare_digest(_int_to_bytes(pow(number, e, n), length), expected)


def _parse_rsa_private_key(der):
    """PKCS#1 RSAPrivateKey DER -> dict of the eight numbers."""
    try:
        fields = der_items(der_unwrap(der, TAG_SEQUENCE))
    except ValueError as exc:
        raise KeyFormatError("malformed RSA private key (%s)" % exc)
    if len(fields) < 9 or any(tag != TAG_INTEGER for tag, _ in fields[:9]):
        raise KeyFormatError("malformed RSA private key (expected nine INTEGERs)")
    numbers = [der_decode_integer(value) for _, value in fields[:9]]
    if numbers[0] != 0 or len(fields) > 9:
        raise KeyFormatError("multi-prime RSA keys are not supported")
    if any(number <= 0 for number in numbers[1:]):
        raise KeyFormatError("malformed RSA private key (non-positive component)")
    names = ("n", "e", "d", "p", "q", "dp", "dq", "qinv")
    return dict(zip(names, numbers[1:]))


def _foreign_key_message(name):
    return "not an RSA key (found %s): an RSA private key is needed for RS256" % name


def _unwrap_private_key_der(der):
    """PKCS#8 PrivateKeyInfo or PKCS#1 RSAPrivateKey DER -> PKCS#1 RSAPrivateKey DER,
    diagnosing encrypted and non-RSA keys."""
    try:
        fields = der_items(der_unwrap(der, TAG_SEQUENCE))
    except ValueError as exc:
        raise KeyFormatError("not a DER private key (%s)" % exc)
    if len(fields) >= 2 and fields[0][0] == TAG_SEQUENCE and fields[1][0] == TAG_OCTET_STRING:
        raise KeyFormatError(
            "encrypted private keys are not supported: decrypt it first with "
            "`openssl pkcs8 -in key.pem -out plain.pem`")
    if len(fields) >= 3 and fields[0][0] == TAG_INTEGER and fields[1][0] == TAG_SEQUENCE:
        # PKCS#8 PrivateKeyInfo: version, AlgorithmIdentifier, OCTET STRING privateKey, ...
        try:
            algorithm = der_items(fields[1][1])
            oid = oid_decode(algorithm[0][1]) if algorithm and algorithm[0][0] == TAG_OID else "?"
        except ValueError:
            oid = "?"
        # RSASSA-PSS keys hold the same numbers; signing PKCS#1 v1.5 with them is what a
        # caller asking for RS256 wants, so they are accepted.
        if oid not in (OID_RSA_ENCRYPTION, OID_RSASSA_PSS):
            name = dict(_FOREIGN_KEY_ALGORITHMS).get(oid, "key algorithm OID %s" % oid)
            raise KeyFormatError(_foreign_key_message(name))
        if fields[2][0] != TAG_OCTET_STRING:
            raise KeyFormatError("malformed PKCS#8 private key")
        return fields[2][1]
    if (len(fields) >= 2 and fields[0][0] == TAG_INTEGER and fields[1][0] == TAG_OCTET_STRING):
        # RFC 5915 ECPrivateKey: version 1, OCTET STRING privateKey, [0] curve, [1] public
        raise KeyFormatError(_foreign_key_message("EC"))
    if len(fields) == 6 and all(tag == TAG_INTEGER for tag, _ in fields):
        raise KeyFormatError(_foreign_key_message("DSA"))
    return der


class RsaKey:
    """An RSA private key that signs RS256 (RSASSA-PKCS1-v1_5 with SHA-256).

    Implements the signer protocol (sign, public_numbers, key_id). `key_id` is a plain
    attribute: it defaults to the first 40 hex digits of SHA-256 over the public key's
    SubjectPublicKeyInfo and callers may overwrite it (e.g. with a Google key file's
    private_key_id). Private numbers are never shown by repr() or fingerprint().
    """

    def __init__(self, n, e, d, p, q, dp=None, dq=None, qinv=None, key_id=None):
        if p * q != n:
            raise KeyFormatError("inconsistent RSA key: p * q != n")
        if e < 3 or not e & 1 or e >= n:
            raise KeyFormatError("inconsistent RSA key: bad public exponent")
        if n.bit_length() < 512:
            raise KeyFormatError("RSA modulus of %d bits is too short to sign with SHA-256"
                                 % n.bit_length())
        self._n, self._e, self._d, self._p, self._q = n, e, d, p, q
        self._dp = d % (p - 1) if dp is None else dp
        self._dq = d % (q - 1) if dq is None else dq
        self._qinv = pow(q, -1, p) if qinv is None else qinv
        self._length = (n.bit_length() + 7) // 8
        self.key_id = key_id or self.fingerprint()[:40]

    # -- loading / generation --

    @classmethod
    def from_der(cls, der):
        """Load PKCS#8 PrivateKeyInfo or PKCS#1 RSAPrivateKey DER."""
        numbers = _parse_rsa_private_key(_unwrap_private_key_der(bytes(der)))
        key = cls(**numbers)
        # One signature through CRT and back catches keys whose parts do not belong
        # together before they produce a bad token at request time.
        probe = b"mds key self-test"
        if rsa_verify(key._n, key._e, probe, key._sign_crt(probe)):
            return key
        if rsa_verify(key._n, key._e, probe, key._sign_plain(probe)):
            # d is right but the stored CRT values are not: derive them from d instead.
            del numbers["dp"], numbers["dq"], numbers["qinv"]
            return cls(**numbers)
        raise KeyFormatError("inconsistent RSA key: its private and public parts do not match")

    @classmethod
    def from_pem(cls, text):
        """Load the first private key in PEM text (str or bytes): PKCS#8 `PRIVATE KEY` or
        PKCS#1 `RSA PRIVATE KEY`. Encrypted and non-RSA keys raise KeyFormatError."""
        text = _pem_text(text)
        labels = []
        for label, headers, body in _pem_blocks(text):
            labels.append(label)
            if label == "ENCRYPTED PRIVATE KEY":
                raise KeyFormatError(
                    "encrypted private keys are not supported: decrypt it first with "
                    "`openssl pkcs8 -in key.pem -out plain.pem`")
            if "ENCRYPTED" in headers.get("proc-type", "").upper():
                raise KeyFormatError(
                    "encrypted private keys are not supported (PEM Proc-Type: 4,ENCRYPTED): "
                    "decrypt it first with `openssl pkey -in key.pem -out plain.pem`")
            if label in ("PRIVATE KEY", "RSA PRIVATE KEY"):
                return cls.from_der(_pem_body_to_der(label, body))
            if label == "EC PRIVATE KEY":
                raise KeyFormatError(_foreign_key_message("EC"))
            if label == "DSA PRIVATE KEY":
                raise KeyFormatError(_foreign_key_message("DSA"))
            if label == "OPENSSH PRIVATE KEY":
                raise KeyFormatError(
                    "OpenSSH-format private keys are not supported: convert a copy with "
                    "`ssh-keygen -p -m PKCS8 -f key` (rewrites the file in place)")
        if labels:
            raise KeyFormatError("no private key in the PEM text (found: %s)" % ", ".join(labels))
        if '"private_key"' in text:
            raise KeyFormatError("no PEM block found: this looks like a JSON key file; "
                                 "pass its private_key field")
        raise KeyFormatError("no PEM block found (expected -----BEGIN PRIVATE KEY-----)")

    @classmethod
    def generate(cls, bits=2048, public_exponent=65537):
        """New random key whose modulus has exactly `bits` bits (pure Python; about a
        second for 2048 bits)."""
        if bits < 1024:
            raise ValueError("refusing to generate an RSA key shorter than 1024 bits")
        p_bits = (bits + 1) // 2
        q_bits = bits - p_bits
        while True:
            p = _random_prime(p_bits, public_exponent)
            q = _random_prime(q_bits, public_exponent)
            # FIPS 186-4 B.3.3: p and q must differ somewhere in their top 100 bits.
            if abs(p - q) <= 1 << (bits // 2 - 100):
                continue
            n = p * q
            if n.bit_length() != bits:
                continue
            lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
            d = pow(public_exponent, -1, lam)
            if d.bit_length() <= bits // 2:
                continue
            return cls(n, public_exponent, d, p, q)

    # -- signer protocol --

    def public_numbers(self):
        return self._n, self._e

    @property
    def bits(self):
        return self._n.bit_length()

    def _sign_plain(self, message):
        encoded = int.from_bytes(_emsa_pkcs1_v15_sha256(message, self._length), "big")
        return _int_to_bytes(pow(encoded, self._d, self._n), self._length)

    def _sign_crt(self, message):
        n = self._n
        encoded = int.from_bytes(_emsa_pkcs1_v15_sha256(message, self._length), "big")
        # Base blinding keeps the exponentiation timing independent of the message.
        while True:
            blind = secrets.randbelow(n - 2) + 2
            if math.gcd(blind, n) == 1:
                break
        blinded = encoded * pow(blind, self._e, n) % n
        s1 = pow(blinded, self._dp, self._p)
        s2 = pow(blinded, self._dq, self._q)
        h = self._qinv * (s1 - s2) % self._p
        signature = (s2 + h * self._q) * pow(blind, -1, n) % n
        return _int_to_bytes(signature, self._length)

    def sign(self, message):
        """RSASSA-PKCS1-v1_5 SHA-256 signature of `message`, modulus-length bytes.

        Computed with CRT, then checked with the public key: a CRT fault would otherwise
        publish a signature from which the key can be factored (Boneh-DeMillo-Lipton). On a
        mismatch fall back to the plain exponent; if that fails too, raise.
        """
        message = bytes(message)
        signature = self._sign_crt(message)
        if rsa_verify(self._n, self._e, message, signature):
            return signature
        signature = self._sign_plain(message)
        if rsa_verify(self._n, self._e, message, signature):
            return signature
        raise RuntimeError("RSA signature failed its self-check; the in-memory key is corrupt")

    # -- export --

    def _pkcs1_der(self):
        return der_sequence(*(der_integer(value) for value in (
            0, self._n, self._e, self._d, self._p, self._q, self._dp, self._dq, self._qinv)))

    def to_der(self):
        """PKCS#8 PrivateKeyInfo DER."""
        return der_sequence(der_integer(0), der_algorithm(OID_RSA_ENCRYPTION),
                            der_octet_string(self._pkcs1_der()))

    def to_pem(self):
        """PKCS#8 `PRIVATE KEY` PEM (private material: never log it)."""
        return pem_encode("PRIVATE KEY", self.to_der())

    def public_der(self):
        """SubjectPublicKeyInfo DER."""
        return rsa_subject_public_key_info(self._n, self._e)

    def public_pem(self):
        return pem_encode("PUBLIC KEY", self.public_der())

    def fingerprint(self):
        """Hex SHA-256 of the SubjectPublicKeyInfo DER; equals
        `openssl pkey -pubout -outform DER | sha256sum`. Safe to log."""
        return hashlib.sha256(self.public_der()).hexdigest()

    def jwk(self):
        return {
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.key_id,
            "n": b64url_encode(_int_to_bytes(self._n)),
            "e": b64url_encode(_int_to_bytes(self._e)),
        }

    def __repr__(self):
        return "RsaKey(bits=%d, key_id=%r)" % (self.bits, self.key_id)


# ---- JWT ----

def _json_compact(value):
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def jwt_encode(claims, signer, header=None):
    """Compact RS256 JWS of `claims` signed by any signer. Header fields in `header` are
    merged over the default {"alg": "RS256", "kid": signer.key_id, "typ": "JWT"}."""
    full_header = {"alg": "RS256"}
    key_id = getattr(signer, "key_id", None)
    if key_id:
        full_header["kid"] = key_id
    full_header["typ"] = "JWT"
    if header:
        full_header.update(header)
    signing_input = (b64url_encode(_json_compact(full_header)) + "."
                     + b64url_encode(_json_compact(claims)))
    signature = signer.sign(signing_input.encode("ascii"))
    return signing_input + "." + b64url_encode(signature)


def jwt_decode_unverified(token):
    """(header, claims) of a compact JWS without checking its signature."""
    if isinstance(token, bytes):
        token = token.decode("ascii")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT: expected three dot-separated segments")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a JWT: header or payload is not base64url JSON")
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("not a JWT: header and payload must be JSON objects")
    return header, claims


# ---- X.509 ----

def _add_years(moment, years):
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year + years, day=28)


def x509_self_signed(signer, common_name, not_before=None, not_after=None, serial=None):
    """DER X.509 v3 certificate for the signer's public key, self-signed with
    sha256WithRSAEncryption; subject = issuer = CN=common_name. Naive datetimes are UTC."""
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = _as_utc(not_before) if not_before else _as_utc(now - datetime.timedelta(hours=1))
    not_after = _as_utc(not_after) if not_after else _as_utc(_add_years(now, 10))
    if serial is None:
        # RFC 5280: positive, at most 20 octets; 159 random bits always fit.
        serial = secrets.randbits(159) | 1
    if serial <= 0:
        raise ValueError("certificate serial must be positive")
    n, e = signer.public_numbers()
    public_key = rsa_public_key_der(n, e)
    name = der_name_common_name(common_name)
    extensions = der_sequence(
        der_sequence(der_oid(OID_BASIC_CONSTRAINTS), der_boolean(True),
                     der_octet_string(der_sequence())),  # cA defaults to FALSE
        der_sequence(der_oid(OID_KEY_USAGE), der_boolean(True),
                     der_octet_string(der_tlv(TAG_BIT_STRING, b"\x07\x80"))),  # digitalSignature
        der_sequence(der_oid(OID_SUBJECT_KEY_IDENTIFIER),
                     der_octet_string(der_octet_string(hashlib.sha1(public_key).digest()))),
    )
    signature_algorithm = der_algorithm(OID_SHA256_WITH_RSA)
    tbs = der_sequence(
        der_context(0, der_integer(2)),  # v3
        der_integer(serial),
        signature_algorithm,
        name,
        der_sequence(der_time(not_before), der_time(not_after)),
        name,
        rsa_subject_public_key_info(n, e),
        der_context(3, extensions),
    )
    return der_sequence(tbs, signature_algorithm, der_bit_string(signer.sign(tbs)))


def _certificate_issuer_and_serial(cert_der):
    """Raw (issuer Name TLV, serial INTEGER TLV) of a DER certificate."""
    try:
        certificate = der_items(der_unwrap(cert_der, TAG_SEQUENCE))
        tbs = der_items_raw(certificate[0][1])
        index = 1 if tbs[0][0] == 0xA0 else 0  # optional [0] version
        serial, issuer = tbs[index], tbs[index + 2]
    except (ValueError, IndexError) as exc:
        raise ValueError("malformed certificate DER (%s)" % exc)
    if serial[0] != TAG_INTEGER or issuer[0] != TAG_SEQUENCE:
        raise ValueError("malformed certificate DER")
    return issuer[2], serial[2]


# ---- PKCS#7 / CMS ----

def pkcs7_signed_data(content, signer, cert_der, signing_time=None, include_certificate=True):
    """DER CMS SignedData (RFC 5652) with the content attached, as in EC2's
    instance-identity/rsa2048: SHA-256, rsaEncryption, signer identified by issuer and
    serial of `cert_der`, signed attributes contentType, messageDigest and signingTime.

    AWS documents verifying rsa2048 with `-certfile` (their cert), which works whether or not
    the certificate is embedded; embedding it (the default) also lets `-noverify` users skip
    the extra file.
    """
    content = bytes(content)
    issuer, serial = _certificate_issuer_and_serial(bytes(cert_der))
    signing_time = _as_utc(signing_time or datetime.datetime.now(datetime.timezone.utc))
    attributes = [
        der_sequence(der_oid(OID_CONTENT_TYPE), der_set(der_oid(OID_PKCS7_DATA))),
        der_sequence(der_oid(OID_SIGNING_TIME), der_set(der_time(signing_time))),
        der_sequence(der_oid(OID_MESSAGE_DIGEST),
                     der_set(der_octet_string(hashlib.sha256(content).digest()))),
    ]
    # The signature covers the attributes encoded as a SET OF (tag 0x31); in the
    # SignerInfo the same bytes appear under the IMPLICIT [0] tag.
    signed_attributes = der_set(*attributes)
    signature = signer.sign(signed_attributes)
    digest_algorithm = der_algorithm(OID_SHA256, null_parameters=False)
    signer_info = der_sequence(
        der_integer(1),
        der_sequence(issuer, serial),
        digest_algorithm,
        b"\xa0" + signed_attributes[1:],
        der_algorithm(OID_RSA_ENCRYPTION),
        der_octet_string(signature),
    )
    parts = [
        der_integer(1),
        der_set(digest_algorithm),
        der_sequence(der_oid(OID_PKCS7_DATA), der_context(0, der_octet_string(content))),
    ]
    if include_certificate:
        parts.append(der_context(0, bytes(cert_der)))  # [0] IMPLICIT CertificateSet
    parts.append(der_set(signer_info))
    return der_sequence(der_oid(OID_PKCS7_SIGNED_DATA), der_context(0, der_sequence(*parts)))


# ---- the server ------------------------------------------------------------------------------


class MetadataServer:
    """One emulated metadata server: document, flavor, credentials, token cache and listener.

    Usable as a context manager; several can run in one process (tests do).
    """

    def __init__(self, config=None, host="127.0.0.1", port=0, flavor="gce", signing_key=None,
                 poll_interval=1.0, credentials=None, options=None):
        if flavor not in FLAVORS:
            raise ConfigError("unknown flavor %r (choose from %s)" % (flavor, ", ".join(FLAVORS)))
        self.host = host
        self.requested_port = port
        self.options = dict(options or {})
        self.credentials = credentials          # spec for the primary account, from the CLI
        self.config_path = None
        self.poll_interval = poll_interval
        self.started_at = int(time.time())
        self.stopping = False
        self.tokens = TokenCache()
        self.signing_key = SigningKey(signing_key)
        self._sources = {}
        self._sources_guard = threading.Lock()
        self._httpd = None
        self._threads = []
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._config_stamp = None
        self._date_cache = (0, "")
        self._common_lines = None
        self.flavor = FLAVORS[flavor](self)
        if isinstance(config, dict):
            document = config
        elif config:
            self.config_path = os.fspath(config)
            document = self._read_config()
        else:
            document = self.flavor.default_document()
        self.settings = document.get("mds") or {} if isinstance(document, dict) else {}
        self.store = MetadataStore(document, self.flavor.compile)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self):
        family_server = _HTTPServer6 if ":" in self.host else _HTTPServer
        # Thousands of hanging GETs each hold a thread; a small stack lets them fit.  This is a
        # process-wide setting and only affects threads created from now on.
        if threading.stack_size() == 0:
            threading.stack_size(512 * 1024)
        self._httpd = family_server((self.host, self.requested_port), self)
        self._spawn(self._httpd.serve_forever, "mds-http", 0.05)
        if self.config_path:
            self._spawn(self._watch_config, "mds-config-watch")
        self.signing_key.start()
        return self

    def _spawn(self, target, name, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self):
        self.stopping = True
        self._stop.set()
        self._reload_requested.set()
        self.store.wake()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._httpd.server_address[1] if self._httpd else self.requested_port

    @property
    def authority(self):
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, self.port)

    @property
    def url(self):
        return "http://" + self.authority

    @property
    def env(self):
        """The environment variables that point client libraries at this server."""
        if hasattr(self.flavor, "client_env"):
            return self.flavor.client_env()
        return {"GCE_METADATA_HOST": self.authority, "GCE_METADATA_IP": self.authority,
                "GCE_METADATA_ROOT": self.authority}

    def common_header_lines(self):
        lines = self._common_lines
        if lines is None:
            lines = self._common_lines = ["%s: %s" % h for h in self.flavor.common_headers]
        return lines

    def http_date(self):
        now = int(time.time())
        cached = self._date_cache
        if cached[0] != now:
            cached = self._date_cache = (now, email.utils.formatdate(now, usegmt=True))
        return cached[1]

    # -- the document -----------------------------------------------------------------------

    def update(self, path, value):
        """Set the value at a URL path (e.g. "instance/attributes/foo"); wakes waiters."""
        self.store.edit(self.flavor.document_keys(path), value)

    def delete(self, path):
        self.store.edit(self.flavor.document_keys(path), delete=True)

    def reload(self):
        """Re-read the config file; a bad file is logged and the last good tree keeps serving."""
        if not self.config_path:
            return False
        try:
            document = self._read_config()
            self.store.replace(document)
        except ConfigError as exc:
            log.error("config reload failed, still serving the previous tree: %s", exc)
            return False
        self.settings = document.get("mds") or {}
        log.info("reloaded %s", self.config_path)
        return True

    def request_reload(self):
        """Ask the watcher thread to reload now (safe to call from a signal handler)."""
        self._config_stamp = None
        self._reload_requested.set()

    def _read_config(self):
        try:
            with open(self.config_path, "rb") as handle:
                self._config_stamp = self._stamp()
                document = json.loads(handle.read().decode("utf-8"))
        except OSError as exc:
            raise ConfigError("cannot read %s: %s" % (self.config_path, exc.strerror or exc))
        except ValueError as exc:
            raise ConfigError("%s is not valid JSON: %s" % (self.config_path, exc))
        if not isinstance(document, dict):
            raise ConfigError("%s must hold a JSON object" % self.config_path)
        return document

    def _stamp(self):
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _watch_config(self):
        # Polling the mtime needs no third-party watcher and notices an edit within a second.
        while not self._stop.is_set():
            self._reload_requested.wait(self.poll_interval)
            self._reload_requested.clear()
            if self._stop.is_set():
                return
            stamp = self._stamp()
            if stamp is not None and stamp != self._config_stamp:
                self._config_stamp = stamp
                self.reload()

    # -- credentials ------------------------------------------------------------------------

    def source_for(self, email_address, spec=None):
        """The credential source of an account, reused across reloads while its spec holds."""
        spec = spec or (self.credentials if self.credentials and
                        self.credentials.get("account") in (None, email_address) else None)
        key = (email_address, canonical_json(spec) if spec else None)
        with self._sources_guard:
            source = self._sources.get(key)
            if source is None:
                source = self._sources[key] = self._build_source(email_address, spec)
            return source

    def _build_source(self, email_address, spec):
        if not spec or spec.get("type") in (None, "offline"):
            return OfflineSource(email_address, unique_id_for(email_address), self.signing_key)
        raise ConfigError("unknown credential source type %r" % spec.get("type"))

    def describe_sources(self):
        tree = self.store.tree
        accounts = getattr(tree, "accounts", None) or {}
        return ["%s: %s" % (name, account.source.describe())
                for name, account in accounts.items() if name != "default"]

    def certs_response(self, path):
        """The public half of the identity-token key, so applications can verify our tokens."""
        try:
            key = self.signing_key.get()
        except CredentialError as exc:
            return Response(exc.status, "%s\n" % exc, "text/plain; charset=utf-8")
        if path == "/oauth2/v3/certs":
            payload = {"keys": [key.jwk()]}
        else:
            payload = {key.key_id: pem_encode("CERTIFICATE", self.signing_certificate(key))}
        return Response(200, json.dumps(payload, indent=2), "application/json; charset=UTF-8",
                        [("Cache-Control", "public, max-age=3600")])

    def signing_certificate(self, key):
        cert = getattr(self, "_certificate", None)
        if cert is None or cert[0] is not key:
            cert = self._certificate = (key, x509_self_signed(key, "mds identity token signer"))
        return cert[1]


# ---- CLI -------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mds",
        description="A cloud metadata server emulator (GCE, Cloud Run, GKE, EC2) in one file.",
        epilog="With no options it serves a plausible GCE VM on 127.0.0.1:8080 with offline "
               "tokens. Edit the config file while it runs, or send SIGHUP, to reload.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; :: or ::1 for IPv6)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080;"
                        " 0 picks a free one)")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON document to serve (see config.example.json); polled for "
                             "changes every second")
    parser.add_argument("--flavor", default="gce", choices=sorted(FLAVORS),
                        help="which metadata server to be (default gce)")
    parser.add_argument("--signing-key", metavar="PEM",
                        help="RSA private key (PEM) that signs offline identity tokens; default:"
                             " a key generated at startup")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="logging verbosity (debug logs every request)")
    parser.add_argument("--version", action="version", version="mds " + __version__)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s mds %(levelname)s %(message)s")
    try:
        server = MetadataServer(config=args.config, host=args.host, port=args.port,
                                flavor=args.flavor, signing_key=args.signing_key)
        server.start()
    except (ConfigError, OSError) as exc:
        parser.exit(2, "mds: error: %s\n" % exc)
    log.info("serving the %s metadata server at %s (config: %s)", args.flavor, server.url,
             server.config_path or "built-in default")
    for line in server.describe_sources():
        log.info("credentials %s", line)
    if any(isinstance(a.source, OfflineSource)
           for a in (getattr(server.store.tree, "accounts", None) or {}).values() if a):
        log.warning("OFFLINE MODE: tokens are minted locally and Google will reject them; "
                    "identity tokens verify against %s/oauth2/v3/certs", server.url)
    for name, value in server.env.items():
        log.info("export %s=%s", name, value)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    while not stop.wait(3600):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
