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
import collections
import copy
import datetime
import email.parser
import email.utils
import errno
import hashlib
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import types
import urllib.parse
import warnings

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

    __slots__ = ("name", "json_key", "kind", "value", "children", "indexed", "json_default",
                 "etag", "account", "_rendered")

    def __init__(self, name, json_key, kind, value=None, children=None, indexed=False,
                 json_default=False, account=None):
        self.name = name                  # URL spelling
        self.json_key = json_key          # recursive-JSON spelling
        self.kind = kind                  # "dir" | "leaf" | a computed kind such as "token"
        self.value = value
        self.children = children if children is not None else {}
        self.indexed = indexed            # a list served as 0/, 1/, ...
        self.json_default = json_default  # served as JSON without alt=json (instance/tags)
        self.account = account
        self.etag = ""
        self._rendered = {}

    @property
    def is_dir(self):
        return self.kind == "dir"

    def finish(self):
        """Compute the ETag: a content hash, so it changes exactly when the content does."""
        if self.kind == "dir":
            # The JSON spelling and list-ness are content too: the recursive JSON shows them.
            parts = ["%s:%s=%s" % (n, c.json_key, c.etag) for n, c in sorted(self.children.items())]
            self.etag = short_hash((("list:" if self.indexed else "dir:")
                                    + ";".join(parts)).encode())
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
        node = node.children.get(segment)
        if node is None:
            return None
    return node


# Deeper documents are refused (see _check_depth); real metadata is a few levels deep, and
# custom values a few more.
MAX_DOCUMENT_DEPTH = 100


def url_segments(path):
    """The segments of a path given to update() or delete(): "a/b/c", or a sequence of
    segments when one holds a "/" (an EC2 client network, "10.0.0.0/8")."""
    if isinstance(path, (list, tuple)):
        return [str(segment) for segment in path]
    return [segment for segment in path.strip("/").split("/") if segment]


def _value_at(document, keys):
    """The value at a key path in a document; KeyError (or IndexError) when absent."""
    value = document
    for key in keys:
        value = value[_list_index(key, value)] if isinstance(value, list) else value[key]
    return value


def _list_index(key, items, allow_append=False):
    """A path segment as an index into `items` (an existing element, or the next one)."""
    index = int(key) if isinstance(key, int) or re.fullmatch(r"[0-9]+", str(key)) else -1
    if not 0 <= index < len(items) + (1 if allow_append else 0):
        raise ConfigError("no list element %r (the list has %d)" % (key, len(items)))
    return index


class _Watch:
    """A change-waiter's question, asked of every tree published while it waits."""

    __slots__ = ("changed_in", "found")

    def __init__(self, changed_in):
        self.changed_in = changed_in    # tree -> None, or a 1-tuple of what changed
        self.found = None


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
        self._watches = set()

    def replace(self, document):
        # Compiled under the lock, so trees are published in the order they were compiled:
        # compiling can start and stop resources (EC2 role providers) the tree refers to.
        with self.changed:
            tree = self._compile(document)
            self.document, self.tree = document, tree
            self.generation += 1
            # Each waiter keeps the first tree that changed its node, however many follow
            # before it runs: a value changed and changed back at once is still a change.
            for watch in self._watches:
                if watch.found is None:
                    watch.found = watch.changed_in(tree)
            self.changed.notify_all()

    def watch(self, changed_in):
        """Register a waiter (call with `changed` held); `unwatch` it when done."""
        watch = _Watch(changed_in)
        self._watches.add(watch)
        return watch

    def unwatch(self, watch):
        self._watches.discard(watch)

    def edit(self, keys, value=None, delete=False):
        """Set (or delete) the value at a document key path and publish the new tree."""
        with self.changed:
            document = copy.deepcopy(self.document)
            parent = document
            keys = list(keys)
            for i, key in enumerate(keys[:-1]):
                following = keys[i + 1]
                if isinstance(parent, list):
                    parent = parent[_list_index(key, parent)]
                    continue
                if key not in parent or not isinstance(parent[key], (dict, list)):
                    if delete:
                        raise KeyError("/".join(map(str, keys)))
                    parent[key] = [] if isinstance(following, int) else {}
                parent = parent[key]
            last = keys[-1]
            if isinstance(parent, list):
                last = _list_index(last, parent, allow_append=not delete)
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


# Timed events (GCE preemption and maintenance, EC2 spot and scheduled events) are configured as
# {"after": seconds or "2m" since startup} or {"at": epoch or ISO time}.


def parse_duration(text):
    """Seconds from "90", "90s", "2m", "1h", "1h30m" (CLI delays)."""
    text = str(text).strip().lower()
    if re.match(r"^\d+(\.\d+)?$", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError("not a duration: %r (use e.g. 90, 90s, 2m, 1h30m)" % text)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def duration_argument(text):
    """parse_duration for argparse, whose error then quotes the reason."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _seconds(value):
    """Seconds from a number or a duration ("90s", "2m"); ValueError or TypeError if neither."""
    if isinstance(value, bool):
        raise TypeError("not a number of seconds")
    return parse_duration(value) if isinstance(value, str) else float(value)


def _event_time(spec, started_at, where):
    """Absolute epoch of an event from {"after": seconds since startup} or {"at": time};
    `where` names the setting in errors ("mds.ec2.events.spot")."""
    if "at" in spec and spec["at"] is not None:
        at = spec["at"]
        if isinstance(at, (int, float)) and not isinstance(at, bool):
            return _checked_moment(float(at), where + ".at")
        try:
            return parse_imds_time(str(at))
        except ValueError:
            raise ConfigError("%s.at must be epoch seconds or an ISO time" % where)
    return _checked_moment(started_at + _event_seconds(spec, "after", 0, where), where)


def _moved_by_flag(given, seconds):
    """An event's settings with its time taken from a command-line flag ("--preempt-after
    5s"): the flag wins over the config's "after" and "at"; of a list of windows it moves the
    first and keeps the others."""
    if isinstance(given, list) and given and isinstance(given[0], dict):
        return [dict(given[0], after=seconds, at=None)] + given[1:]
    return dict(given if isinstance(given, dict) else {}, after=seconds, at=None)


def _event_seconds(spec, field, default, where):
    """A length of time in an event's settings; `where` names the event ("mds.events.x")."""
    try:
        return _seconds(spec.get(field, default))
    except (TypeError, ValueError):
        raise ConfigError("%s.%s must be seconds or a duration" % (where, field))


def _checked_moment(moment, where):
    if not 0 <= moment <= 253402300799:      # 1970 to 9999: what a timestamp can print
        raise ConfigError("%s is out of range (1970 to 9999)" % where)
    return moment


# ---- HTTP handling ---------------------------------------------------------------------------


class Request:
    """One HTTP request as a flavor sees it."""

    __slots__ = ("method", "path", "raw_query", "query", "headers", "client_ip", "host", "body",
                 "_socket", "_pending")

    def __init__(self, method, path, raw_query, headers, client_ip, host, body=b"", sock=None,
                 pending=None):
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
        self._pending = pending         # -> whether requests the client sent wait unread

    def client_gone(self):
        """True once the client has closed its side (so a hanging GET can give up), unless
        it sent more requests first: those still want their answers."""
        sock = self._socket
        if sock is None:
            return False
        try:
            if hasattr(select, "poll"):      # select() cannot watch descriptors above 1023
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if not poller.poll(0):
                    return False
            elif not select.select([sock], [], [], 0)[0]:
                return False
            if sock.recv(1, socket.MSG_PEEK) != b"":
                return False
            return self._pending is None or not self._pending()
        except (BlockingIOError, ValueError):
            return False
        except OSError:
            return True


class ClientGone(Exception):
    """Raised by a flavor whose client hung up while it waited: the connection just ends."""


class Response:
    """Status, body and headers a flavor hands back to the HTTP layer."""

    __slots__ = ("status", "body", "content_type", "headers", "bare", "reason", "close")

    def __init__(self, status, body=b"", content_type=None, headers=(), bare=False, reason=None,
                 close=False):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = list(headers)
        self.bare = bare            # True: leave out the flavor's common headers
        self.reason = reason        # None: the standard reason phrase
        self.close = close          # True: the real server hangs up after this answer


_REASONS = types.MappingProxyType({s.value: s.phrase for s in http.HTTPStatus})


class _DeadlineReader(io.RawIOBase):
    """A connection's reading side that waits for no byte past `deadline` (a monotonic time,
    or None), however slowly the bytes trickle in: the socket's timeout bounds each wait for
    a byte, not a whole request."""

    def __init__(self, raw, sock, timeout):
        super().__init__()
        self.raw, self.sock, self.timeout, self.deadline = raw, sock, timeout, None
        self.waits = timeout            # the socket's timeout now

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request did not arrive in time")
            # Shortened only once it matters (to the second): a request that arrives at
            # once costs no system call.
            if remaining < self.waits - 1.0:
                self.waits = remaining
                self.sock.settimeout(remaining)
        return self.raw.readinto(buffer)

    def arrived(self):
        """The request is in: no deadline, and the socket's own timeout again (for writes)."""
        self.deadline = None
        if self.waits != self.timeout:
            self.waits = self.timeout
            self.sock.settimeout(self.timeout)

    def close(self):
        self.raw.close()
        super().close()


class RequestHeaders:
    """A request's header fields, looked up as `email.message.Message.get` does (any case,
    the first occurrence wins) at the cost of one dict lookup: the stdlib's email parser
    was a third of the server's time per request."""

    __slots__ = ("_fields", "_first")

    # One field per line, its name an RFC 9110 token.  Anything else (a folded line, a bare
    # CR, odd bytes in a name) goes through the stdlib's email parser, quirks and all, so an
    # odd request means what it means to http.server.  The value is cut out with string
    # methods: a regular expression for it would backtrack, quadratic in a line's length
    # (seconds, holding the GIL, for a line of 64 KiB).
    _TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

    def __init__(self, fields):
        self._fields = fields           # [(name, value)] in arrival order
        self._first = {}
        for name, value in reversed(fields):
            self._first[name.lower()] = value

    @classmethod
    def parse(cls, lines):
        """From the raw header lines (bytes, each with its line end)."""
        fields = []
        for line in lines:
            name, colon, value = line.decode("iso-8859-1").partition(":")
            value = value[:-2] if value.endswith("\r\n") else value[:-1]
            if not colon or not line.endswith(b"\n") or "\r" in value \
                    or not cls._TOKEN.fullmatch(name):
                message = email.parser.Parser().parsestr(b"".join(lines).decode("iso-8859-1"))
                return cls(list(message.items()))
            fields.append((name, value.lstrip(" \t")))
        return cls(fields)

    def get(self, name, default=None):
        return self._first.get(name.lower(), default)

    def get_all(self, name, default=None):
        name = name.lower()
        return [value for key, value in self._fields if key.lower() == name] or default

    def items(self):
        return list(self._fields)

    def __contains__(self, name):
        return name.lower() in self._first

    def __iter__(self):
        return iter([name for name, _ in self._fields])

    def __len__(self):
        return len(self._fields)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Turns socket traffic into `Request`s for the server's flavor and writes `Response`s."""

    protocol_version = "HTTP/1.1"       # keep-alive; every response carries Content-Length
    wbufsize = -1                       # headers and body leave in one write
    disable_nagle_algorithm = True      # without TCP_NODELAY keep-alive clients stall ~40 ms
    # Idle keep-alive connections end after a minute (clients reconnect), and so does a
    # client that stops reading: each holds a thread and a file descriptor.
    timeout = 60

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout, OSError) as exc:
            log.debug("client %s went away: %s", self.client_address[0], exc)

    def setup(self):
        super().setup()
        # Each request, body included, must arrive within `timeout` of the last answer: a
        # client trickling a byte at a time would otherwise hold its thread for ever.
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection.makefile("rb", buffering=0),
                                       self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        self.log_target = "-"           # until this request's target is known
        self._reader.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    # http.server's own limits (http.client's), answered with 431 as it does.  It counts the
    # blank line that ends the headers as one of the hundred.
    MAX_HEADER_LINE = 65536
    MAX_HEADERS = 100

    def parse_request(self):
        # The stdlib's parse_request, but with `RequestHeaders`, and with one reading of the
        # request line on every Python (recent releases refuse "HTTP/1.+1" or "HTTP/1_1.1";
        # older ones, 3.11.2 among them, read them as versions).
        self.command = None             # no request to name in an error answer yet
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = re.fullmatch(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})", words[-1])
            if version is None:
                self.send_error(400, "Bad request version (%r)" % words[-1])
                return False
            number = int(version.group(1)), int(version.group(2))
            if number >= (2, 0):
                self.send_error(505, "Invalid HTTP version (%s)" % words[-1][5:])
                return False
            self.close_connection = number < (1, 1)
            self.request_version = words[-1]
        if not 2 <= len(words) <= 3:
            self.send_error(400, "Bad request syntax (%r)" % self.requestline)
            return False
        if len(words) == 2:             # HTTP/0.9: a GET and nothing else
            self.close_connection = True
            if words[0] != "GET":
                self.send_error(400, "Bad HTTP/0.9 request type (%r)" % words[0])
                return False
        self.command, self.path = words[:2]
        if self.path.startswith("//"):
            # What recent Python releases do (gh-87389), on every Python: "//host/path" in a
            # Location built from the path would send a client to another host.
            self.path = "/" + self.path.lstrip("/")
        lines = []
        while True:
            line = self.rfile.readline(self.MAX_HEADER_LINE + 1)
            if len(line) > self.MAX_HEADER_LINE:
                self.send_error(431, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            lines.append(line)
            if len(lines) >= self.MAX_HEADERS:      # with the blank line, one too many
                self.send_error(431, "Too many headers")
                return False
        self.headers = RequestHeaders.parse(lines)
        connection = (self.headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (self.headers.get("Expect") or "").lower() == "100-continue" \
                and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def _dispatch(self):
        self.server.request_started()
        try:
            self._answer()
            self.wfile.flush()          # out before stop() may close the connection
        finally:
            self.server.request_finished()

    def _answer(self):
        mds = self.server.mds
        target = self.path
        if target.startswith(("http://", "https://")):
            # The absolute form a client sends through a proxy; servers must accept it.
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        # What the debug log shows: never a proxy-form target's scheme and userinfo.
        self.log_target = target
        if mds.stopping:
            self.close_connection = True
            self._write(Response(503, "The metadata server is shutting down.\n",
                                 "text/plain; charset=utf-8"), mds)
            return
        body = self._read_body()
        self._reader.arrived()
        if body is None:
            self.close_connection = True
            return
        if isinstance(body, Response):
            self._write(body, mds)
            return
        path, _, raw_query = target.partition("?")
        if not path.isascii():
            # Clients percent-encode; raw bytes (read as latin-1) get the same encoding, so
            # that every flavor sees one spelling and headers built from the path stay ASCII.
            path = urllib.parse.quote(path.encode("latin-1"), safe="/%:@!$&'()*+,;=-._~")
        if not raw_query.isascii():     # Go's metadata client sends a hand-built query as is
            raw_query = urllib.parse.quote(raw_query.encode("latin-1"),
                                           safe="/%:@!$&'()*+,;=-._~?")
        request = Request(self.command, path, raw_query, self.headers, self.client_address[0],
                          self.headers.get("Host") or mds.authority, body, self.connection,
                          # Only asked once the socket is at its end: peek() cannot block.
                          lambda: bool(self.rfile.peek(1)))
        try:
            response = mds.flavor.respond(request)
        except ClientGone:
            log.debug("%s hung up while waiting on %s", self.client_address[0], path)
            self.close_connection = True
            return
        except Exception:                # a bug must cost one request, not the server
            log.exception("internal error answering %s %s", self.command, path)
            response = Response(500, "Internal error in mds; see the server log.\n",
                                "text/plain; charset=utf-8")
        if mds.stopping:                 # answered while stopping: the last on this connection
            self.close_connection = True
        self._write(response, mds)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _dispatch

    def __getattr__(self, name):
        # Any other method reaches the flavor too, which answers 405 with Allow (the stdlib
        # would answer 501).
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    MAX_BODY = 1 << 20      # guest attributes are small; nothing a client sends is larger

    def _announced_body(self):
        """The length of the body the headers announce, or the Response refusing it
        (chunked, a bad length, too large)."""
        refusal = None
        length = (self.headers.get("Content-Length") or "").strip()
        if self.headers.get("Transfer-Encoding", "identity").strip().lower() != "identity":
            refusal = (411, "send the body with a Content-Length, not chunked")
        elif length and not re.fullmatch(r"[0-9]+", length):
            refusal = (400, "bad Content-Length %r" % length[:20])
        elif length and (len(length) > 9 or int(length) > self.MAX_BODY):
            refusal = (413, "request bodies are limited to %d bytes" % self.MAX_BODY)
        if refusal is None:
            return int(length) if length else 0
        self.close_connection = True
        return Response(refusal[0], "%s\n" % refusal[1], "text/plain; charset=utf-8")

    def _read_body(self):
        """The request body, the Response refusing it, or None when the client closed before
        sending all of it.  A refused body is left unread, so the connection closes: its
        bytes must not be taken for the next request."""
        length = self._announced_body()
        if isinstance(length, Response):
            return length
        body = self.rfile.read(length) if length else b""
        return body if len(body) == length else None   # short: the client stopped

    def handle_expect_100(self):
        # A body that would be refused is refused now, not invited with a 100 first.
        refusal = self._announced_body()
        if isinstance(refusal, Response):
            self._write(refusal, self.server.mds)
            return False
        # The interim answer must leave now: with wbufsize=-1 it would wait for the final one,
        # and the client waits for it before sending the body.
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

    def _write(self, response, mds):
        flavor = mds.flavor
        body = response.body
        lines = ["HTTP/1.1 %d %s" % (response.status,
                                     response.reason or _REASONS.get(response.status, "")),
                 "Server: " + flavor.server_header,
                 "Date: " + mds.http_date()]
        if response.content_type:
            lines.append("Content-Type: " + response.content_type)
        lines.append("Content-Length: %d" % len(body))
        if not response.bare:
            lines.extend(mds.common_header_lines())
        for name, value in response.headers:
            lines.append("%s: %s" % (name, value))
        if response.close:
            self.close_connection = True
            lines.append("Connection: Close")       # so spelled in real transcripts
        elif self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # Two writes into one buffer: small answers still leave in one segment, and a large
        # body is not copied once more for each client reading it slowly.
        self.wfile.write(head)
        if self.command != "HEAD":
            self.wfile.write(body)
        # A request the stdlib refused (414, bad version) has no target yet.
        log.debug("%s %s %s -> %d", self.client_address[0], self.command,
                  getattr(self, "log_target", "-"), response.status)

    def send_error(self, code, message=None, explain=None):
        # Malformed requests (and the stdlib's 414) carry the flavor's headers too.
        self.close_connection = True
        reason = message or _REASONS.get(code, "error")
        self._write(Response(code, reason + "\n", "text/plain; charset=utf-8"), self.server.mds)

    def version_string(self):
        return self.server.mds.flavor.server_header

    def log_message(self, format, *args):
        log.debug("%s " + format, self.client_address[0], *args)


# A quarter of Linux's usual 8 MiB, and room for Python's whole recursion limit on Pythons
# before 3.11, whose Python calls use the C stack: a program thread that starts while a
# handler does (the size is process-wide) is no worse off.
HANDLER_STACK_SIZE = 2 * 1024 * 1024


class _HTTPServer(http.server.ThreadingHTTPServer):
    """The listener: one daemon thread per connection, a deep accept backlog."""

    daemon_threads = True
    block_on_close = False       # never wait for hanging GETs on shutdown
    request_queue_size = 1024    # with the default of 5, a burst of waiters gets reset
    allow_reuse_address = True

    def __init__(self, address, mds):
        self.mds = mds
        self._connections = set()
        self._connections_guard = threading.Lock()
        self._fd_warning_due = 0.0
        self._answering = 0
        self._answered = threading.Condition(self._connections_guard)
        super().__init__(address, _Handler)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Out of file descriptors, the listener stays readable and the accept loop
                # would spin; pause so that connections can end, and say so now and then.
                now = time.monotonic()
                if now >= self._fd_warning_due:
                    self._fd_warning_due = now + 60
                    log.warning("out of file descriptors (%s): new connections wait until "
                                "others end", exc.strerror)
                time.sleep(0.1)
            raise

    def process_request(self, request, client_address):
        with self._connections_guard:
            self._connections.add(request)
        # Thousands of hanging GETs each hold a thread; a small stack lets them fit.  The size
        # is process-wide, so it is set only while this thread starts (only the accept loop
        # starts these), and never over one the embedding program chose.  (stack_size()
        # sets as it reads: with no argument it sets 0.)
        previous = threading.stack_size(HANDLER_STACK_SIZE)
        if previous:
            threading.stack_size(previous)
        try:
            super().process_request(request, client_address)
        finally:
            if not previous:
                current = threading.stack_size(0)
                if current != HANDLER_STACK_SIZE:       # the program chose one meanwhile
                    threading.stack_size(current)

    def request_started(self):
        with self._connections_guard:
            self._answering += 1

    def request_finished(self):
        with self._connections_guard:
            self._answering -= 1
            if self.mds.stopping:               # only stop() waits on this
                self._answered.notify_all()

    def wait_answered(self, timeout):
        """Wait until no request is being answered (or `timeout` passes): at stop, woken
        waiters then deliver their 503 before the connections are closed."""
        deadline = time.monotonic() + timeout
        with self._connections_guard:
            while self._answering and time.monotonic() < deadline:
                self._answered.wait(deadline - time.monotonic())

    def shutdown_request(self, request):
        with self._connections_guard:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        """End every accepted connection, so that a stopped server stops answering on
        keep-alive connections too (their handler threads then finish)."""
        with self._connections_guard:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's FQDN, only for CGI's SERVER_NAME; for a
        # wildcard bind that is a DNS query, which can stall startup for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            log.debug("client %s went away: %s", client_address[0], exc)
        else:
            log.exception("error serving %s", client_address[0])


class _HTTPServer6(_HTTPServer):
    """The same server on an IPv6 address (--host ::1, --host ::)."""
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
GUEST_VALUE_LIMIT = 256 * 1024
GUEST_TOTAL_LIMIT = 512 * 1024
GUEST_COUNT_LIMIT = 1000
DEFAULT_SCOPES = (CLOUD_PLATFORM, "https://www.googleapis.com/auth/userinfo.email")


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
    SERVER_HEADERS = {"gce": "Metadata Server for VM",
                      "serverless": "Metadata Server for Serverless",
                      "gke": "GKE Metadata Server"}

    def __init__(self, server, variant="gce"):
        self.server = server
        self.variant = variant
        self.server_header = self.SERVER_HEADERS[variant]
        self.common_headers = [("Metadata-Flavor", "Google")]
        # The GKE server is written in Go, which writes header names canonicalised (spec 13).
        self.etag_header = "Etag" if variant == "gke" else "ETag"
        if variant != "gke":            # GKE's answers carry no browser headers (spec 13)
            self.common_headers += [("X-XSS-Protection", "0"), ("X-Frame-Options", "SAMEORIGIN")]

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
        elif self.variant == "gke":
            # The GKE metadata server exposes a subset, with the cluster in the attributes (13).
            instance = v1["instance"]
            v1["instance"] = {key: instance[key] for key in
                              ("hostname", "id", "serviceAccounts", "zone")}
            v1["instance"]["attributes"] = {"cluster-location": "us-central1",
                                            "cluster-name": "mds-cluster",
                                            "cluster-uid": "4b5f1c3e9d2a4e7f8c6b1a0d3e5f7a9b"}
        if self.variant != "gce":
            # Both serve only the project's ids (spec 12, 13) and no OS Login sessions.
            v1["project"].pop("attributes", None)
            v1.pop("oslogin", None)
        return document

    def compile(self, document):
        """Build the served tree; raises ConfigError naming what is wrong with the document."""
        if not isinstance(document, dict):
            raise ConfigError("the document must be a JSON object")
        top = document.get("computeMetadata")
        if top is None:       # a settings-only document was completed when it was loaded
            raise ConfigError('the document has no "computeMetadata" (it has %s)'
                              % ", ".join(sorted(map(repr, set(document) - {"mds"}))))
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
        now = time.time()
        v1, events = self._with_events(v1, settings, now)
        accounts = self._accounts(v1, settings)
        version = self._compile_dict("v1", "v1", v1, (), accounts)
        top_node = Node("computeMetadata", "computeMetadata", "dir", children={"v1": version})
        root = Node("", "", "dir", children={"computeMetadata": top_node.finish()})
        boundaries = [t for event in events for t in event[:2] if t is not None and t > now]
        return _GceTree(root.finish(), accounts, v1, events, min(boundaries, default=None))

    def _with_events(self, v1, settings, now):
        """The v1 section as it stands at `now` under the timed events, and the events as
        [(start, end or None, instance key, value)]: the key holds the value in that window.

        Configured in the "mds" "events" object (or by --preempt-after and
        --maintenance-event-after): {"preemption": {"after": 120}, "maintenance": [{"after":
        60, "duration": 60, "event": "MIGRATE_ON_HOST_MAINTENANCE"}]}.
        """
        events = settings.get("events") or {}
        if not isinstance(events, dict):
            raise ConfigError('"mds"."events" must be an object')
        events = dict(events)
        for name, option in (("preemption", "preempt_after"),
                             ("maintenance", "maintenance_event_after")):
            if self.server.options.get(option) is not None:
                events[name] = _moved_by_flag(events.get(name), self.server.options[option])
        unknown = sorted(set(events) - {"preemption", "maintenance"})
        if unknown:
            raise ConfigError('unknown event(s) in "mds"."events": %s (expected preemption, '
                              'maintenance)' % ", ".join(unknown))
        if not any(events.values()):
            return v1, []
        if self.variant != "gce":
            raise ConfigError("the %s has no preemption or maintenance events; they are a "
                              "Compute Engine feature" % self.server_header)
        instance = dict(v1.get("instance") or {})
        instance.setdefault("preempted", "FALSE")
        instance.setdefault("maintenanceEvent", "NONE")
        windows = []
        preemption = events.get("preemption")
        if preemption:
            spec = self._event_spec(preemption, "preemption")
            # Only Spot (preemptible) VMs are preempted, and GCE gives them these options.
            instance["scheduling"] = dict(instance.get("scheduling") or {},
                                          automaticRestart="FALSE", onHostMaintenance="TERMINATE",
                                          preemptible="TRUE")
            windows.append((_event_time(spec, self.server.started_at, "mds.events.preemption"),
                            None, "preempted", "TRUE"))
        host = str((instance.get("scheduling") or {}).get("onHostMaintenance") or "MIGRATE")
        maintenance = events.get("maintenance") or []
        for spec in maintenance if isinstance(maintenance, list) else [maintenance]:
            spec = self._event_spec(spec, "maintenance")
            start = _event_time(spec, self.server.started_at, "mds.events.maintenance")
            kind = spec.get("event") or host.upper() + "_ON_HOST_MAINTENANCE"
            if kind not in ("MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE"):
                raise ConfigError("mds.events.maintenance.event must be "
                                  "MIGRATE_ON_HOST_MAINTENANCE or TERMINATE_ON_HOST_MAINTENANCE,"
                                  " not %r" % kind)
            # The value appears 60 s before the maintenance and is NONE again once it is over
            # (a null duration: for good).
            end = None if spec.get("duration", 60) is None else \
                start + _event_seconds(spec, "duration", 60, "mds.events.maintenance")
            windows.append((start, end, "maintenanceEvent", kind))
        for start, end, key, value in windows:
            if start <= now and (end is None or now < end):
                instance[key] = value
        return dict(v1, instance=instance), windows

    @staticmethod
    def _event_spec(value, name):
        spec = {} if value is True else value
        if not isinstance(spec, dict):
            raise ConfigError("mds.events.%s must be true or an object such as {\"after\": 60}"
                              % name)
        return spec

    def _accounts(self, v1, settings):
        instance = v1.get("instance") or {}
        raw = instance.get("serviceAccounts") or instance.get("service-accounts") or {}
        if not isinstance(raw, dict):
            raise ConfigError("instance.serviceAccounts must be an object keyed by email")
        per_account = settings.get("serviceAccounts") or {}
        entries, primary = {}, None
        for key, entry in raw.items():
            if not isinstance(entry, dict):
                raise ConfigError("instance.serviceAccounts.%s must be an object" % key)
            address = entry.get("email") or (key if key != "default" else None)
            if not address:
                raise ConfigError("instance.serviceAccounts.default needs an \"email\"")
            # The entry keyed by the e-mail is the account's own; a "default" entry beside it
            # only says which account is the primary.
            if key != "default" or address not in entries:
                entries[address] = entry
            if primary is None and (key == "default" or "default" in (entry.get("aliases")
                                                                      or [])):
                primary = address
        if entries and primary is None:
            primary = next(iter(entries))
        if not isinstance(per_account, dict):
            raise ConfigError('"mds"."serviceAccounts" must be an object keyed by e-mail')
        per_account = dict(per_account)
        if "default" in per_account and primary is not None:
            # The primary account answers to "default" in URLs; its settings may too.
            if primary in per_account:
                raise ConfigError('"mds"."serviceAccounts" has settings under both "default" '
                                  'and %s, the same account' % primary)
            per_account[primary] = per_account.pop("default")
        # Settings for an account the VM does not have would be dropped without a word (a
        # typo in an e-mail leaves the real account offline).
        unused = sorted(set(per_account) - set(entries))
        if unused:
            raise ConfigError('"mds"."serviceAccounts" has settings for %s, which %s not an '
                              'account of the instance (its accounts: %s)'
                              % (", ".join(unused), "is" if len(unused) == 1 else "are",
                                 ", ".join(sorted(entries)) or "none"))
        for address, options in per_account.items():
            if not isinstance(options, dict):
                raise ConfigError('the settings of %s in "mds"."serviceAccounts" must be an '
                                  'object, such as {"credentials": {...}}' % address)
        accounts = {}
        for address, entry in entries.items():
            options = per_account.get(address) or {}
            spec = options.get("credentials")
            if spec is None and address == primary:
                spec = self.server.credentials     # the command line speaks for `default`
            accounts[address] = Account(
                address, _scope_list(entry.get("scopes", DEFAULT_SCOPES), address),
                ["default"] if address == primary else (entry.get("aliases") or []),
                str(options.get("uniqueId") or unique_id_for(address)),
                self.server.source_for(address, spec, options))
        return {"default": accounts[primary], **accounts} if primary else {}

    def _compile_dict(self, name, json_key, value, path, accounts, raw=False):
        # Below a user-defined key (an attribute holding an object, say) nothing is Google's.
        raw = raw or _user_container(path)
        node = Node(name, json_key, "dir")
        if path == ("instance", "serviceAccounts"):
            primary = accounts.get("default")
            for url_name, account in accounts.items():
                # default/ is the primary account under another name: both serve the fields
                # of every entry that describes the account (keyed "default", by its e-mail,
                # or holding it as "email"), its e-mail entry's first.
                entry = {}
                for key, fields in value.items():
                    if isinstance(fields, dict) and key != account.email and (
                            fields.get("email") == account.email or
                            key == "default" and account is primary):
                        entry.update(fields)
                entry.update(value.get(account.email) or {})
                node.children[url_name] = self._account_node(url_name, account, entry, path)
            return node.finish()
        for key, child_value in value.items():
            key = str(key)
            if raw:
                url_name, child_json = key, key
            else:
                url_name = dash_case(key)
                child_json = key if "-" not in key else camel_case(key)
            if url_name in node.children:
                raise ConfigError("%s: keys %r and %r are both served as %r; keep one"
                                  % (".".join(path) or "v1", node.children[url_name].json_key,
                                     key, url_name))
            node.children[url_name] = self._compile_value(url_name, child_json, child_value,
                                                          path + (child_json,), accounts, raw)
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

    def _account_node(self, url_name, account, entry, path):
        node = Node(url_name, url_name, "dir")
        fields = {"aliases": account.aliases, "email": account.email,
                  "scopes": list(account.scopes)}
        for key, value in fields.items():
            node.children[key] = Node(key, key, "leaf", value=value).finish()
        for key, value in entry.items():          # custom per-account keys are served too
            if key not in fields and key not in SERVICE_ACCOUNT_ENDPOINTS:
                node.children[dash_case(key)] = self._compile_value(
                    dash_case(key), key, value, path + (url_name, key), {}, raw=True)
        for endpoint in SERVICE_ACCOUNT_ENDPOINTS:
            node.children[endpoint] = Node(endpoint, endpoint, endpoint, account=account).finish()
        return node.finish()

    def apply_identity(self, document, identity, explicit):
        """Project and primary-account overrides (flags, the Go emulator's GOOGLE_* variables)
        and what a key file says, applied to a loaded document.

        Overrides always win.  A key file fills in what the config leaves out; with an explicit
        config its email must match the primary account's, so a typo cannot mint tokens for
        an account the config does not describe.
        """
        document = copy.deepcopy(document)
        top = document.setdefault("computeMetadata", self.default_document()["computeMetadata"])
        v1 = top.setdefault("v1", {})
        project = v1.setdefault("project", {})
        instance = v1.setdefault("instance", {})
        if identity.get("project_id"):
            project["projectId"] = identity["project_id"]
        elif identity.get("key_file_project_id") and (not explicit or
                                                      not project.get("projectId")):
            project["projectId"] = identity["key_file_project_id"]
        if identity.get("numeric_project_id"):
            number = str(identity["numeric_project_id"])
            if not number.isdigit():
                raise ConfigError("the numeric project id must be digits, not %r" % number)
            project["numericProjectId"] = int(number)
        accounts = instance.setdefault("serviceAccounts", {})
        current = _primary_email(accounts)
        wanted = identity.get("service_account")
        source_email = identity.get("source_email")
        if not wanted and source_email:
            if explicit and current and current != source_email:
                raise ConfigError("the credentials given on the command line are for %s but "
                                  "the config's default service account is %s"
                                  % (source_email, current))
            wanted = source_email
        if wanted and wanted != current:
            instance["serviceAccounts"] = _rename_primary_account(accounts, current, wanted)
        return document

    def document_keys(self, path):
        """Map a URL path under /computeMetadata/v1/ to a key path in the document."""
        document = self.server.store.document
        keys, node, doc_path = ["computeMetadata", "v1"], document["computeMetadata"]["v1"], ()
        raw = False
        for segment in url_segments(path):
            if isinstance(node, list):
                index = _list_index(segment, node, allow_append=True)
                keys.append(index)
                node = node[index] if index < len(node) else None
                doc_path += ("*",)
                continue
            node = node if isinstance(node, dict) else {}
            if doc_path == ("instance", "serviceAccounts") and segment == "default":
                # The primary account: its e-mail entry when there is one, which is the one
                # served (a "default" entry beside it only names it).
                primary = _primary_email(node)
                segment = next((k for k, v in node.items() if k != "default" and (
                    k == primary or isinstance(v, dict) and v.get("email") == primary)),
                    segment)
            raw = raw or _user_container(doc_path)
            if raw or segment in node:
                key = segment
            else:
                key = next((k for k in node if dash_case(str(k)) == segment), camel_case(segment))
            keys.append(key)
            doc_path += (key,)
            node = node.get(key)
        return keys

    def complete(self, document):
        """The document with this variant's built-in tree when it has none (a config of
        "mds" settings only), so that updates add to what is served instead of replacing it."""
        if isinstance(document, dict) and "computeMetadata" not in document and \
                not set(document) - {"mds"}:
            document = dict(document, computeMetadata=self.default_document()["computeMetadata"])
        return document

    # -- requests ---------------------------------------------------------------------------

    def respond(self, request):
        if request.headers.get("X-Forwarded-For") is not None:
            # The issue asks for 403 on any proxied request, the root included: the real server
            # refuses what a proxy forwards (envoyproxy/envoy#4924).
            return self.forbidden(request, "Requests carrying X-Forwarded-For are refused.")
        path = request.path
        # The value is compared exactly, less the whitespace HTTP allows around any value.
        flavor_ok = (request.headers.get("Metadata-Flavor") or "").strip(" \t") == "Google"
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
            # Guest attributes are a Compute Engine feature, like timed events: Cloud Run and
            # GKE serve no guest-attributes/ (gce.md §12, §13).
            if request.method == "PUT" and "/guest-attributes/" in path and \
                    self.variant == "gce":
                return self.put_guest_attribute(request)
            return Response(405, "Method %s is not allowed here.\n" % request.method,
                            "text/html; charset=UTF-8", [("Allow", "GET")])
        segments = [urllib.parse.unquote(s) for s in path.split("/") if s]
        tree = self.server.store.tree
        if tree.next_event is not None and time.time() >= tree.next_event:
            tree = self.server.publish_due_events()
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
            digits = timeout.strip()
            if not re.fullmatch(r"[0-9]+", digits):
                raise BadRequest("timeout_sec must be a non-negative integer number of seconds,"
                                 " not %r" % timeout[:40])
            # [INFER] A timeout beyond 30 years is no timeout: wait until the value changes.
            digits = digits.lstrip("0") or "0"
            timeout = int(digits) if len(digits) <= 9 else None
        if true_param(query.get("wait_for_change")):
            if node.is_dir and not recursive:
                raise BadRequest("wait_for_change on a directory needs recursive=true")
            node = self.wait_for_change(request, segments, node, query.get("last_etag"), timeout)
            if self.server.stopping:
                # Not the unchanged value: a watcher would take that for a change.
                return Response(503, "The metadata server is shutting down.\n",
                                "text/plain; charset=utf-8")
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

        def changed_in(tree):
            then = resolve(tree.root, segments)
            return None if then is not None and then.etag == etag else (then,)

        with store.changed:
            watch = store.watch(changed_in)
            try:
                while True:
                    if self.server.stopping:
                        return None
                    if watch.found is not None:
                        return watch.found[0]
                    current = resolve(store.tree.root, segments)
                    if current is None or current.etag != etag:   # before this one watched
                        return current
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return current
                    # Time out now and then to notice clients that hung up, so their threads
                    # end (checked at every wake-up too, as other keys may keep changing).
                    store.changed.wait(30.0 if remaining is None else min(remaining, 30.0))
                    if watch.found is None and request.client_gone():
                        # No answer at all: the unchanged value would read as a change to a
                        # client that only shut down its sending side.
                        raise ClientGone()
            finally:
                store.unwatch(watch)

    def render(self, node, alt, recursive):
        headers = [(self.etag_header, node.etag)]
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
        if requested and (source.honours_scopes or self.variant == "serverless"):
            scopes = requested          # Cloud Run honours ?scopes= even for its own tokens
        elif not requested and getattr(source, "unscoped_audience", None):
            scopes = ()         # the source mints an audience-bound token instead
        else:
            scopes = account.scopes
        try:
            # Scopes and audiences are the client's to choose: one too large is not kept.
            token = self.server.tokens.get(
                ("access", source, account.email, scopes), lambda: source.access_token(scopes),
                cache=sum(map(len, scopes)) <= TokenCache.MAX_KEY_CHARS)
        except CredentialError as exc:
            return self.credential_failure(exc, account)
        payload = {"access_token": token.value,
                   "expires_in": max(1, int(token.expiry - time.time())),
                   "token_type": "Bearer"}
        if request.query.get("alt") == "text":
            body = "".join("%s %s\n" % item for item in payload.items())
            return Response(200, body, "application/text",
                            [(self.etag_header, short_hash(body.encode()))])
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Response(200, body, "application/json", [(self.etag_header, short_hash(body))])

    def identity(self, request, node, tree):
        audience = request.query.get("audience")
        if not audience:
            raise BadRequest("non-empty audience parameter required")
        fmt = (request.query.get("format") or "standard").lower()
        if fmt not in ("standard", "full"):
            raise BadRequest("format must be standard or full, not %r" % fmt)
        licenses = fmt == "full" and true_param(request.query.get("licenses"))
        account = node.account
        source = account.source
        # Only VMs add the google.compute_engine claim: serverless and GKE tokens have none
        # even with format=full (vault-plugin-auth-gcp #104, #190, #85 report its absence).
        claims = (self.compute_engine_claims(tree, licenses)
                  if fmt == "full" and self.variant == "gce" else None)
        try:
            # The claims are part of the key: a reload that renames the instance or project
            # must not keep serving tokens that say otherwise.
            token = self.server.tokens.get(
                ("identity", source, account.email, audience, fmt, canonical_json(claims)),
                lambda: source.id_token(audience, fmt, claims),
                cache=len(audience) <= TokenCache.MAX_KEY_CHARS)
        except CredentialError as exc:
            return self.credential_failure(exc, account)
        body = token.value.encode()
        return Response(200, body, "text/html; charset=utf-8",
                        [(self.etag_header, short_hash(body))])

    def compute_engine_claims(self, tree, licenses):
        """The `google.compute_engine` claims of a format=full identity token (spec 10.2)."""
        instance = tree.v1.get("instance") or {}
        project = tree.v1.get("project") or {}
        claims = {
            "instance_creation_timestamp": _whole_number(self.server.settings.get(
                "instanceCreationTimestamp"), int(self.server.started_at)),
            "instance_id": str(instance.get("id", "")),
            "instance_name": str(instance.get("name", "")),
            "project_id": str(project.get("projectId", "")),
            # A number in the token even when the config holds it as text (verifiers type it).
            "project_number": _whole_number(project.get("numericProjectId"), 0),
            "zone": str(instance.get("zone", "")).rsplit("/", 1)[-1],
        }
        if licenses:
            claims["license_id"] = [str(item.get("id") if isinstance(item, dict) else item)
                                    for item in instance.get("licenses") or []
                                    if not isinstance(item, dict) or item.get("id") is not None]
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
        if "/" in namespace + key:
            return Response(400, "Bad request: a guest attribute's namespace and key cannot "
                            "contain '/'\n", "text/html; charset=UTF-8")
        value = request.body.decode("utf-8", "replace")
        with self.server.store.changed:          # checked and stored as one step
            refusal = self._guest_attribute_limits(namespace, key, value)
            if refusal:
                return Response(400, "Bad request: %s\n" % refusal, "text/html; charset=UTF-8")
            self.server.update("instance/guest-attributes/%s/%s" % (namespace, key), value)
        return Response(200, b"", "application/text")

    def _guest_attribute_limits(self, namespace, key, value):
        # [INFER] Google documents no limits for guest attributes; these are custom metadata's
        # (a value of at most 256 KiB, 512 KiB in all), plus a count.  Every PUT recompiles the
        # tree, so an unbounded guest could slow every reader down.
        instance = ((self.server.store.document.get("computeMetadata") or {}).get("v1")
                    or {}).get("instance") or {}
        entries = {(ns, k): str(v) for ns, keys in (instance.get("guestAttributes") or
                                                     {}).items()
                   if isinstance(keys, dict) for k, v in keys.items()}
        entries[(namespace, key)] = value
        if len(value.encode("utf-8")) > GUEST_VALUE_LIMIT:
            return "a guest attribute's value is limited to %d bytes" % GUEST_VALUE_LIMIT
        if len(entries) > GUEST_COUNT_LIMIT:
            return "at most %d guest attributes" % GUEST_COUNT_LIMIT
        if sum(len((n + k + v).encode("utf-8")) for (n, k), v in entries.items()) > \
                GUEST_TOTAL_LIMIT:
            return "guest attributes are limited to %d bytes in all" % GUEST_TOTAL_LIMIT
        return None

    def forbidden(self, request, reason="Missing Metadata-Flavor:Google header."):
        if self.variant == "gke":
            # [INFER] GKE's wording is known for the missing header only; other refusals
            # (X-Forwarded-For) say their own reason in the same shape.
            why = ('Missing required header "Metadata-Flavor": "Google"'
                   if reason.startswith("Missing") else reason)
            return Response(403, "GKE Metadata Server encountered an error: %s\n" % why,
                            "text/plain; charset=utf-8",
                            [("X-Content-Type-Options", "nosniff")], bare=True)
        message = ("Your client does not have permission to get URL <code>%s</code> from this "
                   "server. %s" % (html_escape(request.path), reason))
        # Cloud Run's 403 carries no Metadata-Flavor header (spec 12); the VM's does, and the
        # VM's server hangs up after it (5.2).
        return Response(403, http_error_page(403, "Forbidden", message),
                        "text/html; charset=UTF-8", bare=self.variant == "serverless",
                        close=self.variant == "gce")

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

    def startup_lines(self):
        """Lines for the startup log: the timed events."""
        return ["event: instance/%s is %s from %s%s" % (
            dash_case(key), value, format_imds_time(start),
            "" if end is None else " until " + format_imds_time(end))
            for start, end, key, value in self.server.store.tree.events]


def _scope_list(scopes, address):
    """A service account's scopes: a list, or one string of them separated by commas or
    spaces (as ?scopes= takes them); an empty list is a VM created without scopes."""
    if scopes is None:
        return list(DEFAULT_SCOPES)
    if isinstance(scopes, str):
        scopes = re.split(r"[,\s]+", scopes.strip())
    if not isinstance(scopes, (list, tuple)) or not all(isinstance(s, str) for s in scopes):
        raise ConfigError("instance.serviceAccounts.%s.scopes must be a list of scope URLs"
                          % address)
    return [scope for scope in scopes if scope]


def _whole_number(value, default):
    """An int from a number or digit text (a config value), else `default`."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return int(value) if math.isfinite(value) else default
    try:
        return int(str(value).strip())
    except ValueError:
        return default


def _primary_email(accounts):
    """The email of the account served as `default` in an instance.serviceAccounts object."""
    for key, entry in accounts.items():
        if isinstance(entry, dict) and (key == "default" or "default" in (entry.get("aliases")
                                                                          or ())):
            return entry.get("email") or (key if key != "default" else None)
    for key, entry in accounts.items():
        return (entry or {}).get("email") or key
    return None


def _rename_primary_account(accounts, old, new):
    renamed = {}
    for key, entry in accounts.items():
        entry = dict(entry or {})
        if key == old or entry.get("email") == old or key == "default":
            entry["email"] = new
        renamed[new if key == old else key] = entry
    if not renamed:
        renamed = {"default": {"aliases": ["default"], "email": new,
                               "scopes": list(DEFAULT_SCOPES)}}
    if new not in renamed:
        renamed[new] = dict(renamed.get("default") or {"scopes": list(DEFAULT_SCOPES)},
                            email=new, aliases=["default"])
    return renamed


class BadRequest(ValueError):
    """A query the metadata server refuses with 400 and this reason."""


class _GceTree:
    """A compiled GCE document: the node tree, the service accounts and the raw v1 section."""

    __slots__ = ("root", "accounts", "v1", "events", "next_event")

    def __init__(self, root, accounts, v1, events=(), next_event=None):
        self.root, self.accounts, self.v1 = root, accounts, v1
        self.events = events            # timed events, see GceFlavor._with_events
        self.next_event = next_event    # when one next begins or ends: the tree is then stale


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


def _listing_order(node):
    if node.indexed:
        return sorted(node.children, key=int)       # 0/ 1/ 2/ ... 10/, as the JSON lists them
    return sorted(node.children, key=lambda n: n.encode("utf-8"))


def _render_listing(node):
    names = _listing_order(node)
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
            for name in _listing_order(current):
                walk(current.children[name], prefix + "/" + name if prefix else name)

    walk(node, "")
    return "".join(lines).encode("utf-8")


def add_gce_arguments(parser):
    """Add the GCE flavor's options to the CLI parser (they become MetadataServer options)."""
    group = parser.add_argument_group("GCE flavor (--flavor gce)")
    group.add_argument("--preempt-after", metavar="DURATION", type=duration_argument,
                       help="make this a Spot VM whose instance/preempted turns TRUE this long "
                            "after startup (e.g. 2m)")
    group.add_argument("--maintenance-event-after", metavar="DURATION", type=duration_argument,
                       help="set instance/maintenance-event to MIGRATE_ON_HOST_MAINTENANCE "
                            "(TERMINATE_ON_HOST_MAINTENANCE on a Spot VM) this long after "
                            "startup, and back to NONE 60 s later")
    return group


GCE_OPTIONS = ("preempt_after", "maintenance_event_after")

# Functions that add a flavor's own command-line flags.
FLAVOR_ARGUMENTS = (add_gce_arguments, lambda parser: add_ec2_arguments(parser))

FLAVORS = types.MappingProxyType({
    "gce": lambda server: GceFlavor(server, "gce"),
    "cloudrun": lambda server: GceFlavor(server, "serverless"),
    "gke": lambda server: GceFlavor(server, "gke"),
    "ec2": lambda server: Ec2Flavor(server),
})


# ---- EC2 flavor ------------------------------------------------------------------------------

_ec2_log = logging.getLogger("mds.ec2")

EC2_SERVER_HEADER = "EC2ws"
EC2_TEXT = "text/plain"
EC2_OCTETS = "application/octet-stream"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
# Real GET responses spell the echoed TTL header this way (spec §1).
TOKEN_TTL_RESPONSE_HEADER = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
MAX_TOKEN_TTL = 21600
ECS_CREDENTIALS_PATH = "/mds/ecs/credentials"
EC2_CERTIFICATE_PATH = "/mds/ec2/certificate.pem"
DEFAULT_ROLE_NAME = "mds-ec2-role"
DEFAULT_ACCOUNT_ID = "123456789012"

# Metadata build versions served at "/" (spec §3.1); every one serves the same tree, as the
# common emulators do. Oldest first, "latest" last.
EC2_API_VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
    "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25",
    "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02", "2018-03-28",
    "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03", "2021-03-23",
    "2021-07-15", "latest",
)

# Leaves whose document value may be a JSON object or array; it is served as AWS formats its
# JSON documents (2-space indent, " : " separators). Everywhere else an object is a directory
# and a list of scalars is a newline-separated multi-value leaf.
_EC2_JSON_LEAVES = frozenset((
    ("meta-data", "spot", "instance-action"),
    ("meta-data", "events", "recommendations", "rebalance"),
    ("meta-data", "events", "maintenance", "scheduled"),
    ("meta-data", "events", "maintenance", "history"),
    ("meta-data", "identity-credentials", "ec2", "info"),
    ("dynamic", "instance-identity", "document"),
))

_EC2_XHTML_PAGE = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n'
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
    '         "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
    '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
    ' <head>\n  <title>%(title)s</title>\n </head>\n'
    ' <body>\n  <h1>%(title)s</h1>\n </body>\n</html>\n'
)

