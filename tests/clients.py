"""Helpers that run real cloud client libraries (Node, Go, Python, Java) as child
processes against a local mds server and return what they saw.

Each client program prints one JSON object on stdout; the helpers parse it.
Environment isolation lives here too (`client_env`) so every test hands the
clients the same clean view: only the server's variables, an empty HOME and
gcloud config, no proxy, and nothing AWS_*/GOOGLE_* leaking from the outer
shell.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
NODE_DIR = os.path.join(TESTS_DIR, "node")
GO_DIR = os.path.join(TESTS_DIR, "go")
BUILD_DIR = os.path.join(TESTS_DIR, ".build")
# Debian ships the Go client libraries as source under this GOPATH; building
# in GOPATH mode compiles them offline, with no module download.
DEBIAN_GOPATH = "/usr/share/gocode"
VENV_PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")
JAVA_DIR = os.path.join(TESTS_DIR, "java")
# Debian's libgoogle-auth-java and what it pulls in install their jars here, each also
# under its unversioned name; these are the ones the Google auth library loads.
DEBIAN_JAVA_JARS_DIR = "/usr/share/java"
GOOGLE_AUTH_JAVA_JARS = (
    "google-auth-library-oauth2-http", "google-auth-library-credentials",
    "google-http-client", "google-http-client-gson", "google-http-client-jackson2",
    "guava", "gson", "jackson-core", "auto-value-annotations", "jsr305",
    "opencensus-api", "opencensus-contrib-http-util", "grpc-context",
    "httpclient", "httpcore", "commons-logging", "commons-codec",
)

CLIENT_TIMEOUT_SECONDS = 60

# Outer variables that steer cloud clients; any of them leaking into a client
# would make it talk to something other than the server under test.
_LEAKY_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "GCLOUD_", "CLOUDSDK_", "ECS_", "BOTO_")
_LEAKY_NAMES = {
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "METADATA_SERVER_DETECTION", "DETECT_GCP_RETRIES", "NO_GCE_CHECK",
    "K_SERVICE", "FUNCTION_NAME", "FUNCTION_TARGET", "CLOUD_RUN_JOB",
    "GAE_SERVICE", "GAE_MODULE_NAME", "GKE_METADATA_SERVER",
    "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS", "GOFLAGS",
}

_go_build_lock = threading.Lock()
_go_binaries = {}
_go_build_dir = None


def in_ci():
    """CI sets CI=true; there a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_tool(name):
    """Return the tool's path; skip the test locally, fail it in CI, when absent."""
    path = shutil.which(name)
    if path:
        return path
    message = "required tool %r is not installed (tests/run.sh installs it)" % name
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    return None  # unreachable; pytest.skip raises


def require_path(path, what):
    """Like require_tool for a file or directory the tests depend on."""
    if os.path.exists(path):
        return path
    message = "%s not found at %s (run tests/run.sh to install it)" % (what, path)
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    return None


def client_env(server, home=None, **extra):
    """Environment for a client process that should see only `server`.

    Starts from the outer environment minus every cloud/proxy variable, adds
    `server.env`, points HOME and CLOUDSDK_CONFIG at empty directories (so no
    gcloud/ADC/AWS config file of the developer is found) and bypasses proxies
    for loopback. `extra` entries are added last; a value of None removes the
    variable. GOOGLE_APPLICATION_CREDENTIALS is deliberately left unset: ADC
    must fall through to the metadata server, and a path to anything (even an
    empty directory) makes every library fail instead of falling through.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_LEAKY_PREFIXES) and name not in _LEAKY_NAMES
    }
    if home is None:
        home = tempfile.mkdtemp(prefix="mds-client-home-")
    gcloud_config = os.path.join(home, "gcloud-config")
    os.makedirs(gcloud_config, exist_ok=True)
    env.update({
        "HOME": home,
        "CLOUDSDK_CONFIG": gcloud_config,
        "NO_PROXY": "127.0.0.1,localhost,::1",
        "no_proxy": "127.0.0.1,localhost,::1",
        # Keeps boto/botocore from reading ~/.aws of the real user even if
        # HOME handling changes; the files need not exist.
        "AWS_CONFIG_FILE": os.path.join(home, "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "aws-credentials"),
    })
    env.update({name: str(value) for name, value in dict(server.env).items()})
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def _run_json(argv, env, cwd, what):
    try:
        completed = subprocess.run(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=CLIENT_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("%s timed out after %ss; stderr:\n%s"
                             % (what, exc.timeout, (exc.stderr or b"").decode("utf-8", "replace")))
    stdout = completed.stdout.decode("utf-8", "replace")
    stderr = completed.stderr.decode("utf-8", "replace")
    if completed.returncode != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (what, completed.returncode, stdout, stderr))
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError("%s printed nothing\nstderr:\n%s" % (what, stderr))
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise AssertionError("%s did not print JSON\nstdout:\n%s\nstderr:\n%s"
                             % (what, stdout, stderr))


def run_node(script, env, args=()):
    """Run tests/node/<script> with node and return its JSON report."""
    node = require_tool("node")
    require_path(os.path.join(NODE_DIR, "node_modules"), "tests/node/node_modules")
    script_path = os.path.join(NODE_DIR, script)
    return _run_json([node, script_path] + [str(a) for a in args], env, NODE_DIR,
                     "node %s" % script)


def go_build_env():
    """Environment for `go build` in Debian's GOPATH mode, fully offline."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "GOPATH": DEBIAN_GOPATH,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
        # A cache inside the checkout survives between runs (gitignored) and
        # does not depend on HOME being writable.
        "GOCACHE": os.path.join(BUILD_DIR, "gocache"),
    })
    return env


