#!/usr/bin/env python3
"""Benchmark mds against a bare stdlib keep-alive server measured in the same run.

Run:  python3 bench/bench.py            (stdlib only; ~45 s on a 2-core machine)
      python3 bench/bench.py --profile  (adds a cProfile of 5,000 leaf GETs)

Every throughput figure is a ratio against something measured moments earlier on the same
machine, because absolute req/s on a shared box says little.  Servers run in subprocesses;
the load generator runs in another process so that it does not share the server's GIL.
Nothing here asserts: targets are printed next to the figures as PASS/MISS and the exit
status is 0 whatever they say.
"""

import argparse
import http.client
import http.server
import json
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MDS = os.path.join(os.path.dirname(HERE), "mds.py")

LEAF_PATH = "/computeMetadata/v1/project/project-id"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
WAIT_KEY = "bench-wait"
WAIT_PATH = "/computeMetadata/v1/instance/attributes/" + WAIT_KEY
FLAVOR_HEADERS = {"Metadata-Flavor": "Google"}

TARGET_LEAF_RATIO = 0.6
TARGET_TOKEN_RATIO = 0.7
TARGET_STARTUP_MS = 100.0
WAITERS = 1000


# ---- the baseline server ---------------------------------------------------------------------


class BaselineHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a constant, tuned exactly like mds's handler (keep-alive,
    Content-Length, TCP_NODELAY, one buffered write), so the ratio measures mds's own work."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1
    disable_nagle_algorithm = True
    body = b"bench-project"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format, *args):
        pass


class BaselineServer(http.server.ThreadingHTTPServer):
    """The bare stdlib threading server with the same listener settings mds uses."""

    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


def serve_baseline(port):
    server = BaselineServer(("127.0.0.1", port), BaselineHandler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever(0.05)


# ---- small helpers ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid, field):
    """A numeric field of /proc/<pid>/status (VmRSS in kB, Threads); None off Linux."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_seconds(pid):
    """utime + stime of a process, from /proc/<pid>/stat; None off Linux."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def percentile(sorted_values, fraction):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def http_get(port, path, headers=None, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_answering(port, path="/", deadline_s=30.0, pause=0.002):
    """Poll until `GET path` answers; returns the moment it did (perf_counter) or None."""
    request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
               % (path, port)).encode()
    end = time.perf_counter() + deadline_s
    while time.perf_counter() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(pause)
    return None


def raise_fd_limit(wanted):
    # 1,000 waiters need 1,000 sockets here and 1,000 in the server (which inherits this).
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


class ServerProcess:
    """A server under test in its own process, its stderr kept in a file for post-mortems."""

    def __init__(self, argv, port, cwd=None, env=None):
        self.port = port
        self.log = tempfile.TemporaryFile()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, cwd=cwd,
                                     env=env)

    @property
    def pid(self):
        return self.proc.pid

    def stderr_tail(self, limit=2000):
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-limit:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def mds_argv(mds_path, port, *extra):
    return [sys.executable, mds_path, "--port", str(port), "--log-level", "warning"] + list(extra)


def mds_module_argv(port):
    """`python3 -m mds`: imported as a module, so its bytecode is cached in __pycache__."""
    return [sys.executable, "-m", "mds", "--port", str(port), "--log-level", "warning"]


def baseline_argv(port):
    return [sys.executable, os.path.abspath(__file__), "--serve-baseline", str(port)]


# ---- the load generator (runs in its own process) --------------------------------------------


def content_length(head):
    """Content-Length from a raw header block (0 when absent)."""
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17:end if end > 0 else None])


def _raw_connection_loop(port, request, deadline, max_requests, latencies, errors):
    """One keep-alive connection driven with a plain socket: send, read one response, repeat.

    Parsing only the status line and Content-Length keeps the client far cheaper per request
    than the server, so the figure is the server's rate and not the generator's.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    clock = time.perf_counter
    try:
        while clock() < deadline and len(latencies) < max_requests:
            sent = clock()
            sock.sendall(request)
            while True:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end >= 0:
                    total = head_end + 4 + content_length(buffer[:head_end])
                    if len(buffer) >= total:
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buffer += chunk
            latencies.append(clock() - sent)
            if not buffer.startswith(b"HTTP/1.1 200"):
                errors.append(buffer[:12])
            buffer = buffer[total:]
    finally:
        sock.close()


def _httpclient_connection_loop(port, path, headers, deadline, max_requests, latencies,
                                errors):
    """One keep-alive connection driven with http.client (what most Python clients use)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    clock = time.perf_counter
    try:
        while clock() < deadline and len(latencies) < max_requests:
            sent = clock()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            latencies.append(clock() - sent)
            if response.status != 200:
                errors.append(response.status)
    finally:
        conn.close()