_REGION_DIRECTIONS = types.MappingProxyType({
    "east": "e", "west": "w", "north": "n", "south": "s", "central": "c", "southeast": "se",
    "southwest": "sw", "northeast": "ne", "northwest": "nw", "gov": "g", "iso": "i", "isob": "ib"})


def ec2_error_response(status, extra_headers=()):
    """The XHTML error page real IMDS (404) and AWS's own mock (400/401/403) send (spec §1.1)."""
    titles = {400: "400 - Bad Request", 401: "401 - Unauthorized", 403: "403 - Forbidden",
              404: "404 - Not Found"}
    body = _EC2_XHTML_PAGE % {"title": titles.get(status, "%d - Error" % status)}
    return Response(status, body, "text/html", list(extra_headers))


def aws_json(value, depth=0):
    """JSON as IMDS prints it (Jackson's default pretty printer): an object's members one per
    line, indented 2 spaces per object level, as '"key" : value'; an array on one line with
    its elements separated by ", " ("[ {" ... "} ]", an empty one "[ ]") and no level of its
    own (the real scheduled-events capture in aws.md §3.4 has that shape)."""
    if isinstance(value, dict):
        if not value:
            return "{ }"
        inner = "\n" + "  " * (depth + 1)
        return "{" + inner + ("," + inner).join(
            json.dumps(key) + " : " + aws_json(item, depth + 1)
            for key, item in value.items()) + "\n" + "  " * depth + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[ ]"
        return "[ " + ", ".join(aws_json(item, depth) for item in value) + " ]"
    return json.dumps(value)


def availability_zone_id(region, zone):
    """A plausible zone id ("use1-az1"; Local Zone "usw2-lax1-az1") for a zone; real ids
    are shuffled per account."""
    parts = region.split("-")
    short = parts[0] + "".join(_REGION_DIRECTIONS.get(p, p[:1]) for p in parts[1:-1])
    suffix = zone[len(region):] or "a"
    group = suffix[:-1].replace("-", "")     # a Local or Wavelength Zone's "-lax-1" part
    return "%s%s%s-az%d" % (short, parts[-1], "-" + group if group else "",
                            max(1, ord(suffix[-1]) - ord("a") + 1))


def _region_of_zone(zone):
    # "us-east-1a" and the Local Zone "us-west-2-lax-1a" are zones of us-east-1, us-west-2.
    match = re.match(r"[a-z]{2}(?:-[a-z]+)+-\d+", zone)
    return match.group(0) if match else re.sub(r"[a-z]+$", "", zone)


def _hostname_suffix(region, public=False):
    if region == "us-east-1":
        return "compute-1.amazonaws.com" if public else "ec2.internal"
    return ("%s.compute.amazonaws.com" if public else "%s.compute.internal") % region


def _stable_id(seed, length, alphabet="0123456789abcdef"):
    digest = int(hashlib.sha256(seed.encode("utf-8")).hexdigest(), 16)
    chars = []
    for _ in range(length):
        digest, index = divmod(digest, len(alphabet))
        chars.append(alphabet[index])
    return "".join(chars)


