"""The HTTP layer and the command line, as the core issue asks: HTTP/1.1 keep-alive with
Content-Length, TCP_NODELAY on accepted sockets, quiet and robust handling of clients that
reset, no per-request stderr lines, 1,000 concurrent wait_for_change waiters released by one
update, a documented --help and informative startup log lines.

No assertion here depends on how fast the machine is: time limits are generous bounds that only
stop a broken server from hanging the suite.
"""

import base64
import gc
import http.client
import io
import json
import os
import random
import re
import select
import selectors
import socket
import struct
import subprocess
import sys
import time
import urllib.parse

import pytest

import mds
from clients import MdsCli, in_ci, require_tool

V1 = "/computeMetadata/v1/"
GOOGLE = {"Metadata-Flavor": "Google"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MDS_PY = os.path.join(REPO_ROOT, "mds.py")


@pytest.fixture
def cli_server(tmp_path):
    servers = []

    def start(*args):
        server = MdsCli(tmp_path, *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def fetch(port, path, headers=GOOGLE, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ---- keep-alive -----------------------------------------------------------------------------


def test_one_connection_carries_many_requests_of_every_status(gce_server):
    connection = http.client.HTTPConnection("127.0.0.1", gce_server.port, timeout=10)
    requests = [
        ("GET", V1 + "project/project-id", GOOGLE, None, 200),
        ("GET", V1 + "instance", GOOGLE, None, 301),
        ("GET", V1 + "project/?alt=json", GOOGLE, None, 400),
        # (not 403: the real VM server hangs up after one, see test_gce)
        ("GET", V1 + "no/such/thing", GOOGLE, None, 404),
        ("POST", V1 + "project/project-id", GOOGLE, b"a body the server must consume", 405),
        ("GET", V1 + "instance/service-accounts/default/token", GOOGLE, None, 200),
        ("GET", "/", {}, None, 200),
        ("GET", V1 + "?recursive=true", GOOGLE, None, 200),
        ("GET", V1 + "project/project-id", GOOGLE, None, 200),
    ]
    first_socket = None
    try:
        for method, path, headers, body, status in requests:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            assert response.status == status, (method, path, data[:200])
            assert response.version == 11
            assert response.getheader("Content-Length") == str(len(data)), path
            assert response.getheader("Transfer-Encoding") is None
            assert response.getheader("Date"), path
            assert (response.getheader("Connection") or "").lower() != "close", path
            assert not response.will_close, path
            if first_socket is None:
                first_socket = connection.sock
            # http.client silently reconnects if the server closed; the socket must not change.
            assert connection.sock is first_socket, "the server closed the connection after %s" \
                % path
    finally:
        connection.close()


def test_raw_keep_alive_requests_are_framed_by_content_length(gce_server):
    expected = fetch(gce_server.port, V1 + "project/project-id")[1]
    assert expected
    with socket.create_connection(("127.0.0.1", gce_server.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(b"GET /computeMetadata/v1/project/project-id HTTP/1.1\r\n"
                         b"Host: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n")
            status_line = reader.readline()
            assert status_line.startswith(b"HTTP/1.1 200 ")
            headers = {}
            for line in iter(reader.readline, b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = reader.read(int(headers["content-length"]))
            assert body == expected
            assert headers.get("connection", "").lower() != "close"


def server_side_socket(client_socket):
    """The server's accepted socket object for a client connection (the server runs in this
    process), found by its address pair."""
    local, remote = client_socket.getsockname(), client_socket.getpeername()
    for candidate in gc.get_objects():
        if isinstance(candidate, socket.socket) and candidate is not client_socket:
            try:
                if candidate.getsockname() == remote and candidate.getpeername() == local:
                    return candidate
            except OSError:
                continue
    return None


def test_accepted_sockets_have_tcp_nodelay(gce_server):
    connection = http.client.HTTPConnection("127.0.0.1", gce_server.port, timeout=10)
    try:
        connection.request("GET", V1 + "project/project-id", headers=GOOGLE)
        connection.getresponse().read()
        accepted = server_side_socket(connection.sock)
        assert accepted is not None, "could not find the server's socket for this connection"
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        connection.close()


def data_segments_sent(sock):
    """Linux's count of TCP segments with data that `sock` has sent (tcpi_data_segs_out)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= 160, "this kernel's tcp_info has no tcpi_data_segs_out"
    return struct.unpack_from("I", info, 156)[0]


@pytest.mark.parametrize("path", [V1 + "project/project-id", V1 + "?recursive=true"])
def test_an_answer_leaves_in_one_segment(gce_server, path):
    # Headers and body are written into one buffer and sent together: with TCP_NODELAY, a
    # write each would put the body in a second segment.
    with socket.create_connection(("127.0.0.1", gce_server.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        request = ("GET %s HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n" % path)

        def exchange():
            sock.sendall(request.encode())
            assert reader.readline().startswith(b"HTTP/1.1 200 ")
            head = b"".join(iter(reader.readline, b"\r\n")).lower()
            length = int(re.search(rb"content-length: *([0-9]+)", head).group(1))
            assert 0 < len(reader.read(length)) < 8192

        exchange()
        accepted = server_side_socket(sock)
        before = data_segments_sent(accepted)
        exchange()
        assert data_segments_sent(accepted) - before == 1


def park_a_waiter(server):
    """Open a wait_for_change on `server` (in this process); return the client socket and
    the native id of the handler thread once that thread sleeps in its wait: blocked, and
    not scheduled once over a tenth of a second."""
    import threading
    before = {thread.native_id for thread in threading.enumerate()}
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /computeMetadata/v1/project/project-id?wait_for_change=true "
                 b"HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n")
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, "no handler thread sleeping in its wait"
        time.sleep(0.1)
        new = [thread.native_id for thread in threading.enumerate()
               if thread.native_id not in before]
        if len(new) != 1 or new[0] is None:        # not started, or not running yet
            continue
        switches = voluntary_switches(new[0])
        if task_file(new[0], "syscall").split()[0] == "running":
            continue
        time.sleep(0.1)
        if voluntary_switches(new[0]) == switches:
            return sock, new[0]


def task_file(thread_id, name):
    with open("/proc/self/task/%d/%s" % (thread_id, name)) as handle:
        return handle.read()


def voluntary_switches(thread_id):
    status = task_file(thread_id, "status")
    return int(re.search(r"voluntary_ctxt_switches:\s*(\d+)", status).group(1))


def test_handler_threads_have_small_stacks(gce_server):
    # Each waiter holds a thread; at the usual 8 MiB of stack, a thousand of them would
    # reserve 8 GiB of address space.  What a thread has left is read from /proc: from the
    # stack pointer of the thread blocked in a wait_for_change down to the start of the
    # mapping that holds it (the guard page below keeps other mappings from joining it).
    sock, thread_id = park_a_waiter(gce_server)
    with sock:
        stack_pointer = int(task_file(thread_id, "syscall").split()[-2], 16)
        with open("/proc/self/maps") as maps:
            starts = [int(start, 16)
                      for start, end in (line.split()[0].split("-") for line in maps)
                      if int(start, 16) <= stack_pointer < int(end, 16)]
        assert len(starts) == 1
        assert stack_pointer - starts[0] <= 4 * 1024 * 1024, \
            "a handler thread has %d KiB of stack" % ((stack_pointer - starts[0]) // 1024)


def test_a_parked_waiter_sleeps_until_a_change_wakes_it(gce_server):
    # No polling: over a second with nothing changing, the waiting thread is never
    # scheduled (its voluntary context switches stay put); a change then answers it.
    sock, thread_id = park_a_waiter(gce_server)
    with sock:
        before = voluntary_switches(thread_id)
        time.sleep(1.0)
        assert voluntary_switches(thread_id) - before == 0
        gce_server.update("project/project-id", "changed")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"changed"), answer


def test_server_threads_are_daemons(mds_server_factory):
    import threading
    before = set(threading.enumerate())
    server = mds_server_factory()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", V1 + "project/project-id", headers=GOOGLE)
        connection.getresponse().read()
        # The connection stays open, so its handler thread is alive now.
        started = [thread for thread in threading.enumerate() if thread not in before]
        assert started, "no server threads found"
        assert [t.name for t in started if not t.daemon] == []
    finally:
        connection.close()


def test_a_stopped_server_answers_nothing_more_on_open_connections(mds_server_factory):
    server = mds_server_factory()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", V1 + "project/project-id", headers=GOOGLE)
        assert connection.getresponse().read()
        server.stop()
        with pytest.raises((http.client.HTTPException, OSError)):
            connection.request("GET", V1 + "project/project-id", headers=GOOGLE)
            connection.getresponse().read()
    finally:
        connection.close()


def test_start_twice_is_one_server(mds_server_factory):
    import threading

    def listeners():
        return [t for t in threading.enumerate() if t.name == "mds-http"]

    before = len(listeners())
    import mds
    with mds.MetadataServer(port=0).start() as server:   # __enter__ starts it again
        port = server.port
        assert len(listeners()) == before + 1
    assert len(listeners()) == before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_server_used_as_a_context_manager_starts_and_stops():
    with mds.MetadataServer(port=0) as server:
        assert fetch(server.port, V1 + "project/project-id")[0] == 200
        port = server.port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_starting_does_no_hostname_lookup(mds_server_factory, monkeypatch):
    """http.server resolves the bind address to an FQDN, which can be a slow DNS query."""
    def no_lookups(*args):
        raise AssertionError("startup looked up a host name: %r" % (args,))
    monkeypatch.setattr(socket, "getfqdn", no_lookups)
    monkeypatch.setattr(socket, "gethostbyaddr", no_lookups)
    server = mds_server_factory()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", V1 + "project/project-id", headers=GOOGLE)
        assert connection.getresponse().status == 200
    finally:
        connection.close()


# ---- robustness and quiet logs --------------------------------------------------------------


def reset(sock):
    """Close with SO_LINGER 0 so the peer sees a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("log_level", [None, "debug"])
def test_clients_that_reset_mid_request_leave_no_traceback(cli_server, log_level):
    server = cli_server(*(["--log-level", log_level] if log_level else []))
    address = ("127.0.0.1", server.port)
    half_requests = [
        b"GET /computeMetadata/v1/instance/id HTTP/1.1\r\nHost: x\r\nMetadata-Fla",
        b"GET /computeMetadata/v1/instance/id HTTP/1.1\r\n",
        b"GET /compute",
        b"POST /computeMetadata/v1/instance/id HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google"
        b"\r\nContent-Length: 1000\r\n\r\nonly a little",
        b"PUT /computeMetadata/v1/instance/guest-attributes/ns/key HTTP/1.1\r\nHost: x\r\n"
        b"Metadata-Flavor: Google\r\nContent-Length: 50\r\n\r\npartial",
    ]
    for data in half_requests:
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(data)
        time.sleep(0.05)
        reset(sock)
    # A complete request whose (large) answer the client never reads.
    for _ in range(5):
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(b"GET /computeMetadata/v1/?recursive=true HTTP/1.1\r\nHost: x\r\n"
                     b"Metadata-Flavor: Google\r\n\r\n")
        reset(sock)
    # A client hanging on wait_for_change that resets.
    sock = socket.create_connection(address, timeout=5)
    sock.sendall(b"GET /computeMetadata/v1/instance/id?wait_for_change=true HTTP/1.1\r\n"
                 b"Host: x\r\nMetadata-Flavor: Google\r\n\r\n")
    time.sleep(0.2)
    reset(sock)
    time.sleep(0.5)
    assert fetch(server.port, V1 + "instance/id")[0] == 200, "server died"
    log = server.stderr()
    assert "Traceback" not in log, log
    if log_level is None:
        # At the default level a vanished client is not worth a line at all.
        assert "Exception" not in log and "Error" not in log, log
    else:
        assert re.search(r" DEBUG .*(went away|hung up)", log), log


def test_no_stderr_line_per_request_at_the_default_log_level(cli_server):
    server = cli_server()
    fetch(server.port, "/")
    time.sleep(0.2)
    before = server.stderr()
    for path, headers in [("/", {}), (V1 + "instance/id", GOOGLE), (V1 + "nope", GOOGLE),
                          (V1 + "instance/id", {}), (V1 + "instance", GOOGLE),
                          (V1 + "instance/service-accounts/default/token", GOOGLE)]:
        fetch(server.port, path, headers=headers)
    time.sleep(0.3)
    assert server.stderr() == before


def raw_exchange(port, data, timeout=10):
    """Send raw bytes on a fresh connection; return everything read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        sock.close()


@pytest.mark.parametrize("framing, status", [
    (b"Content-Length: 99999999999999\r\n", b"413"),
    (b"Content-Length: 2000000\r\n", b"413"),
    (b"Content-Length: -1\r\n", b"400"),
    (b"Content-Length: 12abc\r\n", b"400"),
    (b"Transfer-Encoding: chunked\r\n", b"411"),
])
def test_a_body_the_server_will_not_read_is_refused_and_the_connection_closed(cli_server,
                                                                             framing, status):
    server = cli_server("--log-level", "debug")
    # The bytes after the head would be taken for a second request on a connection that
    # stayed open; the server must answer once and close instead of reading or hanging.
    answer = raw_exchange(server.port, b"PUT " + V1.encode() + b"instance/guest-attributes/"
                          b"ns/key HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n"
                          + framing + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer and b"Metadata-Flavor: Google" in answer
    assert fetch(server.port, V1 + "instance/guest-attributes/")[1] == b""   # nothing stored
    assert "Traceback" not in server.stderr()


def test_expect_100_continue_is_answered_before_the_body_is_sent(gce_server):
    sock = socket.create_connection(("127.0.0.1", gce_server.port), timeout=10)
    try:
        sock.sendall(b"PUT " + V1.encode() + b"instance/guest-attributes/ns/expect HTTP/1.1\r\n"
                     b"Host: x\r\nMetadata-Flavor: Google\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n")
        # The client holds its body back until the interim answer arrives (curl does).
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(b"value")
        final = sock.recv(4096)
        assert final.startswith(b"HTTP/1.1 200"), final
    finally:
        sock.close()
    assert fetch(gce_server.port, V1 + "instance/guest-attributes/ns/expect")[1] == b"value"


def test_a_body_too_large_is_refused_before_the_client_is_invited_to_send_it(gce_server):
    answer = raw_exchange(gce_server.port, b"PUT " + V1.encode() + b"instance/guest-attributes/"
                          b"ns/big HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n"
                          b"Expect: 100-continue\r\nContent-Length: 99999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"HTTP/1.1 100" not in answer and b"Connection: close" in answer


@pytest.mark.parametrize("flavor, allow", [("gce", b"Allow: GET"), ("ec2", b"Allow: GET, HEAD")])
def test_unknown_methods_get_the_flavors_405(mds_server_factory, flavor, allow):
    server = mds_server_factory(flavor=flavor)
    path = V1 + "project/project-id" if flavor == "gce" else "/latest/meta-data/instance-id"
    answer = raw_exchange(server.port, b"FROB " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 "), answer[:200]
    assert allow + b"\r\n" in answer


@pytest.mark.parametrize("flavor, path, head_status, get_status", [
    ("gce", "/", b"200", b"200"),
    ("gce", V1 + "project/project-id", b"405", b"200"),
    ("ec2", "/latest/meta-data/instance-id", b"200", b"200"),
    ("ec2", "/latest/meta-data/nope", b"404", b"404"),
])
def test_a_head_answer_has_no_body_so_the_next_answer_follows_its_headers(
        mds_server_factory, flavor, path, head_status, get_status):
    # http.client never reads a body after HEAD, so only the raw stream shows one: sent, it
    # would be read as the start of the next answer on a keep-alive connection.
    server = mds_server_factory(flavor=flavor)
    request = (" %s HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n" % path).encode()
    answer = raw_exchange(server.port, b"HEAD" + request + b"\r\nGET" + request
                          + b"Connection: close\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + head_status), head
    assert rest.startswith(b"HTTP/1.1 " + get_status), rest[:80]


@pytest.mark.parametrize("request_line", [
    b"GET /" + b"a" * 70000 + b" HTTP/1.1",      # too long: 414
    b"GET / HTTP/2.0",                           # unsupported version: 505
    b"GET / FOO/1.1",                            # bad version: 400
    b"GET / HTTP/1.+1",                          # some Python releases read it as HTTP/1.1
    b"GET / HTTP/1.1_0",
])
def test_malformed_request_lines_are_refused_without_a_traceback(cli_server, request_line):
    server = cli_server("--log-level", "debug")
    answer = raw_exchange(server.port, request_line + b"\r\nHost: x\r\n\r\n")
    assert re.match(rb"HTTP/1.1 (414|505|400) ", answer), answer[:200]
    assert b"Metadata-Flavor: Google" in answer
    assert fetch(server.port, "/")[0] == 200
    time.sleep(0.2)
    log = server.stderr()
    assert "Traceback" not in log and "error serving" not in log, log


# Header blocks as clients and odd clients send them: mds reads simple lines itself and
# leaves the rest to the stdlib's email parser, so every one must read as the stdlib reads it.
HEADER_BLOCKS = [
    b"Host: x\r\nMetadata-Flavor: Google\r\n",
    b"host: x\r\nmetadata-flavor: Google\r\nMETADATA-FLAVOR: Other\r\n",   # first one wins
    b"Metadata-Flavor:Google\r\nX-Empty:\r\nX-Blank: \t \r\n",
    b"Metadata-Flavor: \tGoogle \t\r\n",                 # trailing blanks stay in the value
    b"Metadata-Flavor: Google\nHost: x\n",               # bare LF line ends
    b"Metadata-Flavor: Goo\r\n gle\r\nHost: x\r\n",      # a folded line
    b"Metadata-Flavor: Google\rX-Forwarded-For: 1.2.3.4\r\n",  # a bare CR
    b"Bad Name: x\r\nMetadata-Flavor: Google\r\n",       # a space in a name ends the headers
    b"Metadata-Flavor : Google\r\n",
    b": x\r\nMetadata-Flavor: Google\r\n",
    b"X-Latin: caf\xe9\r\nX-N\xe4me: 1\r\nMetadata-Flavor: Google\r\n",
    b"X-Weird!#$%&'*+.^_`|~: 1\r\nX-Colons: a:b: c\r\n",
    b"Host: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n",
    b"From nobody\r\nMetadata-Flavor: Google\r\n",
]


@pytest.mark.parametrize("block", HEADER_BLOCKS)
def test_request_headers_read_as_the_stdlib_reads_them(block):
    stdlib = http.client.parse_headers(io.BytesIO(block + b"\r\n"))
    ours = mds.RequestHeaders.parse(io.BytesIO(block).readlines())
    assert ours.items() == stdlib.items()
    names = {name for name, _ in stdlib.items()} | {"Metadata-Flavor", "Host", "Nope"}
    for name in names:
        for spelling in (name, name.lower(), name.upper()):
            assert ours.get(spelling) == stdlib.get(spelling), spelling
            assert ours.get_all(spelling) == stdlib.get_all(spelling), spelling
            assert (spelling in ours) == (spelling in stdlib), spelling


def test_random_header_blocks_read_as_the_stdlib_reads_them():
    # Blocks built from the pieces parsers trip on: separators, blanks, bytes that
    # str.splitlines() takes for line ends, non-ASCII, a mailbox "From " line.
    pieces = [b"Host", b"metadata-flavor", b"X-A", b":", b": ", b" ", b"\t", b"\r", b"\r\n",
              b"Google", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"\xe9", b"\x00", b"From ",
              b"a:b", b"(", b'"']
    rng = random.Random(2)
    for _ in range(3000):
        lines = [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
                 + rng.choice([b"\r\n", b"\n"]) for _ in range(rng.randint(1, 4))]
        lines = [line for line in lines if line.strip(b"\r\n")]
        stdlib = http.client.parse_headers(io.BytesIO(b"".join(lines) + b"\r\n"))
        ours = mds.RequestHeaders.parse(lines)
        assert ours.items() == stdlib.items(), lines
        for name in {name for name, _ in stdlib.items()}:
            assert ours.get(name.upper()) == stdlib.get(name.upper()), lines


@pytest.mark.parametrize("extra, status", [
    # http.client counts the blank line that ends them: 99 fields, not 100.
    (b"".join(b"X-H%d: v\r\n" % n for n in range(96)), b"200"),    # 99 fields in all
    (b"".join(b"X-H%d: v\r\n" % n for n in range(97)), b"431"),
    (b"X-Long: " + b"v" * 65536 + b"\r\n", b"431"),
])
def test_a_request_carries_up_to_99_header_fields_of_up_to_64_kib(cli_server, extra, status):
    server = cli_server("--log-level", "debug")
    answer = raw_exchange(server.port, b"GET /computeMetadata/v1/project/project-id HTTP/1.1\r\n"
                          b"Host: x\r\nMetadata-Flavor: Google\r\n" + extra
                          + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"Metadata-Flavor: Google" in answer
    assert fetch(server.port, "/")[0] == 200
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("line", [
    b"X:" + b" " * 65000 + b"\r\r\n",          # blanks, then a stray CR
    b"X: a" + b"\t" * 65000 + b"\rb\r\n",
    b"X" * 65000 + b" : v\r\n",
])
def test_a_long_odd_header_line_costs_no_more_than_reading_it(gce_server, line):
    # Such lines go to the email parser.  Deciding so must take time in proportion to the
    # line: quadratic work would hold the GIL, and every other client, for many seconds.
    # (The bound only stops a broken server from hanging the suite.)
    odd = (b"GET /computeMetadata/v1/project/project-id HTTP/1.1\r\nHost: x\r\n"
           b"Metadata-Flavor: Google\r\nConnection: close\r\n" + line + b"\r\n")
    for _ in range(3):
        answer = raw_exchange(gce_server.port, odd, timeout=10)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert fetch(gce_server.port, V1 + "project/project-id", timeout=10)[0] == 200


@pytest.mark.parametrize("version, connection, stays_open", [
    (b"HTTP/1.1", b"", True),
    (b"HTTP/1.1", b"Connection: close\r\n", False),
    (b"HTTP/1.1", b"Connection: CLOSE\r\n", False),
    (b"HTTP/1.0", b"", False),
    (b"HTTP/1.0", b"Connection: keep-alive\r\n", True),
    (b"HTTP/1.0", b"Connection: Keep-Alive\r\n", True),
])
def test_the_version_and_connection_header_decide_whether_a_connection_stays_open(
        gce_server, version, connection, stays_open):
    request = (b"GET /computeMetadata/v1/project/project-id " + version + b"\r\nHost: x\r\n"
               b"Metadata-Flavor: Google\r\n" + connection + b"\r\n")
    with socket.create_connection(("127.0.0.1", gce_server.port), timeout=10) as sock:
        sock.sendall(request + request)
        answer = b""
        while True:
            chunk = sock.recv(65536) if answer.count(b"HTTP/1.1 200") < 2 else b""
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.count(b"HTTP/1.1 200 ") == (2 if stays_open else 1), answer


def test_a_target_starting_with_two_slashes_means_one(gce_server):
    # What recent releases of http.server do (gh-87389), on every Python mds runs on.
    assert fetch(gce_server.port, "//computeMetadata/v1/project/project-id") == \
        fetch(gce_server.port, V1 + "project/project-id")


@pytest.mark.parametrize("target", [b"http://169.254.169.254/computeMetadata/v1/project/"
                                    b"project-id", b"http://metadata.google.internal:80/"
                                    b"computeMetadata/v1/project/project-id?alt=text"])
def test_the_absolute_form_of_a_request_target_is_accepted(gce_server, target):
    # RFC 9112 3.2.2: a server must accept it (clients send it through a proxy).
    answer = raw_exchange(gce_server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.endswith(b"\r\n\r\n" + fetch(gce_server.port, V1 + "project/project-id")[1])


def test_idle_connections_are_closed_but_hanging_gets_are_not(mds_server_factory,
                                                              monkeypatch):
    # The idle timeout (a minute in use) is shortened to see it act: an idle keep-alive
    # connection is closed by the server, while a wait_for_change outlasts it.
    monkeypatch.setattr(mds._Handler, "timeout", 0.5)
    server = mds_server_factory()
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    waiter = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        path = "/computeMetadata/v1/project/project-id"
        waiter.request("GET", path, headers=GOOGLE)
        first = waiter.getresponse()
        etag, value = first.getheader("ETag"), first.read()
        waiter.request("GET", path + "?wait_for_change=true&timeout_sec=2&last_etag=" + etag,
                       headers=GOOGLE)
        assert idle.recv(1) == b""                      # closed by the server, unasked
        reply = waiter.getresponse()
        assert reply.status == 200 and reply.getheader("ETag") == etag
        assert reply.read() == value
    finally:
        idle.close()
        waiter.close()


def test_a_request_trickling_in_is_cut_off_at_the_timeout(mds_server_factory, monkeypatch):
    # One byte every 0.2 s: each wait for a byte is short, but the request as a whole must
    # arrive within the timeout (a minute in use, shortened here).
    monkeypatch.setattr(mds._Handler, "timeout", 1.0)
    server = mds_server_factory()
    request = b"GET /computeMetadata/v1/project/project-id HTTP/1.1\r\nHost: x\r\n"
    trickler = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started = time.monotonic()
    try:
        closed = False
        for byte in request:
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            readable, _, _ = select.select([trickler], [], [], 0)
            if readable:
                closed = True
                break
        assert closed, "the server kept a trickling request for %.1f s" % (
            time.monotonic() - started)
        # Whatever it sent (a 408 or nothing), the server then closed the connection.
        try:
            while trickler.recv(4096):
                pass
        except ConnectionResetError:
            pass
    finally:
        trickler.close()
    # A request sent at once is served as usual.
    assert fetch(server.port, "/computeMetadata/v1/project/project-id")[0] == 200


def test_running_out_of_file_descriptors_is_reported_and_survived(tmp_path):
    import resource

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server = MdsCli(tmp_path, startup_timeout=30, preexec_fn=few_descriptors)
    idle = []
    try:
        for _ in range(80):                    # more than the server can accept
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        deadline = time.monotonic() + 10
        while "out of file descriptors" not in server.stderr() and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert "out of file descriptors" in server.stderr(), server.stderr()
        for connection in idle:
            connection.close()
        idle = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:      # the backlog drains as connections end
            try:
                if fetch(server.port, "/", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert fetch(server.port, "/")[0] == 200
        assert "Traceback" not in server.stderr()
    finally:
        for connection in idle:
            connection.close()
        server.stop()


def test_the_debug_log_shows_no_userinfo_of_a_proxy_form_target(cli_server):
    server = cli_server("--log-level", "debug")
    answer = raw_exchange(server.port, b"GET http://user:pa55w0rd@metadata.google.internal/"
                          b"computeMetadata/v1/project/project-id HTTP/1.1\r\nHost: x\r\n"
                          b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    time.sleep(0.2)
    log = server.stderr()
    assert "GET /computeMetadata/v1/project/project-id -> 200" in log, log
    assert "pa55w0rd" not in log
    # A request the stdlib refuses on the same connection is not logged with the last one's
    # target.
    answer = raw_exchange(server.port, b"GET /computeMetadata/v1/project/numeric-project-id "
                          b"HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n"
                          b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 414 " in answer, answer[:300]
    time.sleep(0.2)
    log = server.stderr()
    assert "- -> 414" in log and "numeric-project-id -> 414" not in log, log


def test_raw_utf8_in_a_path_means_what_its_percent_encoding_means(mds_server_factory):
    server = mds_server_factory(config={"computeMetadata": {"v1": {"instance": {
        "attributes": {"café": "crème"}}}}})
    encoded = fetch(server.port, V1 + "instance/attributes/caf%C3%A9")
    raw = raw_exchange(server.port, b"GET " + V1.encode() + "instance/attributes/café".encode()
                       + b" HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n"
                       b"Connection: close\r\n\r\n")
    assert encoded == (200, "crème".encode())
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith("crème".encode()), raw


def test_raw_utf8_in_a_query_means_what_its_percent_encoding_means(mds_server_factory):
    server = mds_server_factory()
    path = V1 + "instance/service-accounts/default/identity?format=full&audience="
    audience = "https://caf\u00e9.example/a b+c"

    def audience_of(response):
        assert response.startswith(b"HTTP/1.1 200"), response
        payload = response.rsplit(b"\r\n\r\n", 1)[1].split(b".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))["aud"]

    request = (b" HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    raw = raw_exchange(server.port, b"GET " + (path + audience.replace(" ", "%20")).encode()
                       + request)
    encoded = raw_exchange(server.port, b"GET " + (path + urllib.parse.quote(
        audience, safe=":/+")).encode() + request)
    # "+" keeps its form meaning in both spellings, as the real server's parser gives it.
    assert audience_of(raw) == audience_of(encoded) == audience.replace("+", " ")


# ---- many waiters ---------------------------------------------------------------------------


def read_responses(sockets, deadline_seconds):
    """Read one HTTP response from each socket; returns {socket: (status, body)}."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    done = {}
    deadline = time.monotonic() + deadline_seconds
    while len(done) < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                done[sock] = ("error", str(exc).encode())
                selector.unregister(sock)
                continue
            buffers[sock] += chunk
            head, separator, body = buffers[sock].partition(b"\r\n\r\n")
            if not chunk or separator:
                if not chunk and not separator:
                    done[sock] = ("closed", buffers[sock])
                    selector.unregister(sock)
                    continue
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                length = int(match.group(1)) if match else 0
                if len(body) >= length or not chunk:
                    done[sock] = (int(head.split(b" ")[1]), body[:length])
                    selector.unregister(sock)
    selector.close()
    return done


def ensure_descriptors(needed):
    """Raise this process's open-file soft limit (clients and, in-process, the server's side
    of every connection share it); many CI shells start at 1024."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail("this test needs %d open files; the hard limit is %d" % (needed, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_a_thousand_waiters_are_all_answered_after_one_update(gce_server):
    ensure_descriptors(4096)
    count = 1000
    path = V1 + "instance/attributes/thousand"
    gce_server.update("instance/attributes/thousand", "before")
    connection = http.client.HTTPConnection("127.0.0.1", gce_server.port, timeout=10)
    connection.request("GET", path, headers=GOOGLE)
    response = connection.getresponse()
    response.read()
    etag = response.getheader("ETag")
    connection.close()
    request = ("GET %s?wait_for_change=true&last_etag=%s HTTP/1.1\r\nHost: x\r\n"
               "Metadata-Flavor: Google\r\n\r\n" % (path, etag)).encode()
    sockets = []
    try:
        # Connect all at once, as a burst of clients would: the listen backlog must hold them.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", gce_server.port))
            sockets.append(sock)
        _, writable, _ = select_all_writable(sockets, 60)
        assert len(writable) == count, "only %d of %d connected" % (len(writable), count)
        for sock in sockets:
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(request)
        time.sleep(2)   # let the server pick them all up; early birds are fine either way
        gce_server.update("instance/attributes/thousand", "after")
        answers = read_responses(sockets, 60)
        statuses = [answer[0] for answer in answers.values()]
        assert len(answers) == count, "%d of %d answered" % (len(answers), count)
        bad = [answer for answer in answers.values() if answer != (200, b"after")]
        assert not bad, "%d bad answers, e.g. %r (statuses %r)" % (
            len(bad), bad[:3], sorted(set(map(str, statuses))))
    finally:
        for sock in sockets:
            sock.close()


def test_a_waiter_on_a_high_numbered_socket_keeps_waiting(gce_server):
    ensure_descriptors(2048)
    # Thousands of waiters (or an embedding test process with many files open) put accepted
    # sockets above descriptor 1023, where select.select() cannot go.  Such a waiter must keep
    # waiting through a change elsewhere in the tree, like any other.
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    sock = None
    try:
        path = V1 + "project/project-id"
        connection = http.client.HTTPConnection("127.0.0.1", gce_server.port, timeout=10)
        connection.request("GET", path, headers=GOOGLE)
        response = connection.getresponse()
        response.read()
        etag = response.getheader("ETag")
        connection.close()
        sock = socket.create_connection(("127.0.0.1", gce_server.port), timeout=10)
        sock.sendall(("GET %s?wait_for_change=true&last_etag=%s HTTP/1.1\r\nHost: x\r\n"
                      "Metadata-Flavor: Google\r\n\r\n" % (path, etag)).encode())
        time.sleep(0.5)
        accepted = server_side_socket(sock)
        assert accepted is not None and accepted.fileno() > 1023, "test setup: low fd"
        gce_server.update("instance/attributes/unrelated", "x")
        sock.settimeout(1.5)
        try:
            early = sock.recv(65536)
        except socket.timeout:
            early = None
        assert early is None, "answered though its value did not change: %r" % early[-80:]
        gce_server.update("project/project-id", "changed-project")
        sock.settimeout(10)
        answer = b""
        while not answer.endswith(b"changed-project"):
            chunk = sock.recv(65536)
            assert chunk, "connection closed: %r" % answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        if sock is not None:
            sock.close()
        for descriptor in filler:
            os.close(descriptor)


def select_all_writable(sockets, deadline_seconds):
    """Wait until every non-blocking connect finished (the socket turns writable)."""
    writable = set()
    deadline = time.monotonic() + deadline_seconds
    pending = list(sockets)
    while pending and time.monotonic() < deadline:
        selector = selectors.DefaultSelector()
        for sock in pending:
            selector.register(sock, selectors.EVENT_WRITE)
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                writable.add(key.fileobj)
            else:
                writable.discard(key.fileobj)
                pending.remove(key.fileobj)
        selector.close()
        pending = [sock for sock in pending if sock not in writable]
    return None, writable, None


# ---- command line ---------------------------------------------------------------------------


def help_entries():
    result = subprocess.run([sys.executable, MDS_PY, "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    entries = {}
    current = None
    for line in result.stdout.splitlines():
        match = re.match(r"\s{2}(-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if match:
            current = [flag.split(" ")[0].split("=")[0] for flag in match.group(1).split(", ")]
            for flag in current:
                entries[flag] = match.group(2) or ""
        elif current and line.startswith(" " * 4) and line.strip():
            for flag in current:
                entries[flag] = (entries[flag] + " " + line.strip()).strip()
        else:
            current = None
    return result.stdout, entries


def test_help_documents_every_flag():
    text, entries = help_entries()
    for flag in ("--host", "--port", "--config", "--signing-key", "--log-level"):
        assert flag in entries, "%s missing from --help:\n%s" % (flag, text)
    undocumented = [flag for flag, description in entries.items() if not description]
    assert not undocumented, "flags without a description: %s" % undocumented
    assert "8080" in entries["--port"]
    assert "127.0.0.1" in entries["--host"]


def test_startup_log_names_address_config_credentials_and_exports(cli_server):
    server = cli_server()
    log = server.stderr()
    authority = "127.0.0.1:%d" % server.port
    assert authority in log.split("export")[0], "listen address not logged before exports"
    assert re.search(r"(?i)default", log), "the config in use (built-in default) is not named"
    assert re.search(r"(?i)offline", log), "the credential source is not named"
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        assert re.search(r"export %s=%s\b" % (name, re.escape(authority)), log), name
    warnings = [line for line in log.splitlines()
                if re.search(r"(?i)\b(warning|warn)\b", line) and re.search(r"(?i)offline", line)]
    assert warnings, "no loud offline warning:\n" + log
    assert re.search(r"(?i)reject", " ".join(warnings)), "the warning must say Google rejects"
    assert fetch(server.port, "/", headers={})[0] == 200


def test_startup_log_names_the_config_file(cli_server, tmp_path):
    config = tmp_path / "my-config.json"
    config.write_text('{"computeMetadata": {"v1": {"project": {"projectId": "from-file"}}}}')
    server = cli_server("--config", str(config))
    assert str(config) in server.stderr()
    assert fetch(server.port, V1 + "project/project-id")[1] == b"from-file"


@pytest.mark.parametrize("host, other", [("127.0.0.2", "127.0.0.1"), ("::1", "127.0.0.1")])
def test_host_flag_picks_the_bind_address(cli_server, host, other):
    # 127.0.0.2 is a loopback address on Linux without any setup.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        message = "%s is not configured on this machine: %s" % (host, exc)
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    server = cli_server("--host", host)
    with socket.create_connection((host, server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    with pytest.raises(OSError):                         # not listening on every address
        socket.create_connection((other, server.port), timeout=5).close()
    authority = ("[%s]:%d" if ":" in host else "%s:%d") % (host, server.port)
    log = server.stderr()
    assert "at http://%s " % authority in log and "listening on every" not in log, log


@pytest.mark.parametrize("host, loopback, everywhere", [
    ("0.0.0.0", "127.0.0.1", "every IPv4 address"),
    ("0", "127.0.0.1", "every IPv4 address"),            # inet_aton's spelling of 0.0.0.0
    ("::", "::1", "every IPv6 "),
    ("::0", "::1", "every IPv6 "),
])
def test_a_wildcard_bind_is_named_in_the_startup_log(cli_server, host, loopback, everywhere):
    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = cli_server("--host", host)
    url = "http://%s:%d" % ("[::1]" if loopback == "::1" else loopback, server.port)
    assert server.url == url                             # the exports name loopback
    with socket.create_connection((loopback, server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    line = [line for line in server.stderr().splitlines() if "serving the" in line][0]
    assert " at %s, listening on %s" % (url, everywhere) in line, line


# Run in a network namespace of its own where it can be, as port 8080 is surely free there:
# its loopback interface starts down, and is brought up with the ioctl `ip link set lo up`
# makes.
NO_ARGUMENTS_RUN = r"""
import fcntl, socket, struct, subprocess, sys, time
if sys.argv[2] == "netns":
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack_from("H", fcntl.ioctl(ctl, 0x8913, request), 16)[0]  # SIOCGIFFLAGS
        fcntl.ioctl(ctl, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))    # IFF_UP
server = subprocess.Popen([sys.executable, sys.argv[1]], stderr=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", 8080), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.05)
    sock.sendall(b"GET /computeMetadata/v1/project/project-id HTTP/1.1\r\nHost: x\r\n"
                 b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    print(sock.makefile("rb").readline().decode().strip())
    try:
        socket.create_connection(("127.0.0.2", 8080), timeout=5).close()
        print("also on 127.0.0.2")
    except OSError:
        print("only on 127.0.0.1")
finally:
    server.terminate()
    server.wait()
"""


def test_with_no_arguments_it_serves_on_127_0_0_1_port_8080():
    unshare = require_tool("unshare")
    run = subprocess.run([unshare, "--net", sys.executable, "-c", NO_ARGUMENTS_RUN, MDS_PY,
                          "netns"], capture_output=True, text=True, timeout=90)
    if run.returncode and "unshare failed" in run.stderr:
        # No namespaces here (a container without CAP_SYS_ADMIN): this host's own port
        # 8080 then, if nothing holds it.
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 8080))
        except OSError as exc:
            message = "no network namespace (%s) and port 8080 is taken (%s)" % (
                run.stderr.strip(), exc)
            if in_ci():
                pytest.fail(message)
            pytest.skip(message)
        run = subprocess.run([sys.executable, "-c", NO_ARGUMENTS_RUN, MDS_PY, "host"],
                             capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["HTTP/1.1 200 OK", "only on 127.0.0.1"], run.stdout