def load_worker(port, path, headers, connections, duration, max_requests, client, results):
    """Drive `connections` keep-alive connections for `duration` seconds; report via queue."""
    request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (
        path, port, "".join("%s: %s\r\n" % item for item in headers.items()))).encode()
    latencies = []                    # list.append is atomic, so threads share these lists
    errors = []
    failures = []
    start = time.perf_counter()
    deadline = start + duration
    cpu_before = os.times()

    def run():
        try:
            if client == "raw":
                _raw_connection_loop(port, request, deadline, max_requests, latencies, errors)
            else:
                _httpclient_connection_loop(port, path, headers, deadline, max_requests,
                                            latencies, errors)
        except Exception as exc:      # report, do not hide, a connection that broke
            failures.append("%s: %s" % (type(exc).__name__, exc))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu_after = os.times()
    latencies.sort()
    count = len(latencies)
    results.put({
        "requests": count, "errors": len(errors), "failures": failures[:3],
        "elapsed": elapsed, "rps": count / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "client_cpu": (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system),
    })


def measure(server, path, headers, args):
    """One bounded load run against a server process; adds the server's CPU per request."""
    context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    results = context.Queue()
    cpu_before = proc_cpu_seconds(server.pid)
    worker = context.Process(target=load_worker, args=(
        server.port, path, headers, args.connections, args.duration, args.max_requests,
        args.client, results))
    worker.start()
    result = results.get(timeout=args.duration + 30)
    worker.join(10)
    cpu_after = proc_cpu_seconds(server.pid)
    if cpu_before is not None and cpu_after is not None and result["requests"]:
        result["server_us_per_req"] = (cpu_after - cpu_before) / result["requests"] * 1e6
        result["server_cpu_share"] = (cpu_after - cpu_before) / result["elapsed"]
    result["client_cpu_share"] = result["client_cpu"] / result["elapsed"]
    return result


# ---- the report ------------------------------------------------------------------------------


def verdict(ok):
    return "PASS" if ok else "MISS"


def median_of(runs, key):
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else float("nan")


def describe_runs(runs):
    line = "%8.0f req/s  p50 %5.2f ms  p99 %6.2f ms" % (
        median_of(runs, "rps"), median_of(runs, "p50_ms"), median_of(runs, "p99_ms"))
    if any("server_us_per_req" in run for run in runs):
        line += "  server %5.0f us CPU/req" % median_of(runs, "server_us_per_req")
    line += "\n      runs: %s; CPU use: server %.0f%%, load generator %.0f%% of one core" % (
        ", ".join("%.0f" % run["rps"] for run in runs), 100 * median_of(runs, "server_cpu_share"),
        100 * median_of(runs, "client_cpu_share"))
    errors = sum(run["errors"] for run in runs)
    failures = [f for run in runs for f in run["failures"]]
    if errors or failures:
        line += "\n      !! %d non-200 answers; %s" % (errors, "; ".join(failures[:3]) or "")
    return line