def _deep_merge(base, override):
    """`override` laid over `base`; a None value in `override` removes the key."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _rfc1123_short(epoch):
    # Scheduled-event dates look like "21 Jan 2019 09:00:43 GMT" (spec §3.4).
    moment = time.gmtime(epoch)
    return "%d %s" % (moment.tm_mday, time.strftime("%b %Y %H:%M:%S GMT", moment))


def _check_role_name(role, where):
    # None means "no instance profile"; anything else is a name served in paths and ARNs.
    if role is not None and (not isinstance(role, str) or not role or "/" in role):
        raise ConfigError("%s must be a role name (text without \"/\") or null, not %r"
                          % (where, role))


def _check_tag_keys(tags):
    # EC2 refuses to expose tags in metadata while any key falls outside this alphabet or is
    # ".", ".." or "_index" (spec §3.4); such a key could not be fetched by its path anyway.
    instance = tags.get("instance") if isinstance(tags, dict) else None
    for key in instance if isinstance(instance, dict) else ():
        if not re.fullmatch(r"[A-Za-z0-9+\-=.,_:@]+", key) or key in (".", "..", "_index"):
            raise ConfigError('"meta-data"."tags"."instance": tag key %r cannot be served in '
                              'instance metadata (letters, digits and + - = . , _ : @ only; '
                              'not ".", ".." or "_index")' % key)


class _Computed(object):
    """A leaf rendered at request time (credentials, events, signatures); None means 404."""

    __slots__ = ("render", "content_type")

    def __init__(self, render, content_type=EC2_TEXT):
        self.render = render
        self.content_type = content_type


class _Ec2Tree(object):
    """A compiled EC2 document: the static IMDS tree plus the settings the flavor acts on."""

    def __init__(self):
        self.meta = {}            # meta-data tree: dict = directory, str = leaf, _Computed
        self.dynamic = {}
        self.user_data = None     # bytes or None (404)
        self.region = None
        self.account_id = DEFAULT_ACCOUNT_ID
        self.identity_document = b""
        self.default_role = None
        self.roles = {}           # name -> role settings (dict)
        self.client_roles = []    # (ip_network, role name or None), most specific first
        self.imdsv2_required = False
        self.events = {}
        self.ecs_path = ECS_CREDENTIALS_PATH
        self.ecs_auth_token = None
        self.public_keys = []     # [(index, name)]
        self.started_at = 0.0
        self.providers = {}       # role name -> credential provider
        # Real IMDS answers carry Last-Modified (aws.md §1); no client reads it, so one date
        # for the whole tree, the moment this version of it was built, is close enough.
        self.last_modified = email.utils.formatdate(usegmt=True)


class Ec2Flavor(object):
    """The EC2 instance metadata service (IMDSv1 and v2) plus an ECS credentials endpoint.

    Serves the document's "ec2" section (IMDS path shape, laid over a plausible default
    instance) under every metadata version; role credentials come from per-role providers
    (offline, static, STS AssumeRole) chosen by the client's source address. Emulator
    settings live in the document's "mds" -> "ec2" object; `options` (from the CLI or
    MetadataServer(options=...)) override them.
    """

    name = "ec2"
    server_header = EC2_SERVER_HEADER

    def __init__(self, server, options=None):
        self.server = server
        self.options = dict(options if options is not None
                            else (getattr(server, "options", None) or {}))
        self.common_headers = [("Accept-Ranges", "none")]
        self._token_key = secrets.token_bytes(32)
        self._providers = {}
        self._providers_guard = threading.Lock()
        self._identity_credentials = OfflineRoleCredentials("ec2-instance")
        self._identity_cache = {}
        self._identity_guard = threading.Lock()
        self._error_log = {}

    # -- lifecycle (the server calls these when it has such hooks) ---------------------------

    def start(self):
        """Give upstream providers (AssumeRole) up to 10 s each for their first credentials,
        so that the first client after startup is served; they already run in background."""
        for provider in list(self._providers.values()):
            provider.start()

    def stop(self):
        """Stop background refreshers (they also stop by themselves once the server stops)."""
        with self._providers_guard:
            providers = list(self._providers.values())
            self._providers.clear()
        for provider in providers:
            provider.stop()

    def _stopping(self):
        return bool(getattr(self.server, "stopping", False))

    # -- the document -----------------------------------------------------------------------

    def default_document(self):
        # Minimal on purpose: compile() derives the whole plausible instance, and keeping the
        # document small lets update("meta-data/placement/region", ...) move every derived
        # value (zone, hostnames, identity document) along with it.
        return {"ec2": {}}

    def document_keys(self, path):
        """Key path in the document for a URL-ish path.

        "meta-data/spot/instance-action" and "/latest/meta-data/..." address the IMDS tree
        (document "ec2"); "mds/ec2/events/spot" addresses emulator settings.
        """
        segments = url_segments(path)
        if segments and segments[0] == "mds":
            return segments
        if segments and segments[0] in EC2_API_VERSIONS:
            segments = segments[1:]
        if not segments:
            raise KeyError("empty path")
        return ["ec2"] + segments

    def serves_default(self, keys):
        """Whether document keys name a meta-data value now served, whether the document or
        the default instance it is laid over set it (a null in the document hides it)."""
        node = self.server.store.tree.meta
        if keys[:2] != ["ec2", "meta-data"] or len(keys) < 3:
            return False
        for key in keys[2:]:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    def compile(self, document):
        """Build the served tree; raises ConfigError naming what is wrong with the document."""
        if not isinstance(document, dict):
            raise ConfigError("the document must be a JSON object")
        if "ec2" not in document and set(document) - {"mds"}:
            raise ConfigError('the document has no "ec2" section (it has %s)'
                              % ", ".join(sorted(map(repr, set(document) - {"mds"}))))
        section = document.get("ec2") or {}
        if not isinstance(section, dict):
            raise ConfigError('"ec2" must be an object in IMDS path shape')
        unknown = sorted(set(section) - {"meta-data", "user-data", "dynamic"})
        if unknown:
            raise ConfigError('unknown key(s) in "ec2": %s (expected meta-data, user-data, '
                              'dynamic)' % ", ".join(unknown))
        settings = (document.get("mds") or {})
        if not isinstance(settings, dict):
            raise ConfigError('"mds" settings must be an object')
        settings = settings.get("ec2") or {}
        if not isinstance(settings, dict):
            raise ConfigError('"mds"."ec2" settings must be an object')
        tree = _Ec2Tree()
        tree.started_at = self.server.started_at
        tree.account_id = settings.get("account_id") or DEFAULT_ACCOUNT_ID
        if isinstance(tree.account_id, int) and not isinstance(tree.account_id, bool):
            tree.account_id = str(tree.account_id)   # 12 digits still; a lost 0 is refused
        if not (isinstance(tree.account_id, str) and re.fullmatch(r"\d{12}", tree.account_id)):
            raise ConfigError('"mds"."ec2"."account_id" must be text of 12 digits, like '
                              '"123456789012" (not %s)' % json.dumps(tree.account_id)[:40])
        self._compile_settings(tree, settings)
        meta = section.get("meta-data") or {}
        if not isinstance(meta, dict):
            raise ConfigError('"ec2"."meta-data" must be an object')
        if "iam" in meta:
            raise ConfigError('"ec2"."meta-data"."iam" is computed: configure roles under '
                              '"mds"."ec2"."roles" instead')
        merged = self._default_meta_data(meta, tree)
        events = merged.get("events")
        if not isinstance(events, dict) or not isinstance(events.get("maintenance", {}), dict):
            raise ConfigError('"meta-data"."events" is a directory (maintenance/, ...): '
                              'configure events under "mds"."ec2"."events"')
        _check_tag_keys(merged.get("tags"))
        tree.meta = self._compile_dir(merged, ("meta-data",), tree)
        tree.user_data = self._user_data(section.get("user-data"))
        tree.identity_document = self._identity_document(tree, merged, section)
        dynamic = section.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ConfigError('"ec2"."dynamic" must be an object')
        dynamic = _deep_merge({"fws": {"instance-monitoring": "disabled"}}, dynamic)
        dynamic.setdefault("instance-identity", {})
        tree.dynamic = self._compile_dir(dynamic, ("dynamic",), tree)
        identity = tree.dynamic["instance-identity"]
        identity["document"] = tree.identity_document.decode("utf-8")
        identity["signature"] = _Computed(lambda: self._identity_signatures(tree)[0])
        identity["rsa2048"] = _Computed(lambda: self._identity_signatures(tree)[1])
        # Real pkcs7 is SHA-1/DSA (spec §3.5); we have one RSA key, so the RSA-SHA256
        # SignedData is served under both names. Verifiers of AWS's DSA cert fail either way.
        identity["pkcs7"] = identity["rsa2048"]
        self._sync_providers(tree)
        return tree

    # -- settings ---------------------------------------------------------------------------

    def _compile_settings(self, tree, settings):
        options = self.options
        required = settings.get("imdsv2_required", False)
        if not isinstance(required, bool):
            raise ConfigError('"mds"."ec2"."imdsv2_required" must be true or false, not %r'
                              % (required,))
        tree.imdsv2_required = bool(options.get("imdsv2_required")) or required
        roles = settings.get("roles") or {}
        if not isinstance(roles, dict):
            raise ConfigError('"mds"."ec2"."roles" must map role names to settings')
        tree.roles = {}
        for name, spec in roles.items():
            tree.roles[str(name)] = self._role_spec(str(name), spec)
        default_role = settings.get("role", DEFAULT_ROLE_NAME)
        # CLI options describe the default role and win over the document.
        if options.get("role_arn"):
            arn = options["role_arn"]
            if not re.match(r"^arn:aws[\w-]*:iam::\d{12}:role/.+", arn):
                raise ConfigError("--role-arn %r is not an IAM role ARN" % arn)
            default_role = options.get("role_name") or arn.rsplit("/", 1)[-1]
            spec = {"source": "assume-role", "role_arn": arn}
            for key in ("sts_endpoint", "sts_region", "aws_profile", "external_id",
                        "role_session_name"):
                if options.get(key):
                    spec[key] = options[key]
            tree.roles[default_role] = self._role_spec(default_role, spec)
        elif options.get("static_credentials") or options.get("aws_profile"):
            default_role = options.get("role_name") or default_role or DEFAULT_ROLE_NAME
            tree.roles[default_role] = self._role_spec(default_role, {
                "source": "static", "aws_profile": options.get("aws_profile")})
        elif options.get("role_name"):
            default_role = options["role_name"]
        _check_role_name(default_role, '"mds"."ec2"."role"')
        tree.default_role = default_role
        clients = settings.get("clients") or {}
        if not isinstance(clients, dict):
            raise ConfigError('"mds"."ec2"."clients" must map source IP/CIDR to a role name')
        for address, role in clients.items():
            try:
                # A zone ("fe80::1%eth0") is dropped, as from clients' addresses: Python
                # 3.8 cannot parse one, and a client's zone is its own interface's name.
                network = ipaddress.ip_network(re.sub(r"%[^/]*", "", str(address)),
                                               strict=False)
            except ValueError:
                raise ConfigError('"mds"."ec2"."clients": %r is not an IP address or CIDR'
                                  % address)
            mapped = getattr(network.network_address, "ipv4_mapped", None)
            if mapped is not None and network.prefixlen >= 96:
                # Clients are matched by their IPv4 form; so is "::ffff:10.0.0.0/104".
                network = ipaddress.ip_network("%s/%d" % (mapped, network.prefixlen - 96))
            _check_role_name(role, '"mds"."ec2"."clients".%s' % address)
            tree.client_roles.append((network, role))
        tree.client_roles.sort(key=lambda item: -item[0].prefixlen)
        for role in [tree.default_role] + [r for _, r in tree.client_roles]:
            if role is not None and role not in tree.roles:
                tree.roles[role] = self._role_spec(role, {"source": "offline"})
        events = dict(settings.get("events") or {})
        for name, option in (("spot", "spot_interruption_after"),
                             ("rebalance", "rebalance_after")):
            if options.get(option) is not None:
                events[name] = _moved_by_flag(events.get(name), float(options[option]))
        tree.events = self._compile_events(events, tree.started_at)
        ecs = settings.get("ecs") or {}
        tree.ecs_path = ecs.get("path") or ECS_CREDENTIALS_PATH
        if not isinstance(tree.ecs_path, str) or not tree.ecs_path.startswith("/"):
            raise ConfigError('"mds"."ec2"."ecs"."path" must be a path starting with "/"')
        # The ECS path is matched before IMDS's own paths: one of those would be taken over,
        # token check included.
        first = [s for s in tree.ecs_path.split("/") if s][:1]
        if not first or first[0] in EC2_API_VERSIONS:
            raise ConfigError('"mds"."ec2"."ecs"."path" %s would hide the IMDS paths under '
                              'it: choose one outside /latest/ and the dated versions'
                              % json.dumps(tree.ecs_path)[:80])
        tree.ecs_auth_token = options.get("ecs_auth_token") or ecs.get("auth_token")
        if tree.ecs_auth_token is not None and not isinstance(tree.ecs_auth_token, str):
            raise ConfigError('"mds"."ec2"."ecs"."auth_token" must be text')

    def _role_spec(self, name, spec):
        if isinstance(spec, str):
            spec = {"source": spec}
        if spec is None:
            spec = {"source": "offline"}
        if not isinstance(spec, dict):
            raise ConfigError("role %s: settings must be an object or a source name" % name)
        spec = dict(spec)
        if "profile" in spec and "aws_profile" not in spec:
            spec["aws_profile"] = spec.pop("profile")
        source = spec.get("source") or ("assume-role" if spec.get("role_arn") else "offline")
        if source not in ("offline", "static", "assume-role"):
            raise ConfigError("role %s: unknown source %r (offline, static, assume-role)"
                              % (name, source))
        if source == "assume-role" and not spec.get("role_arn"):
            raise ConfigError("role %s: assume-role needs role_arn" % name)
        if spec.get("role_arn") is not None and not re.match(
                r"^arn:aws[\w-]*:iam::\d{12}:role/.+", str(spec["role_arn"])):
            raise ConfigError("role %s: role_arn %r is not an IAM role ARN"
                              % (name, spec["role_arn"]))
        # Checked here, not when the provider is built, so that a bad value fails the whole
        # (re)load before any running provider is touched.  STS's own range is 900-43200 s.
        for field, low, high, whole in (("duration", 900, 43200, True),
                                        ("refresh_margin", 0, 43200, False),
                                        ("retry_delay", 0.01, 3600, False)):
            value = spec.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high or (whole and value != int(value)):
                raise ConfigError("role %s: %s must be %s from %s to %s, not %r" % (
                    name, field, "whole seconds" if whole else "a number of seconds", low,
                    high, value))
        spec["source"] = source
        return spec

    def _compile_events(self, events, started_at):
        compiled = {}
        spot = events.get("spot")
        if spot:
            spot = {} if spot is True else dict(spot)
            action = spot.get("action", "terminate")
            if action not in ("terminate", "stop", "hibernate"):
                raise ConfigError("mds.ec2.events.spot.action must be terminate, stop or "
                                  "hibernate")
            notice_at = _event_time(spot, started_at, "mds.ec2.events.spot")
            # The action time is two minutes after the notice, as on EC2.
            compiled["spot"] = (notice_at, action,
                                notice_at + _event_seconds(spot, "notice", 120,
                                                            "mds.ec2.events.spot"))
        rebalance = events.get("rebalance")
        if rebalance:
            rebalance = {} if rebalance is True else dict(rebalance)
            compiled["rebalance"] = _event_time(rebalance, started_at,
                                                "mds.ec2.events.rebalance")
        maintenance = events.get("maintenance") or []
        if isinstance(maintenance, dict):
            maintenance = [maintenance]
        compiled["maintenance"] = []
        for index, event in enumerate(maintenance):
            visible_at = _event_time(event, started_at, "mds.ec2.events.maintenance")
            not_before = visible_at + _event_seconds(event, "starts_in", 7 * 86400,
                                                     "mds.ec2.events.maintenance")
            entry = collections.OrderedDict()
            entry["NotBefore"] = _rfc1123_short(not_before)
            entry["Code"] = event.get("code", "system-reboot")
            entry["Description"] = event.get("description", "scheduled reboot")
            entry["EventId"] = event.get("event_id") or "instance-event-0" + _stable_id(
                "%s/%d/%s" % (entry["Code"], index, not_before), 16)
            ends_at = None
            if event.get("duration", 1200) is not None:
                ends_at = not_before + _event_seconds(event, "duration", 1200,
                                                      "mds.ec2.events.maintenance")
                entry["NotAfter"] = _rfc1123_short(ends_at)
            entry["State"] = event.get("state", "active")
            compiled["maintenance"].append((visible_at, ends_at, entry))
        lifecycle = events.get("autoscaling") or events.get("target_lifecycle_state")
        if lifecycle:
            lifecycle = {} if lifecycle is True else dict(lifecycle)
            starts = _event_time(lifecycle, started_at, "mds.ec2.events.autoscaling")
            for field in ("initial", "state"):
                if not isinstance(lifecycle.get(field, ""), str):
                    raise ConfigError("mds.ec2.events.autoscaling.%s must be text" % field)
            compiled["autoscaling"] = (starts, lifecycle.get("initial", "InService"),
                                       lifecycle.get("state", "Terminated"))
        return compiled

    # -- the instance -------------------------------------------------------------------------

    def _default_meta_data(self, meta, tree):
        placement = meta.get("placement") or {}
        if not isinstance(placement, dict):
            raise ConfigError('"meta-data"."placement" must be an object')
        region = placement.get("region")
        zone = placement.get("availability-zone")
        if zone and not region:
            region = _region_of_zone(zone)
        elif region and not zone:
            zone = region + "a"
        elif not region:
            region, zone = "us-east-1", "us-east-1a"
        if not zone.startswith(region):
            raise ConfigError("placement: availability-zone %s is not in region %s (clients "
                              "derive the region from the zone)" % (zone, region))
        tree.region = region
        for key in ("local-ipv4", "public-ipv4", "mac", "instance-id", "local-hostname"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise ConfigError('"meta-data"."%s" must be text (other values are derived '
                                  'from it)' % key)
        local_ip = str(meta.get("local-ipv4") or "172.31.16.10")
        public_ip = meta.get("public-ipv4", "203.0.113.25")
        mac = str(meta.get("mac") or "0e:1f:2a:3b:4c:5d")
        instance_id = str(meta.get("instance-id") or "i-0a1b2c3d4e5f67890")
        # A configured local-hostname (resource-name hostnames) is also the host name and the
        # interface's, as they agree on EC2.
        local_host = meta.get("local-hostname") or "ip-%s.%s" % (
            local_ip.replace(".", "-"), _hostname_suffix(region))
        public_host = ("ec2-%s.%s" % (str(public_ip).replace(".", "-"),
                                      _hostname_suffix(region, public=True))
                       if public_ip else None)
        security_groups = meta.get("security-groups") or ["default"]
        interface = collections.OrderedDict((
            ("device-number", "0"),
            ("interface-id", "eni-0" + _stable_id(instance_id + "/eni", 16)),
            ("local-hostname", local_host),
            ("local-ipv4s", local_ip),
            ("mac", mac),
            ("network-card-index", "0"),
            ("owner-id", tree.account_id),
            ("security-group-ids", "sg-0" + _stable_id(instance_id + "/sg", 16)),
            ("security-groups", security_groups),
            ("subnet-id", "subnet-0" + _stable_id(instance_id + "/subnet", 16)),
            ("subnet-ipv4-cidr-block", "172.31.16.0/20"),
            ("vpc-id", "vpc-0" + _stable_id(instance_id + "/vpc", 16)),
            ("vpc-ipv4-cidr-block", "172.31.0.0/16"),
            ("vpc-ipv4-cidr-blocks", "172.31.0.0/16"),
        ))
        if public_ip:
            interface["public-hostname"] = public_host
            interface["public-ipv4s"] = str(public_ip)
            interface["ipv4-associations"] = {str(public_ip): local_ip}
        default = {
            "ami-id": "ami-0" + _stable_id(instance_id + "/ami", 16),
            "ami-launch-index": "0",
            "ami-manifest-path": "(unknown)",
            "block-device-mapping": {"ami": "/dev/xvda", "root": "/dev/xvda"},
            "hostname": local_host,
            "instance-action": "none",
            "instance-id": instance_id,
            "instance-life-cycle": "spot" if tree.events.get("spot") else "on-demand",
            "instance-type": "t3.micro",
            "local-hostname": local_host,
            "local-ipv4": local_ip,
            "mac": mac,
            "network": {"interfaces": {"macs": {mac: interface}}},
            "placement": {"availability-zone": zone,
                          "availability-zone-id": availability_zone_id(region, zone),
                          "region": region},
            "profile": "default-hvm",
            "reservation-id": "r-0" + _stable_id(instance_id + "/reservation", 16),
            "security-groups": security_groups,
            "services": {"domain": "amazonaws.com", "partition": "aws"},
        }
        if public_ip:
            default["public-hostname"] = public_host
            default["public-ipv4"] = str(public_ip)
        merged = _deep_merge(default, meta)
        merged["placement"] = _deep_merge(merged.get("placement") or {},
                                          {"region": region, "availability-zone": zone})
        if "events" not in merged:
            merged["events"] = {"maintenance": {}}
        return merged

    def _compile_dir(self, value, path, tree):
        node = {}
        for key, child in value.items():
            key = str(key)
            child_path = path + (key,)
            if child is None:
                continue
            if path == ("meta-data",) and key == "public-keys" and isinstance(child, dict):
                keys = self._public_keys(child, tree)
                if keys:                # an instance without a key has no public-keys/
                    node[key] = keys
            elif child_path in _EC2_JSON_LEAVES and isinstance(child, (dict, list)):
                node[key] = aws_json(child)
            elif isinstance(child, dict):
                node[key] = self._compile_dir(child, child_path, tree)
            elif isinstance(child, list):
                node[key] = "\n".join(self._scalar(v, child_path) for v in child)
            else:
                node[key] = self._scalar(child, child_path)
        return node

    @staticmethod
    def _scalar(value, path):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float, str)):
            return str(value)
        raise ConfigError("ec2 document: %s holds a %s where text was expected"
                          % ("/".join(path), type(value).__name__))

    def _public_keys(self, keys, tree):
        # Document shape {"my-key": "ssh-rsa ..."}; served as the listing "0=my-key" and the
        # directory public-keys/0/openssh-key (spec §3.4).
        node = {}
        tree.public_keys = []
        present = [(name, material) for name, material in keys.items() if material is not None]
        for index, (name, material) in enumerate(present):
            if isinstance(material, dict):          # the served shape, {"openssh-key": ...}
                material = material.get("openssh-key")
            if not isinstance(material, str):
                raise ConfigError('"meta-data"."public-keys"."%s" must be the key text' % name)
            node[str(index)] = {"openssh-key": material}
            tree.public_keys.append((str(index), str(name)))
        return node

    @staticmethod
    def _user_data(value):
        if value is None:
            return None
        if isinstance(value, dict) and "base64" in value:
            try:
                # `base64 file` wraps its output at 76 columns; EC2's API takes that too.
                return base64.b64decode("".join(value["base64"].split()), validate=True)
            except (ValueError, TypeError, AttributeError):
                raise ConfigError('"ec2"."user-data"."base64" is not valid base64')
        if isinstance(value, str):
            return value.encode("utf-8")
        raise ConfigError('"ec2"."user-data" must be text or {"base64": "..."}')

    def _identity_document(self, tree, meta, section):
        placement = meta.get("placement") or {}
        instance_type = str(meta.get("instance-type", ""))
        architecture = "arm64" if re.match(r"^[a-z]+\d+[a-z]*g[a-z]*\.", instance_type) \
            else "x86_64"
        # Key order as in real captures (spec §3.5); nulls stay JSON null (spec §9.12).
        document = collections.OrderedDict((
            ("accountId", tree.account_id),
            ("architecture", architecture),
            ("availabilityZone", placement.get("availability-zone")),
            ("billingProducts", None),
            ("devpayProductCodes", None),
            ("marketplaceProductCodes", None),
            ("imageId", meta.get("ami-id")),
            ("instanceId", meta.get("instance-id")),
            ("instanceType", instance_type),
            ("kernelId", meta.get("kernel-id")),
            ("pendingTime", format_imds_time(tree.started_at)),
            ("privateIp", meta.get("local-ipv4")),
            ("ramdiskId", meta.get("ramdisk-id")),
            ("region", tree.region),
            ("version", "2017-09-30"),
        ))
        given = ((section.get("dynamic") or {}).get("instance-identity") or {}).get("document")
        if isinstance(given, dict):
            document.update(given)
        elif isinstance(given, str):
            return given.encode("utf-8")
        return aws_json(document).encode("utf-8")

    def _identity_signatures(self, tree):
        """(signature, rsa2048) for the tree's identity document, signed by the server key."""
        key = self.server.signing_key.get()
        cache_key = (id(key), tree.identity_document)
        with self._identity_guard:
            cached = self._identity_cache.get(cache_key)
            if cached is None:
                certificate = self.server.signing_certificate(key)
                signature = base64.b64encode(key.sign(tree.identity_document)).decode("ascii")
                signed = pkcs7_signed_data(tree.identity_document, key, certificate)
                cached = (_wrap64(signature), _wrap64(base64.b64encode(signed).decode("ascii")))
                self._identity_cache = {cache_key: cached}
            return cached

    # -- roles and credentials ----------------------------------------------------------------

    def _sync_providers(self, tree):
        wanted = {}
        for name, spec in tree.roles.items():
            wanted[(name, json.dumps(spec, sort_keys=True))] = (name, spec)
        with self._providers_guard:
            # Build every new provider before stopping any old one: if a build fails, the
            # reload fails and the tree still serving keeps providers that still run.
            fresh = {key: self._build_provider(name, spec, tree)
                     for key, (name, spec) in wanted.items() if key not in self._providers}
            for key in [key for key in self._providers if key not in wanted]:
                self._providers.pop(key).stop(wait=False)
            for key, provider in fresh.items():
                self._providers[key] = provider
                # Providers that fetch upstream start at once, so the first client never
                # waits for STS; start() does not block here.
                if isinstance(provider, AssumeRoleCredentials):
                    provider.start(wait=0)
        tree.providers = {name: self._providers[key] for key, (name, _) in wanted.items()}

    def _build_provider(self, name, spec, tree):
        source = spec["source"]
        if source == "offline":
            return OfflineRoleCredentials(name)
        profile = spec.get("aws_profile")

        def load_keys():
            return resolve_aws_source_keys(profile)

        if source == "static":
            return StaticRoleCredentials(load_keys, where=(
                "profile %s" % profile if profile else "the environment"))
        region = spec.get("sts_region") or spec.get("region") or resolve_aws_region(profile)
        return AssumeRoleCredentials(
            spec["role_arn"], load_keys, region=region, endpoint=spec.get("sts_endpoint"),
            session_name=spec.get("role_session_name") or "mds-" + name[:58],
            duration=int(spec.get("duration", 3600)), external_id=spec.get("external_id"),
            refresh_margin=float(spec.get("refresh_margin", 1800)),
            retry_delay=float(spec.get("retry_delay", 5)), should_stop=self._stopping)

    def role_for_client(self, tree, client_ip):
        """The role a client sees: the most specific "clients" entry, else the default."""
        try:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return tree.default_role
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        for network, role in tree.client_roles:
            if address.version == network.version and address in network:
                return role
        return tree.default_role

    def role_arn(self, tree, role):
        spec = tree.roles.get(role) or {}
        return spec.get("role_arn") or "arn:aws:iam::%s:role/%s" % (tree.account_id, role)

    def role_credentials(self, tree, role):
        """The role's credential dict (epoch times); raises CredentialError."""
        provider = tree.providers.get(role)
        if provider is None:
            raise CredentialError("role %s has no credential provider" % role, status=500)
        return provider.credentials()

    def _log_credential_error(self, role, error):
        now = time.time()
        message = str(error)
        last = self._error_log.get(role)
        if last is None or last[0] != message or now - last[1] > 60:
            self._error_log[role] = (message, now)
            _ec2_log.warning("credentials for role %s unavailable: %s", role, message)

    def _credentials_document(self, tree, role):
        try:
            creds = self.role_credentials(tree, role)
        except CredentialError as error:
            self._log_credential_error(role, error)
            # Real IMDS answers 200 with a JSON error (spec §4 "Error form"): botocore logs it
            # and yields no credentials, Go rejects a Code other than Success.
            return aws_json(collections.OrderedDict((
                ("Code", "AssumeRoleUnauthorizedAccess"),
                ("Message", "mds cannot provide credentials for role %s: %s"
                 % (role, _for_clients(error))),
                ("LastUpdated", format_imds_time(time.time())),
            )))
        return _credentials_json(creds)

    def _iam_info(self, tree, role):
        spec = tree.roles.get(role) or {}
        account = tree.account_id
        if spec.get("role_arn"):
            account = spec["role_arn"].split(":")[4]
        # The instance profile is named after the role: ec2-metadata derives the role name
        # from the ARN's last segment (spec §4, §9.10).
        return aws_json(collections.OrderedDict((
            ("Code", "Success"),
            ("LastUpdated", format_imds_time(tree.started_at)),
            ("InstanceProfileArn", "arn:aws:iam::%s:instance-profile/%s" % (account, role)),
            ("InstanceProfileId", "AIPA" + _stable_id(account + "/" + role, 17,
                                                      "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")),
        )))

    # -- per-request view of the tree -------------------------------------------------------

    def _meta_view(self, tree, role, now):
        root = dict(tree.meta)
        if role is not None:
            root["iam"] = {
                "info": _Computed(lambda: self._iam_info(tree, role)),
                "security-credentials": {
                    role: _Computed(lambda: self._credentials_document(tree, role))},
            }
        identity = self._identity_credentials
        account = tree.account_id
        root["identity-credentials"] = {"ec2": {
            "info": aws_json(collections.OrderedDict((
                ("Code", "Success"), ("LastUpdated", format_imds_time(tree.started_at)),
                ("AccountId", account)))),
            "security-credentials": {"ec2-instance": _Computed(
                lambda: _credentials_json(identity.credentials()))},
        }}
        events = tree.events
        spot = events.get("spot")
        if spot and now >= spot[0]:
            root["spot"] = {
                "instance-action": json.dumps({"action": spot[1],
                                               "time": format_imds_time(spot[2])}),
                "termination-time": format_imds_time(spot[2]),
            }
        rebalance = events.get("rebalance")
        scheduled, history = [], []
        for visible_at, ends_at, entry in events.get("maintenance", []):
            if ends_at is not None and now >= ends_at:
                history.append(dict(entry, State="completed"))    # done: moved to history
            elif now >= visible_at:
                scheduled.append(entry)
        ev = dict(root.get("events") or {})
        maintenance = dict(ev.get("maintenance") or {})
        # Both are listed on every instance and answer an empty array while there is nothing
        # to report.  aws.md §3.4 marks "[ ]" UNCERTAIN (one 404 was seen, during a spot
        # interruption), but cloud-init crawls every listed meta-data leaf at each boot and
        # gives up on a 404 on AWS, so the real service must answer 200 there.
        for name, entries in (("history", history), ("scheduled", scheduled)):
            if entries or name not in maintenance:
                maintenance[name] = aws_json(entries)
        ev["maintenance"] = maintenance
        if rebalance is not None and now >= rebalance:
            ev["recommendations"] = {"rebalance": json.dumps(
                {"noticeTime": format_imds_time(rebalance)})}
        root["events"] = ev
        lifecycle = events.get("autoscaling")
        if lifecycle:
            root["autoscaling"] = {"target-lifecycle-state":
                                   lifecycle[2] if now >= lifecycle[0] else lifecycle[1]}
        return root


    # -- IMDSv2 session tokens --------------------------------------------------------------

    def _mint_token(self, ttl):
        # Stateless: version, expiry (ms), nonce and a MAC, so that no token table grows and
        # tokens outlive config reloads. 40 bytes -> 56 URL-safe base64 characters like EC2's.
        expiry_ms = int((time.time() + ttl) * 1000)
        payload = b"\x01\x00\x00\x00" + expiry_ms.to_bytes(6, "big") + secrets.token_bytes(6)
        return base64.urlsafe_b64encode(payload + self._token_mac(payload)).decode("ascii")

    def _token_mac(self, payload):
        return hmac.new(self._token_key, payload, hashlib.sha256).digest()[:24]

    def _token_remaining(self, token):
        """Seconds a token has left, or None if it is unknown, forged or expired."""
        # Exactly the 56 characters _mint_token writes: b64decode would skip stray ones.
        if not re.fullmatch(r"[A-Za-z0-9_-]{54}==", token.strip()):
            return None
        raw = base64.urlsafe_b64decode(token.strip())
        payload, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, self._token_mac(payload)):
            return None
        remaining = int.from_bytes(payload[4:10], "big") / 1000.0 - time.time()
        return remaining if remaining > 0 else None

    def _token_response(self, request, version):
        if version != "latest":
            return ec2_error_response(403)     # versioned token paths are refused (spec §2.1)
        if request.method == "OPTIONS":
            # [INFER] the Allow header of the real 405 lists OPTIONS, so it is answered.
            return Response(200, b"", EC2_TEXT, [("Allow", "OPTIONS, PUT")])
        if request.method != "PUT":
            # The reason phrase of a real capture (spec 1.1).
            return Response(405, b"", EC2_TEXT, [("Allow", "OPTIONS, PUT")],
                            reason="Not Allowed")
        if request.headers.get("X-Forwarded-For") is not None:
            return ec2_error_response(403)
        ttl_text = (request.headers.get(TOKEN_TTL_HEADER) or "").strip()
        if not re.fullmatch(r"[0-9]{1,12}", ttl_text) or not 1 <= int(ttl_text) <= MAX_TOKEN_TTL:
            return ec2_error_response(400)
        ttl = int(ttl_text)
        return Response(200, self._mint_token(ttl), EC2_TEXT, [(TOKEN_TTL_HEADER, str(ttl))])

    # -- requests ---------------------------------------------------------------------------

    def respond(self, request):
        tree = self.server.store.tree
        path = request.path
        if path.startswith("/mds/"):
            return self._mds_endpoint(request, tree, path)
        if path == tree.ecs_path:
            return self._ecs_response(request, tree)
        segments = [urllib.parse.unquote(s) for s in path.split("/") if s]
        if segments and segments[0] not in EC2_API_VERSIONS:
            return ec2_error_response(404)
        if segments[1:] == ["api", "token"]:
            return self._token_response(request, segments[0])
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"", EC2_TEXT, [("Allow", "GET, HEAD")])
        headers = [("Last-Modified", tree.last_modified)]
        token = request.headers.get(TOKEN_HEADER)
        if token is not None:
            if request.headers.get("X-Forwarded-For") is not None:
                return ec2_error_response(403)
            remaining = self._token_remaining(token)
            if remaining is None:
                return ec2_error_response(401)
            headers.append((TOKEN_TTL_RESPONSE_HEADER, str(max(1, int(remaining)))))
        elif tree.imdsv2_required:
            return ec2_error_response(401)
        if not segments:
            return self._text("\n".join(EC2_API_VERSIONS), headers)
        return self._serve(request, tree, segments[1:], headers)

    def _text(self, text, headers, content_type=EC2_TEXT):
        return Response(200, text, content_type, headers)

    def _serve(self, request, tree, segments, headers):
        if not segments:
            entries = ["dynamic", "meta-data"] + (["user-data"] if tree.user_data is not None
                                                  else [])
            return self._text("\n".join(entries), headers)
        category, rest = segments[0], segments[1:]
        if category == "user-data":
            if tree.user_data is None or rest:
                return ec2_error_response(404)
            return Response(200, tree.user_data, EC2_OCTETS, headers)
        if category == "meta-data":
            role = self.role_for_client(tree, request.client_ip)
            root = self._meta_view(tree, role, time.time())
        elif category == "dynamic":
            root = tree.dynamic
        else:
            return ec2_error_response(404)
        node = root
        for segment in rest:
            if not isinstance(node, dict) or segment not in node:
                return ec2_error_response(404)
            node = node[segment]
        if isinstance(node, dict):
            return self._text(self._listing(node, category, rest, tree), headers)
        if isinstance(node, _Computed):
            try:
                body = node.render()
            except CredentialError as error:
                _ec2_log.warning("cannot serve %s: %s", request.path, error)
                return Response(error.status if error.status >= 500 else 500,
                                b"", EC2_TEXT, headers)
            if body is None:
                return ec2_error_response(404)
            return Response(200, body, node.content_type, headers)
        return self._text(node, headers)

    @staticmethod
    def _listing(node, category, rest, tree):
        if category == "meta-data" and rest == ["public-keys"]:
            return "\n".join("%s=%s" % pair for pair in tree.public_keys)
        return "\n".join(name + "/" if isinstance(child, dict) else name
                         for name, child in sorted(node.items()))

    # -- mds's own endpoints ------------------------------------------------------------------

    def _mds_endpoint(self, request, tree, path):
        if path == tree.ecs_path:
            return self._ecs_response(request, tree)
        if path == EC2_CERTIFICATE_PATH and request.method in ("GET", "HEAD"):
            try:
                certificate = self.server.signing_certificate()
            except CredentialError as error:
                return Response(error.status, "%s\n" % error, "text/plain; charset=utf-8")
            return Response(200, pem_encode("CERTIFICATE", certificate),
                            "application/x-pem-file")
        return ec2_error_response(404)

    def _ecs_response(self, request, tree):
        """ECS/EKS container credentials (spec §8): same role credentials, JSON, optional token."""
        def error(status, code, message):
            return Response(status, json.dumps({"Code": code, "Message": message}),
                            "application/json")

        if request.method not in ("GET", "HEAD"):
            return error(405, "MethodNotAllowed", "use GET")
        if tree.ecs_auth_token is not None:
            given = request.headers.get("Authorization")
            if given is None:
                return error(401, "AccessDenied", "missing Authorization header")
            if not hmac.compare_digest(given.encode("utf-8"),
                                       tree.ecs_auth_token.encode("utf-8")):
                return error(403, "AccessDenied", "Authorization token does not match")
        role = self.role_for_client(tree, request.client_ip)
        if role is None:
            return error(404, "NoRole", "no role is configured for %s" % request.client_ip)
        try:
            creds = self.role_credentials(tree, role)
        except CredentialError as failure:
            self._log_credential_error(role, failure)
            return error(502 if failure.status >= 500 else failure.status,
                         "CredentialsUnavailable", _for_clients(failure))
        arn = self.role_arn(tree, role)
        return Response(200, json.dumps(collections.OrderedDict((
            ("AccessKeyId", creds["AccessKeyId"]),
            ("SecretAccessKey", creds["SecretAccessKey"]),
            ("Token", creds["Token"]),
            ("Expiration", format_imds_time(creds["Expiration"])),
            ("RoleArn", arn),
            ("AccountId", arn.split(":")[4]),
        ))), "application/json")

    # -- what the server tells users --------------------------------------------------------

    def client_env(self):
        """Variables that point AWS SDKs at this server's IMDS."""
        return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": self.server.url + "/"}

    def ecs_env(self):
        """Variables for the ECS container-credentials endpoint (instead of IMDS)."""
        tree = self.server.store.tree
        env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": self.server.url + tree.ecs_path}
        if tree.ecs_auth_token:
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = tree.ecs_auth_token
        return env

    def schedule_event(self, kind, delay=0.0, **fields):
        """Make an event ("spot", "rebalance", "autoscaling", "maintenance") due in `delay` s."""
        spec = dict(fields, at=time.time() + float(delay))
        store = self.server.store
        with store.changed:      # read and write as one step, or a concurrent edit is lost
            if kind == "maintenance":
                document = store.document
                current = (((document.get("mds") or {}).get("ec2") or {}).get("events") or {})
                existing = current.get("maintenance") or []
                spec = (existing if isinstance(existing, list) else [existing]) + [spec]
            self.server.update("mds/ec2/events/" + kind, spec)

    def startup_warnings(self):
        """Warnings for the startup log, as loud as the GCE flavor's offline one."""
        tree = self.server.store.tree
        offline = sorted(name for name, provider in tree.providers.items()
                         if isinstance(provider, OfflineRoleCredentials))
        if not offline:
            return []
        return ["OFFLINE MODE: the credentials of role%s %s are minted locally and AWS will "
                "reject them" % ("s" if len(offline) > 1 else "", ", ".join(offline))]

    def startup_lines(self):
        """Lines for the startup log (no secrets)."""
        tree = self.server.store.tree
        url = self.server.url
        lines = ["EC2 IMDS: IMDSv2 %s; region %s; instance %s"
                 % ("required" if tree.imdsv2_required else "optional (v1 allowed)",
                    tree.region, tree.meta.get("instance-id"))]
        for name, provider in sorted(tree.providers.items()):
            lines.append("role %s%s: %s" % (name, " (default)" if name == tree.default_role
                                            else "", provider.describe()))
        for network, role in tree.client_roles:
            lines.append("clients %s -> role %s" % (network, role))
        lines.append("instance identity documents verify against %s%s"
                     % (url, EC2_CERTIFICATE_PATH))
        lines.append("ECS credentials: export AWS_CONTAINER_CREDENTIALS_FULL_URI=%s%s%s"
                     % (url, tree.ecs_path, " (plus AWS_CONTAINER_AUTHORIZATION_TOKEN)"
                        if tree.ecs_auth_token else ""))
        if not _sdks_accept_container_host(self.server.authority.rsplit(":", 1)[0].strip("[]")):
            lines.append("  (botocore and the JS SDK refuse an http FULL_URI on this address: "
                         "only loopback, 169.254.170.2, 169.254.170.23 and fd00:ec2::23 are "
                         "accepted; a second mds on 169.254.170.2:80 serves "
                         "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=%s)" % tree.ecs_path)
        for kind, value in sorted(tree.events.items()):
            if kind == "maintenance":
                for at, _, entry in value:
                    lines.append("event maintenance %s visible at %s" % (entry["Code"],
                                                                         format_imds_time(at)))
            elif value:
                at = value[0] if isinstance(value, tuple) else value
                lines.append("event %s at %s" % (kind, format_imds_time(at)))
        return lines


