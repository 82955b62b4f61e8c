"""Project-level promises: mds.py is one stdlib-only file that runs on Python
3.8+, starts from the command line with no site-packages, and CI runs the
same test command the README documents."""

import ast
import configparser
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from clients import REPO_ROOT, in_ci

MDS_PY = os.path.join(REPO_ROOT, "mds.py")
CI_RUN = os.path.join(REPO_ROOT, ".ci", "run")
README = os.path.join(REPO_ROOT, "README.md")
BENCH = os.path.join(REPO_ROOT, "bench", "bench.py")
LICENSE = os.path.join(REPO_ROOT, "LICENSE")
SETUP_CFG = os.path.join(REPO_ROOT, "setup.cfg")
TEST_COMMAND = "bash tests/run.sh"


def _venv_tool(name):
    """A console script installed next to the interpreter running the tests."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    message = "%s is not installed next to %s (tests/run.sh installs it)" % (name, sys.executable)
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    return None


def test_mds_py_runs_on_python_3_8():
    vermin = _venv_tool("vermin")
    completed = subprocess.run(
        [vermin, "--target=3.8-", "--no-tips", "--violations", MDS_PY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout.decode("utf-8", "replace")


def _module_level_imports(tree):
    """Top-level module names imported when mds.py is imported.

    Function bodies run later (optional extras are imported lazily there), but
    class bodies and top-level if/try blocks run at import time, so they count.
    """
    names = []
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            names.extend((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.append((module.split(".")[0] if node.level == 0 else module, node.lineno))
        pending.extend(ast.iter_child_nodes(node))
    return names


def test_mds_py_imports_only_the_standard_library_at_module_level():
    with open(MDS_PY, "rb") as handle:
        tree = ast.parse(handle.read(), MDS_PY)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    foreign = sorted((lineno, name) for name, lineno in _module_level_imports(tree)
                     if name not in stdlib)
    assert not foreign, "non-stdlib module-level imports in mds.py: %s" % ", ".join(
        "%s (line %d)" % (name, lineno) for lineno, name in foreign)


def test_importing_mds_skips_modules_only_optional_features_need():
    """Every module imported at startup is compile and load time before the first answer."""
    optional = ["configparser", "urllib.request", "xml.etree.ElementTree"]
    probe = ("import sys; sys.path.insert(0, %r); import mds; "
             "print(' '.join(sorted(sys.modules)))" % REPO_ROOT)
    loaded = subprocess.run([sys.executable, "-I", "-S", "-c", probe], check=True,
                            stdout=subprocess.PIPE, universal_newlines=True).stdout.split()
    assert "mds" in loaded
    assert [name for name in optional if name in loaded] == []


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url, headers=None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_cli_serves_without_site_packages():
    """`python3 -I -S mds.py` proves the server needs nothing outside the stdlib."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", MDS_PY, "--port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.monotonic() + 20
        root = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                root = _get(base + "/")
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.1)
        assert root is not None, "mds.py never answered on %s (exit %s)" % (base, process.poll())
        status, headers, body = root
        assert status == 200
        assert headers.get("Metadata-Flavor") == "Google"
        assert b"computeMetadata/" in body.split(b"\n")

        status, headers, project_id = _get(base + "/computeMetadata/v1/project/project-id",
                                           {"Metadata-Flavor": "Google"})
        assert status == 200
        assert project_id and not project_id.endswith(b"\n")
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    assert process.returncode == 0, "mds.py did not exit cleanly on SIGTERM:\n%s" % (
        output.decode("utf-8", "replace"))


def test_cli_help_lists_port_option():
    completed = subprocess.run([sys.executable, "-I", "-S", MDS_PY, "--help"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert completed.returncode == 0
    assert "--port" in completed.stdout.decode("utf-8", "replace")


def test_ci_runs_the_readme_test_command():
    with open(CI_RUN, encoding="utf-8") as handle:
        ci_script = handle.read()
    assert ci_script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in ci_script
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
    ci_commands = [line.strip() for line in ci_script.splitlines()
                   if line.strip() and not line.strip().startswith("#")]
    assert any(re.search(r"(^|\s)%s(\s|$)" % re.escape(TEST_COMMAND), line)
               for line in ci_commands), ".ci/run does not run %r" % TEST_COMMAND

    assert os.path.exists(README), "README.md is missing; it must document %r" % TEST_COMMAND
    with open(README, encoding="utf-8") as handle:
        readme_lines = [line.strip() for line in handle]
    assert any(line.lstrip("$ ").startswith(TEST_COMMAND) for line in readme_lines), \
        "README.md does not document %r" % TEST_COMMAND


def test_the_package_builds_with_the_mds_command_and_both_extras(tmp_path):
    """`pip install ".[google]"` / `".[tpm]"` from a checkout, which error messages and the
    README name, work."""
    import shutil
    import zipfile

    source = tmp_path / "source"          # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("mds.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO_ROOT, name), str(source / name))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("mds-*.whl"))
    with zipfile.ZipFile(str(wheel)) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names
                                         if n.endswith("/entry_points.txt"))).decode()
    assert "mds.py" in names
    assert re.search(r"^mds\s*=\s*mds:main$", entry_points, re.M)
    assert re.search(r'^Requires-Dist: google-auth.*extra == "google"', metadata, re.M)
    assert re.search(r'^Requires-Dist: tpm2-pytss==3\.0\.0.*extra == "tpm"', metadata, re.M)