def throughput_section(args):
    print("== throughput: %d keep-alive connections, %.1f s per run, %d interleaved rounds, "
          "%s client ==" % (args.connections, args.duration, args.rounds, args.client))
    base_port = free_port()
    base = ServerProcess(baseline_argv(base_port), base_port)
    mds_port = free_port()
    mds = ServerProcess(mds_argv(args.mds, mds_port), mds_port)
    try:
        for server, name in ((base, "baseline"), (mds, "mds")):
            if wait_until_answering(server.port) is None:
                print("  %s did not answer; stderr:\n%s" % (name, server.stderr_tail()))
                return None
        # Key generation runs in a background thread at startup; let it finish (the JWKS waits
        # for it) so it does not steal the GIL from the requests being measured.
        http_get(mds.port, "/oauth2/v3/certs", timeout=120)
        status, body = http_get(mds.port, LEAF_PATH, FLAVOR_HEADERS)
        token_status, _ = http_get(mds.port, TOKEN_PATH, FLAVOR_HEADERS)
        if status != 200 or token_status != 200:
            print("  mds answered %d (leaf) / %d (token); stderr:\n%s"
                  % (status, token_status, mds.stderr_tail()))
            return None
        warm_up = argparse.Namespace(**dict(vars(args), duration=min(0.5, args.duration)))
        for server, path in ((base, LEAF_PATH), (mds, LEAF_PATH), (mds, TOKEN_PATH)):
            measure(server, path, FLAVOR_HEADERS, warm_up)
        baseline_runs, leaf_runs, token_runs = [], [], []
        for _ in range(args.rounds):
            baseline_runs.append(measure(base, LEAF_PATH, FLAVOR_HEADERS, args))
            leaf_runs.append(measure(mds, LEAF_PATH, FLAVOR_HEADERS, args))
            token_runs.append(measure(mds, TOKEN_PATH, FLAVOR_HEADERS, args))
    finally:
        base.stop()
        mds.stop()
    base_rps = median_of(baseline_runs, "rps")
    leaf_rps = median_of(leaf_runs, "rps")
    token_rps = median_of(token_runs, "rps")
    leaf_ratio = leaf_rps / base_rps if base_rps else float("nan")
    token_ratio = token_rps / leaf_rps if leaf_rps else float("nan")
    print("  baseline (bare stdlib)  " + describe_runs(baseline_runs))
    print("  mds leaf GET            " + describe_runs(leaf_runs))
    print("  mds cached token GET    " + describe_runs(token_runs))
    cpu_base = median_of(baseline_runs, "server_us_per_req")
    cpu_leaf = median_of(leaf_runs, "server_us_per_req")
    cpu_token = median_of(token_runs, "server_us_per_req")
    print("  leaf  / baseline  req/s ratio %.2f  (target >= %.1f)  %s   [server CPU/req ratio "
          "%.2f, lower is better]" % (leaf_ratio, TARGET_LEAF_RATIO,
                                      verdict(leaf_ratio >= TARGET_LEAF_RATIO),
                                      cpu_leaf / cpu_base if cpu_base else float("nan")))
    print("  token / leaf      req/s ratio %.2f  (target >= %.1f)  %s   [server CPU/req ratio "
          "%.2f]" % (token_ratio, TARGET_TOKEN_RATIO, verdict(token_ratio >= TARGET_TOKEN_RATIO),
                     cpu_token / cpu_leaf if cpu_leaf else float("nan")))
    return leaf_ratio, token_ratio


def startup_once(argv, port, cwd=None, env=None):
    server = ServerProcess(argv, port, cwd, env)
    try:
        answered = wait_until_answering(port, deadline_s=15.0, pause=0.001)
        if answered is None:
            return None, server.stderr_tail()
        return (answered - server.started) * 1000, None
    finally:
        server.stop()


def startup_section(args):
    print("== startup: spawn to first answer of GET /, median of %d runs ==" % args.startup_runs)
    floor, bare_floor, base_ms, mds_ms, bare_mds_ms, module_ms = [], [], [], [], [], []
    # `python3 mds.py` compiles the whole file at every start (CPython never caches a script's
    # bytecode); `python3 -m mds` and the installed `mds` command load cached bytecode.
    module_env = dict(os.environ)
    module_env.pop("PYTHONDONTWRITEBYTECODE", None)
    module_dir = os.path.dirname(os.path.abspath(args.mds))
    warm_port = free_port()
    startup_once(mds_module_argv(warm_port), warm_port, module_dir, module_env)   # writes the cache
    for _ in range(args.startup_runs):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=False)
        floor.append((time.perf_counter() - begin) * 1000)
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-S", "-c", "pass"], check=False)
        bare_floor.append((time.perf_counter() - begin) * 1000)
        port = free_port()
        elapsed, _ = startup_once(baseline_argv(port), port)
        if elapsed is not None:
            base_ms.append(elapsed)
        port = free_port()
        elapsed, tail = startup_once(mds_argv(args.mds, port), port)
        if elapsed is None:
            print("  mds did not answer within 15 s; stderr:\n%s" % tail)
            return None
        mds_ms.append(elapsed)
        port = free_port()
        elapsed, _ = startup_once([sys.executable, "-S"] + mds_argv(args.mds, port)[1:], port)
        if elapsed is not None:
            bare_mds_ms.append(elapsed)
        port = free_port()
        elapsed, _ = startup_once(mds_module_argv(port), port, module_dir, module_env)
        if elapsed is not None:
            module_ms.append(elapsed)
    median_mds = statistics.median(mds_ms)
    site_ms = statistics.median(floor) - statistics.median(bare_floor)
    print("  python3 -c pass (floor) %6.1f ms  (with -S %.1f ms: site hooks, .pth files "
          "included, add %.0f ms to every start)"
          % (statistics.median(floor), statistics.median(bare_floor), site_ms))
    if base_ms:
        print("  baseline server         %6.1f ms  (runs: %s; best %.0f)" % (
            statistics.median(base_ms), ", ".join("%.0f" % m for m in base_ms), min(base_ms)))
    print("  python3 mds.py          %6.1f ms  (runs: %s; best %.0f)  target < %.0f ms  %s"
          % (median_mds, ", ".join("%.0f" % m for m in mds_ms), min(mds_ms), TARGET_STARTUP_MS,
             verdict(median_mds < TARGET_STARTUP_MS)))
    if bare_mds_ms:
        print("  python3 -S mds.py       %6.1f ms  (runs: %s; without the site hooks)" % (
            statistics.median(bare_mds_ms), ", ".join("%.0f" % m for m in bare_mds_ms)))
    if module_ms:
        median_module = statistics.median(module_ms)
        print("  python3 -m mds          %6.1f ms  (runs: %s; best %.0f)  target < %.0f ms  %s"
              % (median_module, ", ".join("%.0f" % m for m in module_ms), min(module_ms),
                 TARGET_STARTUP_MS, verdict(median_module < TARGET_STARTUP_MS)))
    if base_ms:
        median_base = statistics.median(base_ms)
        print("  mds - baseline          %6.1f ms  (mds / baseline %.2f)"
              % (median_mds - median_base, median_mds / median_base))
    print("  compiling mds.py alone  %6.1f ms  (fresh interpreter; paid by the script form at "
          "every start)" % compile_ms(args.mds))
    return median_mds