def _sdks_accept_container_host(host):
    """Whether the AWS SDKs take an http:// container-credentials URI on this host (botocore's
    ContainerMetadataFetcher and the JS SDK's fromHttp allow only these without TLS)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.is_loopback or str(address) in ("169.254.170.2", "169.254.170.23",
                                                   "fd00:ec2::23")


def _for_clients(error):
    """An upstream failure as any local client may read it: STS names the server's own IAM
    user or session in AccessDenied messages, which only the operator's log should show."""
    return re.sub(r"arn:aws[\w-]*:(?:iam|sts)::\d+:(?:user|assumed-role|federated-user)/\S+",
                  "[the server's AWS identity]", str(error))


def _credentials_json(creds):
    """The credentials document as IMDS serves it, field order and time format included
    (spec section 4: Go needs Code, botocore and JS need Token, all parse Expiration)."""
    return aws_json(collections.OrderedDict((
        ("Code", "Success"),
        ("LastUpdated", format_imds_time(creds["LastUpdated"])),
        ("Type", "AWS-HMAC"),
        ("AccessKeyId", creds["AccessKeyId"]),
        ("SecretAccessKey", creds["SecretAccessKey"]),
        ("Token", creds["Token"]),
        ("Expiration", format_imds_time(creds["Expiration"])),
    )))


def _wrap64(text):
    return "\n".join(text[i:i + 64] for i in range(0, len(text), 64))


def add_ec2_arguments(parser):
    """Add the EC2 flavor's options to the CLI parser (read back by ec2_options_from_args)."""
    group = parser.add_argument_group("EC2 flavor (--flavor ec2)")
    group.add_argument("--imdsv2-required", action="store_true",
                       help="reject requests without an IMDSv2 session token (401)")
    group.add_argument("--role-name", metavar="NAME",
                       help="name of the instance's role (default %s, or the last part of "
                            "--role-arn)" % DEFAULT_ROLE_NAME)
    group.add_argument("--role-arn", metavar="ARN",
                       help="serve real credentials from STS AssumeRole of this role, signed "
                            "with the server's own AWS keys (environment or --aws-profile)")
    group.add_argument("--sts-endpoint", metavar="URL",
                       help="STS endpoint for --role-arn (default: the regional endpoint)")
    group.add_argument("--sts-region", metavar="REGION",
                       help="region for STS (default AWS_REGION, AWS_DEFAULT_REGION or the "
                            "profile's region; none means the global endpoint)")
    group.add_argument("--external-id", metavar="ID", help="ExternalId for --role-arn")
    group.add_argument("--aws-profile", metavar="PROFILE",
                       help="profile in ~/.aws/credentials / ~/.aws/config holding the "
                            "server's keys; without --role-arn they are served as the role's")
    group.add_argument("--static-credentials", action="store_true",
                       help="serve the server's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/"
                            "AWS_SESSION_TOKEN as the role's credentials")
    group.add_argument("--spot-interruption-after", metavar="DURATION", type=duration_argument,
                       help="publish a spot interruption notice this long after startup "
                            "(e.g. 2m); the action time is 2 minutes later")
    group.add_argument("--rebalance-after", metavar="DURATION", type=duration_argument,
                       help="publish a rebalance recommendation this long after startup")
    group.add_argument("--ecs-auth-token", metavar="TOKEN",
                       help="require this Authorization value on the ECS credentials "
                            "endpoint %s" % ECS_CREDENTIALS_PATH)
    return group


# The MetadataServer `options` of the EC2 flavor: its command line's flags.
EC2_OPTIONS = ("imdsv2_required", "role_name", "role_arn", "sts_endpoint", "sts_region",
               "external_id", "aws_profile", "static_credentials", "spot_interruption_after",
               "rebalance_after", "ecs_auth_token")


def ec2_options_from_args(args):
    """The MetadataServer `options` dict for the EC2 flag values in an argparse namespace."""
    return {name: getattr(args, name) for name in EC2_OPTIONS
            if getattr(args, name, None) not in (None, False)}


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
    an upstream.  A token that lives less than twice the margin uses half its lifetime as its
    margin instead.  At most one mint per key is in flight, however many requests arrive cold,
    and expired entries are dropped, so the cache stays as small as the tokens in use.
    """

    MAX_ENTRIES = 1000      # tokens, and failures; real clients use a handful of keys
    MAX_KEY_CHARS = 4096    # an audience or scope list this long is minted, not kept

    def __init__(self, margin=300, refresh_ahead=600, clock=time.time, monotonic=None):
        self.margin = margin
        self.refresh_ahead = refresh_ahead
        self.clock = clock
        # Expiries are wall-clock times (Google's), but a pause is a duration: on the wall
        # clock, a clock step during a failing mint would stretch a 1 s back-off to hours or
        # turn it into an hour's wait.  A test that sets one clock sets both.
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self._tokens = {}          # key -> (token, usable until, refresh from)
        self._staged = {}          # key -> the same, fetched ahead of the swap
        self._locks = {}           # key -> [lock, users]: only while someone uses the key
        self._failures = {}        # key -> (retry at (monotonic), tries, exception)
        self._refreshing = set()
        self._guard = threading.Lock()
        self._next_prune = 0.0

    def _acquire(self, key):
        with self._guard:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [threading.Lock(), 0]
            entry[1] += 1
        entry[0].acquire()
        return entry

    def _release(self, key, entry):
        entry[0].release()
        with self._guard:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    def _entry(self, token, now):
        lifetime = max(0.0, token.expiry - now)
        margin = min(self.margin, lifetime / 2)
        ahead = margin + min(self.refresh_ahead - self.margin, lifetime / 4)
        return (token, token.expiry - margin, token.expiry - ahead)

    def get(self, key, mint, cache=True):
        """The token for `key`, minted by `mint()` when there is none to hand out; with
        `cache` false (a client-chosen key too large to keep), minted every time."""
        entry = self._tokens.get(key)
        now = self.clock()
        if entry is not None and now <= entry[1]:
            if now > entry[2] and key not in self._staged and self._may_try(key):
                self._refresh_in_background(key, mint)
            return entry[0]
        if not cache:
            return _mint_checked(mint)
        lock = self._acquire(key)
        try:
            # A background refresh of this key holds the lock while it mints: waiting for it
            # here means one upstream call, not two.
            entry = self._tokens.get(key)
            now = self.clock()
            if entry is not None and now <= entry[1]:
                return entry[0]
            token = entry[0] if entry is not None else None
            staged = self._staged.pop(key, None)
            if staged is not None and now <= staged[1]:
                self._tokens[key] = staged
                return staged[0]
            if not self._may_try(key):
                return self._fallback(token, now, self._failures[key][2])
            started = self.monotonic()
            try:
                fresh = _mint_checked(mint)
            except CredentialError as exc:
                failure = self._record_failure(key, started, exc)
                failed = self.clock()
                self._prune(failed)
                return self._fallback(token, failed, failure)
            self._failures.pop(key, None)
            self._tokens[key] = self._entry(fresh, self.clock())
            self._prune(now)
            return fresh
        finally:
            self._release(key, lock)

    def _prune(self, now):
        # Tokens nobody asked for again lapse; an audience per request must not grow the cache
        # without bound.
        if now < self._next_prune and len(self._tokens) <= self.MAX_ENTRIES and \
                len(self._failures) <= self.MAX_ENTRIES:
            return
        self._next_prune = now + 60
        for key in [k for k, e in list(self._tokens.items()) if e[0].expiry <= now]:
            self._tokens.pop(key, None)
            self._staged.pop(key, None)
        # A refresh that ended after its key was forgotten leaves a staged token only.
        for key in [k for k, e in list(self._staged.items()) if e[0].expiry <= now]:
            self._staged.pop(key, None)
        ticks = self.monotonic()
        for key in [k for k, f in list(self._failures.items()) if f[0] <= ticks
                    and k not in self._tokens]:
            self._failures.pop(key, None)
        if len(self._tokens) > self.MAX_ENTRIES:
            by_expiry = sorted(list(self._tokens.items()), key=lambda item: item[1][0].expiry)
            for key, _ in by_expiry[:len(by_expiry) - self.MAX_ENTRIES]:
                self._tokens.pop(key, None)
                self._staged.pop(key, None)
        if len(self._failures) > self.MAX_ENTRIES:    # the soonest retried go first
            by_retry = sorted(list(self._failures.items()), key=lambda item: item[1][0])
            for key, _ in by_retry[:len(by_retry) - self.MAX_ENTRIES]:
                self._failures.pop(key, None)

    def _may_try(self, key):
        failure = self._failures.get(key)
        return failure is None or self.monotonic() >= failure[0]

    def _record_failure(self, key, started, exc):
        # Back off (1 s, 2 s, 4 s ... 30 s) so a dead upstream is not hammered, whether the
        # failed mint was a request's or a background refresh's; counted from the failure, and
        # never shorter than the failed mint took.  A mint that hung for its whole deadline is
        # then not restarted by the client retries queued behind it: they get its 502 and its
        # cause at once, inside their own short timeouts (google-auth and gcp-metadata: 3 s).
        failed = self.monotonic()
        failure = self._failures.get(key)
        tries = failure[1] + 1 if failure else 1
        pause = max(min(30, 2 ** (tries - 1)), failed - started)
        # The message and status only: the exception's traceback would keep the failed
        # request (an assertion, a signed body) alive as long as the entry.
        self._failures[key] = (failed + pause, tries, (str(exc), exc.status))
        return self._failures[key][2]

    def _fallback(self, token, now, failure):
        # A cached token that still works beats an error while the upstream recovers.
        if token is not None and token.expiry - now > 60:
            return token
        message, status = failure
        raise CredentialError(message, status)

    def _refresh_in_background(self, key, mint):
        with self._guard:
            if key in self._refreshing:
                return
            self._refreshing.add(key)

        def refresh():
            lock = self._acquire(key)
            try:
                started = self.monotonic()
                fresh = _mint_checked(mint)
                self._staged[key] = self._entry(fresh, self.clock())
                self._failures.pop(key, None)
            except CredentialError as exc:
                self._record_failure(key, started, exc)
                log.warning("background token refresh failed (will retry): %s", exc)
            finally:
                self._release(key, lock)
                with self._guard:
                    self._refreshing.discard(key)

        threading.Thread(target=refresh, name="mds-refresh", daemon=True).start()

    def forget(self, unwanted):
        """Drop every token and failure whose key `unwanted(key)` picks."""
        with self._guard:
            for table in (self._tokens, self._staged, self._failures):
                for key in [k for k in list(table) if unwanted(k)]:
                    table.pop(key, None)


def _mint_checked(mint):
    """mint(), with any failure a CredentialError: a bug or an odd upstream answer must back
    off and answer 5xx like any upstream failure, not hammer the upstream with 500s."""
    try:
        token = mint()
        if not isinstance(token.expiry, (int, float)) or not math.isfinite(token.expiry):
            raise ValueError("the token has no usable expiry")
        return token
    except CredentialError:
        raise
    except Exception as exc:
        import traceback
        # Where it failed, for a bug report; its message only in redacted form, below.
        log.debug("minting a token failed at:\n%s", "".join(traceback.format_tb(
            exc.__traceback__)))
        raise CredentialError("minting the token failed: %s: %s"
                              % (type(exc).__name__, _redact(exc)), status=500) from None


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
        return google_id_token(self.signing_key.get(), self.email, self.unique_id, audience,
                               self.lifetime, compute_claims)

    def describe(self):
        return "offline (locally minted tokens for %s; Google will reject them)" % self.email


def google_id_token(signer, email_address, unique_id, audience, lifetime, compute_claims=None):
    """An identity token shaped like the metadata server's (spec 10.2), signed by `signer`:
    the offline key, or a service account's own key for self-signed tokens."""
    now = int(time.time())
    claims = {"aud": audience, "azp": unique_id, "email": email_address, "email_verified": True,
              "exp": now + lifetime, "iat": now, "iss": GOOGLE_ID_TOKEN_ISSUER,
              "sub": unique_id}
    if compute_claims is not None:
        claims["google"] = {"compute_engine": compute_claims}
    return Token(jwt_encode(claims, signer), float(claims["exp"]))


class SignerWithKeyId:
    """One shared signer (a TPM key) seen under an account's own key id, so that accounts
    sharing the key each get their `kid` without changing the signer under the others."""

    def __init__(self, signer, key_id=None):
        self._signer = signer
        self.key_id = key_id or signer.key_id

    def sign(self, message):
        return self._signer.sign(message)

    def public_numbers(self):
        return self._signer.public_numbers()

    def __getattr__(self, name):          # fingerprint(), describe(), ...
        return getattr(self._signer, name)


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
        self._needed = threading.Event()
        self._cancelled = False
        if pem_path:
            try:
                with open(pem_path, "r", encoding="utf-8") as handle:
                    self._key = RsaKey.from_pem(handle.read())
            except (OSError, ValueError) as exc:
                # An OSError's text repeats the file name, which may be the key itself.
                raise ConfigError("--signing-key %s: %s" % (
                    _file_name(pem_path), getattr(exc, "strerror", None) or exc))
            self._ready.set()

    def start(self, delay=0.0):
        """Start generating; with a delay, only after `delay` seconds or at the first get().

        Prime generation is a few hundred ms of pure-Python CPU, and each big pow() holds
        the GIL for milliseconds: run at once, it slows the first requests a client makes."""
        with self._guard:
            if self._started or self._ready.is_set():
                return
            self._started = True
        threading.Thread(target=self._generate, args=(delay,), name="mds-keygen",
                         daemon=True).start()

    def _generate(self, delay):
        self._needed.wait(delay)
        try:
            if self._cancelled:          # the server stopped before anyone needed the key
                self._error = "the server stopped before the key was made"
                return
            self._key = RsaKey.generate(2048)
            log.debug("identity-token signing key ready: %s", self._key.fingerprint())
        except Exception as exc:   # never leave id-token requests waiting forever
            self._error = exc
            log.exception("could not generate the signing key")
        finally:
            self._ready.set()

    def stop(self):
        """A key not yet generated never will be: short-lived servers (tests) cost no CPU."""
        self._cancelled = True
        self._needed.set()

    def get(self, timeout=60):
        self._needed.set()
        self.start()
        if not self._ready.wait(timeout):
            raise CredentialError("the signing key is still being generated", 503)
        if self._key is None:
            raise CredentialError("no signing key: %s" % self._error, 500)
        return self._key


# -- Google credential sources: key file (JWT-bearer or self-signed), impersonation, workload
#    identity federation, static tokens.  Sources never cache; the TokenCache does.  No token,
#    assertion or key ever reaches a log line or an error message: upstream text goes through
#    `_redact` before it is quoted.

CREDS_LOG = logging.getLogger("mds.credentials")

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
GOOGLE_IAM_CREDENTIALS_URL = "https://iamcredentials.googleapis.com"
GOOGLE_ID_TOKEN_ISSUER = "https://accounts.google.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google refuses JWT-bearer assertions whose exp - iat exceeds one hour.
ASSERTION_LIFETIME = 3600
SELF_SIGNED_LIFETIME = 3600
# mds is not on PyPI (an unrelated "mds" is): name the packages, and the extra for a checkout.
GOOGLE_EXTRA_HINT = 'pip install google-auth (in a checkout of mds: pip install ".[google]")'

# Upstream statuses worth another try: Google's token and IAM endpoints document 429/5xx as
# transient. Everything else (400 invalid_grant, 401, 403, 404) will not improve by retrying.
_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)

# Anything that looks like a credential is masked before upstream text is quoted: JWTs
# (assertions, id tokens), OAuth access tokens (ya29./1//), PEM blocks, and long opaque blobs.
_SECRET_PATTERNS = (
    re.compile(r"-----BEGIN [A-Z ]+-----.*?(-----END [A-Z ]+-----|$)", re.S),
    # Only from the start of a run: tried at each "eyJ" inside one, it was quadratic in the
    # run's length (an upstream's "eyJeyJ..." held the GIL for seconds).  A JWT glued to the
    # text before it still has segments the catch-all below masks.
    re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"),
    re.compile(r"\b(ya29|1//|GOCSPX-)[A-Za-z0-9._~+/=-]+"),
    # Percent-escapes count as part of a run: an encoded token must not hide in pieces.
    re.compile(r"(?:[A-Za-z0-9_~+/=-]|%[0-9A-Fa-f]{2}){40,}"),
)


# A URL: group 1 its authority and path, group 2 its query or fragment (dropped when quoted).
# Quotes and brackets end it, so a URL inside JSON does not swallow the text after it.
_URL_BEFORE_QUERY = re.compile(r"https?://([^\s?#\"'<>,]+)([?#][^\s\"'<>]*)?")


