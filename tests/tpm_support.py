"""A real software TPM (swtpm) for tests, and helpers that put RSA keys into it.

Keys are provisioned the way a user would: with tpm2-tools commands (the same ones the README
documents) or with tpm2-pytss.  swtpm is talked to directly (no resource manager), so after every
tpm2-tools command the transient objects it left behind are flushed: swtpm has 3 object slots.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from clients import in_ci, stop_process

SWTPM_TOOLS = ("swtpm",)
TPM2_TOOLS = ("tpm2_createprimary", "tpm2_import", "tpm2_load", "tpm2_evictcontrol",
              "tpm2_encodeobject", "tpm2_create", "tpm2_readpublic", "tpm2_flushcontext",
              "tpm2_startauthsession", "tpm2_policypcr", "tpm2_policysecret", "tpm2_createek",
              "tpm2_duplicate", "tpm2_pcrextend", "tpm2_pcrreset", "tpm2_pcrread",
              "tpm2_changeauth", "tpm2_getcap", "tpm2_print")
INSTALL_HINT = ("apt-get install swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config && "
                "pip install 'tpm2-pytss==3.0.0'")

# The owner-hierarchy "H-2" parent used by tpm2-openssl, tpm2-pytss and the seed's README.
H2_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt"


def _missing(message):
    """In CI a missing tool is a failure (the CI script must install it); locally a skip."""
    if in_ci():
        pytest.fail(message + " (CI=true: install it: %s)" % INSTALL_HINT)
    pytest.skip(message + " (install: %s)" % INSTALL_HINT)


def require_tools(names=SWTPM_TOOLS + TPM2_TOOLS):
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        _missing("TPM test tools not found: " + ", ".join(missing))


def require_tpm2_pytss():
    try:
        import tpm2_pytss  # noqa: F401
        from tpm2_pytss.tsskey import TSSPrivKey  # noqa: F401  (needs a recent cryptography)
    except ImportError as exc:
        _missing("tpm2-pytss not importable: %s" % exc)


def free_port_pair():
    """Two consecutive free loopback ports (swtpm's control channel is data port + 1)."""
    for _ in range(200):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free loopback ports")


class Swtpm:
    """One swtpm process on 127.0.0.1 with its state in `state_dir` (restartable)."""

    def __init__(self, state_dir):
        self.state_dir = str(state_dir)
        os.makedirs(self.state_dir, exist_ok=True)
        self.port = None
        self.process = None
        self.log_path = os.path.join(self.state_dir, "swtpm.log")

    @property
    def tcti(self):
        return "swtpm:host=127.0.0.1,port=%d" % self.port

    def start(self, keep_port=False):
        for _ in range(5):
            if not keep_port or self.port is None:
                self.port = free_port_pair()
            log = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", "type=tcp,port=%d,bindaddr=127.0.0.1" % self.port,
                 "--ctrl", "type=tcp,port=%d,bindaddr=127.0.0.1" % (self.port + 1),
                 "--tpmstate", "dir=" + self.state_dir,
                 "--flags", "not-need-init,startup-clear"],
                stdout=log, stderr=log)
            log.close()
            if self._wait_ready():
                return self
            self.stop()
            if keep_port:
                time.sleep(0.3)  # the old process's port may still be in TIME_WAIT
        raise RuntimeError("swtpm did not start; log: %s" % self._log_tail())

    def _wait_ready(self):
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                # The control port answers without consuming the single data connection.
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _log_tail(self):
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read()[-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self):
        if self.process is not None:
            stop_process(self.process, timeout=5)
        self.process = None

    def restart(self):
        """Power-cycle the TPM: same ports and NV state, transient state lost."""
        self.stop()
        return self.start(keep_port=True)