def compile_ms(path, runs=5):
    """Median time to compile `path` in a fresh interpreter, as `python3 mds.py` pays it (a
    warm, in-process compile runs about a third faster and would understate it)."""
    probe = ("import sys, time\n"
             "source = open(sys.argv[1], 'rb').read()\n"
             "begin = time.perf_counter()\n"
             "compile(source, sys.argv[1], 'exec', dont_inherit=True)\n"
             "print((time.perf_counter() - begin) * 1000)\n")
    timings = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", probe, path], stdout=subprocess.PIPE,
                              check=True)
        timings.append(float(done.stdout))
    return statistics.median(timings)


def write_config(path, document):
    # Write-then-rename so the server never reads a half-written file.
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(document, handle)
    os.replace(partial, path)


def waiters_section(args):
    print("== %d concurrent wait_for_change waiters on one leaf, released by one config change"
          " (file rewrite + SIGHUP) ==" % args.waiters)
    raise_fd_limit(args.waiters * 2 + 256)
    workdir = tempfile.mkdtemp(prefix="mds-bench-")
    config_path = os.path.join(workdir, "config.json")
    # Serve the default VM plus one attribute to wait on; take the default tree from mds
    # itself (recursive JSON is the config-file shape) so this keeps up with mds.py.
    port = free_port()
    seed = ServerProcess(mds_argv(args.mds, port), port)
    try:
        if wait_until_answering(port) is None:
            print("  mds did not answer; stderr:\n%s" % seed.stderr_tail())
            return None
        status, body = http_get(port, "/computeMetadata/v1/?recursive=true", FLAVOR_HEADERS)
    finally:
        seed.stop()
    if status != 200:
        print("  could not read mds's default tree (%d)" % status)
        return None
    v1 = json.loads(body)
    v1.setdefault("instance", {}).setdefault("attributes", {})[WAIT_KEY] = "before"
    document = {"computeMetadata": {"v1": v1}}
    write_config(config_path, document)

    port = free_port()
    server = ServerProcess(mds_argv(args.mds, port, "--config", config_path), port)
    sockets = []
    try:
        if wait_until_answering(port) is None:
            print("  mds --config did not answer; stderr:\n%s" % server.stderr_tail())
            return None
        http_get(port, "/oauth2/v3/certs", timeout=120)      # key generation out of the way
        status, body = http_get(port, WAIT_PATH, FLAVOR_HEADERS)
        if status != 200 or body != b"before":
            print("  the waited-on leaf answered %d %r; stderr:\n%s"
                  % (status, body[:80], server.stderr_tail()))
            return None
        idle_threads = _settled_thread_count(server.pid)
        rss_idle = proc_status(server.pid, "VmRSS")
        request = ("GET %s?wait_for_change=true&timeout_sec=60 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                   "Metadata-Flavor: Google\r\n\r\n" % (WAIT_PATH, port)).encode()
        connect_errors = 0
        connect_start = time.perf_counter()
        for _ in range(args.waiters):
            sock = socket.socket()
            sock.settimeout(10)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(request)
            except OSError:
                connect_errors += 1
                sock.close()
                continue
            sockets.append(sock)
        # A waiter is parked once its handler thread exists; wait for all of them (or for the
        # count to stop growing, so a lost connection costs a second, not the whole deadline).
        parked_deadline = time.perf_counter() + 20
        threads, last_growth, previous = 0, time.perf_counter(), -1
        while time.perf_counter() < parked_deadline:
            threads = (proc_status(server.pid, "Threads") or 0) - idle_threads
            if threads >= len(sockets) or time.perf_counter() - last_growth > 1.0:
                break
            if threads != previous:
                previous, last_growth = threads, time.perf_counter()
            time.sleep(0.05)
        parked_after = time.perf_counter() - connect_start
        time.sleep(0.2)               # let the last threads reach Condition.wait
        rss_parked = proc_status(server.pid, "VmRSS")

        selector = selectors.DefaultSelector()
        buffers = {}
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            buffers[sock] = b""
        early = _count_readable(selector)        # anyone answered before the change?

        document["computeMetadata"]["v1"]["instance"]["attributes"][WAIT_KEY] = "after"
        changed_at = time.perf_counter()
        write_config(config_path, document)
        os.kill(server.pid, signal.SIGHUP)
        answers, first_answer, last_answer = _collect(selector, buffers,
                                                      changed_at + args.waiter_deadline)
        selector.close()
        rss_after = proc_status(server.pid, "VmRSS")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)

    released = sum(1 for status, body in answers.values() if status == 200 and body == b"after")
    others = len(answers) - released
    to_last = (last_answer - changed_at) * 1000 if last_answer else float("nan")
    to_first = (first_answer - changed_at) * 1000 if first_answer else float("nan")
    print("  connected %d/%d (%d connect errors), %d handler threads parked after %.2f s"
          % (len(sockets), args.waiters, connect_errors, threads, parked_after))
    if early:
        print("  !! %d waiters answered before the change" % early)
    print("  answered with the new value: %d/%d   other answers: %d   no answer: %d   %s"
          % (released, args.waiters, others, len(sockets) - len(answers),
             verdict(released == args.waiters)))
    print("  change -> first answer %.0f ms (file write, SIGHUP, reload), -> last answer %.0f ms"
          % (to_first, to_last))
    print("  server RSS: idle %s, %d waiters parked %s, after release %s"
          % (_kb(rss_idle), args.waiters, _kb(rss_parked), _kb(rss_after)))
    return released