def _redact(text, limit=300, secrets=()):
    """Upstream text made safe to quote: secrets masked, length bounded.  URLs keep their
    scheme, host and path, so an error still names the endpoint; never their query.

    `secrets` are values the caller knows to be secret (a client secret, the bearer token
    or AWS keys it sent): masked as they are and percent-encoded, whatever their shape."""
    text = str(text).replace("\x00", "")
    for secret in secrets:
        if isinstance(secret, str) and len(secret) >= 6:
            forms = {secret, urllib.parse.quote(secret, safe=""),
                     urllib.parse.quote_plus(secret), urllib.parse.quote(secret),
                     json.dumps(secret)[1:-1]}
            forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), f) for f in forms}
            for form in sorted(forms, key=len, reverse=True):
                text = text.replace(form, "[redacted]")
    urls = []

    def set_aside(match):
        # Kept readable, but never its userinfo or query, nor a token-shaped piece of its
        # path; the catch-all for long runs looks at one path segment at a time, as an IAM
        # path ("projects/-/serviceAccounts/...") is a long run of the catch-all's alphabet.
        scheme = match.group(0).partition("://")[0]
        authority, slash, path = match.group(1).partition("/")
        for pattern in _SECRET_PATTERNS[:-1]:
            authority = pattern.sub("[redacted]", authority)
            path = pattern.sub("[redacted]", path)
        path = "/".join(_SECRET_PATTERNS[-1].sub("[redacted]", segment)
                        for segment in path.split("/"))
        url = "%s://%s%s%s" % (scheme, re.sub(r"^.*@", "[redacted]@", authority), slash, path)
        if match.group(2):
            url += "?[redacted]"
        urls.append(url)
        return "\x00%d\x00" % (len(urls) - 1)

    text = _URL_BEFORE_QUERY.sub(set_aside, text)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("[redacted]", text)
    text = re.sub("\x00(\\d+)\x00", lambda match: urls[int(match.group(1))], text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def _jwt_claims(token):
    return jwt_decode_unverified(token)[1]


def _jwt_expiry(token, fallback):
    """The numeric `exp` of a JWT, or `fallback` when the token is not a JWT with one."""
    try:
        exp = _jwt_claims(token).get("exp")
    except (ValueError, UnicodeDecodeError, TypeError):
        return fallback
    if isinstance(exp, (int, float)) and not isinstance(exp, bool):
        return float(exp)
    return fallback


def _url_host(url):
    """scheme://host[:port] of a URL: enough to name an endpoint in an error, no query."""
    parts = urllib.parse.urlsplit(url)
    return "%s://%s%s" % (parts.scheme, parts.netloc, parts.path)


def _describe_upstream_error(status, body, secrets=()):
    """One line naming Google's error from an OAuth ({"error","error_description"}) or a
    Google API ({"error": {"code","status","message"}}) error body."""
    try:
        document = json.loads(body.decode("utf-8", "replace") if isinstance(body, bytes) else body)
    except (ValueError, TypeError, RecursionError):     # nested past the parser's depth
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            words = [str(error.get(k)) for k in ("status", "message") if error.get(k)]
            if words:
                return "HTTP %d: %s" % (status, _redact(": ".join(words), secrets=secrets))
        elif isinstance(error, str):
            description = document.get("error_description")
            if isinstance(description, str) and description:
                return "HTTP %d: %s: %s" % (status, _redact(error, secrets=secrets),
                                            _redact(description, secrets=secrets))
            return "HTTP %d: %s" % (status, _redact(error, secrets=secrets))
    return "HTTP %d" % status


def _status_for_upstream(status):
    """Status the metadata server answers when Google refused a token.

    Google's 4xx for a token request (invalid_grant, unauthorized_client, PERMISSION_DENIED,
    NOT_FOUND) means "this token cannot be issued", which the real metadata server reports as
    403 (spec §9.6); answering 400/401/404 would tell the client *its* request was wrong or
    the account does not exist. 5xx, 429 and network failures stay 502 (a 5xx, so Go's
    metadata client retries).
    """
    if 400 <= status < 500 and status not in (408, 429):
        return 403
    return 502


class _UpstreamFailure(Exception):
    """One failed attempt at an upstream call: what to say, and whether a retry may help."""

    def __init__(self, cause, transient, status):
        super().__init__(cause)
        self.cause, self.transient, self.status = cause, transient, status


MINT_BUDGET = 10.0     # seconds one token may take upstream, every attempt and retry included


def mint_deadline(budget):
    """The time.monotonic() by which one mint gives up.  One deadline spans every attempt,
    retry and chained call (google-auth's own retries too), so a dead upstream costs a
    waiting client `budget` seconds and then a 502 naming the cause - not a minute, by which
    time the client library has timed out and says nothing about why."""
    return time.monotonic() + budget


def _attempt_timeout(timeout, deadline):
    """`timeout` for one upstream attempt, cut to what is left before `deadline`."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0.01:
        raise _UpstreamFailure("out of time: the deadline for one token has passed", False, 502)
    return min(timeout, left)


class _ExchangeDeadline:
    """A bound on one whole upstream exchange: connection, proxy tunnel, TLS handshake,
    headers and body.

    urllib's timeout bounds each socket operation, not the answer: headers or a body that
    trickle in a byte at a time never trip it.  So a timer shuts the exchange's sockets down
    when its time is up, which ends whatever read is waiting on them; `fired` then tells that
    cut-off from a failure of the upstream's own making, and `connected` a silent or slow
    upstream from one that could not be reached."""

    def __init__(self, ends):
        self.fired = False
        self.connected = False
        self._sockets = []
        self._guard = threading.Lock()
        self._timer = threading.Timer(max(0.0, ends - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock):
        # A duplicate: an https connection detaches the socket it wraps in TLS, and shutting
        # down either descriptor ends the connection for both.
        with self._guard:
            self.connected = True
            self._sockets.append(sock.dup())
            if self.fired:
                self._shut_down()

    def _fire(self):
        with self._guard:
            self.fired = True
            self._shut_down()

    def _shut_down(self):
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._timer.cancel()
        with self._guard:
            for sock in self._sockets:
                sock.close()
            self._sockets = []


# Token, STS and IAM answers are a few KiB; a body past this is read no further (it would
# be held in memory, and scanned for secrets before it is quoted).
MAX_UPSTREAM_ANSWER = 1 << 20


def _fetch_upstream(method, url, data, headers, ends, context=None):
    """(status, headers, body) of one upstream exchange through urllib (so the proxy
    variables hold), all of it by time.monotonic() `ends`.  An HTTP status other than 2xx is
    an answer here, not an exception.  No complete answer in time from a reached upstream is
    a transient _UpstreamFailure; any other failure is urllib's own OSError or
    http.client.HTTPException."""
    import urllib.error     # here, not at the top: only upstream sources need them, and
    import urllib.request   # every millisecond of startup counts

    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    deadline = _ExchangeDeadline(ends)

    class Connection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # http.client's seam for making the socket (in every version mds supports): the
            # socket is watched before a proxy tunnel or a TLS handshake uses it.
            create = self._create_connection

            def create_watched(*args, **kwargs):
                sock = create(*args, **kwargs)
                deadline.watch(sock)
                return sock

            self._create_connection = create_watched

    class TLSConnection(http.client.HTTPSConnection, Connection):
        pass

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(Connection, req)

    class TLSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(TLSConnection, req, context=context)

    opener = urllib.request.build_opener(Handler(), TLSHandler(context=context))
    try:
        try:
            response = opener.open(request, timeout=max(0.01, ends - time.monotonic()))
        except urllib.error.HTTPError as error:
            if error.fp is None:
                return error.code, error.headers, b""
            response = error
        with response:
            answer = (response.getcode(), response.headers,
                      response.read(MAX_UPSTREAM_ANSWER + 1))
    except (OSError, http.client.HTTPException) as exc:
        # The socket's own timeout and the timer end at the same moment; either way a reached
        # upstream ran out of time, and an unreached one stays a network error.
        if not (deadline.connected and (deadline.fired or isinstance(exc, socket.timeout))):
            raise
        answer = None
    finally:
        deadline.close()
    if answer is None or deadline.fired:   # even a body that seemed whole, if cut off
        raise _UpstreamFailure("timed out: no complete answer within the time for one "
                               "attempt", True, 502)
    if len(answer[2]) > MAX_UPSTREAM_ANSWER:
        raise _UpstreamFailure("answered more than %d KiB, which no token endpoint does"
                               % (MAX_UPSTREAM_ANSWER // 1024), False, 502)
    return answer


def _with_retries(what, retry_delays, attempt, deadline=None):
    """`attempt()` until it returns; a transient _UpstreamFailure is retried after each delay
    in `retry_delays` (with jitter) while `deadline` allows, and the last failure becomes a
    CredentialError."""
    for delay in tuple(retry_delays) + (None,):
        try:
            return attempt()
        except _UpstreamFailure as failure:
            if delay is not None:
                delay *= 0.75 + random.random() / 2
            late = (delay is not None and deadline is not None
                    and time.monotonic() + delay >= deadline)
            if not failure.transient or delay is None or late:
                raise CredentialError("%s failed (%s)%s" % (
                    what, failure.cause, "; no time left to retry" if late else ""),
                    status=failure.status) from None
            CREDS_LOG.warning("%s failed (%s); retrying in %.2fs", what, failure.cause, delay)
            time.sleep(delay)


def post_upstream(url, what, data, headers, describe_error, status_for, timeout=10.0,
                  retry_delays=(), context=None, deadline=None, secrets=()):
    """POST `data` to an upstream credential endpoint (Google, STS) and return the body.

    Transient failures (connection errors, timeouts, 408/429/5xx) are retried after each delay
    in `retry_delays` (short and bounded: a metadata client may be waiting), all before
    `deadline` (a time.monotonic(), see mint_deadline) when one is given.  Every failure
    ends as a CredentialError naming `what`, the endpoint and the upstream's own error, all
    redacted; never the request, which carries an assertion, a bearer token or a signature.
    `describe_error(status, body)` words an HTTP error; `status_for(status)` is what the
    metadata endpoint answers for it; `secrets` are masked wherever they appear (_redact).
    """
    def attempt():
        ends = time.monotonic() + _attempt_timeout(timeout, deadline)
        try:
            status, _, body = _fetch_upstream("POST", url, data, headers, ends, context)
        except OSError as exc:                 # URLError, timeouts, refused and reset connections
            raise _UpstreamFailure("network error, unreachable: %s"
                                   % _redact(getattr(exc, "reason", None) or exc,
                                             secrets=secrets), True, 502)
        except http.client.HTTPException as exc:
            raise _UpstreamFailure("network error: %s" % type(exc).__name__, True, 502)
        except ValueError:
            raise CredentialError("%s: %s is not a usable URL" % (what, _url_host(url)),
                                  status=500) from None
        if not 200 <= status < 300:          # a redirect urllib does not follow included
            raise _UpstreamFailure(_redact(describe_error(status, body), secrets=secrets),
                                   status in _TRANSIENT_STATUSES, status_for(status))
        return body

    return _with_retries("%s: %s" % (what, _url_host(url)), retry_delays, attempt, deadline)


def google_post(url, what, form=None, json_body=None, bearer=None, timeout=10.0,
                retry_delays=(0.25, 1.0), deadline=None):
    """POST to a Google endpoint and return the decoded JSON answer (see post_upstream)."""
    if form is not None:
        data = urllib.parse.urlencode(form).encode("ascii")
        content_type = "application/x-www-form-urlencoded"
    else:
        data = json.dumps(json_body if json_body is not None else {}).encode("utf-8")
        content_type = "application/json"
    headers = {"Content-Type": content_type, "Accept": "application/json",
               "User-Agent": "mds-metadata-emulator"}
    if bearer:
        headers["Authorization"] = "Bearer " + bearer
    body = post_upstream(url, what, data, headers, _describe_upstream_error,
                         _status_for_upstream, timeout, retry_delays, deadline=deadline,
                         secrets=(bearer, (form or {}).get("assertion")))
    endpoint = _url_host(url)
    try:
        answer = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise CredentialError("%s: %s answered something that is not JSON"
                              % (what, endpoint), status=502) from None
    if not isinstance(answer, dict):
        raise CredentialError("%s: %s answered an unexpected JSON document"
                              % (what, endpoint), status=502)
    return answer


def _scope_string(scopes):
    """Space-joined scopes; cloud-platform when none were asked for, because every Google
    token grant needs at least one scope and cloud-platform is what `gcloud` users expect."""
    scopes = [s for s in (scopes or ()) if s]
    return " ".join(scopes) if scopes else CLOUD_PLATFORM_SCOPE


def _file_name(path):
    """A file name as an error quotes it.  Key or credentials text pasted where a file name
    belongs (`--signing-key "$(cat key.pem)"`) is not a name, and is never quoted back."""
    text = str(os.fspath(path))
    if "\n" in text or len(text) > 1024 or text.lstrip().startswith(("{", "-----BEGIN")):
        return "(a value that looks like a file's content, not its name)"
    return text


def _load_json_config(source, what):
    """A JSON object given inline (dict) or as a file path; errors name the file, never its
    content."""
    if isinstance(source, dict):
        return dict(source), None
    path = os.fspath(source)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise CredentialError("cannot read %s %s: %s" % (what, _file_name(path),
                                                         exc.strerror or exc),
                              status=500) from None
    except ValueError:
        raise CredentialError("%s %s is not valid JSON" % (what, _file_name(path)),
                              status=500) from None
    if not isinstance(document, dict):
        raise CredentialError("%s %s is not a JSON object" % (what, _file_name(path)),
                              status=500)
    return document, path


class KeyFileSource:
    """Tokens for a service account from its JSON key (or an injected signer such as a TPM key).

    oauth mode (default): signs a JWT-bearer assertion by hand and exchanges it at the key's
    token_uri for a Google access token, or (with target_audience) a Google-signed id token.
    self-signed mode: no network at all; access tokens are self-signed JWTs as google-auth
    makes them (AIP-4111), id tokens are Google-shaped JWTs signed by the service-account key,
    so they verify against the key's public certificate that Google publishes at
    https://www.googleapis.com/service_accounts/v1/metadata/x509/<email> - not against
    Google's own id-token JWKS.
    """

    honours_scopes = True
    TOKEN_MODES = ("oauth", "self-signed")

    def __init__(self, key_info, token_mode="oauth", signer=None, self_signed_audience=None,
                 timeout=10.0, retry_delays=(0.25, 1.0), budget=MINT_BUDGET):
        if token_mode not in self.TOKEN_MODES:
            raise CredentialError("unknown token mode %r (expected oauth or self-signed)"
                                  % (token_mode,), status=500)
        info, path = _load_json_config(key_info, "service-account key file")
        origin = path or "service-account key"
        key_type = info.get("type")
        if signer is None and key_type != "service_account":
            raise CredentialError(
                "%s is not a service-account key (type is %r, expected \"service_account\")"
                % (origin, key_type), status=500)
        self.email = info.get("client_email")
        if not isinstance(self.email, str) or "@" not in self.email:
            raise CredentialError("%s has no client_email" % origin, status=500)
        self.token_uri = info.get("token_uri") or GOOGLE_TOKEN_URI
        self.project_id = info.get("project_id")
        # client_id of a key file is the account's numeric unique id: Google puts it in
        # sub/azp of id tokens, so self-signed id tokens do too.
        self.unique_id = str(info.get("client_id") or self.email)
        self.token_mode = token_mode
        self.self_signed_audience = self_signed_audience
        # A request without ?scopes= gets a token for this audience instead of the VM's scopes.
        self.unscoped_audience = self_signed_audience if token_mode == "self-signed" else None
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self.budget = budget
        if signer is None:
            pem = info.get("private_key")
            if not isinstance(pem, str) or not pem.strip():
                raise CredentialError("%s has no private_key" % origin, status=500)
            try:
                signer = RsaKey.from_pem(pem)
            except KeyFormatError as exc:
                raise CredentialError("%s: unusable private_key: %s" % (origin, _redact(exc)),
                                      status=500) from None
            if info.get("private_key_id"):
                signer.key_id = info["private_key_id"]
        self.signer = signer
        self.key_id = getattr(signer, "key_id", None)

    def describe(self):
        key = ("key %s" % self.key_id[:12]) if self.key_id else "injected signer"
        held = getattr(self.signer, "describe", None)
        if held is not None:                     # a TPM says where the key is (no secrets)
            key += "; " + held()
        if self.token_mode == "self-signed":
            return "service account %s (%s, self-signed JWTs, offline)" % (self.email, key)
        return "service account %s (%s, JWT-bearer grant at %s)" % (
            self.email, key, _url_host(self.token_uri))

    def _assertion(self, extra_claims):
        now = int(time.time())
        claims = {"iss": self.email, "aud": self.token_uri, "iat": now,
                  "exp": now + ASSERTION_LIFETIME}
        claims.update(extra_claims)
        return jwt_encode(claims, self.signer)

    def _grant(self, extra_claims, what):
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self._assertion(extra_claims)}
        return google_post(self.token_uri, what, form=form, timeout=self.timeout,
                           retry_delays=self.retry_delays, deadline=mint_deadline(self.budget))

    def access_token(self, scopes=()):
        now = time.time()
        if self.token_mode == "self-signed":
            return self._self_signed_access_token(scopes)
        answer = self._grant({"scope": _scope_string(scopes)},
                             "access token for %s" % self.email)
        value = answer.get("access_token")
        if not isinstance(value, str) or not value:
            raise CredentialError("access token for %s: %s answered without access_token"
                                  % (self.email, _url_host(self.token_uri)), status=502)
        try:
            expires_in = float(answer.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        if not 0 < expires_in < math.inf:
            raise CredentialError("access token for %s: %s answered with an unusable expires_in"
                                  % (self.email, _url_host(self.token_uri)), status=502)
        # Google's access tokens last at most 12 hours; a longer promise is not believed
        # (Java clients reject an expires_in beyond 32 bits).
        return Token(value, now + min(expires_in, 43200))

    def _self_signed_access_token(self, scopes):
        # google-auth's self-signed JWT (service_account._create_self_signed_jwt): iss = sub =
        # email, iat, exp = iat + 1h, and either a `scope` claim or an `aud` naming one API.
        # The metadata server cannot know which API the client will call, so `scope` is used
        # unless an audience was configured for scope-less requests.
        now = int(time.time())
        claims = {"iss": self.email, "sub": self.email, "iat": now,
                  "exp": now + SELF_SIGNED_LIFETIME}
        wanted = [s for s in (scopes or ()) if s]
        if wanted or not self.self_signed_audience:
            claims["scope"] = _scope_string(wanted)
        else:
            claims["aud"] = self.self_signed_audience
        return Token(jwt_encode(claims, self.signer), float(claims["exp"]))

    def id_token(self, audience, fmt="standard", compute_claims=None):
        if self.token_mode == "self-signed":
            return self._self_signed_id_token(audience, fmt, compute_claims)
        # Google's id tokens from the JWT-bearer grant carry no google.compute_engine claim;
        # format=full cannot be honoured upstream, so compute_claims is ignored here.
        now = time.time()
        answer = self._grant({"target_audience": audience}, "id token for %s" % self.email)
        value = answer.get("id_token")
        if not isinstance(value, str) or not value:
            raise CredentialError("id token for %s: %s answered without id_token"
                                  % (self.email, _url_host(self.token_uri)), status=502)
        return Token(value, _jwt_expiry(value, now + 3600))

    def _self_signed_id_token(self, audience, fmt, compute_claims):
        return google_id_token(self.signer, self.email, self.unique_id, audience,
                               SELF_SIGNED_LIFETIME, compute_claims if fmt == "full" else None)


def _import_google_auth(feature):
    """google.auth, or a CredentialError telling the user which extra to install."""
    try:
        import google.auth  # noqa: F401
        import google.auth.exceptions  # noqa: F401
        import google.auth.impersonated_credentials  # noqa: F401
        import google.auth.transport  # noqa: F401
    except ImportError:
        raise CredentialError("%s needs the \"google\" extra: %s" % (feature, GOOGLE_EXTRA_HINT),
                              status=500) from None
    return google.auth


class _GoogleAuthResponse:
    """Response in the shape google-auth transports return (status, headers, data)."""

    def __init__(self, status, headers, data):
        self.status = status
        self.headers = headers
        self.data = data


def _lower_headers(headers):
    """Response headers as google-auth's own transports hand them over: a plain dict with
    lower-case names.  Parts of google-auth index it by the lower-case name (the compute-engine
    credentials read headers["content-type"]), so the server's own spelling would fail them."""
    return {name.lower(): value for name, value in (headers or {}).items()}


class GoogleAuthTransport:
    """A google-auth `transport.Request` built on urllib, so the google extra needs no
    `requests`. It also remembers the last refused answer, because google-auth's exceptions
    carry the body but not the status we need to choose 403 vs 502."""

    def __init__(self, timeout=10.0, deadline=None):
        self.timeout = timeout
        self.deadline = deadline
        self.last_error_status = None
        self.last_error_body = b""

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        import google.auth.exceptions

        self.last_error_status, self.last_error_body = None, b""   # this call's answer only
        if isinstance(body, str):
            body = body.encode("utf-8")
        try:
            wait = _attempt_timeout(min(timeout or self.timeout, self.timeout), self.deadline)
        except _UpstreamFailure as late:
            # google-auth retries some failures itself; none may outlast the mint's deadline.
            raise google.auth.exceptions.TransportError(late.cause) from None
        try:
            status, answer_headers, data = _fetch_upstream(
                method, url, body, dict(headers or {}), time.monotonic() + wait)
            if not 200 <= status < 300:
                self.last_error_status, self.last_error_body = status, data
            return _GoogleAuthResponse(status, _lower_headers(answer_headers), data)
        except _UpstreamFailure as late:         # no whole answer in time, or an oversized one
            self.last_error_status = None
            raise google.auth.exceptions.TransportError("%s: %s" % (
                _url_host(url), late.cause)) from None
        except Exception as exc:  # urllib raises a zoo of OSError/HTTPException subclasses
            self.last_error_status = None
            raise google.auth.exceptions.TransportError("network error reaching %s: %s" % (
                _url_host(url), _redact(getattr(exc, "reason", exc))))


def _credential_secrets(credentials):
    """What a google-auth credentials object holds that must never be quoted: its token,
    refresh token and OAuth client secret (a secret of any shape, "GOCSPX-..." or older)."""
    return tuple(value for value in (
        getattr(credentials, name, None) for name in (
            "token", "refresh_token", "client_secret", "_client_secret"))
        if isinstance(value, str))


def _run_google_auth(action, what, timeout, retry_delays, deadline=None, secrets=()):
    """Run `action(transport)` (a google-auth refresh), retrying transient failures and
    turning google-auth's exceptions into CredentialError without quoting secrets (those
    `secrets` the caller knows of included)."""
    import subprocess

    import google.auth.exceptions

    def attempt():
        transport = GoogleAuthTransport(timeout, deadline)
        try:
            return action(transport)
        except CredentialError:
            raise
        except subprocess.TimeoutExpired as exc:
            # A federation executable outlived the mint's time.  Its output may hold the
            # subject token, so only the program is named.
            program = exc.cmd[0] if isinstance(exc.cmd, (list, tuple)) and exc.cmd else exc.cmd
            raise CredentialError("%s failed: the credential executable %s did not finish "
                                  "in time (%.1f s)" % (what, _file_name(program), exc.timeout),
                                  status=502) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            # Only the message: google-auth puts the whole response body in args[1], and that
            # body can hold a token even when it was refused.
            message = _redact(exc.args[0] if exc.args else type(exc).__name__,
                              secrets=secrets)
            if transport.last_error_status is not None:
                # Google answered with an error status: its JSON body names the cause.
                raise _UpstreamFailure(
                    _describe_upstream_error(transport.last_error_status,
                                             transport.last_error_body, secrets),
                    transport.last_error_status in _TRANSIENT_STATUSES,
                    _status_for_upstream(transport.last_error_status))
            if isinstance(exc, google.auth.exceptions.TransportError):
                raise _UpstreamFailure(message, True, 502)
            # Refused before any HTTP answer: configuration (unreadable subject-token file,
            # executables not allowed, ...). Retrying cannot help.
            raise CredentialError("%s failed: %s" % (what, message), status=502) from None

    return _with_retries(what, retry_delays, attempt, deadline)


def _datetime_to_epoch(moment):
    """google-auth expiries are naive UTC datetimes."""
    if moment is None:
        return time.time() + 3600
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return float(int(moment.timestamp()))


def _iam_account_url(iam_base, email, method):
    return "%s/v1/projects/-/serviceAccounts/%s:%s" % (
        iam_base.rstrip("/"), urllib.parse.quote(email, safe="@"), method)


def _iam_delegates(delegates):
    # generateIdToken wants delegates as resource names; a bare e-mail is accepted on input.
    return [d if d.startswith("projects/") else "projects/-/serviceAccounts/" + d
            for d in delegates]


def _generate_id_token(iam_url, bearer, audience, delegates, what, timeout, retry_delays,
                       deadline):
    """IAM Credentials generateIdToken: the same call google-auth's IDTokenCredentials makes.

    Made directly because IDTokenCredentials hard-codes the https IAM host (it has no
    iam_endpoint_override, so regional/private endpoints and local tests cannot reach it),
    needs `requests`, and its AuthorizedSession starts background regional-access-boundary
    lookups at iamcredentials.googleapis.com.
    """
    body = {"audience": audience, "includeEmail": True}
    if delegates:
        body["delegates"] = _iam_delegates(delegates)
    now = time.time()
    answer = google_post(iam_url, what, json_body=body, bearer=bearer, timeout=timeout,
                         retry_delays=retry_delays, deadline=deadline)
    value = answer.get("token")
    if not isinstance(value, str) or not value:
        raise CredentialError("%s: %s answered without token" % (what, _url_host(iam_url)),
                              status=502)
    return Token(value, _jwt_expiry(value, now + 3600))


class ImpersonatedSource:
    """Tokens for `target_email` minted by the IAM Credentials API on behalf of the user's own
    Application Default Credentials (`gcloud auth application-default login`), via google-auth.

    `iam_endpoint_override` is the base URL of the IAM Credentials API (default
    https://iamcredentials.googleapis.com); google-auth's own override wants the full
    generateAccessToken URL, which is derived from it.
    """

    honours_scopes = True

    def __init__(self, target_email, delegates=(), source_credentials=None,
                 iam_endpoint_override=None, source_credentials_file=None, lifetime=3600,
                 timeout=10.0, retry_delays=(0.25, 1.0), budget=MINT_BUDGET):
        google_auth = _import_google_auth("impersonation")
        if not target_email or "@" not in target_email:
            raise CredentialError("impersonation needs a target service-account e-mail",
                                  status=500)
        self.email = target_email
        self.project_id = None
        self.delegates = tuple(delegates or ())
        self.iam_base = (iam_endpoint_override or GOOGLE_IAM_CREDENTIALS_URL).rstrip("/")
        self.lifetime = int(lifetime)
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self.budget = budget
        # The shared source credentials are refreshed by one thread at a time; each mint then
        # runs on its own impersonated credentials, so scope sets do not queue behind each other.
        self._lock = threading.Lock()
        if source_credentials is None:
            source_credentials = self._load_source(google_auth, source_credentials_file)
        self._source = source_credentials
        self._source_view = None
        # Compute-engine credentials fetch their tokens from a metadata server: this one
        # (host:port), which the server checks is not itself.
        self.metadata_host = None
        if type(source_credentials).__module__.startswith("google.auth.compute_engine"):
            metadata = sys.modules.get("google.auth.compute_engine._metadata")
            self.metadata_host = getattr(metadata, "_GCE_METADATA_HOST", None)

    @staticmethod
    def _load_source(google_auth, path):
        import google.auth.exceptions

        if path and not os.path.exists(path):
            # google-auth's message would quote the value, which may be the file's content.
            raise CredentialError("impersonation: cannot read source credentials file %s"
                                  % _file_name(path), status=500)
        try:
            if path:
                with warnings.catch_warnings():
                    # google-auth warns that a config from an untrusted source could be
                    # malicious; this path is the operator's own credentials file.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    credentials, _ = google_auth.load_credentials_from_file(
                        path, scopes=[CLOUD_PLATFORM_SCOPE])
            else:
                credentials, _ = google_auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        except google.auth.exceptions.GoogleAuthError as exc:
            # At startup mds is not answering yet, so ADC that would be mds itself look like
            # no ADC at all: say where google-auth looked for a metadata server (it probes
            # GCE_METADATA_IP) when nothing else was there to find.
            probed = os.environ.get("GCE_METADATA_IP")
            hint = ("; google-auth also looked for a metadata server at %s (GCE_METADATA_IP in "
                    "mds's own environment) and none answered: if that is this mds, unset "
                    "GCE_METADATA_HOST and GCE_METADATA_IP where mds runs" % probed
                    if probed and not path and not os.environ.get(
                        "GOOGLE_APPLICATION_CREDENTIALS") and isinstance(
                        exc, google.auth.exceptions.DefaultCredentialsError) else "")
            raise CredentialError(
                "impersonation needs Application Default Credentials (run `gcloud auth "
                "application-default login`): %s%s" % (_redact(exc), hint),
                status=500) from None
        return credentials

    def describe(self):
        chain = (" via " + ", ".join(self.delegates)) if self.delegates else ""
        return "impersonating %s%s (IAM Credentials API at %s)" % (self.email, chain,
                                                                   self.iam_base)

    def access_token(self, scopes=()):
        import google.auth.impersonated_credentials as impersonated

        wanted = [s for s in (scopes or ()) if s] or [CLOUD_PLATFORM_SCOPE]

        def refresh(transport):
            credentials = impersonated.Credentials(
                source_credentials=self._shared_source(), target_principal=self.email,
                target_scopes=wanted, delegates=_iam_delegates(self.delegates),
                lifetime=self.lifetime,
                iam_endpoint_override=_iam_account_url(self.iam_base, self.email,
                                                       "generateAccessToken"))
            credentials.refresh(transport)
            return Token(credentials.token, _datetime_to_epoch(credentials.expiry))

        return _run_google_auth(refresh, "impersonating %s" % self.email, self.timeout,
                                self.retry_delays, mint_deadline(self.budget),
                                _credential_secrets(self._source))

    def _shared_source(self):
        """The source credentials as impersonated.Credentials should see them: it copies its
        source, and gives a service-account source new scopes (dropping its token), so the
        real source would be refreshed at every mint.  This view is neither: every copy
        refreshes the one shared source, once, under the lock."""
        if self._source_view is None:
            import google.auth.credentials

            outer = self

            class SharedSource(google.auth.credentials.Credentials):
                """A copy google-auth may make freely: all of them refresh the one source."""

                def refresh(self, request):
                    with outer._lock:
                        if not outer._source.valid:
                            outer._source.refresh(request)
                        self.token, self.expiry = outer._source.token, outer._source.expiry

            self._source_view = SharedSource
        view = self._source_view()
        view._universe_domain = getattr(self._source, "universe_domain", None) or \
            view.universe_domain
        # Sent as x-goog-user-project with each IAM call, as the source itself would.
        view._quota_project_id = getattr(self._source, "quota_project_id", None)
        return view

    def _source_token(self, deadline):
        def refresh(transport):
            view = self._shared_source()
            view.refresh(transport)
            return view.token

        return _run_google_auth(refresh, "refreshing the source credentials for %s"
                                % self.email, self.timeout, self.retry_delays, deadline,
                                _credential_secrets(self._source))

    def id_token(self, audience, fmt="standard", compute_claims=None):
        # IAM-issued id tokens are Google-signed; format=full claims cannot be added.
        deadline = mint_deadline(self.budget)
        bearer = self._source_token(deadline)
        return _generate_id_token(
            _iam_account_url(self.iam_base, self.email, "generateIdToken"), bearer, audience,
            self.delegates, "id token for %s" % self.email, self.timeout, self.retry_delays,
            deadline)


def _deadline_bound_executable():
    """google-auth's executable-sourced credentials, run for no longer than the mint has left.

    google-auth lets the executable run for its timeout_millis (5 s to 2 minutes) whatever
    the caller's deadline; cut short, a hanging executable costs a waiting client the budget
    and a 502, as a hanging Google does.  A subclass, because google-auth builds its own
    copies (scoped, and unimpersonated for the STS exchange) with `self.__class__`."""
    import google.auth.pluggable

    class Credentials(google.auth.pluggable.Credentials):
        def retrieve_subject_token(self, request):
            deadline = getattr(request, "deadline", None)
            # A private attribute of google-auth's: a release without it runs the executable
            # for its own timeout, as google-auth itself would.
            configured = getattr(self, "_credential_source_executable_timeout_millis", None)
            if deadline is None or not isinstance(configured, int):
                return super().retrieve_subject_token(request)
            left = max(1, int((deadline - time.monotonic()) * 1000))
            self._credential_source_executable_timeout_millis = min(configured, left)
            try:
                return super().retrieve_subject_token(request)
            finally:
                self._credential_source_executable_timeout_millis = configured

    return Credentials


class FederatedSource:
    """Tokens from workload identity federation: an external-account configuration
    (`gcloud iam workload-identity-pools create-cred-config`) whose subject token (file, URL
    or executable) is exchanged at Google STS, optionally impersonating a service account.

    Identity tokens need a service account: STS tokens for a federated principal cannot
    mint them, so id_token() works only when impersonation is configured (in the file or via
    `impersonate_email`) and then calls IAM generateIdToken with the federated token.
    """

    honours_scopes = True

    def __init__(self, config, impersonate_email=None, iam_endpoint_override=None,
                 timeout=10.0, retry_delays=(0.25, 1.0), budget=MINT_BUDGET):
        _import_google_auth("workload identity federation")
        info, path = _load_json_config(config, "external-account configuration")
        origin = path or "external-account configuration"
        if info.get("type") != "external_account":
            raise CredentialError("%s is not an external-account configuration (type is %r)"
                                  % (origin, info.get("type")), status=500)
        if impersonate_email:
            base = (iam_endpoint_override or self._iam_base_of(info)
                    or GOOGLE_IAM_CREDENTIALS_URL)
            info["service_account_impersonation_url"] = _iam_account_url(
                base, impersonate_email, "generateAccessToken")
        elif iam_endpoint_override and info.get("service_account_impersonation_url"):
            info["service_account_impersonation_url"] = _iam_account_url(
                iam_endpoint_override, self._impersonated_email(info), "generateAccessToken")
        self.email = self._impersonated_email(info)
        self.project_id = None
        self.audience = info.get("audience")
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self.budget = budget
        self._info = info
        self._lock = threading.Lock()
        self._credentials = self._load(info, origin)
        self._unimpersonated = None

    @staticmethod
    def _iam_base_of(info):
        url = info.get("service_account_impersonation_url")
        if not url:
            return None
        parts = urllib.parse.urlsplit(url)
        return "%s://%s" % (parts.scheme, parts.netloc)

    @staticmethod
    def _impersonated_email(info):
        url = info.get("service_account_impersonation_url") or ""
        match = re.search(r"/serviceAccounts/([^/:]+):generateAccessToken", url)
        return urllib.parse.unquote(match.group(1)) if match else None

    @staticmethod
    def _load(info, origin):
        # Built per credential-source kind, as google-auth's own loader does, but without
        # google.auth.load_credentials_from_dict: that one also looks the project up at
        # cloudresourcemanager.googleapis.com, a network call at startup we do not want.
        import google.auth.exceptions

        source = info.get("credential_source") or {}
        try:
            if str(source.get("environment_id", "")).startswith("aws"):
                import google.auth.aws as kind
            elif "executable" in source:
                kind = types.SimpleNamespace(Credentials=_deadline_bound_executable())
            else:
                import google.auth.identity_pool as kind
            credentials = kind.Credentials.from_info(info)
        except (google.auth.exceptions.GoogleAuthError, ValueError) as exc:
            raise CredentialError("%s cannot be used: %s" % (origin, _redact(exc)),
                                  status=500) from None
        return credentials.with_scopes([CLOUD_PLATFORM_SCOPE])

    def _secrets(self):
        """Secrets this configuration holds or points at, for _redact: its client secret,
        the headers sent to a URL source, the subject token in a file source."""
        source = self._info.get("credential_source") or {}
        found = [self._info.get("client_secret")]
        found += [value for name, value in (source.get("headers") or {}).items()
                  if re.search(r"auth|token|key|secret|cookie", str(name), re.I)]
        # A regular file only: reading a FIFO would take the token google-auth is to read.
        if source.get("file") and os.path.isfile(source["file"]):
            try:
                with open(source["file"], "r", encoding="utf-8") as handle:
                    content = handle.read(65536).strip()
                field = (source.get("format") or {}).get("subject_token_field_name")
                found.append(json.loads(content).get(field) if field else content)
            except (OSError, ValueError, AttributeError, TypeError, RecursionError):
                pass
        return tuple(s for s in found if isinstance(s, str)) + \
            _credential_secrets(self._credentials)

    def describe(self):
        who = ("impersonating %s" % self.email) if self.email else "federated principal"
        return "workload identity federation (%s, audience %s)" % (who, self.audience)

    def access_token(self, scopes=()):
        wanted = [s for s in (scopes or ()) if s] or [CLOUD_PLATFORM_SCOPE]
        credentials = self._credentials.with_scopes(wanted)

        def refresh(transport):
            credentials.refresh(transport)
            return Token(credentials.token, _datetime_to_epoch(credentials.expiry))

        # `credentials` is this call's own copy: mints for other scope sets run alongside.
        return _run_google_auth(refresh, "federated token%s" % (
            " for %s" % self.email if self.email else ""), self.timeout, self.retry_delays,
            mint_deadline(self.budget), self._secrets())

    def id_token(self, audience, fmt="standard", compute_claims=None):
        if not self.email:
            raise CredentialError(
                "identity tokens need a service account to impersonate: a federated "
                "principal cannot mint them (set service_account_impersonation_url or "
                "\"impersonate\")", status=403)
        deadline = mint_deadline(self.budget)
        with self._lock:
            if self._unimpersonated is None:
                info = dict(self._info)
                info.pop("service_account_impersonation_url", None)
                info.pop("service_account_impersonation", None)
                self._unimpersonated = self._load(info, "external-account configuration")
            sts_credentials = self._unimpersonated

            def refresh(transport):
                if not sts_credentials.valid:
                    sts_credentials.refresh(transport)
                return sts_credentials.token

            bearer = _run_google_auth(refresh, "federated token for %s" % self.email,
                                      self.timeout, self.retry_delays, deadline,
                                      self._secrets())
        iam_url = self._info["service_account_impersonation_url"].replace(
            ":generateAccessToken", ":generateIdToken")
        return _generate_id_token(iam_url, bearer, audience, (), "id token for %s"
                                  % self.email, self.timeout, self.retry_delays, deadline)


class StaticSource:
    """Fixed tokens given on the command line or in GOOGLE_ACCESS_TOKEN / GOOGLE_ID_TOKEN
    (the Go emulator's variables). Scopes and audiences are ignored: the token is what it is.

    An access token without `expiry` is reported as valid for another hour on each mint, so
    clients keep using it; an id token that is a JWT reports its own `exp`.
    """

    honours_scopes = False

    def __init__(self, access_token=None, id_token=None, expiry=None):
        self._access_token = access_token or None
        self._id_token = id_token or None
        self.expiry = float(expiry) if expiry is not None else None
        self.email = None
        self.project_id = None

    def describe(self):
        kinds = [name for name, value in (("access token", self._access_token),
                                          ("id token", self._id_token)) if value]
        return "static %s (scopes and audiences ignored)" % (" and ".join(kinds) or "nothing")

    def access_token(self, scopes=()):
        if not self._access_token:
            raise CredentialError("no static access token configured (set GOOGLE_ACCESS_TOKEN "
                                  "or --access-token)", status=404)
        expiry = self.expiry if self.expiry is not None else time.time() + 3600
        if expiry <= time.time():
            raise CredentialError("the static access token expired at %s"
                                  % format_imds_time(expiry), status=403)
        return Token(self._access_token, expiry)

    def id_token(self, audience, fmt="standard", compute_claims=None):
        if not self._id_token:
            raise CredentialError("no static id token configured (set GOOGLE_ID_TOKEN "
                                  "or --id-token)", status=404)
        fallback = self.expiry if self.expiry is not None else time.time() + 3600
        expiry = _jwt_expiry(self._id_token, fallback)
        if expiry <= time.time():
            raise CredentialError("the static id token expired at %s" % format_imds_time(expiry),
                                  status=403)
        return Token(self._id_token, expiry)


def static_source_from_env(environ=None):
    """StaticSource from GOOGLE_ACCESS_TOKEN / GOOGLE_ID_TOKEN, or None when neither is set.
    (GOOGLE_PROJECT_ID, GOOGLE_NUMERIC_PROJECT_ID and GOOGLE_SERVICE_ACCOUNT are metadata,
    handled by the CLI.)"""
    environ = os.environ if environ is None else environ
    access_token = environ.get("GOOGLE_ACCESS_TOKEN") or None
    id_token = environ.get("GOOGLE_ID_TOKEN") or None
    if not access_token and not id_token:
        return None
    return StaticSource(access_token=access_token, id_token=id_token)


CREDENTIAL_SOURCE_TYPES = ("key-file", "impersonate", "federate", "static")