@pytest.fixture
def swtpm_process(tmp_path):
    """A running swtpm (object with .tcti, .restart()), killed after the test."""
    require_tools(SWTPM_TOOLS)
    require_tpm2_pytss()  # every user of the fixture drives the TPM through tpm2-pytss
    tpm = Swtpm(tmp_path / "swtpm-state").start()
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def swtpm(swtpm_process):
    """The TCTI string of a fresh swtpm: swtpm:host=127.0.0.1,port=P."""
    yield swtpm_process.tcti


class TpmTools:
    """Runs tpm2-tools against one TPM, in one work directory, flushing leftovers."""

    def __init__(self, tcti, workdir):
        require_tools(TPM2_TOOLS)
        self.tcti = tcti
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.env = dict(os.environ, TPM2TOOLS_TCTI=tcti, TSS2_LOG="all+NONE")
        self.log = []  # the exact commands run, for the README cross-check

    def path(self, name):
        return os.path.join(self.workdir, name)

    def run(self, *args, flush=True):
        args = [str(arg) for arg in args]
        self.log.append(" ".join(args))
        result = subprocess.run(args, cwd=self.workdir, env=self.env, capture_output=True,
                                timeout=60)
        if flush:
            # tpm2-tools save contexts but leave objects loaded when there is no resource
            # manager; without this the 3 swtpm object slots fill after two commands.
            # (tpm2_encodeobject also leaves a loaded session behind; saved policy sessions
            # of a multi-command sequence are "saved", not "loaded", and survive this.)
            for what in ("-t", "-l"):
                subprocess.run(["tpm2_flushcontext", what], cwd=self.workdir, env=self.env,
                               capture_output=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError("%s failed (%d): %s" % (
                " ".join(args), result.returncode, result.stderr.decode(errors="replace")))
        return result.stdout

    # -- parents ---------------------------------------------------------------------------

    def h2_primary(self, name="primary.ctx", owner_password=None):
        """The owner-hierarchy ECC P-256 "H-2" primary TSS2 key files assume."""
        with open(self.path("unique.dat"), "wb") as handle:
            handle.write(b"\x00\x00")
        args = ["tpm2_createprimary", "-C", "o", "-G", "ecc", "-g", "sha256",
                "-c", name, "-a", H2_ATTRIBUTES, "-u", "unique.dat", "-Q"]
        if owner_password:
            args += ["-P", owner_password]
        self.run(*args)
        return name

    def create_ek(self, prefix="ek"):
        """RSA endorsement key: returns (context file, TPM2B_PUBLIC file, name hex)."""
        ctx, pub, name = prefix + ".ctx", prefix + ".pub", prefix + ".name"
        self.run("tpm2_createek", "-c", ctx, "-G", "rsa", "-u", pub, "-Q")
        self.run("tpm2_readpublic", "-c", ctx, "-o", prefix + ".pem", "-f", "PEM",
                 "-n", name, "-Q")
        with open(self.path(name), "rb") as handle:
            return ctx, pub, handle.read().hex()

    # -- keys ------------------------------------------------------------------------------

    def pcr_policy(self, selection="sha256:23", name="pcr.policy"):
        """Policy digest of PolicyPCR over the PCRs' current values."""
        self.run("tpm2_startauthsession", "-S", "policy_session.ctx", flush=False)
        try:
            self.run("tpm2_policypcr", "-S", "policy_session.ctx", "-l", selection, "-L", name,
                     flush=False)
        finally:
            self.run("tpm2_flushcontext", "policy_session.ctx")
        return name

    def import_key(self, key_pem_path, parent_ctx, prefix="key", key_password=None,
                   policy=None):
        """Import an existing RSA private key (PEM) under `parent_ctx`: (pub, prv) files."""
        pub, prv = prefix + ".pub", prefix + ".prv"
        args = ["tpm2_import", "-C", parent_ctx, "-G", "rsa2048:rsassa:null", "-g", "sha256",
                "-i", key_pem_path, "-u", pub, "-r", prv, "-Q"]
        if key_password:
            args += ["-p", key_password]
        if policy:
            args += ["-L", policy]
        self.run(*args)
        return pub, prv

    def create_key(self, parent_ctx, prefix="tpmkey", key_password=None):
        """Generate an RSA signing key inside the TPM: (pub, prv) files."""
        pub, prv = prefix + ".pub", prefix + ".prv"
        args = ["tpm2_create", "-C", parent_ctx, "-G", "rsa2048:rsassa:null", "-g", "sha256",
                "-u", pub, "-r", prv, "-Q"]
        if key_password:
            args += ["-p", key_password]
        self.run(*args)
        return pub, prv

    def persist(self, parent_ctx, pub, prv, handle, parent_auth=None):
        """tpm2_load + tpm2_evictcontrol: the key at a persistent handle."""
        args = ["tpm2_load", "-C", parent_ctx, "-u", pub, "-r", prv, "-c", "loaded.ctx", "-Q"]
        if parent_auth:
            args += ["-P", parent_auth]
        self.run(*args, flush=False)
        try:
            self.run("tpm2_evictcontrol", "-C", "o", "-c", "loaded.ctx", "0x%08x" % handle)
        finally:
            self.run("tpm2_flushcontext", "-t")
        return handle

    def encode(self, parent_ctx, pub, prv, out):
        """TSS2 PRIVATE KEY PEM with tpm2_encodeobject; returns its absolute path."""
        self.run("tpm2_encodeobject", "-C", parent_ctx, "-u", pub, "-r", prv, "-o", out)
        return self.path(out)

    def readpublic_pem(self, obj):
        out = "readpublic_%s.pem" % hashlib.sha1(str(obj).encode()).hexdigest()[:8]
        self.run("tpm2_readpublic", "-c", obj, "-f", "PEM", "-o", out, "-Q")
        with open(self.path(out), "rb") as handle:
            return handle.read()

    # -- transfer to another TPM under its EK ----------------------------------------------

    def duplicate_for_parent(self, parent_public, key_pem_path, prefix="dup", key_password=None):
        """Sender side: wrap a private key for a remote parent (only its public is needed)."""
        pub, dpriv, seed = prefix + ".pub", prefix + ".dpriv", prefix + ".seed"
        args = ["tpm2_duplicate", "-U", parent_public, "-G", "rsa", "-k", key_pem_path,
                "-u", pub, "-r", dpriv, "-s", seed]
        if key_password:
            args += ["-p", key_password]
        self.run(*args)
        return pub, dpriv, seed

    def import_under_ek(self, ek_ctx, pub, dpriv, seed, prefix="transferred"):
        """Receiver side: tpm2_import under the EK, authorised by PolicySecret(endorsement)."""
        prv = prefix + ".prv"
        self.run("tpm2_startauthsession", "--policy-session", "-S", "ek_session.ctx",
                 flush=False)
        try:
            self.run("tpm2_policysecret", "-S", "ek_session.ctx", "-c", "e", flush=False)
            self.run("tpm2_import", "-C", ek_ctx, "-G", "rsa", "-u", pub, "-i", dpriv,
                     "-s", seed, "-r", prv, "-P", "session:ek_session.ctx", flush=False)
        finally:
            self.run("tpm2_flushcontext", "ek_session.ctx")
        return prv

    def persist_under_ek(self, ek_ctx, pub, prv, handle):
        self.run("tpm2_startauthsession", "--policy-session", "-S", "ek_session.ctx",
                 flush=False)
        try:
            self.run("tpm2_policysecret", "-S", "ek_session.ctx", "-c", "e", flush=False)
            self.run("tpm2_load", "-C", ek_ctx, "-u", pub, "-r", prv, "-c", "loaded.ctx",
                     "-P", "session:ek_session.ctx", flush=False)
        finally:
            self.run("tpm2_flushcontext", "ek_session.ctx", flush=False)
        try:
            self.run("tpm2_evictcontrol", "-C", "o", "-c", "loaded.ctx", "0x%08x" % handle)
        finally:
            self.run("tpm2_flushcontext", "-t")
        return handle

    # -- PCRs ------------------------------------------------------------------------------

    def pcr_extend(self, index=23, byte="00"):
        self.run("tpm2_pcrextend", "%d:sha256=%s" % (index, byte * 32))

    def pcr_reset(self, index=23):
        self.run("tpm2_pcrreset", str(index))


# -- tpm2-pytss provisioning (the "TSS2 PEM from tpm2-pytss" path) ------------------------------

def pytss_import_key(tcti, key_pem_bytes, key_password=None):
    """Import a known RSA private key under the owner H-2 parent with tpm2-pytss (Import of a
    software-wrapped duplicate) and return the TSS2 PRIVATE KEY PEM that TSSPrivKey writes."""
    require_tpm2_pytss()
    from tpm2_pytss import (ESAPI, ESYS_TR, TPM2B_DATA, TPM2B_PUBLIC, TPM2B_SENSITIVE,
                            TPM2B_SENSITIVE_CREATE, TPMA_OBJECT, TPMT_SYM_DEF_OBJECT, TPM2_ALG)
    from tpm2_pytss.tsskey import TSSPrivKey, _parent_ecc_template
    from tpm2_pytss.utils import wrap

    attributes = TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT
    public = TPM2B_PUBLIC.from_pem(key_pem_bytes, objectAttributes=attributes)
    sensitive = TPM2B_SENSITIVE.from_pem(key_pem_bytes)
    if key_password:
        sensitive.sensitiveArea.authValue = key_password.encode()
    with ESAPI(tcti) as ectx:
        parent = ectx.create_primary(TPM2B_SENSITIVE_CREATE(),
                                     TPM2B_PUBLIC(publicArea=_parent_ecc_template),
                                     ESYS_TR.OWNER)[0]
        try:
            parent_public = ectx.read_public(parent)[0]
            _, duplicate, seed = wrap(parent_public.publicArea, public, sensitive)
            private = ectx.import_(parent, TPM2B_DATA(), public, duplicate, seed,
                                   TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL))
        finally:
            ectx.flush_context(parent)
    return TSSPrivKey(private, public, empty_auth=not key_password).to_pem()