def _settled_thread_count(pid, timeout=3.0):
    """The server's thread count once handler threads of closed connections have ended."""
    end = time.perf_counter() + timeout
    previous = proc_status(pid, "Threads")
    while time.perf_counter() < end:
        time.sleep(0.1)
        current = proc_status(pid, "Threads")
        if current == previous:
            return current or 0
        previous = current
    return previous or 0


def _kb(value):
    return "n/a" if value is None else "%.1f MB" % (value / 1024)


def _count_readable(selector):
    count = 0
    for key, _ in selector.select(0):
        try:
            if key.fileobj.recv(65536, socket.MSG_PEEK):
                count += 1
        except OSError:
            count += 1
    return count


def _collect(selector, buffers, deadline):
    """Read every waiter's answer as it arrives: ({sock: (status, body)}, first, last time)."""
    answers = {}
    first = last = None
    pending = len(buffers)
    while pending and time.perf_counter() < deadline:
        for key, _ in selector.select(max(0.0, deadline - time.perf_counter())):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                buffers[sock] += chunk
            data = buffers[sock]
            head_end = data.find(b"\r\n\r\n")
            done = False
            if head_end >= 0:
                head = data[:head_end]
                length = content_length(head)
                if len(data) >= head_end + 4 + length:
                    answers[sock] = (int(head.split()[1]),
                                     data[head_end + 4:head_end + 4 + length])
                    done = True
            if done or not chunk:
                if not done:
                    answers[sock] = (0, b"")          # closed without an answer
                last = time.perf_counter()
                first = first or last
                selector.unregister(sock)
                pending -= 1
    return answers, first, last