def build_credential_source(spec, signer=None, account_email=None):
    """A credential source from a CLI/config spec (one account's "credentials" object):

        {"type": "key-file", "path": "sa.json" | "key": {...}, "token_mode": "oauth"|"self-signed",
         "self_signed_audience": "https://pubsub.googleapis.com/"}
        {"type": "impersonate", "target": email, "delegates": [...], "iam_endpoint": url,
         "source_credentials_file": path}
        {"type": "federate", "config": path | {...}, "impersonate": email, "iam_endpoint": url}
        {"type": "static", "access_token": ..., "id_token": ..., "expiry": epoch}

    `signer` (e.g. a TPM key) replaces the key file's private key; then only client_email
    and token_uri are read from "key" (or "client_email"/"token_uri" in the spec itself).
    `account_email` is the account the spec is attached to: the impersonation target when
    the spec names none (`--impersonate` impersonates the config's account).
    The core's offline source is not built here.
    """
    if not isinstance(spec, dict):
        raise CredentialError("credentials must be a JSON object", status=500)
    kind = str(spec.get("type", "")).replace("_", "-")
    retry = {}
    if "timeout" in spec:
        retry["timeout"] = float(spec["timeout"])
    if kind == "key-file":
        key = spec.get("key") or spec.get("path")
        if key is None and signer is not None:
            key = {"client_email": spec.get("client_email"), "client_id": spec.get("client_id"),
                   "token_uri": spec.get("token_uri"), "project_id": spec.get("project_id")}
        if key is None:
            raise CredentialError("key-file credentials need \"path\" (or \"key\")", status=500)
        return KeyFileSource(key, token_mode=spec.get("token_mode", "oauth"), signer=signer,
                             self_signed_audience=spec.get("self_signed_audience"), **retry)
    if kind == "impersonate":
        return ImpersonatedSource(spec.get("target") or account_email,
                                  delegates=spec.get("delegates") or (),
                                  iam_endpoint_override=spec.get("iam_endpoint"),
                                  source_credentials_file=spec.get("source_credentials_file"),
                                  **retry)
    if kind == "federate":
        if not spec.get("config"):
            raise CredentialError("federate credentials need \"config\"", status=500)
        impersonate = spec.get("impersonate")
        if impersonate is True:              # `--federate --impersonate`: the config's account
            impersonate = account_email
        return FederatedSource(spec["config"], impersonate_email=impersonate,
                               iam_endpoint_override=spec.get("iam_endpoint"), **retry)
    if kind == "static":
        return StaticSource(access_token=spec.get("access_token"),
                            id_token=spec.get("id_token"), expiry=spec.get("expiry"))
    raise CredentialError("unknown credentials type %r (expected one of: %s)"
                          % (spec.get("type"), ", ".join(CREDENTIAL_SOURCE_TYPES)), status=500)


def credentials_spec_from_cli(service_account_file=None, token_mode=None, impersonate=None,
                              federate=False, access_token=None, id_token=None, environ=None):
    """The credentials spec for the primary account from command-line flags (and the Go
    emulator's GOOGLE_ACCESS_TOKEN / GOOGLE_ID_TOKEN), or None for the offline default.

    `impersonate` is True (impersonate the config's default account) or an e-mail;
    `federate` reads the external-account file named by GOOGLE_APPLICATION_CREDENTIALS.
    Choosing two sources is an error: which one wins would be a guess.
    """
    environ = os.environ if environ is None else environ
    access_token = access_token or environ.get("GOOGLE_ACCESS_TOKEN") or None
    id_token = id_token or environ.get("GOOGLE_ID_TOKEN") or None
    chosen = []
    if service_account_file:
        chosen.append({"type": "key-file", "path": service_account_file,
                       "token_mode": token_mode or "oauth"})
    elif token_mode and token_mode != "oauth":
        raise CredentialError("--token-mode %s needs --service-account-file or --tpm"
                              % token_mode, status=500)
    if impersonate and not federate:
        spec = {"type": "impersonate"}
        if isinstance(impersonate, str):
            spec["target"] = impersonate
        chosen.append(spec)
    if federate:
        config = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if not config:
            raise CredentialError("--federate needs GOOGLE_APPLICATION_CREDENTIALS naming an "
                                  "external-account configuration (gcloud iam "
                                  "workload-identity-pools create-cred-config)", status=500)
        spec = {"type": "federate", "config": config}
        if impersonate:                        # federation, then impersonation (issue 3)
            spec["impersonate"] = impersonate
        chosen.append(spec)
    if access_token or id_token:
        chosen.append({"type": "static", "access_token": access_token, "id_token": id_token})
    if len(chosen) > 1:
        raise CredentialError("choose one credential source, not %s"
                              % " and ".join(spec["type"] for spec in chosen), status=500)
    return chosen[0] if chosen else None


# -- TPM-held keys: RS256 signatures made inside a TPM 2.0 through tpm2-pytss (the "tpm" extra,
#    imported lazily), for a key at a persistent handle or in a TSS2 PRIVATE KEY file.

TPM_EXTRA_HINT = ('TPM support needs the "tpm" extra: pip install tpm2-pytss==3.0.0 (in a '
                  'checkout of mds: pip install ".[tpm]"), which builds against the Debian '
                  'packages libtss2-dev pkg-config')

# Handles of TCG-defined hierarchies as written in a TSS2 PRIVATE KEY's `parent` field.
_TPM_RH_OWNER = 0x40000001
_TPM_RH_ENDORSEMENT = 0x4000000B


class TpmError(CredentialError):
    """A TPM operation failed; the message names the TPM's reason and never any secret.

    Raised at construction (meant for a fast, one-line startup failure) and by sign() when
    the key's policy stops holding; it is a CredentialError so token requests answer 5xx.
    """


def _import_tpm2_pytss():
    """Import tpm2_pytss lazily so mds.py stays stdlib-only without the extra."""
    # tpm2-tss prints every TPM error code to stderr; TpmError already names the reason in
    # one line, so keep the library quiet unless the user asked for its log (TSS2_LOG=...).
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss
    except ImportError as exc:
        raise TpmError("%s [%s]" % (TPM_EXTRA_HINT, exc), status=500) from None
    return tpm2_pytss


def normalize_tcti(tpm_path):
    """Map the user's --tpm-path to a tpm2-tss TCTI config string.

    Accepts a device path (/dev/tpmrm0 -> device:/dev/tpmrm0), any TCTI string
    (device:, swtpm:, mssim:, tabrmd:), and the seed's bare "host:port" swtpm form.
    """
    path = (tpm_path or "/dev/tpmrm0").strip()
    if path.startswith("/"):
        return "device:" + path
    if re.match(r"^[a-z][a-z0-9_-]*:", path) and not re.match(r"^[^:]+:\d+$", path):
        return path
    match = re.match(r"^\[?([0-9A-Za-z.:-]+?)\]?:(\d+)$", path)
    if match:  # the Go seed takes "127.0.0.1:2321" for a swtpm socket
        return "swtpm:host=%s,port=%s" % (match.group(1), match.group(2))
    if path.startswith(("device", "swtpm", "mssim", "tabrmd", "libtpms")):
        return path
    raise TpmError("cannot understand TPM path %r: use a device path (/dev/tpmrm0) or a TCTI "
                   "string (device:/dev/tpm0, swtpm:host=127.0.0.1,port=2321, "
                   "swtpm:path=/run/swtpm.sock)" % tpm_path, status=500)


def parse_pcr_selection(pcrs):
    """Parse "23", "0,7,23" or "sha256:0,7,23" (optionally "+"-joined banks) into
    [(bank, [indices])]; the default bank is sha256 like the seed's --pcrs."""
    if pcrs is None or str(pcrs).strip() == "":
        return []
    banks = []
    for part in str(pcrs).replace(" ", "").split("+"):
        bank, _, indices = part.rpartition(":")
        bank = (bank or "sha256").lower()
        if bank not in ("sha1", "sha256", "sha384", "sha512", "sm3_256"):
            raise TpmError("unknown PCR bank %r in --tpm-pcrs %r" % (bank, pcrs), status=500)
        try:
            numbers = sorted({int(item, 0) for item in indices.split(",") if item})
        except ValueError:
            raise TpmError("cannot parse --tpm-pcrs %r (use 23 or sha256:0,7,23)" % (pcrs,),
                           status=500) from None
        if not numbers or any(n < 0 or n > 23 for n in numbers):
            raise TpmError("PCR indices must be 0..23 in --tpm-pcrs %r" % (pcrs,), status=500)
        banks.append((bank, numbers))
    return banks


def _format_pcr_selection(banks):
    return "+".join("%s:%s" % (bank, ",".join(str(n) for n in numbers))
                    for bank, numbers in banks)


