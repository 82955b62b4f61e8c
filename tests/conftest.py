"""Shared pytest fixtures: running mds servers and isolated client environments."""

import copy
import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# Appended, not prepended, so a PYTHONPATH shim for `import mds` (used while a
# draft is not yet spliced) still wins over the checkout's mds.py.
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.append(_path)

import clients  # noqa: E402  (needs TESTS_DIR on sys.path)


def _import_mds():
    try:
        import mds
    except ImportError as exc:
        pytest.fail("cannot import mds: %s" % exc, pytrace=False)
    return mds


@pytest.fixture
def mds_server_factory():
    """Start mds.MetadataServer instances on free ports; all are stopped at teardown.

    Call it with the MetadataServer keyword arguments, e.g.
    `mds_server_factory(config={...}, flavor="ec2")`.
    """
    mds = _import_mds()
    started = []

    def start(config=None, **options):
        options.setdefault("port", 0)
        server = mds.MetadataServer(config=config, **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def gce_server(request, mds_server_factory):
    """A started GCE-flavour server; default config is mds's built-in default VM.

    Tests choose another config with
    `@pytest.mark.parametrize("gce_server", [config], indirect=True)`.
    """
    # A private copy: parametrize shares one dict between tests, and a server
    # may edit its document in place (server.update).
    config = copy.deepcopy(getattr(request, "param", None))
    return mds_server_factory(config=config, flavor="gce")


@pytest.fixture
def client_env(tmp_path):
    """Build an isolated environment for a client process talking to a server.

    Usage: `env = client_env(server, EXTRA_VAR="x")`; see clients.client_env.
    Each call gets its own empty HOME under the test's tmp_path.
    """
    counter = [0]

    def build(server, **extra):
        counter[0] += 1
        home = tmp_path / ("client-home-%d" % counter[0])
        home.mkdir()
        return clients.client_env(server, home=str(home), **extra)

    return build