def _wait_for(condition, timeout=5.0):
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        time.sleep(0.01)


def profile_shares(stats, mds_path):
    """Split a profile's own time into mds.py, http.server, request parsing (mds.py's own
    and the stdlib's email parser, which mds falls back to), sockets, the rest."""
    groups = {}
    mds_path = os.path.abspath(mds_path)
    for (filename, _, name), (_, _, own, _, _) in stats.stats.items():
        if os.path.abspath(filename) == mds_path and name in ("parse_request", "parse"):
            group = "request parsing (mds.py, email, http.client)"
        elif os.path.abspath(filename) == mds_path:
            group = "mds.py"
        elif "http/server.py" in filename or "socketserver.py" in filename:
            group = "http.server"
        elif "/email/" in filename or "http/client.py" in filename:
            group = "request parsing (mds.py, email, http.client)"
        elif "socket" in name or "socket.py" in filename:
            group = "socket I/O"
        else:
            group = "other"
        groups[group] = groups.get(group, 0.0) + own
    total = sum(groups.values()) or 1.0
    return ", ".join("%s %.0f%%" % (group, 100 * own / total)
                     for group, own in sorted(groups.items(), key=lambda kv: -kv[1]))


def profile_leaf(args):
    """cProfile of the leaf path inside an in-process MetadataServer, printed by tottime."""
    import cProfile
    import pstats
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.mds)))
    import mds as mds_module
    profiles = []
    handler = getattr(mds_module, "_Handler", None)
    original = handler.handle

    def profiled_handle(self):
        # cProfile follows one thread; each connection has its own handler thread.
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()
            profiles.append(profiler)

    handler.handle = profiled_handle
    with mds_module.MetadataServer(port=0) as server:
        # Wait out key generation; its connection's profile must not land in the figures.
        http_get(server.port, "/oauth2/v3/certs", timeout=120)
        _wait_for(lambda: len(profiles) >= 1)
        for path in (LEAF_PATH, TOKEN_PATH):
            profiles.clear()
            # The client lives in another process (spawned: this one has threads) so that it
            # never holds this GIL; wall-clock profile times are then the server's own.
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            client = context.Process(target=load_worker, args=(
                server.port, path, FLAVOR_HEADERS, 1, 120.0, args.profile_requests, "raw",
                results))
            client.start()
            outcome = results.get(timeout=150)
            client.join(10)
            _wait_for(lambda: len(profiles) >= 1)
            stats = pstats.Stats(profiles[0])
            for extra in profiles[1:]:
                stats.add(extra)
            print("== cProfile of %d keep-alive GET %s (server side, by tottime) =="
                  % (args.profile_requests, path))
            stats.sort_stats("tottime").print_stats(args.profile_top)
            print("  %d requests (%d non-200), profiled server time by where it was spent: %s"
                  "\n  (recv_into includes waiting for the client's next request)\n"
                  % (outcome["requests"], outcome["errors"], profile_shares(stats, args.mds)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mds", default=DEFAULT_MDS, help="path to mds.py (default: ../mds.py)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved baseline/leaf/token rounds (ratio of medians)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=200000,
                        help="cap on requests per load run")
    parser.add_argument("--client", choices=["raw", "http.client"], default="raw",
                        help="load generator: raw sockets (cheap, default) or http.client")
    parser.add_argument("--startup-runs", type=int, default=7)
    parser.add_argument("--waiters", type=int, default=WAITERS)
    parser.add_argument("--waiter-deadline", type=float, default=15.0,
                        help="seconds after the change to wait for every waiter's answer")
    parser.add_argument("--only", choices=["throughput", "startup", "waiters"],
                        help="run one section only")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of the leaf and token paths")
    parser.add_argument("--profile-requests", type=int, default=5000)
    parser.add_argument("--profile-top", type=int, default=10)
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return 0
    print("mds bench: %s, Python %s, %d CPUs, load average %s"
          % (args.mds, sys.version.split()[0], os.cpu_count() or 0,
             " ".join("%.2f" % x for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"))
    began = time.perf_counter()
    if args.only in (None, "throughput"):
        throughput_section(args)
    if args.only in (None, "startup"):
        startup_section(args)
    if args.only in (None, "waiters"):
        waiters_section(args)
    if args.profile:
        profile_leaf(args)
    print("total %.1f s (targets are informational; exit status is always 0)"
          % (time.perf_counter() - began))
    return 0


if __name__ == "__main__":
    sys.exit(main())