def _read_tss2_pem(key_file):
    """Return the DER bytes of a TSS2 PRIVATE KEY PEM file (TpmError if unreadable)."""
    try:
        with open(key_file, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise TpmError("cannot read TPM key file %s: %s" % (_file_name(key_file),
                                                             exc.strerror or exc),
                       status=500) from None
    try:
        return pem_decode(data, "TSS2 PRIVATE KEY")[1]
    except KeyFormatError as exc:
        raise TpmError("TPM key file %s is not a 'TSS2 PRIVATE KEY' PEM (as written by "
                       "tpm2_encodeobject, tpm2-openssl or tpm2-pytss): %s" % (key_file, exc),
                       status=500) from None


_OID_LOADABLE_KEY = "2.23.133.10.1.3"
_OID_IMPORTABLE_KEY = "2.23.133.10.1.4"


def parse_tss2_private_key(der):
    """Fields of a TSS2 PRIVATE KEY (TCG/tpm2-tss-engine key file ASN.1):
    SEQUENCE { type OID, emptyAuth [0] BOOLEAN OPTIONAL, [1] policy, [2] secret, [3]
    authPolicy (all OPTIONAL, ignored), parent INTEGER, pubkey OCTET STRING (TPM2B_PUBLIC),
    privkey OCTET STRING (TPM2B_PRIVATE) } -> (oid, empty_auth, parent, public, private).
    Parsed here rather than with tpm2-pytss so that variants (emptyAuth written as 1, the
    optional policy fields) all load."""
    tag, body, end = der_read(der, 0)
    if tag != 0x30:
        raise ValueError("not an ASN.1 SEQUENCE")
    tag, value, offset = der_read(body, 0)
    if tag != 0x06:
        raise ValueError("no key type OID")
    oid = oid_decode(value)
    empty_auth = False
    tag, value, following = der_read(body, offset)
    while tag & 0xE0 == 0xA0:  # context-specific constructed: [0] emptyAuth .. [3]
        if tag == 0xA0:
            inner_tag, inner, _ = der_read(value, 0)
            empty_auth = inner_tag == 0x01 and inner != b"\x00"
        offset = following
        tag, value, following = der_read(body, offset)
    if tag != 0x02:
        raise ValueError("no parent INTEGER")
    parent = int.from_bytes(value, "big")
    tag, public, offset = der_read(body, following)
    if tag != 0x04:
        raise ValueError("no public OCTET STRING")
    tag, private, offset = der_read(body, offset)
    if tag != 0x04:
        raise ValueError("no private OCTET STRING")
    return oid, empty_auth, parent, public, private


class TpmSigner:
    """Signer (contract protocol) whose RSA private key never leaves a TPM.

    One ESAPI connection guarded by a lock.  Between signatures the TPM holds nothing for us:
    transient objects are kept as saved contexts and loaded, used and flushed per signature,
    sessions are flushed after each use (a direct swtpm/device connection has no resource
    manager and only ~3 object slots).  After a TPM restart or a dropped connection the key is
    reloaded from its handle/file once, transparently.
    """

    def __init__(self, tcti=None, persistent_handle=None, key_file=None, key_password=None,
                 parent_password=None, pcrs=None, ek_parent=False,
                 session_encrypt_with_name=None, key_id=None, validate=True):
        if (persistent_handle is None) == (key_file is None):
            raise TpmError("TPM key: give exactly one of a persistent handle "
                           "(--tpm-persistent-handle) or a key file (--tpm-key-file)", status=500)
        self.tcti = normalize_tcti(tcti)
        self.persistent_handle = None
        if persistent_handle is not None:
            try:
                self.persistent_handle = (int(persistent_handle, 0)
                                          if isinstance(persistent_handle, str)
                                          else int(persistent_handle))
            except ValueError:
                raise TpmError("cannot parse persistent handle %r (e.g. 0x81010002)"
                               % (persistent_handle,), status=500) from None
            if not 0x81000000 <= self.persistent_handle <= 0x81FFFFFF:
                raise TpmError("persistent handle 0x%08x is outside 0x81000000-0x81ffffff"
                               % self.persistent_handle, status=500)
        self.key_file = key_file
        self._key_file_fields = None
        if key_file is not None:
            try:
                self._key_file_fields = parse_tss2_private_key(_read_tss2_pem(key_file))
            except ValueError as exc:
                raise TpmError("cannot parse TSS2 PRIVATE KEY file %s: %s" % (key_file, exc),
                               status=500) from None
            oid = self._key_file_fields[0]
            if oid != _OID_LOADABLE_KEY:
                raise TpmError("TPM key file %s is of type %s; only loadable keys (%s) are "
                               "supported%s" % (key_file, oid, _OID_LOADABLE_KEY,
                                                " (this one still needs TPM2_Import)"
                                                if oid == _OID_IMPORTABLE_KEY else ""),
                               status=500)
        self._key_password = (key_password or "").encode() if isinstance(
            key_password, str) else (key_password or b"")
        self._parent_password = (parent_password or "").encode() if isinstance(
            parent_password, str) else (parent_password or b"")
        self.pcr_banks = parse_pcr_selection(pcrs)
        # A key file may itself say its parent is the endorsement hierarchy.
        self.ek_parent = bool(ek_parent) or (self._key_file_fields is not None
                                             and self._key_file_fields[2] == _TPM_RH_ENDORSEMENT)
        self.session_encrypt_name = None
        if session_encrypt_with_name:
            try:
                self.session_encrypt_name = bytes.fromhex(session_encrypt_with_name.strip())
            except ValueError:
                raise TpmError("--tpm-session-encrypt-with-name must be the hex name of a key "
                               "(e.g. 000b...)", status=500) from None
        self._lock = threading.Lock()
        self._tpm = _import_tpm2_pytss()
        self._ectx = None
        self._key_context = None   # saved TPMS_CONTEXT of a transient key loaded from key_file
        self._ek_context = None    # saved TPMS_CONTEXT of the RSA endorsement key
        self._persistent_tr = None
        self._n = None
        self._e = None
        with self._lock:
            self._call_with_recovery(self._prepare_locked)
        spki = rsa_subject_public_key_info(self._n, self._e)
        self._fingerprint = hashlib.sha256(spki).hexdigest()
        self.key_id = key_id or hashlib.sha1(spki).hexdigest()
        if validate:
            # A throwaway signature proves password / PCR policy / parent now rather than at
            # the first token request (fast one-line startup failure).
            self.sign(b"mds TPM startup self-test")

    @classmethod
    def from_options(cls, tpm=True, tpm_path=None, tpm_persistent_handle=None,
                     tpm_key_file=None, tpm_key_pass=None, tpm_parent_pass=None, tpm_pcrs=None,
                     tpm_ek_parent=False, tpm_session_encrypt_with_name=None, key_id=None):
        """Build a signer from the CLI flags (--tpm, --tpm-path, ...), mapped 1:1."""
        if not tpm:
            raise TpmError("TpmSigner.from_options called without --tpm", status=500)
        return cls(tcti=tpm_path, persistent_handle=tpm_persistent_handle,
                   key_file=tpm_key_file, key_password=tpm_key_pass,
                   parent_password=tpm_parent_pass, pcrs=tpm_pcrs, ek_parent=tpm_ek_parent,
                   session_encrypt_with_name=tpm_session_encrypt_with_name, key_id=key_id)

    # ---- signer protocol -------------------------------------------------------------------

    def sign(self, message):
        """RSASSA-PKCS1-v1_5 / SHA-256 signature over `message`, made inside the TPM."""
        digest = hashlib.sha256(message).digest()
        # One signature at a time; a TPM that stopped answering must not queue every request
        # behind it for ever.
        if not self._lock.acquire(timeout=MINT_BUDGET):
            raise TpmError("the TPM at %s is not answering: a signature has been pending for "
                           "over %d s" % (self.tcti, MINT_BUDGET), status=503)
        try:
            signature = self._call_with_recovery(lambda: self._sign_locked(digest))
        finally:
            self._lock.release()
        # Checked with the public key, as RsaKey checks its CRT: a signature that does not
        # verify must become an error here, not a token that fails wherever it is presented.
        if not rsa_verify(self._n, self._e, message, signature):
            raise TpmError("the TPM's signature does not verify against the key's public part; "
                           "refusing to use it")
        return signature

    def public_numbers(self):
        return (self._n, self._e)

    def fingerprint(self):
        """SHA-256 (hex) of the public key's SubjectPublicKeyInfo DER; safe for logs."""
        return self._fingerprint

    def describe(self):
        where = ("persistent handle 0x%08x" % self.persistent_handle
                 if self.persistent_handle is not None else "key file %s" % self.key_file)
        extras = []
        if self.ek_parent:
            extras.append("EK parent")
        if self.pcr_banks:
            extras.append("PCR policy " + _format_pcr_selection(self.pcr_banks))
        if self._key_password:
            extras.append("key password")
        if self.session_encrypt_name:
            extras.append("encrypted sessions")
        return "TPM RSA-%d key at %s via %s%s, fingerprint sha256:%s" % (
            self._n.bit_length(), where, self.tcti,
            " (" + ", ".join(extras) + ")" if extras else "", self._fingerprint)

    def close(self):
        """Flush nothing (nothing stays loaded) and drop the TPM connection."""
        with self._lock:
            self._disconnect_locked()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "<TpmSigner %s>" % (self.describe() if self._n else self.tcti)

    # ---- connection and recovery ----------------------------------------------------------

    def _connect_locked(self):
        if self._ectx is not None:
            return self._ectx
        try:
            self._ectx = self._tpm.ESAPI(self.tcti)
        except Exception as exc:  # TSS errors, a missing TCTI library, a bad config string
            raise TpmError("cannot open the TPM at %s: %s" % (self.tcti, exc)) from None
        return self._ectx

    def _disconnect_locked(self):
        ectx, self._ectx = self._ectx, None
        self._key_context = None
        self._ek_context = None
        self._persistent_tr = None
        if ectx is not None:
            try:
                ectx.close()
            except Exception:
                pass

    def _call_with_recovery(self, operation):
        """Run `operation`; if the TPM lost our state (restart, reset, dropped socket) rebuild
        once and retry, otherwise translate the TPM's error into a TpmError."""
        for attempt in (1, 2):
            try:
                return operation()
            except TpmError:
                raise
            except _Step as step:
                if self._recoverable(step):
                    # Start the next attempt (or the next request) from a fresh connection:
                    # one half-rebuilt would fail every request until a restart.
                    self._disconnect_locked()
                    if attempt == 1:
                        continue
                raise TpmError(self._explain(step)) from None
            except self._tpm.TSS2_Exception as exc:
                # A call not wrapped in a named _step (setting auth, reading a name, parsing a
                # selection): still the TPM's refusal, so a TpmError, never an internal error.
                raise TpmError("TPM error: %s" % exc) from None
            except Exception as exc:         # the TSS lost track of our objects
                self._disconnect_locked()
                if attempt == 1:
                    continue
                raise TpmError("TPM state lost and not rebuilt: %s: %s"
                               % (type(exc).__name__, exc)) from None

    def _recoverable(self, step):
        rc = getattr(step.exc, "rc", None)
        if rc is None:
            return False
        if rc >> 16:  # TSS layer (TCTI I/O error after a TPM restart, ESYS state): reconnect
            return True
        codes = self._tpm.constants.TPM2_RC
        # Saved contexts die with a TPM reset and transient handles vanish with it; never
        # retry authorization failures (each one counts against dictionary-attack lockout).
        return step.name == "context load" or getattr(step.exc, "error", None) in (
            codes.REFERENCE_H0, codes.INITIALIZE)

    def _explain(self, step):
        exc = step.exc
        codes = self._tpm.constants.TPM2_RC
        error = getattr(exc, "error", None)
        rc = getattr(exc, "rc", None)
        detail = str(exc)
        name = step.name
        if rc is not None and rc >> 16:
            return "TPM at %s unreachable or failing during %s: %s" % (self.tcti, name, detail)
        if error in (codes.AUTH_FAIL, codes.BAD_AUTH):
            if name in ("create parent", "parent auth", "load key", "load endorsement key"):
                return ("wrong TPM parent password (--tpm-parent-pass) for %s: %s (%s)"
                        % (name, "TPM_RC_AUTH_FAIL" if error == codes.AUTH_FAIL
                           else "TPM_RC_BAD_AUTH", detail))
            return "wrong TPM key password (--tpm-key-pass): %s (%s)" % (
                "TPM_RC_AUTH_FAIL" if error == codes.AUTH_FAIL else "TPM_RC_BAD_AUTH", detail)
        if error == codes.POLICY_FAIL:
            if self.pcr_banks:
                return ("TPM key's PCR policy does not hold: PCRs %s differ from the values the "
                        "key is bound to (TPM_RC_POLICY_FAIL)"
                        % _format_pcr_selection(self.pcr_banks))
            return "TPM key policy not satisfied (TPM_RC_POLICY_FAIL): does it need --tpm-pcrs?"
        if error == codes.AUTH_UNAVAILABLE:
            return ("TPM key cannot be used with a password (TPM_RC_AUTH_UNAVAILABLE): it is "
                    "bound to a policy; give --tpm-pcrs")
        if error == codes.LOCKOUT:
            return ("TPM is in dictionary-attack lockout after wrong passwords (TPM_RC_LOCKOUT); "
                    "wait for recovery or run tpm2_dictionarylockout --clear-lockout")
        if error == codes.HANDLE and name == "persistent":
            return ("no key at TPM persistent handle 0x%08x (TPM_RC_HANDLE)"
                    % self.persistent_handle)
        if error == codes.INTEGRITY and name == "load key":
            return ("TPM key file %s does not belong under this parent (TPM_RC_INTEGRITY): "
                    "wrong TPM, wrong parent (--tpm-ek-parent?) or a corrupted file"
                    % self.key_file)
        if error == codes.VALUE and name == "policy pcr":
            return "TPM refused PCR selection %s (TPM_RC_VALUE): bank not allocated?" % (
                _format_pcr_selection(self.pcr_banks))
        try:
            code_name = "TPM_RC_" + str(codes(error)).upper()
        except Exception:
            code_name = "rc=0x%x" % (rc or 0)
        return "TPM error during %s: %s (%s)" % (name, detail, code_name)

    # ---- preparation (startup and after a TPM reset) ----------------------------------------

    def _prepare_locked(self):
        ectx = self._connect_locked()
        if self.session_encrypt_name is not None or self.ek_parent:
            ek = self._create_ek_locked()
            try:
                if self.session_encrypt_name is not None:
                    actual = bytes(ectx.tr_get_name(ek))
                    if actual != self.session_encrypt_name:
                        raise TpmError(
                            "the TPM's RSA endorsement key name %s does not match "
                            "--tpm-session-encrypt-with-name %s: refusing to talk to a TPM we "
                            "cannot authenticate" % (actual.hex(), self.session_encrypt_name.hex()))
                self._ek_context = _step("save endorsement key", ectx.context_save, ek)
            finally:
                _flush(ectx, ek)
        if self.persistent_handle is not None:
            self._persistent_tr = _step("persistent", ectx.tr_from_tpmpublic,
                                        self.persistent_handle)
            public = _step("read public", ectx.read_public, self._persistent_tr)[0]
        else:
            key_tr, public = self._load_key_file_locked()
            try:
                self._key_context = _step("save key", ectx.context_save, key_tr)
            finally:
                _flush(ectx, key_tr)
        self._check_public(public.publicArea)

    def _check_public(self, area):
        constants = self._tpm.constants
        if area.type != constants.TPM2_ALG.RSA:
            raise TpmError("TPM key is not an RSA key (type 0x%x); service-account keys are "
                           "RSA" % int(area.type), status=500)
        if not area.objectAttributes & constants.TPMA_OBJECT.SIGN_ENCRYPT:
            raise TpmError("TPM key does not have the 'sign' attribute", status=500)
        if area.objectAttributes & constants.TPMA_OBJECT.RESTRICTED:
            raise TpmError("TPM key is a restricted signing key (an attestation key); use an "
                           "unrestricted rsassa key", status=500)
        scheme = area.parameters.rsaDetail.scheme
        if scheme.scheme not in (constants.TPM2_ALG.NULL, constants.TPM2_ALG.RSASSA) or (
                scheme.scheme == constants.TPM2_ALG.RSASSA
                and scheme.details.rsassa.hashAlg != constants.TPM2_ALG.SHA256):
            raise TpmError("TPM key's scheme is not RSASSA-SHA256 or null (create it with "
                           "-G rsa2048:rsassa:null or rsa2048:rsassa-sha256)", status=500)
        exponent = int(area.parameters.rsaDetail.exponent) or 65537
        modulus = int.from_bytes(bytes(area.unique.rsa), "big")
        if self._n is not None and (modulus, exponent) != (self._n, self._e):
            raise TpmError("the TPM key changed under us (different public key after reload)")
        self._n, self._e = modulus, exponent

    def _create_ek_locked(self):
        """Create the TCG default RSA EK (template from NV if the TPM has one)."""
        from tpm2_pytss.utils import NVReadEK, create_ek_template
        ectx = self._ectx
        try:
            _, template = create_ek_template("EK-RSA2048", NVReadEK(ectx))
        except Exception as exc:
            raise TpmError("cannot build the RSA endorsement key template: %s" % exc) from None
        ectx.tr_set_auth(self._tpm.ESYS_TR.ENDORSEMENT, self._parent_password
                         if self.ek_parent else b"")
        handle = _step("create parent", ectx.create_primary,
                       self._tpm.TPM2B_SENSITIVE_CREATE(), template,
                       self._tpm.ESYS_TR.ENDORSEMENT)[0]
        return handle

    def _load_key_file_locked(self):
        """Load the TSS2 key under its parent; returns (transient handle, TPM2B_PUBLIC)."""
        tpm = self._tpm
        ectx = self._ectx
        _, _, parent_handle, public_bytes, private_bytes = self._key_file_fields
        try:
            public = tpm.TPM2B_PUBLIC.unmarshal(public_bytes)[0]
            private = tpm.TPM2B_PRIVATE.unmarshal(private_bytes)[0]
        except Exception as exc:
            raise TpmError("cannot parse TSS2 PRIVATE KEY file %s: %s"
                           % (self.key_file, exc), status=500) from None
        if self.ek_parent:
            parent = self._load_ek_locked()
            try:
                session = self._policy_secret_session_locked()
                try:
                    key = _step("load key", ectx.load, parent, private, public,
                                session1=session)
                finally:
                    _flush(ectx, session)
            finally:
                _flush(ectx, parent)
            return key, public
        if 0x81000000 <= parent_handle <= 0x81FFFFFF:
            parent = _step("persistent parent", ectx.tr_from_tpmpublic, parent_handle)
            ectx.tr_set_auth(parent, self._parent_password)
            return _step("load key", ectx.load, parent, private, public), public
        if parent_handle not in (_TPM_RH_OWNER, 0):
            raise TpmError("TPM key file %s names parent 0x%08x; only the owner hierarchy, a "
                           "persistent parent, or --tpm-ek-parent are supported"
                           % (self.key_file, parent_handle), status=500)
        # The TSS2 key-file convention: parent 0x40000001 means the owner "H-2" ECC P-256
        # primary (tpm2-openssl, tpm2-pytss, the seed); older tpm2-tss-engine keys were made
        # under the RSA-2048 SRK, so fall back to it when the integrity check says "not mine".
        constants = tpm.constants
        storage = (constants.TPMA_OBJECT.USERWITHAUTH | constants.TPMA_OBJECT.RESTRICTED
                   | constants.TPMA_OBJECT.DECRYPT | constants.TPMA_OBJECT.NODA
                   | constants.TPMA_OBJECT.FIXEDTPM | constants.TPMA_OBJECT.FIXEDPARENT
                   | constants.TPMA_OBJECT.SENSITIVEDATAORIGIN)
        last = None
        for algorithm in ("ecc256:aes128cfb", "rsa2048:aes128cfb"):
            template = tpm.TPMT_PUBLIC.parse(algorithm, objectAttributes=storage,
                                             nameAlg="sha256")
            ectx.tr_set_auth(tpm.ESYS_TR.OWNER, self._parent_password)
            try:
                parent = _step("create parent", ectx.create_primary,
                               tpm.TPM2B_SENSITIVE_CREATE(), tpm.TPM2B_PUBLIC(publicArea=template),
                               tpm.ESYS_TR.OWNER)[0]
            except _Step as step:
                if (getattr(step.exc, "error", None) == tpm.constants.TPM2_RC.ASYMMETRIC
                        or getattr(step.exc, "error", None) == tpm.constants.TPM2_RC.CURVE):
                    last = step
                    continue
                raise
            try:
                return _step("load key", ectx.load, parent, private, public), public
            except _Step as step:
                if getattr(step.exc, "error", None) != tpm.constants.TPM2_RC.INTEGRITY:
                    raise
                last = step
            finally:
                _flush(ectx, parent)
        raise last

    def _load_ek_locked(self):
        if self._ek_context is None:
            ek = self._create_ek_locked()
            try:
                self._ek_context = _step("save endorsement key", self._ectx.context_save, ek)
            except _Step:
                _flush(self._ectx, ek)
                raise
            return ek
        return _step("load endorsement key", self._ectx.context_load, self._ek_context)

    def _policy_secret_session_locked(self):
        """Policy session satisfying the EK's policy A: PolicySecret(TPM_RH_ENDORSEMENT)."""
        tpm = self._tpm
        ectx = self._ectx
        session = _step("parent auth", ectx.start_auth_session, tpm.ESYS_TR.NONE,
                        tpm.ESYS_TR.NONE, tpm.constants.TPM2_SE.POLICY,
                        _aes128cfb(tpm), tpm.constants.TPM2_ALG.SHA256)
        try:
            ectx.tr_set_auth(tpm.ESYS_TR.ENDORSEMENT, self._parent_password)
            _step("parent auth", ectx.policy_secret, tpm.ESYS_TR.ENDORSEMENT, session)
        except _Step:
            _flush(ectx, session)
            raise
        return session

    # ---- signing ----------------------------------------------------------------------------

    def _sign_locked(self, digest):
        tpm = self._tpm
        constants = tpm.constants
        if self._ectx is None or (self._persistent_tr is None and self._key_context is None):
            self._prepare_locked()
        ectx = self._ectx
        flush_later = []
        try:
            if self.persistent_handle is not None:
                key = self._persistent_tr
            else:
                key = _step("context load", ectx.context_load, self._key_context)
                flush_later.append(key)
            salt_key = tpm.ESYS_TR.NONE
            if self.session_encrypt_name is not None:
                salt_key = self._load_ek_locked()
                flush_later.append(salt_key)
            ectx.tr_set_auth(key, self._key_password)
            encrypt = self.session_encrypt_name is not None
            if self.pcr_banks:
                session = _step("start session", ectx.start_auth_session, salt_key,
                                tpm.ESYS_TR.NONE, constants.TPM2_SE.POLICY,
                                _aes128cfb(tpm), constants.TPM2_ALG.SHA256)
                flush_later.append(session)
                selection = tpm.TPML_PCR_SELECTION.parse(_format_pcr_selection(self.pcr_banks))
                # An empty pcrDigest makes the TPM use the PCRs' current values, so the
                # policy holds exactly when they still equal the ones the key was bound to.
                _step("policy pcr", ectx.policy_pcr, session, tpm.TPM2B_DIGEST(), selection)
                if self._key_password:
                    # PolicyAuthValue, not PolicyPassword (same policy digest): the password
                    # then keys the session's HMAC instead of travelling in clear, which also
                    # keeps it right with parameter encryption.
                    _step("policy auth value", ectx.policy_auth_value, session)
            elif encrypt:
                session = _step("start session", ectx.start_auth_session, salt_key,
                                tpm.ESYS_TR.NONE, constants.TPM2_SE.HMAC,
                                _aes128cfb(tpm), constants.TPM2_ALG.SHA256)
                flush_later.append(session)
            else:
                session = tpm.ESYS_TR.PASSWORD
            if encrypt:
                # Sign's first command parameter (the digest) travels AES-encrypted under a
                # session key salted to the verified EK; its response has no sized first
                # parameter, so only DECRYPT applies.
                ectx.trsess_set_attributes(
                    session, constants.TPMA_SESSION.CONTINUESESSION
                    | constants.TPMA_SESSION.DECRYPT)
            scheme = tpm.TPMT_SIG_SCHEME(scheme=constants.TPM2_ALG.RSASSA)
            scheme.details.rsassa.hashAlg = constants.TPM2_ALG.SHA256
            # Unrestricted keys accept a NULL ticket (no proof the TPM made the hash).
            validation = tpm.TPMT_TK_HASHCHECK(tag=constants.TPM2_ST.HASHCHECK,
                                               hierarchy=constants.TPM2_RH.NULL)
            signature = _step("sign", ectx.sign, key, tpm.TPM2B_DIGEST(digest), scheme,
                              validation, session1=session)
            return bytes(signature.signature.rsassa.sig)
        finally:
            for handle in reversed(flush_later):
                _flush(ectx, handle)


class _Step(Exception):
    """Internal: a TSS2_Exception tagged with the operation that raised it."""

    def __init__(self, name, exc):
        super().__init__("%s: %s" % (name, exc))
        self.name = name
        self.exc = exc


def _step(name, function, *args, **kwargs):
    import tpm2_pytss
    try:
        return function(*args, **kwargs)
    except tpm2_pytss.TSS2_Exception as exc:
        raise _Step(name, exc) from None


def _flush(ectx, handle):
    """Flush a transient object or session; errors ignored (it may already be gone)."""
    try:
        ectx.flush_context(handle)
    except Exception:
        pass


def _aes128cfb(tpm):
    return tpm.TPMT_SYM_DEF(
        algorithm=tpm.constants.TPM2_ALG.AES,
        keyBits=tpm.TPMU_SYM_KEY_BITS(aes=128),
        mode=tpm.TPMU_SYM_MODE(aes=tpm.constants.TPM2_ALG.CFB))


# -- AWS credentials: source keys (environment, profiles) and the role's credential providers.

class AwsKeys(collections.namedtuple(
        "AwsKeys", "access_key secret_key session_token expiration origin")):
    """Static AWS keys the emulator itself holds; `origin` names where they came from."""

    __slots__ = ()

    def __repr__(self):
        # Never let a secret reach a log line through repr().
        return "AwsKeys(access_key=%r, origin=%r)" % (self.access_key, self.origin)


def _aws_file(environ, variable, default):
    path = environ.get(variable) or default
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME")     # the given environment's, for tests and services
        if home:
            return os.path.join(home, path[2:])
    return os.path.expanduser(path)


def _read_ini(path):
    import configparser   # here, not at the top: only AWS profiles need it, and startup counts
    parser = configparser.RawConfigParser()
    try:
        # UTF-8 whatever the locale says: the same file must mean the same keys everywhere.
        parser.read(path, encoding="utf-8")
    except configparser.Error as error:
        raise CredentialError("cannot parse %s: %s" % (path, error.__class__.__name__),
                              status=500)
    except UnicodeDecodeError:
        # The undecodable bytes may be part of a key: the file is named, never quoted.
        raise CredentialError("cannot read %s: it is not UTF-8 text" % _file_name(path),
                              status=500) from None
    except OSError as error:
        raise CredentialError("cannot read %s: %s" % (_file_name(path),
                                                     error.strerror or type(error).__name__),
                              status=500) from None
    return parser


def aws_profile_name(profile=None, environ=None):
    """The profile botocore would use: explicit, then AWS_PROFILE / AWS_DEFAULT_PROFILE."""
    environ = os.environ if environ is None else environ
    return profile or environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"


def _config_profile_name(section):
    """The profile a ~/.aws/config section holds: "[profile dev]" (botocore also reads
    [profile "dev"] and extra spaces), or a bare "[default]"; None for anything else."""
    if section.strip() == "default":
        return "default"
    match = re.fullmatch(r'\s*profile\s+("?)(.+?)\1\s*', section)
    return match.group(2) if match else None


def _profile_sections(profile=None, environ=None):
    """(~/.aws/config settings, ~/.aws/credentials settings, description) of one profile;
    a file without the profile gives None."""
    environ = os.environ if environ is None else environ
    name = aws_profile_name(profile, environ)
    config = _read_ini(_aws_file(environ, "AWS_CONFIG_FILE", "~/.aws/config"))
    from_config = next((dict(config.items(section)) for section in config.sections()
                        if _config_profile_name(section) == name), None)
    credentials = _read_ini(_aws_file(environ, "AWS_SHARED_CREDENTIALS_FILE",
                                      "~/.aws/credentials"))
    from_credentials = dict(credentials.items(name)) if credentials.has_section(name) else None
    return from_config, from_credentials, "profile %r" % name


def load_aws_profile(profile=None, environ=None):
    """Merged settings of one profile: ~/.aws/config values overridden by ~/.aws/credentials.

    Returns (settings dict, description) or (None, description) when neither file has it.
    """
    from_config, from_credentials, described = _profile_sections(profile, environ)
    if from_config is None and from_credentials is None:
        return None, described
    return dict(from_config or {}, **(from_credentials or {})), described


def _keys_from_settings(settings, origin):
    """The keys of one file's section, taken together (an id from one file and a token from
    another would not belong together); None if it has none, an error if only half."""
    access_key = (settings.get("aws_access_key_id") or "").strip()
    secret_key = (settings.get("aws_secret_access_key") or "").strip()
    if not (access_key or secret_key):
        return None
    if not (access_key and secret_key):
        raise CredentialError("%s has only one of aws_access_key_id and aws_secret_access_key"
                              % origin, status=500)
    token = (settings.get("aws_session_token") or settings.get("aws_security_token") or "")
    return AwsKeys(access_key, secret_key, token.strip() or None, None, origin)


# Profile settings through which botocore finds keys that mds does not follow itself.
_INDIRECT_AWS_SOURCES = ("role_arn", "web_identity_token_file", "sso_session", "sso_start_url")


def resolve_aws_source_keys(profile=None, environ=None):
    """Static source keys, resolved like botocore's static providers (spec §7.1).

    An explicit `profile` argument wins; otherwise the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    (+AWS_SESSION_TOKEN, AWS_CREDENTIAL_EXPIRATION) environment, then the AWS_PROFILE or
    "default" profile: its keys in ~/.aws/credentials, else in ~/.aws/config. A profile that
    botocore would resolve another way (role_arn, web identity, SSO, credential_process) is
    refused rather than read differently. Never consults IMDS: clients pointed at this
    emulator would make it ask itself (spec §7.1 caution). Raises CredentialError when
    nothing is found.
    """
    environ = os.environ if environ is None else environ
    if not profile:
        access_key = environ.get("AWS_ACCESS_KEY_ID", "").strip()
        secret_key = environ.get("AWS_SECRET_ACCESS_KEY", "").strip()
        if access_key or secret_key:
            if not (access_key and secret_key):
                raise CredentialError("partial AWS credentials in the environment: set both "
                                      "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                                      status=500)
            token = (environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN")
                     or "").strip() or None
            expiration = None
            if environ.get("AWS_CREDENTIAL_EXPIRATION"):
                try:
                    expiration = parse_imds_time(environ["AWS_CREDENTIAL_EXPIRATION"])
                except ValueError:
                    raise CredentialError("AWS_CREDENTIAL_EXPIRATION is not an ISO-8601 time",
                                          status=500)
            return AwsKeys(access_key, secret_key, token, expiration, "environment")
    from_config, from_credentials, described = _profile_sections(profile, environ)
    if from_config is None and from_credentials is None:
        raise CredentialError("no AWS source credentials: AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY unset and %s not found" % described,
                              status=500)
    merged = dict(from_config or {}, **(from_credentials or {}))
    indirect = [name for name in _INDIRECT_AWS_SOURCES if merged.get(name)]
    if indirect:
        raise CredentialError("%s gets its keys through %s, which mds does not follow: give "
                              "the server static keys (aws_access_key_id and "
                              "aws_secret_access_key)" % (described, indirect[0]), status=500)
    keys = _keys_from_settings(from_credentials or {}, described)
    if keys is None and merged.get("credential_process"):
        raise CredentialError("%s gets its keys from credential_process, which mds does not "
                              "run: give the server static keys" % described, status=500)
    keys = keys or _keys_from_settings(from_config or {}, described)
    if keys is None:
        raise CredentialError("%s has no aws_access_key_id/aws_secret_access_key "
                              "(only static keys are supported as a source)" % described,
                              status=500)
    return keys


def resolve_aws_region(profile=None, environ=None):
    """AWS_REGION, AWS_DEFAULT_REGION, then the profile's `region`; None if unset."""
    environ = os.environ if environ is None else environ
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        return region.strip()
    try:
        settings, _ = load_aws_profile(profile, environ)
    except CredentialError:
        return None
    if settings and settings.get("region"):
        return settings["region"].strip()
    return None


# Role credentials handed to the EC2 flavor: every provider returns this dict shape (epoch
# floats for the times) from credentials(), or raises CredentialError.
#   {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "LastUpdated"}

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def fake_aws_access_key_id(prefix="ASIA"):
    """A syntactically valid temporary access key id (ASIA + 16 base32 characters)."""
    return prefix + "".join(secrets.choice(_BASE32) for _ in range(16))


def fake_aws_secret_access_key():
    return base64.b64encode(secrets.token_bytes(30)).decode("ascii")


def fake_aws_session_token():
    # Real tokens are long opaque base64 blobs that begin with "IQoJb3JpZ2luX2Vj" (the
    # encoding of a protobuf-ish "origin_ec..." header); mimic the look, not the content.
    return "IQoJb3JpZ2luX2Vj" + base64.b64encode(secrets.token_bytes(600)).decode("ascii")


class OfflineRoleCredentials(object):
    """Fake but well-formed temporary credentials that rotate and never expire (default).

    A new key set is minted every `rotation` seconds and each is valid for `lifetime`
    seconds, so what is served always has at least lifetime - rotation left: SDKs never see
    expired credentials (the AEMM bug, spec §9.7) and never enter static-stability paths.
    """

    def __init__(self, role_name, lifetime=6 * 3600, rotation=3600, clock=time.time):
        if rotation >= lifetime:
            raise ValueError("rotation must be shorter than lifetime")
        self.role_name = role_name
        self.lifetime = lifetime
        self.rotation = rotation
        self._clock = clock
        self._epoch = clock()
        self._lock = threading.Lock()
        self._period = None
        self._current = None

    def credentials(self):
        now = self._clock()
        period = int((now - self._epoch) // self.rotation)
        with self._lock:
            if period != self._period:
                issued = self._epoch + period * self.rotation
                self._current = {
                    "AccessKeyId": fake_aws_access_key_id(),
                    "SecretAccessKey": fake_aws_secret_access_key(),
                    "Token": fake_aws_session_token(),
                    "LastUpdated": issued,
                    "Expiration": issued + self.lifetime,
                }
                self._period = period
            return dict(self._current)

    def describe(self):
        return "offline fake credentials for role %s (rotate every %ds, valid %ds)" % (
            self.role_name, self.rotation, self.lifetime)

    def start(self):
        pass

    def stop(self, wait=True):
        pass


class StaticRoleCredentials(object):
    """The emulator's own static keys (environment or profile) served as the role's.

    Long-term keys (AKIA...) have no expiry and no session token, but every IMDS client
    requires both fields: Expiration then rolls forward (`lifetime` ahead, renewed every
    `rotation`) and Token is "" (botocore and the JS SDK only check that it is present /
    a string; an empty token is not sent when signing). Keys with an explicit expiration are
    served until then, and refused afterwards.  Session keys without a known expiration
    usually last an hour: they are served for one, so clients come back for the keys again
    (re-read from their source) before they are likely to have expired.
    """

    SESSION_LIFETIME, SESSION_ROTATION = 3600, 900

    def __init__(self, keys_loader, lifetime=6 * 3600, rotation=3600, clock=time.time,
                 where="environment/profile"):
        self._load = keys_loader
        self._where = where
        self.lifetime = lifetime
        self.rotation = rotation
        self._clock = clock
        self._epoch = clock()
        self._origin = None

    def credentials(self):
        keys = self._load()  # re-read each time so an edited credentials file takes effect
        self._origin = keys.origin
        now = self._clock()
        if keys.expiration is not None:
            if keys.expiration <= now:
                raise CredentialError("static AWS credentials from %s expired at %s"
                                      % (keys.origin, format_imds_time(keys.expiration)))
            updated = self._epoch
            expiration = keys.expiration
        else:
            lifetime, rotation = (self.SESSION_LIFETIME, self.SESSION_ROTATION) \
                if keys.session_token else (self.lifetime, self.rotation)
            updated = self._epoch + ((now - self._epoch) // rotation) * rotation
            expiration = updated + lifetime
        return {
            "AccessKeyId": keys.access_key,
            "SecretAccessKey": keys.secret_key,
            "Token": keys.session_token or "",
            "LastUpdated": updated,
            "Expiration": expiration,
        }

    def describe(self):
        return "static AWS credentials from %s" % (self._origin or self._where)

    def start(self):
        # Keys are read at each request, so a fix needs no restart; but a missing profile or
        # empty environment should show at startup, not at the first client's error.
        try:
            self._origin = self._load().origin
        except CredentialError as error:
            _ec2_log.warning("static AWS credentials are not usable yet: %s", error)

    def stop(self, wait=True):
        pass


class AssumeRoleCredentials(object):
    """Credentials from STS AssumeRole, cached and refreshed by a background thread.

    Requests only ever read the cache (spec §0.7: never call STS in the request path). The
    thread re-assumes once less than `refresh_margin` seconds are left (30 min by default,
    spec §7.6), retrying with backoff on failure; while STS fails, the cached credentials
    are served for as long as they are still valid. With nothing valid, credentials()
    raises CredentialError carrying the last STS error (never a secret).
    """

    def __init__(self, role_arn, keys_loader, region=None, endpoint=None,
                 session_name="mds", duration=3600, external_id=None, refresh_margin=1800,
                 retry_delay=5.0, max_retry_delay=300.0, clock=time.time, environ=None,
                 should_stop=None):
        self.role_arn = role_arn
        self._load_keys = keys_loader
        self.region = region
        self.endpoint = endpoint
        self.session_name = session_name
        self.duration = duration
        self.external_id = external_id
        self.refresh_margin = refresh_margin
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._clock = clock
        self._environ = environ
        self._should_stop = should_stop or (lambda: False)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._first_attempt_done = threading.Event()
        self._thread = None
        self._cached = None
        self._last_error = None
        self._last_attempt = 0.0
        self._due_at = math.inf        # wall-clock time of the refresher's next attempt
        self.sts_calls = 0

    def describe(self):
        where = self.endpoint or sts_endpoint_for_region(self.region)[0]
        return "STS AssumeRole %s via %s" % (self.role_arn, where)

    def _assume(self):
        self._last_attempt = self._clock()
        keys = self._load_keys()
        self.sts_calls += 1
        answer = sts_assume_role(self.role_arn, keys, session_name=self.session_name,
                                 region=self.region, endpoint=self.endpoint,
                                 duration=self.duration, external_id=self.external_id,
                                 environ=self._environ)
        answer["LastUpdated"] = self._clock()
        answer.pop("AssumedRoleArn", None)
        return answer

    def refresh_now(self):
        """One synchronous AssumeRole; updates the cache, returns the error text or None."""
        try:
            fresh = self._assume()
        except Exception as error:     # the refresher thread must outlive any single failure
            text = str(error) if isinstance(error, CredentialError) else \
                "unexpected %s: %s" % (type(error).__name__, _redact(error))
            with self._lock:
                self._last_error = text
            _ec2_log.warning("AssumeRole %s failed: %s", self.role_arn, text)
            return text
        with self._lock:
            self._cached = fresh
            self._last_error = None
        # Only a hint of the key id: enough to match CloudTrail entries, nothing to reuse.
        key_hint = fresh["AccessKeyId"][:4] + "..." + fresh["AccessKeyId"][-4:]
        _ec2_log.info("AssumeRole %s ok: %s, expires %s", self.role_arn, key_hint,
                      format_imds_time(fresh["Expiration"]))
        return None

    def _next_refresh_delay(self):
        with self._lock:
            cached = self._cached
        now = self._clock()
        if cached is None:
            return None
        remaining = cached["Expiration"] - now
        # Refresh at the margin; a session shorter than twice the margin (DurationSeconds 900
        # against the default 1800) is refreshed halfway through instead of in a loop.
        return max(1.0, remaining - self.refresh_margin, remaining / 2.0)

    def _stopped(self):
        return self._stopping.is_set() or self._should_stop()

    def _sleep(self, delay):
        # Sleep in short slices so that the owner stopping (which may not call stop()) ends
        # the thread promptly; a wake-up request cuts the sleep short.
        deadline = time.monotonic() + delay
        while not self._stopped():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._wake.wait(min(left, 0.5)):
                self._wake.clear()
                return

    def _run(self):
        failures = 0
        while not self._stopped():
            error = self.refresh_now()
            self._first_attempt_done.set()
            if error is None:
                failures = 0
                delay = self._next_refresh_delay()
            else:
                failures += 1
                # The exponent is bounded: an outage of any length must not overflow it.
                delay = min(self.max_retry_delay, self.retry_delay * 2 ** min(failures - 1, 30))
            self._due_at = self._clock() + delay
            self._sleep(delay)

    def start(self, wait=10.0):
        """Start the refresher; wait up to `wait` seconds for the first AssumeRole."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mds-assume-role",
                                            daemon=True)
            self._thread.start()
        if wait:
            self._first_attempt_done.wait(wait)

    def stop(self, wait=True):
        """Stop the refresher; with wait=False it ends on its own (within an STS call's
        timeout) and the caller, which may hold the store lock, does not wait for it."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and wait:
            self._thread.join(5)
            self._thread = None

    def credentials(self):
        now = self._clock()
        with self._lock:
            cached = self._cached
            last_error = self._last_error
        due = cached is None or cached["Expiration"] <= now or now >= self._due_at
        if due and self._thread is not None and now - self._last_attempt >= self.retry_delay:
            # Ask the refresher to retry now (this request does not wait); rate-limited so
            # that a burst of requests during an STS outage is not a burst of STS calls.  Also
            # when the refresher slept through its time: its sleep runs on the monotonic
            # clock, which stands still while the host is suspended or the container paused.
            self._wake.set()
        if cached is not None and cached["Expiration"] > now:
            return dict(cached)
        if last_error:
            raise CredentialError("no valid credentials for %s: %s" % (self.role_arn, last_error))
        raise CredentialError("no valid credentials for %s yet (AssumeRole pending)"
                              % self.role_arn)


# ---- crypto: DER, RSA, JWT, X.509, PKCS#7, SigV4 ---------------------------------------------

# Just enough DER to read RSA private keys and write SubjectPublicKeyInfo, X.509 v3
# self-signed certificates and CMS SignedData, plus RS256 (RSASSA-PKCS1-v1_5, SHA-256)
# signing with CRT and a fault check.  Hand-written so mds.py needs nothing installed.

class KeyFormatError(ValueError):
    """A key (or PEM/DER blob) we cannot use, with a message telling a human what to do.

    Messages name the kind of input found, never any of its content.
    """


# -- DER reader / writer

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
    return [(tag, value) for tag, value, _ in der_items_raw(data)]


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


# -- PEM and base64url

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
        # Not the armour line itself: quoted, it would read as a PEM block and be redacted.
        raise KeyFormatError("no PEM block found (expected a \"BEGIN %s\" PEM block)"
                             % labels[0])
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


# -- RSA

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
        raise KeyFormatError("no PEM block found (expected a \"BEGIN PRIVATE KEY\" PEM block)")

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


# -- JWT

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
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("not a JWT: header or payload is not base64url JSON")
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("not a JWT: header and payload must be JSON objects")
    return header, claims


# -- X.509

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


# -- PKCS#7 / CMS

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


# -- AWS SigV4 (header signing, as for an STS POST) and the STS query API client (aws.md 7).

SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
STS_API_VERSION = "2011-06-15"
STS_XML_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
STS_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

# Headers that proxies or the HTTP stack may add or rewrite after signing; signing them would
# break the signature in transit (same set botocore leaves out).
_SIGV4_UNSIGNED_HEADERS = frozenset((
    "authorization", "baggage", "connection", "expect", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "te", "traceparent", "tracestate", "trailer", "transfer-encoding",
    "upgrade", "user-agent", "x-amzn-trace-id",
))
# Only RFC 3986 unreserved characters stay literal in SigV4 encodings.
_SIGV4_UNRESERVED = "-_.~"


def _sigv4_encode(text, keep_slash=False):
    return urllib.parse.quote(text, safe=_SIGV4_UNRESERVED + ("/" if keep_slash else ""))


def _sigv4_remove_dot_segments(path):
    # AWS (except S3) canonicalises the path: "." and ".." resolved and empty segments dropped,
    # keeping a leading and (for a non-root result) trailing slash.
    kept = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    result = "/" + "/".join(kept)
    if kept and path.endswith("/"):
        result += "/"
    return result


def _sigv4_canonical_query(raw_query):
    pairs = []
    if raw_query:
        for item in raw_query.split("&"):
            key, _, value = item.partition("=")
            # Decode first so that an already percent-encoded query is not double-encoded;
            # "+" is kept literal (RFC 3986 has no "+ means space" rule).
            pairs.append((_sigv4_encode(urllib.parse.unquote(key)),
                          _sigv4_encode(urllib.parse.unquote(value))))
    pairs.sort()
    return "&".join(k + "=" + v for k, v in pairs)


def _sigv4_host(url_parts):
    host = url_parts.hostname or ""
    if ":" in host:
        host = "[" + host + "]"
    default_port = {"http": 80, "https": 443}.get(url_parts.scheme)
    if url_parts.port is not None and url_parts.port != default_port:
        host += ":%d" % url_parts.port
    return host


def _sigv4_header_items(headers):
    if headers is None:
        return []
    if hasattr(headers, "items"):
        return list(headers.items())
    return list(headers)


def _sigv4_timestamp(now):
    if now is None:
        now = time.time()
    if isinstance(now, datetime.datetime):
        if now.tzinfo is not None:
            now = now.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return now.strftime("%Y%m%dT%H%M%SZ")
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def _hmac_sha256(key, message):
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def sigv4_signing_key(secret_key, datestamp, region, service):
    """The derived SigV4 key: HMAC chain over date, region, service and "aws4_request"."""
    key = _hmac_sha256(("AWS4" + secret_key).encode("utf-8"), datestamp)
    key = _hmac_sha256(key, region)
    key = _hmac_sha256(key, service)
    return _hmac_sha256(key, "aws4_request")


def sigv4_canonical_request(method, url, headers, body, amz_date, session_token=None,
                            normalize_path=True):
    """Return (canonical_request, signed_headers) for a request as SigV4 sees it (spec §7.4)."""
    if body is None:
        body = b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    parts = urllib.parse.urlsplit(url)
    grouped = collections.OrderedDict()
    for name, value in _sigv4_header_items(headers):
        lname = name.strip().lower()
        if lname in _SIGV4_UNSIGNED_HEADERS or lname in ("x-amz-date", "x-amz-security-token"):
            continue
        grouped.setdefault(lname, []).append(" ".join(str(value).split()))
    if "host" not in grouped:
        grouped["host"] = [_sigv4_host(parts)]
    grouped["x-amz-date"] = [amz_date]
    if session_token:
        grouped["x-amz-security-token"] = [" ".join(session_token.split())]
    names = sorted(grouped)
    canonical_headers = "".join(n + ":" + ",".join(grouped[n]) + "\n" for n in names)
    signed_headers = ";".join(names)
    path = parts.path or "/"
    if normalize_path:
        path = _sigv4_remove_dot_segments(path)
    canonical = "\n".join((
        method.upper(),
        _sigv4_encode(path, keep_slash=True),
        _sigv4_canonical_query(parts.query),
        canonical_headers,
        signed_headers,
        hashlib.sha256(body).hexdigest(),
    ))
    return canonical, signed_headers


def sigv4_sign(method, url, headers, body, region, service, access_key, secret_key,
               session_token=None, now=None):
    """Sign a request with AWS Signature Version 4 (header form, spec §7.4/§7.6).

    `headers` (dict or list of (name, value)) are the headers that will be sent, except
    Host, which is derived from the URL unless given. Every header not in the hop-by-hop
    set is signed, like botocore does. Returns the headers to add: X-Amz-Date,
    Authorization and, with a session token, X-Amz-Security-Token. `now` (epoch seconds or
    datetime) pins the clock, for test vectors.
    """
    amz_date = _sigv4_timestamp(now)
    datestamp = amz_date[:8]
    canonical, signed_headers = sigv4_canonical_request(
        method, url, headers, body, amz_date, session_token)
    scope = "%s/%s/%s/aws4_request" % (datestamp, region, service)
    string_to_sign = "\n".join((
        SIGV4_ALGORITHM, amz_date, scope,
        hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    ))
    signature = hmac.new(sigv4_signing_key(secret_key, datestamp, region, service),
                         string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    added = collections.OrderedDict()
    added["X-Amz-Date"] = amz_date
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    added["Authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        SIGV4_ALGORITHM, access_key, scope, signed_headers, signature)
    return dict(added)


def sts_endpoint_for_region(region):
    """(endpoint URL, signing region) for STS in the aws partition (spec §7.2, §7.6)."""
    if not region or region == "aws-global":
        # The legacy global endpoint is signed as us-east-1.
        return "https://sts.amazonaws.com/", "us-east-1"
    return "https://sts.%s.amazonaws.com/" % region, region


def parse_imds_time(text):
    """Epoch seconds from an ISO-8601 UTC timestamp ("Z" or +00:00, optional fraction)."""
    text = text.strip()
    match = re.match(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$",
                     text)
    if not match:
        raise ValueError("not an ISO-8601 timestamp: %r" % text)
    epoch = int(datetime.datetime.strptime(match.group(1) + "T" + match.group(2),
                                           "%Y-%m-%dT%H:%M:%S")
                .replace(tzinfo=datetime.timezone.utc).timestamp())
    zone = match.group(4)
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        epoch -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return float(epoch)


def format_imds_time(epoch):
    """UTC as %Y-%m-%dT%H:%M:%SZ: the only form IMDS clients accept (aws.md 4), and RFC 3339."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _sts_ssl_context(environ):
    bundle = environ.get("AWS_CA_BUNDLE")
    if bundle:
        return ssl.create_default_context(cafile=bundle)
    return ssl.create_default_context()


def _sts_error_text(body):
    """'Code: Message' from an STS XML error body, or a short excerpt if it is not XML."""
    from xml.etree import ElementTree
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    code = root.findtext(".//{*}Error/{*}Code") or root.findtext(".//Error/Code") or "?"
    message = root.findtext(".//{*}Error/{*}Message") or root.findtext(".//Error/Message") or ""
    return "%s: %s" % (code, message)


def sts_build_request(params, keys, region=None, endpoint=None, now=None):
    """(url, headers, body) of a signed STS Query API POST, exactly as sts_call sends it."""
    default_url, signing_region = sts_endpoint_for_region(region)
    url = endpoint or default_url
    body = urllib.parse.urlencode(params).encode("ascii")
    headers = collections.OrderedDict()
    # Sent as signed: urllib would send the URL's netloc as written (upper case, :443).
    headers["Host"] = _sigv4_host(urllib.parse.urlsplit(url))
    headers["Content-Type"] = STS_FORM_CONTENT_TYPE
    headers.update(sigv4_sign("POST", url, headers, body, signing_region, "sts",
                              keys.access_key, keys.secret_key, keys.session_token, now=now))
    return url, headers, body


def sts_call(params, keys, region=None, endpoint=None, timeout=10.0, environ=None, now=None):
    """POST a signed STS Query API call; return the parsed Credentials (spec §7.6).

    `keys` are the source AwsKeys. Without `endpoint` the regional endpoint of `region` is
    used (global when region is empty); with it, `region` still names the signing region.
    Raises CredentialError naming the STS error code. Returns dict(AccessKeyId,
    SecretAccessKey, Token, Expiration epoch, AssumedRoleArn).
    """
    environ = os.environ if environ is None else environ
    url, headers, body = sts_build_request(params, keys, region, endpoint, now)
    context = _sts_ssl_context(environ) if url.startswith("https:") else None
    what = "STS " + params.get("Action", "call")
    # No retries here: the refresher that calls this paces its own attempts.
    payload = post_upstream(url, what, body, dict(headers),
                            lambda status, text: "HTTP %d %s" % (status, _sts_error_text(text)),
                            lambda status: 502, timeout, context=context,
                            secrets=(keys.secret_key, keys.session_token))
    url = _url_host(url)
    action = params.get("Action", "STS")
    from xml.etree import ElementTree
    try:
        root = ElementTree.fromstring(payload)
    except ElementTree.ParseError:
        raise CredentialError("STS %s at %s returned a body that is not XML" % (action, url),
                              status=502)
    creds = root.find(".//{%s}Credentials" % STS_XML_NAMESPACE)
    if creds is None:
        creds = root.find(".//{*}Credentials")
    if creds is None:
        raise CredentialError("STS %s at %s returned no Credentials" % (action, url),
                              status=502)

    def field(name):
        return (creds.findtext("{*}" + name) or creds.findtext(name) or "").strip()

    result = {
        "AccessKeyId": field("AccessKeyId"),
        "SecretAccessKey": field("SecretAccessKey"),
        "Token": field("SessionToken"),
        "AssumedRoleArn": (root.findtext(".//{*}AssumedRoleUser/{*}Arn") or "").strip(),
    }
    if not (result["AccessKeyId"] and result["SecretAccessKey"]):
        raise CredentialError("STS %s at %s returned incomplete Credentials" % (action, url),
                              status=502)
    try:
        result["Expiration"] = parse_imds_time(field("Expiration"))
    except ValueError:
        raise CredentialError("STS %s at %s returned an unreadable Expiration"
                              % (action, url), status=502)
    return result


def sts_assume_role(role_arn, keys, session_name="mds", region=None, endpoint=None,
                    duration=3600, external_id=None, timeout=10.0, environ=None, now=None):
    """STS AssumeRole signed with the source `keys` (AwsKeys); see sts_call for the result."""
    params = collections.OrderedDict((
        ("Action", "AssumeRole"), ("Version", STS_API_VERSION), ("RoleArn", role_arn),
        ("RoleSessionName", session_name), ("DurationSeconds", str(int(duration))),
    ))
    if external_id:
        params["ExternalId"] = external_id
    return sts_call(params, keys, region=region, endpoint=endpoint, timeout=timeout,
                    environ=environ, now=now)


def sts_get_session_token(keys, region=None, endpoint=None, duration=43200, timeout=10.0,
                          environ=None, now=None):
    """STS GetSessionToken with long-term `keys` (no session token allowed, spec §7.2)."""
    params = collections.OrderedDict((
        ("Action", "GetSessionToken"), ("Version", STS_API_VERSION),
        ("DurationSeconds", str(int(duration))),
    ))
    return sts_call(params, keys, region=region, endpoint=endpoint, timeout=timeout,
                    environ=environ, now=now)


# ---- the server ------------------------------------------------------------------------------


class MetadataServer:
    """One emulated metadata server: document, flavor, credentials, token cache and listener.

    Usable as a context manager; several can run in one process (tests do).
    """

    def __init__(self, config=None, host="127.0.0.1", port=0, flavor="gce", signing_key=None,
                 poll_interval=1.0, credentials=None, signer=None, identity=None, options=None):
        if flavor not in FLAVORS:
            raise ConfigError("unknown flavor %r (choose from %s)" % (flavor, ", ".join(FLAVORS)))
        known = EC2_OPTIONS if flavor == "ec2" else GCE_OPTIONS
        unknown = sorted(set(options or {}) - set(known), key=str)
        if unknown:
            # A misspelt option silently ignored would look like a feature that does not work.
            raise ConfigError("unknown option%s %s for flavor %s (known: %s)%s" % (
                "s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown)), flavor,
                ", ".join(known), "; the flavor is MetadataServer(flavor=...)"
                if "flavor" in unknown else ""))
        self.host = host
        self.requested_port = port
        self.options = dict(options or {})
        self.credentials = credentials          # spec for the primary account, from the CLI
        self.signer = signer                    # a TPM-held key for specs that say "tpm": true
        self.identity = dict(identity or {})    # project / account overrides from the CLI
        self.config_path = None
        self.poll_interval = poll_interval
        self.started_at = time.time()
        self.stopping = False
        self.tokens = TokenCache()
        self.signing_key = SigningKey(signing_key)
        self._sources = {}
        self._sources_guard = threading.Lock()
        self._httpd = None
        self._threads = []
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._reload_guard = threading.Lock()
        self._config_stamp = None
        self._date_cache = (0, "")
        self._common_lines = None
        self._certificate = None
        self._certificate_guard = threading.Lock()
        self.flavor = FLAVORS[flavor](self)
        if isinstance(config, dict):
            document = config
        elif config:
            self.config_path = os.fspath(config)
            document = self._read_config()
        else:
            document = self.flavor.default_document()
        self._explicit_document = bool(config)
        self._adopt_source_identity()
        document = self._prepare(document)
        self.settings = document.get("mds") or {} if isinstance(document, dict) else {}
        self.store = MetadataStore(document, self._compile)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self):
        if self._httpd is not None:       # `with MetadataServer(...).start() as server:`
            return self
        if sys.version_info < (3, 10):
            # A thread's first exit makes glibc load libgcc_s, which takes a file descriptor:
            # out of them, the process would abort at its first finished request.
            warm_up = threading.Thread(target=lambda: None)
            warm_up.start()
            warm_up.join()
        family_server = _HTTPServer6 if ":" in self.host else _HTTPServer
        self._httpd = family_server((self.host, self.requested_port), self)
        self._spawn(self._httpd.serve_forever, "mds-http", 0.05)
        if hasattr(self.flavor, "start"):
            self.flavor.start()
        if self.config_path:
            self._spawn(self._watch_config, "mds-config-watch")
        self._spawn(self._event_clock, "mds-event-clock")
        self.signing_key.start(delay=1.0)   # the startup burst of requests goes first
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
        if hasattr(self.flavor, "stop"):
            self.flavor.stop()
        self.signing_key.stop()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.wait_answered(1.0)
            self._httpd.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._httpd.server_address[1] if self._httpd else self.requested_port

    def _wildcard_family(self):
        """None when the server listens on one address; for a wildcard bind (0.0.0.0, ::, or
        another spelling of them such as 0 or ::0), the family: 4 or 6."""
        host = self._httpd.server_address[0] if self._httpd else self.host
        if host in ("", "0"):           # before start, spellings that bind 0.0.0.0
            return 4
        try:
            address = ipaddress.ip_address(host.split("%")[0].strip("[]"))
        except ValueError:              # a host name: one address
            return None
        address = getattr(address, "ipv4_mapped", None) or address
        return address.version if address.is_unspecified else None

    @property
    def authority(self):
        """host:port where clients on this host reach the server (loopback for a wildcard)."""
        host = {4: "127.0.0.1", 6: "::1"}.get(self._wildcard_family(), self.host)
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, self.port)

    @property
    def url(self):
        return "http://" + self.authority

    def wildcard_note(self):
        """For a wildcard bind, words saying that the server listens beyond this host (its
        `url` names loopback, which is where clients on this host reach it); else ""."""
        family = self._wildcard_family()
        if family is None or self._httpd is None:
            return ""
        everywhere = "every IPv4 address"
        if family == 6:
            # Linux answers IPv4 on a v6 wildcard too, unless the system sets V6ONLY.
            v6_only = self._httpd.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            everywhere = "every IPv6 address" if v6_only else "every IPv6 and IPv4 address"
        bound = self._httpd.server_address[0]
        bound = "[%s]" % bound if ":" in bound else bound
        return ", listening on %s of this host (%s:%d)" % (everywhere, bound, self.port)

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
        """Set the value at a URL path (e.g. "instance/attributes/foo", or a list of segments
        when one holds a "/"); wakes waiters."""
        self.store.edit(self.flavor.document_keys(path), value)

    def delete(self, path):
        """Remove the value at a URL path; wakes waiters.  KeyError when nothing is there."""
        keys = self.flavor.document_keys(path)
        where = "/".join(url_segments(path))
        serves_default = getattr(self.flavor, "serves_default", None)
        with self.store.changed:
            if serves_default is None:
                try:
                    self.store.edit(keys, delete=True)
                except KeyError:
                    raise KeyError("nothing to delete at %s" % where) from None
                return
            # EC2 lays the document over a default instance: a value it serves is hidden by
            # the null that hides it in a config file (which must not then be deleted, as
            # that would bring the value back).
            previous = self.store.document
            try:
                held = _value_at(previous, keys)
            except (KeyError, IndexError, TypeError, ConfigError):
                held = None
            if held is not None:
                self.store.edit(keys, delete=True)
            elif not serves_default(keys):
                raise KeyError("nothing to delete at %s" % where)
            if serves_default(keys):
                self.store.edit(keys, None)
                if serves_default(keys):
                    self.store.replace(previous)
                    raise KeyError("%s is derived from other values and cannot be deleted "
                                   "on its own" % where)

    def reload(self):
        """Re-read the config file; a bad file is logged and the last good tree keeps serving."""
        if not self.config_path:
            return False
        try:
            # One reload at a time: the file stamp it records must be the file it published.
            with self._reload_guard:
                before = getattr(self.store.tree, "accounts", None) or {}
                document = self._prepare(self._read_config())
                self.store.replace(document)
        except ConfigError as exc:
            log.error("config reload failed, still serving the previous tree: %s", exc)
            return False
        self.settings = document.get("mds") or {}
        log.info("reloaded %s", self.config_path)
        # Offline tokens work locally and fail at Google: a switch to them must not be silent.
        for name, account in (getattr(self.store.tree, "accounts", None) or {}).items():
            was = before.get(name)
            if name != "default" and isinstance(account.source, OfflineSource) and \
                    was is not None and not isinstance(was.source, OfflineSource):
                log.warning("%s now gets offline tokens (Google will reject them): the "
                            "reloaded config gives it no credentials", name)
        return True

    def publish_due_events(self):
        """Recompile once a timed event has begun or ended (GCE preemption, maintenance), so
        that it reaches readers and wakes wait_for_change like any other change; returns the
        tree now serving."""
        store = self.store
        with store.changed:
            tree = store.tree
            due = getattr(tree, "next_event", None)
            if due is not None and time.time() >= due:
                try:
                    store.replace(store.document)
                except ConfigError as exc:      # the same document compiled a moment ago
                    tree.next_event = None
                    log.error("cannot apply a timed event: %s", exc)
            return store.tree

    def _event_clock(self):
        store = self.store
        while not self._stop.is_set():
            try:
                self.publish_due_events()
            except Exception:              # the clock must outlive any one failure
                log.exception("timed event failed")
            with store.changed:
                due = getattr(store.tree, "next_event", None)
                if not self._stop.is_set():
                    # Any change wakes this too: a reload may move or add events.  An hour at
                    # most, as wait() refuses timeouts beyond a few centuries.
                    store.changed.wait(3600.0 if due is None else
                                       min(3600.0, max(0.0, due - time.time())))

    def _compile(self, document, served=True):
        """The flavor's compile; any failure is the ConfigError it really is, so a bad document
        never costs the last good tree (or the thread that watches the file).  A tree that
        will be `served` replaces the one serving, whose unused sources go."""
        try:
            _check_depth(document)
            tree = self.flavor.compile(document)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError("the document cannot be served: %s: %s"
                              % (type(exc).__name__, exc)) from None
        if served:
            self._forget_sources_unused_by(tree)
        return tree

    def _forget_sources_unused_by(self, tree):
        """Drop the sources (and their tokens) that no account of `tree` uses any more: a key
        taken out of the config must not stay in memory for the life of the process."""
        accounts = getattr(tree, "accounts", None)
        if accounts is None:
            return
        used = {id(account.source) for account in accounts.values() if account}
        unused = {}     # by identity, the objects held until the end: no identity is reused
        with self._sources_guard:
            for key, (_, source) in list(self._sources.items()):
                if id(source) not in used:
                    unused[id(source)] = source
                    del self._sources[key]
        if unused:
            self.tokens.forget(lambda key: len(key) > 1 and id(key[1]) in unused)

    def _prepare(self, document):
        """Apply the command line's identity (project, primary account) to a loaded document,
        and read the file names in its credentials relative to the config file."""
        if hasattr(self.flavor, "complete"):
            document = self.flavor.complete(document)
        if self.config_path:
            document = _resolve_credential_paths(document, os.path.dirname(
                os.path.abspath(self.config_path)))
        if not self.identity or not hasattr(self.flavor, "apply_identity"):
            return document
        try:
            return self.flavor.apply_identity(document, self.identity,
                                              explicit=self._explicit_document)
        except ConfigError:
            raise
        except Exception as exc:       # a document of the wrong shape: the compile says why
            self._compile(document, served=False)
            raise ConfigError("the document cannot be served: %s: %s"
                              % (type(exc).__name__, exc)) from None

    def _adopt_source_identity(self):
        """The command line's credential source names its account (a key file's client_email,
        an impersonation target, a federation file's service account) and a key file its
        project: use them where the config has none."""
        spec = self.credentials or {}
        kind, email = spec.get("type"), None
        if kind == "key-file" and spec.get("path"):
            info = self._read_credentials_file(spec["path"], "--service-account-file",
                                               "service-account key file")
            # Only the names are read here; the key itself is parsed (once) when the account's
            # source is built, which fails startup just as clearly if the key is unusable.
            email = info.get("client_email")
            if info.get("project_id"):
                self.identity.setdefault("key_file_project_id", info["project_id"])
        elif kind == "impersonate":
            email = spec.get("target")
        elif kind == "federate" and spec.get("impersonate") is not True:
            email = spec.get("impersonate") or FederatedSource._impersonated_email(
                self._read_credentials_file(spec["config"], "--federate",
                                            "external-account configuration"))
        if email:
            self.identity.setdefault("source_email", email)

    @staticmethod
    def _read_credentials_file(path, flag, what):
        try:
            return _load_json_config(path, what)[0]
        except CredentialError as exc:
            raise ConfigError("%s: %s" % (flag, exc))

    def request_reload(self):
        """Ask the watcher thread to reload now (safe to call from a signal handler)."""
        self._config_stamp = None
        self._reload_requested.set()

    def _read_config(self):
        try:
            with open(self.config_path, "rb") as handle:
                self._config_stamp = self._stamp()
                document = json.loads(handle.read().decode("utf-8"),
                                      parse_constant=_refuse_json_constant,
                                      parse_float=_finite_float)
        except OSError as exc:
            raise ConfigError("cannot read %s: %s" % (_file_name(self.config_path),
                                                     exc.strerror or exc))
        except (ValueError, RecursionError) as exc:    # RecursionError: nested too deep
            raise ConfigError("%s is not valid JSON: %s" % (self.config_path, exc))
        if not isinstance(document, dict):
            raise ConfigError("%s must hold a JSON object" % self.config_path)
        return document

    def _stamp(self):
        return _file_stamp(self.config_path)

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
                try:
                    self.reload()
                except Exception:            # a bug must not end the watching for good
                    log.exception("config reload failed unexpectedly")

    # -- credentials ------------------------------------------------------------------------

    def source_for(self, email_address, spec=None, account_options=None):
        """The credential source of an account, reused across reloads while its spec holds."""
        options = account_options or {}
        if not isinstance(spec, (dict, type(None))):
            raise ConfigError('the "credentials" of %s must be an object, such as '
                              '{"type": "key-file", "path": "sa.json"}' % email_address)
        unique_id = str(options.get("uniqueId") or unique_id_for(email_address))
        if spec and spec.get("tpm"):
            # A TPM key carries no account data: the account's settings supply it.
            spec = dict(spec, client_email=spec.get("client_email") or email_address,
                        client_id=spec.get("client_id") or unique_id)
            if options.get("keyId") and not spec.get("key_id"):
                spec["key_id"] = options["keyId"]
        key = (email_address, unique_id, canonical_json(spec) if spec else None)
        # A key file rotated in place keeps its name, so the spec alone cannot tell that the
        # source must be built anew: the files it reads are part of what it was built from.
        stamps = _credential_file_stamps(spec)
        with self._sources_guard:
            held = self._sources.get(key)
            if held is None or held[0] != stamps:
                held = self._sources[key] = (
                    stamps, self._build_source(email_address, spec, unique_id))
            return held[1]

    def _build_source(self, email_address, spec, unique_id):
        if isinstance(spec, dict) and spec and "type" not in spec:
            # Offline tokens where real ones were meant would look like success until Google
            # refused them: a misspelled or forgotten "type" is an error, not offline.
            raise ConfigError("credentials for %s have no \"type\" (keys given: %s); expected "
                              "one of: %s, offline" % (
                                  email_address, ", ".join(sorted(map(str, spec))),
                                  ", ".join(CREDENTIAL_SOURCE_TYPES)))
        if not spec or spec.get("type") in (None, "offline"):
            return OfflineSource(email_address, unique_id, self.signing_key)
        signer = None
        if spec.get("tpm"):
            if self.signer is None:
                raise ConfigError("credentials for %s want a TPM key: start mds with --tpm"
                                  % email_address)
            signer = SignerWithKeyId(self.signer, spec.get("key_id"))
        try:
            source = build_credential_source(spec, signer=signer, account_email=email_address)
        except CredentialError as exc:
            raise ConfigError("credentials for %s: %s" % (email_address, exc))
        metadata_host = getattr(source, "metadata_host", None)
        if metadata_host and self.serves_address(metadata_host):
            # Its tokens would be asked of itself, for ever: each mint waits on another.
            raise ConfigError(
                "credentials for %s: the Application Default Credentials are this metadata "
                "server itself (GCE_METADATA_HOST=%s in mds's own environment); set "
                "GOOGLE_APPLICATION_CREDENTIALS or \"source_credentials_file\", run `gcloud "
                "auth application-default login`, or start mds without GCE_METADATA_HOST"
                % (email_address, metadata_host))
        source_email = getattr(source, "email", None)
        if source_email and source_email != email_address:
            raise ConfigError("the credentials configured for %s are for %s"
                              % (email_address, source_email))
        return source

    def serves_address(self, authority):
        """True when `authority` (host[:port], port 80 when absent) reaches this server."""
        try:
            parts = urllib.parse.urlsplit("//" + authority)
            port, host = parts.port or 80, (parts.hostname or "").lower()
        except ValueError:
            return False
        if port != self.port or not host:
            return False
        mine = self.host.lower().strip("[]")
        if host == mine:
            return True
        addresses = _resolve(host, port)
        if self._wildcard_family() is not None:
            return any(_is_local_address(address) for address in addresses)
        return bool(addresses & _resolve(mine, port))

    def offline(self):
        """True when some account's tokens are minted locally (Google would reject them)."""
        accounts = getattr(self.store.tree, "accounts", None) or {}
        return any(isinstance(a.source, OfflineSource) for a in accounts.values() if a)

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

    def signing_certificate(self, key=None):
        """The self-signed certificate of the server's signing key, made once (its serial is
        random, so two concurrent first requests must not publish different ones)."""
        key = key or self.signing_key.get()
        with self._certificate_guard:
            if self._certificate is None or self._certificate[0] is not key:
                self._certificate = (key, x509_self_signed(key, "mds metadata server signing key"))
            return self._certificate[1]


def _resolve(host, port):
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return set()


def _is_local_address(address):
    """True for an address of this machine: loopback, or one a socket can be bound to."""
    try:
        if ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return True
    except ValueError:
        return False
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def _check_depth(document, limit=None):
    """Refuse a document nested deeper than MAX_DOCUMENT_DEPTH: compiling and serving it
    recurse, and on a handler thread's small stack (before Python 3.11) a deep enough
    document would crash the process instead of raising."""
    limit = MAX_DOCUMENT_DEPTH if limit is None else limit
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            raise ConfigError("the document nests deeper than %d levels" % limit)
        children = value.values() if isinstance(value, dict) else value
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, (dict, list)))


def _refuse_json_constant(name):
    raise ValueError("%s is not JSON (and could not be served as JSON)" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is too large for a JSON number" % text)
    return value


def _file_stamp(path):
    """What changes when a file is rewritten or replaced (in place or by a rename)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _adc_file_paths(environ=None):
    """The files google-auth reads Application Default Credentials from, most specific first."""
    environ = os.environ if environ is None else environ
    config = environ.get("CLOUDSDK_CONFIG") or (
        os.path.join(environ.get("APPDATA") or "", "gcloud") if os.name == "nt"
        else os.path.join(os.path.expanduser("~"), ".config", "gcloud"))
    return [path for path in (environ.get("GOOGLE_APPLICATION_CREDENTIALS"),
                              os.path.join(config, "application_default_credentials.json"))
            if path]


def _credential_file_stamps(spec):
    """Stamps of the files a credentials spec's source reads when it is built (a key file,
    source credentials, a federation config, or the Application Default Credentials)."""
    if not isinstance(spec, dict):
        return ()
    paths = [spec.get(field) for field in ("path", "key", "source_credentials_file", "config")]
    if str(spec.get("type", "")) == "impersonate" and not spec.get("source_credentials_file"):
        paths += _adc_file_paths()
    return tuple((path, _file_stamp(path)) for path in paths
                 if isinstance(path, (str, bytes, os.PathLike)) and path)


def _resolve_credential_paths(document, base):
    """The document with relative file names in its per-account credentials ("path",
    "source_credentials_file", "config") made absolute against `base`, the config's folder:
    what a config names must not depend on where mds was started."""
    accounts = ((document.get("mds") or {}).get("serviceAccounts") or {}) \
        if isinstance(document.get("mds"), dict) else {}
    if not isinstance(accounts, dict) or not accounts:
        return document
    document = copy.deepcopy(document)
    for options in document["mds"]["serviceAccounts"].values():
        spec = options.get("credentials") if isinstance(options, dict) else None
        if not isinstance(spec, dict):
            continue
        for field in ("path", "source_credentials_file", "config"):
            value = spec.get(field)
            if isinstance(value, str) and value and not os.path.isabs(value):
                spec[field] = os.path.join(base, os.path.expanduser(value))
    return document


# ---- CLI -------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mds",
        description="A cloud metadata server emulator (GCE, Cloud Run, GKE, EC2) in one file.",
        epilog="With no options it serves a plausible GCE VM on 127.0.0.1:8080 with offline "
               "tokens. Edit the config file while it runs, or send SIGHUP, to reload.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; ::1 for IPv6; 0.0.0.0"
                        " or :: for every address, which opens mds to the network)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080;"
                        " 0 picks a free one)")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON document to serve (see config.example.json); polled for "
                             "changes every second")
    parser.add_argument("--flavor", default="gce", choices=sorted(FLAVORS),
                        help="which metadata server to be (default gce)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="logging verbosity (debug logs every request)")
    parser.add_argument("--version", action="version", version="mds " + __version__)

    google = parser.add_argument_group(
        "Google credentials (for the default service account; per-account sources go in the "
        "config's \"mds\" section). Without any of these, tokens are minted offline.")
    google.add_argument("--signing-key", metavar="PEM",
                        help="RSA private key (PEM) that signs offline identity tokens (with "
                             "--flavor ec2: the instance identity document); default: a key "
                             "generated at startup")
    google.add_argument("--service-account-file", metavar="FILE",
                        help="service-account key JSON: tokens from Google via the JWT-bearer "
                             "grant (honours ?scopes=); email and project are taken from it "
                             "when the config has none")
    google.add_argument("--token-mode", choices=["oauth", "self-signed"],
                        help="with a key file or --tpm: oauth (default) asks Google for tokens; "
                             "self-signed mints JWT access and identity tokens offline, signed "
                             "by the key (honours ?scopes=)")
    google.add_argument("--impersonate", nargs="?", const=True, metavar="EMAIL",
                        help="impersonate the config's default account (or EMAIL) using your "
                             "own ADC; needs google-auth (the \"google\" extra; honours ?scopes=)")
    google.add_argument("--federate", action="store_true",
                        help="workload identity federation: the external-account file named by "
                             "GOOGLE_APPLICATION_CREDENTIALS, optionally with --impersonate; "
                             "needs google-auth (the \"google\" extra; honours ?scopes=)")
    google.add_argument("--access-token", metavar="TOKEN",
                        help="serve this access token (env GOOGLE_ACCESS_TOKEN; ignores "
                             "?scopes=)")
    google.add_argument("--id-token", metavar="JWT",
                        help="serve this identity token for every audience (env "
                             "GOOGLE_ID_TOKEN)")
    google.add_argument("--project-id", metavar="ID",
                        help="override project/project-id (env GOOGLE_PROJECT_ID)")
    google.add_argument("--numeric-project-id", metavar="NUMBER",
                        help="override project/numeric-project-id (env "
                             "GOOGLE_NUMERIC_PROJECT_ID)")
    google.add_argument("--service-account", metavar="EMAIL",
                        help="override the default service account's email (env "
                             "GOOGLE_SERVICE_ACCOUNT)")

    tpm = parser.add_argument_group(
        "TPM-held key (needs tpm2-pytss, the \"tpm\" extra); the account is the config's default "
        "service account, the key id its \"keyId\" in the \"mds\" section")
    tpm.add_argument("--tpm", action="store_true",
                     help="sign the default account's tokens with a key held in a TPM")
    tpm.add_argument("--tpm-path", metavar="PATH",
                     help="TPM device or TCTI: /dev/tpmrm0 (default), device:/dev/tpm0, "
                          "swtpm:host=127.0.0.1,port=2321, swtpm:path=/run/swtpm.sock")
    tpm.add_argument("--tpm-persistent-handle", type=lambda text: int(text, 0), metavar="HANDLE",
                     help="the key's persistent handle, e.g. 0x81010002")
    tpm.add_argument("--tpm-key-file", metavar="FILE",
                     help="the key as a TSS2 PRIVATE KEY PEM (tpm2_encodeobject, tpm2-openssl)")
    tpm.add_argument("--tpm-key-pass", metavar="PASSWORD", help="the key's password")
    tpm.add_argument("--tpm-parent-pass", metavar="PASSWORD",
                     help="the parent's (owner or endorsement hierarchy's) password")
    tpm.add_argument("--tpm-pcrs", metavar="PCRS",
                     help="PCR policy the key is bound to: 23 or sha256:0,7,23")
    tpm.add_argument("--tpm-ek-parent", action="store_true",
                     help="the key was imported (transferred) under the RSA endorsement key")
    tpm.add_argument("--tpm-session-encrypt-with-name", metavar="HEX",
                     help="salt and encrypt TPM sessions to the key with this name (the EK's)")

    for add_arguments in FLAVOR_ARGUMENTS:
        add_arguments(parser)
    return parser


def credentials_from_args(args, environ=None):
    """(spec for the primary account, TPM signer, identity overrides) from the command line."""
    environ = os.environ if environ is None else environ
    identity = {
        "project_id": args.project_id or environ.get("GOOGLE_PROJECT_ID"),
        "numeric_project_id": args.numeric_project_id or environ.get("GOOGLE_NUMERIC_PROJECT_ID"),
        "service_account": args.service_account or environ.get("GOOGLE_SERVICE_ACCOUNT"),
    }
    identity = {key: value for key, value in identity.items() if value}
    signer = None
    try:
        if not args.tpm:
            # Without --tpm they would be ignored, and the account silently offline.
            stray = [name for name in TPM_OPTIONS if getattr(args, name, None) not in (None, False)]
            if stray:
                raise ConfigError("--%s needs --tpm" % stray[0].replace("_", "-"))
        if args.tpm:
            signer = TpmSigner.from_options(
                tpm=True, tpm_path=args.tpm_path, tpm_persistent_handle=args.tpm_persistent_handle,
                tpm_key_file=args.tpm_key_file, tpm_key_pass=args.tpm_key_pass,
                tpm_parent_pass=args.tpm_parent_pass, tpm_pcrs=args.tpm_pcrs,
                tpm_ek_parent=args.tpm_ek_parent,
                tpm_session_encrypt_with_name=args.tpm_session_encrypt_with_name)
            spec = {"type": "key-file", "tpm": True, "token_mode": args.token_mode or "oauth"}
            if args.service_account_file:
                spec["path"] = args.service_account_file
            return spec, signer, identity
        spec = credentials_spec_from_cli(
            service_account_file=args.service_account_file, token_mode=args.token_mode,
            impersonate=args.impersonate, federate=args.federate,
            access_token=args.access_token, id_token=args.id_token, environ=environ)
    except CredentialError as exc:
        raise ConfigError(str(exc))
    return spec, signer, identity


# Flags that configure Google credentials: meaningless for the EC2 flavor.
TPM_OPTIONS = ("tpm_path", "tpm_persistent_handle", "tpm_key_file", "tpm_key_pass",
               "tpm_parent_pass", "tpm_pcrs", "tpm_ek_parent", "tpm_session_encrypt_with_name")
GOOGLE_CREDENTIAL_OPTIONS = ("service_account_file", "token_mode", "impersonate", "federate",
                             "access_token", "id_token", "project_id", "numeric_project_id",
                             "service_account", "tpm") + TPM_OPTIONS


def flavor_options_from_args(args):
    """The MetadataServer `options` for the chosen flavor's flags; another flavor's flag (or a
    Google credential flag with the EC2 flavor) is an error rather than silently ignored."""
    ec2 = ec2_options_from_args(args)
    gce = {name: getattr(args, name) for name in GCE_OPTIONS
           if getattr(args, name, None) is not None}
    chosen, other = (ec2, gce) if args.flavor == "ec2" else (gce, ec2)
    if args.flavor == "ec2":
        other = sorted(other) + [name for name in GOOGLE_CREDENTIAL_OPTIONS
                                 if getattr(args, name, None) not in (None, False)]
    if other:
        raise ConfigError("--%s does not apply to --flavor %s"
                          % (sorted(other)[0].replace("_", "-"), args.flavor))
    return chosen


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # A signal sent to the process lands on any thread that does not block it, and only the
    # main thread runs Python handlers: one landing on a worker could go unnoticed for as long
    # as the main thread sleeps.  So block them before any thread starts (threads inherit the
    # mask) and take them synchronously in the main thread.
    wanted = {signal.SIGTERM, signal.SIGINT} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP")
                                                else set())
    synchronous = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait")
    if synchronous:
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s mds %(levelname)s %(message)s")
    try:
        options = flavor_options_from_args(args)       # before a TPM is opened for nothing
        spec, signer, identity = credentials_from_args(args)
        server = MetadataServer(config=args.config, host=args.host, port=args.port,
                                flavor=args.flavor, signing_key=args.signing_key,
                                credentials=spec, signer=signer, identity=identity,
                                options=options)
        server.start()
    except (ConfigError, CredentialError, OSError) as exc:
        parser.exit(2, "mds: error: %s\n" % exc)
    log.info("serving the %s metadata server at %s%s (config: %s)", args.flavor, server.url,
             server.wildcard_note(), server.config_path or "built-in default")
    for line in server.describe_sources():
        log.info("credentials %s", line)
    for line in getattr(server.flavor, "startup_lines", lambda: [])():
        log.info("%s", line)
    if server.offline():
        log.warning("OFFLINE MODE: tokens are minted locally and Google will reject them; "
                    "identity tokens verify against %s/oauth2/v1/certs (PEM, what google-auth "
                    "reads) or %s/oauth2/v3/certs (JWKS)", server.url, server.url)
    for line in getattr(server.flavor, "startup_warnings", lambda: [])():
        log.warning("%s", line)
    # One record, so the block arrives whole and can be pasted into a shell as it is.
    log.info("point clients at it with:\n%s", "\n".join(
        "export %s=%s" % item for item in server.env.items()))
    if synchronous:
        while signal.sigwait(wanted) == getattr(signal, "SIGHUP", None):
            server.request_reload()
    else:                                   # Windows: handlers, and a short sleep to run them
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