def pytss_generate_key(tcti, key_password=None):
    """Generate an RSA key inside the TPM with tpm2-pytss; returns its TSS2 PEM."""
    require_tpm2_pytss()
    from tpm2_pytss import ESAPI
    from tpm2_pytss.tsskey import TSSPrivKey
    with ESAPI(tcti) as ectx:
        key = TSSPrivKey.create_rsa(ectx, password=key_password.encode() if key_password
                                    else None)
    return key.to_pem()


class RecordingProxy:
    """TCP relay in front of swtpm (data and control ports) keeping what the client sent,
    so a test can check which command parameters crossed the "bus" in the clear."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._listeners = []
        self._stop = threading.Event()
        self.port = None

    @property
    def tcti(self):
        return "swtpm:host=127.0.0.1,port=%d" % self.port

    def start(self):
        for _ in range(20):
            port = free_port_pair()
            listeners = []
            try:
                for offset in (0, 1):
                    listener = socket.socket()
                    listeners.append(listener)
                    listener.bind(("127.0.0.1", port + offset))
                    listener.listen(8)
            except OSError:
                for listener in listeners:
                    listener.close()
                continue
            self.port, self._listeners = port, listeners
            for offset, listener in enumerate(listeners):
                threading.Thread(target=self._accept, args=(listener, offset),
                                 daemon=True).start()
            return self
        raise RuntimeError("no port pair for the proxy")

    def _accept(self, listener, offset):
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port + offset))
            except OSError:
                # The TPM behind the proxy is gone (teardown, or a restart under test): the
                # client sees its connection close, as it would talking to the TPM directly.
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, offset == 0),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source, destination, record):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self.sent += data
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, destination):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def stop(self):
        self._stop.set()
        for listener in self._listeners:
            listener.close()