NUMBER = r"\d+(?:\.\d+)?"


def _printed(output, pattern):
    """Fails unless a line of the bench's output matches `pattern` (NUMBER: a figure)."""
    match = re.search(pattern.replace("NUMBER", NUMBER), output, re.M)
    assert match, "the bench printed no line like %r:\n%s" % (pattern, output)


def test_the_bench_runs_every_section_and_prints_each_figure_as_a_number(tmp_path):
    """bench/bench.py on tiny settings.  Only what it prints is checked, never the figures:
    they measure the machine as much as mds."""
    # The startup section runs `python3 -m mds` in mds.py's directory with bytecode writing
    # switched back on; pointed at a copy, the __pycache__ it leaves is in tmp_path, not the
    # checkout.  TMPDIR keeps the waiters section's config file in tmp_path too.
    mds_copy = str(tmp_path / "mds.py")
    shutil.copy(MDS_PY, mds_copy)
    waiters = 20
    completed = subprocess.run(
        [sys.executable, BENCH, "--mds", mds_copy, "--duration", "0.2", "--rounds", "1",
         "--max-requests", "500", "--startup-runs", "1", "--waiters", str(waiters),
         "--waiter-deadline", "10"],
        cwd=str(tmp_path), env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    output = completed.stdout
    assert completed.returncode == 0, output

    # Throughput: req/s and latency of each load, then the two ratios, each of medians.
    for load in ("baseline (bare stdlib)", "mds leaf GET", "mds cached token GET"):
        _printed(output, r"^  %s +NUMBER req/s  p50 +NUMBER ms  p99 +NUMBER ms"
                 % re.escape(load))
    _printed(output, r"^  leaf  / baseline  req/s ratio NUMBER ")
    _printed(output, r"^  token / leaf      req/s ratio NUMBER ")

    # Startup: spawn to first answer, for the script and the module form of mds.
    _printed(output, r"^== startup: spawn to first answer of GET /")
    _printed(output, r"^  python3 mds\.py +NUMBER ms ")
    _printed(output, r"^  python3 -m mds +NUMBER ms ")

    # Waiters: how many of those asked for got the new value, how long the release took,
    # and the server's memory with and without them parked.
    _printed(output, r"^== %d concurrent wait_for_change waiters" % waiters)
    _printed(output, r"^  answered with the new value: \d+/%d " % waiters)
    _printed(output, r"^  change -> first answer NUMBER ms .*-> last answer NUMBER ms")
    _printed(output, r"^  server RSS: idle NUMBER MB, %d waiters parked NUMBER MB, "
             r"after release NUMBER MB" % waiters)


def test_the_license_is_apache_2_0_and_the_package_metadata_says_so():
    with open(LICENSE, encoding="utf-8") as handle:
        text = handle.read()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[:4] == ["Apache License", "Version 2.0, January 2004",
                         "http://www.apache.org/licenses/",
                         "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION"]
    # The nine sections of the terms, in order, then their end: a truncated or different
    # license (or another Apache version) does not have all of them.
    sections = ["Definitions.", "Grant of Copyright License.", "Grant of Patent License.",
                "Redistribution.", "Submission of Contributions.", "Trademarks.",
                "Disclaimer of Warranty.", "Limitation of Liability.",
                "Accepting Warranty or Additional Liability."]
    headings = [(index, re.match(r"\d+\. [^.]*\.", line)) for index, line in enumerate(lines)]
    headings = [(index, heading.group(0)) for index, heading in headings if heading]
    assert [heading for _, heading in headings] == \
        ["%d. %s" % (number, title) for number, title in enumerate(sections, 1)]
    assert "END OF TERMS AND CONDITIONS" in lines[headings[-1][0]:]

    config = configparser.ConfigParser()
    assert config.read(SETUP_CFG) == [SETUP_CFG]
    metadata = config["metadata"]
    assert metadata["license"] == "Apache-2.0"
    assert metadata["license_files"].split() == ["LICENSE"]
    assert "License :: OSI Approved :: Apache Software License" in \
        metadata["classifiers"].splitlines()