def go_binary(program_name):
    """Build tests/go/<program_name> once per test session; return the binary path."""
    global _go_build_dir
    go = require_tool("go")
    require_path(os.path.join(DEBIAN_GOPATH, "src", "cloud.google.com", "go", "compute", "metadata"),
                 "Debian package golang-google-cloud-dev")
    require_path(os.path.join(DEBIAN_GOPATH, "src", "golang.org", "x", "oauth2", "google"),
                 "Debian package golang-golang-x-oauth2-google-dev")
    with _go_build_lock:
        if program_name in _go_binaries:
            return _go_binaries[program_name]
        if _go_build_dir is None:
            _go_build_dir = tempfile.mkdtemp(prefix="mds-go-bin-")
        output = os.path.join(_go_build_dir, program_name)
        completed = subprocess.run(
            [go, "build", "-o", output, "./" + program_name],
            cwd=GO_DIR, env=go_build_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=600,
        )
        if completed.returncode != 0:
            raise AssertionError("go build %s failed:\n%s"
                                 % (program_name, completed.stdout.decode("utf-8", "replace")))
        _go_binaries[program_name] = output
        return output


def run_go(program_name, env, args=()):
    """Build (cached) and run tests/go/<program_name>; return its JSON report."""
    binary = go_binary(program_name)
    return _run_json([binary] + [str(a) for a in args], env, GO_DIR, "go %s" % program_name)


def start_go(program_name, env, args=()):
    """Start tests/go/<program_name> for streaming output (caller reads lines, must kill)."""
    binary = go_binary(program_name)
    return subprocess.Popen([binary] + [str(a) for a in args], env=env, cwd=GO_DIR,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_python(script, env, args=()):
    """Run tests/<script> with the test interpreter in a fresh process.

    Client libraries such as google-auth read their environment variables at
    import or first use, so running them in a child with `env` is the only way
    to be sure they see exactly the server under test.
    """
    script_path = os.path.join(TESTS_DIR, script)
    # Prefer the interpreter running pytest (the venv when run via run.sh).
    python = sys.executable or VENV_PYTHON
    return _run_json([python, script_path] + [str(a) for a in args], env, TESTS_DIR,
                     "python %s" % script)


def google_auth_java_classpath():
    """The jars of Debian's libgoogle-auth-java as a classpath; skips/fails if any is missing."""
    jars = [os.path.join(DEBIAN_JAVA_JARS_DIR, name + ".jar") for name in GOOGLE_AUTH_JAVA_JARS]
    missing = [os.path.basename(jar) for jar in jars if not os.path.isfile(jar)]
    if missing:
        message = ("jars of the Java Google auth library missing from %s: %s (tests/run.sh "
                   "installs libgoogle-auth-java)" % (DEBIAN_JAVA_JARS_DIR, ", ".join(missing)))
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return os.pathsep.join(jars)


def compile_java(program_name, output_dir):
    """Compile tests/java/<program_name>.java into output_dir; return (java, classpath)."""
    javac = require_tool("javac")
    java = require_tool("java")
    classpath = google_auth_java_classpath()
    completed = subprocess.run(
        # -path: commons-logging's manifest names optional jars Debian does not ship.
        [javac, "-Xlint:all,-path", "-encoding", "UTF-8", "-d", str(output_dir),
         "-cp", classpath, os.path.join(JAVA_DIR, program_name + ".java")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
    )
    if completed.returncode != 0:
        raise AssertionError("javac %s failed:\n%s"
                             % (program_name, completed.stdout.decode("utf-8", "replace")))
    return java, os.pathsep.join([str(output_dir), classpath])


def run_java(compiled, program_name, env, args=()):
    """Run a class compiled by compile_java (`compiled` is what it returned); JSON report."""
    java, classpath = compiled
    argv = [java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
            # Java takes the home directory from the password database, not HOME.
            "-Duser.home=" + env.get("HOME", ""),
            "-cp", classpath, program_name] + [str(a) for a in args]
    return _run_json(argv, env, JAVA_DIR, "java %s" % program_name)


def stop_process(process, timeout=10):
    """Terminate a child process, killing it if it has not stopped within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class MdsCli:
    """`python3 mds.py --port 0 ARGS...` run as a user runs it, its stderr kept in a file.

    Startup waits for the log's `export GCE_METADATA_HOST=HOST:PORT` line; `port` and `url`
    come from it, `stderr()` is the log so far (all of it after `stop()`).
    """

    def __init__(self, log_dir, *args, startup_timeout=30, preexec_fn=None):
        handle, self.stderr_path = tempfile.mkstemp(prefix="mds-stderr-", suffix=".log",
                                                    dir=str(log_dir))
        with os.fdopen(handle, "wb") as stderr_file:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(REPO_ROOT, "mds.py"), "--port", "0"]
                + [str(arg) for arg in args],
                stdout=subprocess.DEVNULL, stderr=stderr_file, cwd=REPO_ROOT,
                preexec_fn=preexec_fn)
        self.port = None
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            match = re.search(r"export GCE_METADATA_HOST=((?:\[[^]]*\]|[^\s:]+):(\d+))\b",
                              self.stderr())
            if match:
                self.authority, self.port = match.group(1), int(match.group(2))
                break
            time.sleep(0.05)
        if self.port is None:
            self.stop()
            pytest.fail("mds.py did not announce its address; stderr:\n" + self.stderr(),
                        pytrace=False)
        self.url = "http://" + self.authority

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    @property
    def env(self):
        """The variables the startup log tells a user to export (GCE flavor)."""
        return dict(re.findall(r"export (GCE_METADATA_\w+)=(\S+)", self.stderr()))

    def stop(self):
        stop_process(self.process)
