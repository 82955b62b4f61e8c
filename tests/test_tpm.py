"""TpmSigner against a real software TPM (swtpm): every way of getting a key into a TPM, every
option of the issue, signatures checked with `cryptography` against the known public key."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import mds
import tpm_support  # tests/ is on sys.path via conftest.py
from clients import stop_process
from tpm_support import TpmTools, pytss_generate_key, pytss_import_key, require_tpm2_pytss
from tpm_support import swtpm, swtpm_process  # noqa: F401,F811  (pytest fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = b"header.payload-to-sign"


@pytest.fixture(scope="module")
def known_key():
    """A service-account-like RSA key made in software, so signatures can be checked."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def key_pem(known_key, tmp_path):
    # PKCS#8, the form of "private_key" in a Google service-account JSON file
    path = tmp_path / "sa_key.pem"
    path.write_bytes(known_key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return str(path)


@pytest.fixture
def tools(swtpm, tmp_path):
    require_tpm2_pytss()
    return TpmTools(swtpm, tmp_path / "work")


def verify(public_key, signature, message=MESSAGE):
    public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def public_key_of(signer):
    n, e = signer.public_numbers()
    return rsa.RSAPublicNumbers(e, n).public_key()


def assert_signs_with(signer, public_key):
    signature = signer.sign(MESSAGE)
    assert len(signature) == 256
    verify(public_key, signature)
    with pytest.raises(InvalidSignature):
        verify(public_key, signature, MESSAGE + b"x")
    assert signer.public_numbers() == (public_key.public_numbers().n,
                                       public_key.public_numbers().e)
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signer.fingerprint() == hashlib.sha256(spki).hexdigest()
    assert signer.fingerprint() in signer.describe()


# -- the three ways a key gets into a TPM ----------------------------------------------------------

def test_imported_key_at_persistent_handle(tools, swtpm, key_pem, known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    tools.persist(parent, pub, prv, 0x81010002)
    signer = mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm,
                                        tpm_persistent_handle="0x81010002")
    try:
        assert_signs_with(signer, known_key.public_key())
        assert "0x81010002" in signer.describe()
        assert len(signer.key_id) == 40
    finally:
        signer.close()


def test_tss2_pem_from_tpm2_tools(tools, swtpm, key_pem, known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "key.tss.pem")
    with open(pem_path, "rb") as handle:
        assert handle.read().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    signer = mds.TpmSigner(tcti=swtpm, key_file=pem_path, key_id="my-google-key-id")
    try:
        assert_signs_with(signer, known_key.public_key())
        assert signer.key_id == "my-google-key-id"
    finally:
        signer.close()


def test_tss2_pem_from_tpm2_pytss(swtpm, tmp_path, key_pem, known_key):
    with open(key_pem, "rb") as handle:
        pem = pytss_import_key(swtpm, handle.read())
    path = tmp_path / "pytss.tss.pem"
    path.write_bytes(pem)
    with mds.TpmSigner(tcti=swtpm, key_file=str(path)) as signer:
        assert_signs_with(signer, known_key.public_key())


def test_key_generated_inside_tpm_persistent(tools, swtpm):
    parent = tools.h2_primary()
    pub, prv = tools.create_key(parent)
    tools.persist(parent, pub, prv, 0x81010003)
    # the public key the user would upload with `gcloud iam service-accounts keys upload`
    tools_public = serialization.load_pem_public_key(tools.readpublic_pem("0x81010003"))
    with mds.TpmSigner(tcti=swtpm, persistent_handle=0x81010003) as signer:
        assert signer.public_numbers() == (tools_public.public_numbers().n,
                                           tools_public.public_numbers().e)
        assert_signs_with(signer, tools_public)


def test_generated_key_certificate_for_gcloud_upload(tools, swtpm):
    """Generate-and-upload: the X.509 certificate `gcloud iam service-accounts keys upload`
    takes, self-signed inside the TPM by mds's certificate builder."""
    from cryptography import x509
    parent = tools.h2_primary()
    pub, prv = tools.create_key(parent)
    pem_path = tools.encode(parent, pub, prv, "generated.tss.pem")
    tools_public = serialization.load_pem_public_key(
        tools.run("tpm2_print", "-t", "TPM2B_PUBLIC", "-f", "pem", tools.path(pub)))
    with mds.TpmSigner(tcti=swtpm, key_file=pem_path) as signer:
        cert_pem = mds.pem_encode("CERTIFICATE", mds.x509_self_signed(
            signer, "metadata-sa@project.iam.gserviceaccount.com"))
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    assert cert.public_key().public_numbers() == tools_public.public_numbers()
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                             cert.signature_hash_algorithm)


def test_key_generated_inside_tpm_pytss_pem(tools, swtpm, tmp_path):
    path = tmp_path / "generated.tss.pem"
    pem = pytss_generate_key(swtpm)
    path.write_bytes(pem)
    # cross-check the public half with tpm2-tools (tpm2_print of the file's TPM2B_PUBLIC)
    from tpm2_pytss.tsskey import TSSPrivKey
    public_blob = tmp_path / "work" / "generated.pub"
    public_blob.write_bytes(TSSPrivKey.from_pem(pem).public.marshal())
    tools_public = serialization.load_pem_public_key(
        tools.run("tpm2_print", "-t", "TPM2B_PUBLIC", "-f", "pem", str(public_blob)))
    with mds.TpmSigner(tcti=swtpm, key_file=str(path)) as signer:
        assert_signs_with(signer, tools_public)


def test_transferred_key_under_endorsement_key(tools, swtpm, key_pem, known_key):
    # Target TPM publishes its EK public; the sender wraps the service-account key for it.
    ek_ctx, ek_pub, _ = tools.create_ek()
    pub, dpriv, seed = tools.duplicate_for_parent(ek_pub, key_pem, key_password="bar")
    # Target TPM imports under its EK (PolicySecret endorsement) and writes a key file.
    prv = tools.import_under_ek(ek_ctx, pub, dpriv, seed)
    pem_path = tools.encode(ek_ctx, pub, prv, "transferred.tss.pem")
    with mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm, tpm_key_file=pem_path,
                                    tpm_ek_parent=True, tpm_key_pass="bar") as signer:
        assert_signs_with(signer, known_key.public_key())
        assert "EK parent" in signer.describe()
    # without --tpm-ek-parent the key is tried under the owner parent and refused clearly
    with pytest.raises(mds.TpmError, match="TPM_RC_INTEGRITY.*--tpm-ek-parent"):
        mds.TpmSigner(tcti=swtpm, key_file=pem_path, key_password="bar")
    # and once persisted, the handle works with the same flags
    tools.persist_under_ek(ek_ctx, pub, prv, 0x81008001)
    with mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm, tpm_persistent_handle=0x81008001,
                                    tpm_ek_parent=True, tpm_key_pass="bar") as signer:
        assert_signs_with(signer, known_key.public_key())


# -- authorisation: password and PCR policy ------------------------------------------------------

def test_key_password_right_and_wrong(tools, swtpm, key_pem, known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent, key_password="s3cret")
    pem_path = tools.encode(parent, pub, prv, "pw.tss.pem")
    tools.persist(parent, pub, prv, 0x81010004)
    with mds.TpmSigner(tcti=swtpm, key_file=pem_path, key_password="s3cret") as signer:
        assert_signs_with(signer, known_key.public_key())
        assert "s3cret" not in signer.describe() and "s3cret" not in repr(signer)
    with mds.TpmSigner(tcti=swtpm, persistent_handle=0x81010004,
                       key_password="s3cret") as signer:
        assert_signs_with(signer, known_key.public_key())
    for options in (dict(key_file=pem_path), dict(persistent_handle=0x81010004)):
        with pytest.raises(mds.TpmError) as failure:
            mds.TpmSigner(tcti=swtpm, key_password="n0t-the-Pa55", **options)
        message = str(failure.value)
        assert "wrong TPM key password" in message and "TPM_RC_AUTH_FAIL" in message
        assert "n0t-the-Pa55" not in message and "s3cret" not in message
        assert "\n" not in message


def test_parent_password_for_owner_hierarchy(tools, swtpm, key_pem, known_key):
    tools.run("tpm2_changeauth", "-c", "o", "owner-pw-123")
    parent = tools.h2_primary(owner_password="owner-pw-123")
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "owner_pw.tss.pem")
    with mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm, tpm_key_file=pem_path,
                                    tpm_parent_pass="owner-pw-123") as signer:
        assert_signs_with(signer, known_key.public_key())
    with pytest.raises(mds.TpmError) as failure:
        mds.TpmSigner(tcti=swtpm, key_file=pem_path, parent_password="not-owner-pw")
    assert "wrong TPM parent password" in str(failure.value)
    assert "not-owner-pw" not in str(failure.value)


def test_pcr_policy_holds_breaks_and_recovers(tools, swtpm, key_pem, known_key):
    parent = tools.h2_primary()
    policy = tools.pcr_policy("sha256:23")
    pub, prv = tools.import_key(key_pem, parent, policy=policy)
    pem_path = tools.encode(parent, pub, prv, "pcr.tss.pem")
    signer = mds.TpmSigner.from_options(tpm=True, tpm_path=swtpm, tpm_key_file=pem_path,
                                        tpm_pcrs="sha256:23")
    try:
        assert_signs_with(signer, known_key.public_key())
        tools.pcr_extend(23)
        with pytest.raises(mds.TpmError) as failure:
            signer.sign(MESSAGE)
        assert "PCR policy does not hold" in str(failure.value)
        assert "sha256:23" in str(failure.value)
        assert failure.value.status >= 500
        # a new server started while the PCR is off fails at startup with the same reason
        with pytest.raises(mds.TpmError, match="PCR policy does not hold"):
            mds.TpmSigner(tcti=swtpm, key_file=pem_path, pcrs="23")
        tools.pcr_reset(23)
        verify(known_key.public_key(), signer.sign(MESSAGE))
    finally:
        signer.close()
    # a policy-only key refuses plain password use with a hint
    with pytest.raises(mds.TpmError, match="--tpm-pcrs"):
        mds.TpmSigner(tcti=swtpm, key_file=pem_path)


# -- encrypted sessions ------------------------------------------------------------------------

def test_session_encryption_with_ek_name(tools, swtpm_process, key_pem, known_key):
    _, _, ek_name = tools.create_ek()
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent, key_password="pw-sekrit-123")
    tools.persist(parent, pub, prv, 0x81010005)
    digest = hashlib.sha256(MESSAGE).digest()

    proxy = tpm_support.RecordingProxy(swtpm_process.port).start()
    try:
        with mds.TpmSigner(tcti=proxy.tcti, persistent_handle=0x81010005,
                           key_password="pw-sekrit-123",
                           session_encrypt_with_name=ek_name) as signer:
            assert_signs_with(signer, known_key.public_key())
        assert proxy.sent, "the proxy saw no TPM traffic"
        assert digest not in bytes(proxy.sent), "Sign's digest crossed the wire in clear"
        assert b"pw-sekrit-123" not in bytes(proxy.sent)  # an HMAC proves it, not the password
        # control: the same signature without --tpm-session-encrypt-with-name is visible
        del proxy.sent[:]
        with mds.TpmSigner(tcti=proxy.tcti, persistent_handle=0x81010005,
                           key_password="pw-sekrit-123") as signer:
            signer.sign(MESSAGE)
        assert digest in bytes(proxy.sent)
        assert b"pw-sekrit-123" in bytes(proxy.sent)
    finally:
        proxy.stop()

    wrong_name = "000b" + "00" * 32
    with pytest.raises(mds.TpmError, match="does not match --tpm-session-encrypt-with-name"):
        mds.TpmSigner(tcti=swtpm_process.tcti, persistent_handle=0x81010005,
                      key_password="pw-sekrit-123", session_encrypt_with_name=wrong_name)


def test_session_encryption_with_pcr_policy_and_key_file(tools, swtpm, key_pem, known_key):
    _, _, ek_name = tools.create_ek()
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent, policy=tools.pcr_policy("sha256:23"))
    pem_path = tools.encode(parent, pub, prv, "pcr_enc.tss.pem")
    with mds.TpmSigner(tcti=swtpm, key_file=pem_path, pcrs="23",
                       session_encrypt_with_name=ek_name) as signer:
        assert_signs_with(signer, known_key.public_key())
        assert "encrypted sessions" in signer.describe()


def test_session_encryption_with_a_pcr_and_password_policy(tools, swtpm, key_pem, known_key):
    # PolicyPCR + PolicyPassword, the key password and an encrypted session together: the
    # TPM must sign our digest (with PolicyPassword sent in clear beside parameter
    # encryption, it signed another one and every token failed verification).
    _, _, ek_name = tools.create_ek()
    parent = tools.h2_primary()
    tools.run("tpm2_startauthsession", "-S", "pcrpw.ctx", flush=False)
    tools.run("tpm2_policypcr", "-S", "pcrpw.ctx", "-l", "sha256:23", flush=False)
    tools.run("tpm2_policypassword", "-S", "pcrpw.ctx", "-L", "pcrpw.policy", flush=False)
    tools.run("tpm2_flushcontext", "pcrpw.ctx")
    pub, prv = tools.import_key(key_pem, parent, key_password="pcr-and-pw-77",
                                policy="pcrpw.policy", prefix="pcrpw")
    pem_path = tools.encode(parent, pub, prv, "pcrpw.tss.pem")
    for encrypted in (None, ek_name):
        with mds.TpmSigner(tcti=swtpm, key_file=pem_path, pcrs="23",
                           key_password="pcr-and-pw-77",
                           session_encrypt_with_name=encrypted) as signer:
            for number in range(3):
                verify(known_key.public_key(), signer.sign(MESSAGE + b"%d" % number),
                       MESSAGE + b"%d" % number)


def test_a_signature_that_does_not_verify_is_refused(tools, swtpm, key_pem, known_key):
    # As if the TPM (or the TSS between us) signed something else: the public key catches it.
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "check.tss.pem")
    with mds.TpmSigner(tcti=swtpm, key_file=pem_path) as signer:
        signer._n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
        with pytest.raises(mds.TpmError) as caught:
            signer.sign(MESSAGE)
        assert caught.value.status == 502 and "does not verify" in str(caught.value)


def test_a_failed_rebuild_after_a_tpm_restart_is_retried_later(tools, swtpm_process, key_pem,
                                                               known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "rebuild.tss.pem")
    with mds.TpmSigner(tcti=swtpm_process.tcti, key_file=pem_path) as signer:
        verify(known_key.public_key(), signer.sign(MESSAGE))
        swtpm_process.restart()
        for number in range(3):       # another user holds every object slot for a moment
            tools.run("tpm2_createprimary", "-C", "o", "-c", "hog%d.ctx" % number, "-Q",
                      flush=False)
        with pytest.raises(mds.TpmError) as caught:
            signer.sign(MESSAGE)
        assert caught.value.status == 502 and "OBJECT_MEMORY" in str(caught.value)
        tools.run("tpm2_flushcontext", "-t")
        for _ in range(3):            # the TPM is fine again, and so is every later request
            verify(known_key.public_key(), signer.sign(MESSAGE))


def test_a_tpm_that_stops_answering_gets_requests_a_bounded_wait(tools, swtpm_process,
                                                                 key_pem, known_key,
                                                                 monkeypatch):
    import signal

    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "hang.tss.pem")
    monkeypatch.setattr(mds, "MINT_BUDGET", 1.0)
    with mds.TpmSigner(tcti=swtpm_process.tcti, key_file=pem_path) as signer:
        swtpm_process.process.send_signal(signal.SIGSTOP)
        first = threading.Thread(target=lambda: signer.sign(MESSAGE), daemon=True)
        try:
            first.start()
            time.sleep(0.3)           # the first signature now waits on the frozen TPM
            with pytest.raises(mds.TpmError) as caught:
                signer.sign(MESSAGE)
            assert caught.value.status == 503 and "not answering" in str(caught.value)
        finally:
            swtpm_process.process.send_signal(signal.SIGCONT)
        first.join(30)
        verify(known_key.public_key(), signer.sign(MESSAGE))


# -- startup failures: one clear line ----------------------------------------------------------

def test_startup_errors_are_one_clear_line(swtpm, tmp_path):
    with pytest.raises(mds.TpmError, match=r"no key at TPM persistent handle 0x81010099"):
        mds.TpmSigner(tcti=swtpm, persistent_handle=0x81010099)
    with pytest.raises(mds.TpmError, match="cannot read TPM key file"):
        mds.TpmSigner(tcti=swtpm, key_file=str(tmp_path / "absent.pem"))
    not_tss = tmp_path / "plain.pem"
    not_tss.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(mds.TpmError, match="not a 'TSS2 PRIVATE KEY' PEM"):
        mds.TpmSigner(tcti=swtpm, key_file=str(not_tss))
    garbage = tmp_path / "garbage.tss.pem"
    garbage.write_text("-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n")
    with pytest.raises(mds.TpmError, match="cannot parse TSS2 PRIVATE KEY"):
        mds.TpmSigner(tcti=swtpm, key_file=str(garbage))
    with pytest.raises(mds.TpmError, match="cannot open the TPM at swtpm:host=127.0.0.1,port=1"):
        mds.TpmSigner(tcti="127.0.0.1:1", persistent_handle=0x81010002)
    with pytest.raises(mds.TpmError, match="exactly one of"):
        mds.TpmSigner(tcti=swtpm)
    with pytest.raises(mds.TpmError, match="--tpm-pcrs"):
        mds.TpmSigner(tcti=swtpm, persistent_handle=0x81010002, pcrs="sha256:24")


def test_tcti_and_pcr_option_forms():
    assert mds.normalize_tcti("/dev/tpmrm0") == "device:/dev/tpmrm0"
    assert mds.normalize_tcti("/dev/tpm0") == "device:/dev/tpm0"
    assert mds.normalize_tcti(None) == "device:/dev/tpmrm0"
    assert mds.normalize_tcti("device:/dev/tpm0") == "device:/dev/tpm0"
    assert mds.normalize_tcti("swtpm:host=127.0.0.1,port=2321") == \
        "swtpm:host=127.0.0.1,port=2321"
    assert mds.normalize_tcti("swtpm:path=/run/swtpm.sock") == "swtpm:path=/run/swtpm.sock"
    assert mds.normalize_tcti("127.0.0.1:2321") == "swtpm:host=127.0.0.1,port=2321"
    assert mds.parse_pcr_selection("23") == [("sha256", [23])]
    assert mds.parse_pcr_selection("sha256:0,7,23") == [("sha256", [0, 7, 23])]
    assert mds.parse_pcr_selection("23,7") == [("sha256", [7, 23])]
    assert mds.parse_pcr_selection("") == []


def test_unix_socket_tcti(tmp_path, tools, key_pem, known_key):
    """swtpm:path= (a unix-socket swtpm) as --tpm-path accepts it."""
    state = tmp_path / "unix-state"
    state.mkdir()
    socket_path = str(tmp_path / "swtpm.sock")
    process = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--server", "type=unixio,path=" + socket_path,
         "--ctrl", "type=unixio,path=" + socket_path + ".ctrl", "--tpmstate",
         "dir=" + str(state), "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(socket_path):
                break
            time.sleep(0.05)
        unix_tools = TpmTools("swtpm:path=" + socket_path, tmp_path / "unix-work")
        parent = unix_tools.h2_primary()
        pub, prv = unix_tools.import_key(key_pem, parent)
        pem_path = unix_tools.encode(parent, pub, prv, "unix.tss.pem")
        with mds.TpmSigner(tcti="swtpm:path=" + socket_path, key_file=pem_path) as signer:
            assert_signs_with(signer, known_key.public_key())
    finally:
        stop_process(process)


# -- robustness --------------------------------------------------------------------------------

def test_survives_tpm_restart_and_frees_slots(tools, swtpm_process, key_pem, known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "restart.tss.pem")
    tools.persist(parent, pub, prv, 0x81010006)
    file_signer = mds.TpmSigner(tcti=swtpm_process.tcti, key_file=pem_path)
    handle_signer = mds.TpmSigner(tcti=swtpm_process.tcti, persistent_handle=0x81010006)
    try:
        for _ in range(5):  # more than the 3 object slots: each use must flush
            verify(known_key.public_key(), file_signer.sign(MESSAGE))
        assert tools.run("tpm2_getcap", "handles-transient", flush=False).strip() == b""
        assert tools.run("tpm2_getcap", "handles-loaded-session", flush=False).strip() == b""
        swtpm_process.restart()  # power cycle: socket dropped, saved contexts invalid
        verify(known_key.public_key(), file_signer.sign(MESSAGE))
        verify(known_key.public_key(), handle_signer.sign(MESSAGE))
    finally:
        file_signer.close()
        handle_signer.close()


def test_one_connection_many_threads(tools, swtpm, key_pem, known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "threads.tss.pem")
    signer = mds.TpmSigner(tcti=swtpm, key_file=pem_path)
    errors, signatures = [], []

    def worker(index):
        try:
            message = MESSAGE + str(index).encode()
            signatures.append((message, signer.sign(message)))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    signer.close()
    assert not errors
    assert len(signatures) == 12
    for message, signature in signatures:
        verify(known_key.public_key(), signature, message)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_jwt_signed_in_tpm_verifies(tools, swtpm, key_pem, known_key):
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_pem, parent)
    pem_path = tools.encode(parent, pub, prv, "jwt.tss.pem")
    claims = {"iss": "sa@proj.iam.gserviceaccount.com", "aud": "https://example.test",
              "iat": 1700000000, "exp": 1700003600}
    with mds.TpmSigner(tcti=swtpm, key_file=pem_path, key_id="kid-123") as signer:
        if hasattr(mds, "jwt_encode"):
            token = mds.jwt_encode(claims, signer)
        else:  # before crypto_draft.py is spliced: a minimal RS256 JWT over the signer
            header = {"alg": "RS256", "typ": "JWT", "kid": signer.key_id}
            signing_input = "%s.%s" % (_b64url(json.dumps(header).encode()),
                                       _b64url(json.dumps(claims).encode()))
            token = signing_input + "." + _b64url(signer.sign(signing_input.encode()))
    header_b64, payload_b64, signature_b64 = token.split(".")
    signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    verify(known_key.public_key(), signature, ("%s.%s" % (header_b64, payload_b64)).encode())
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    assert header["alg"] == "RS256" and header["kid"] == "kid-123"
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    assert payload["iss"] == claims["iss"]


def test_missing_tool_fails_in_ci_and_skips_locally(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tpm-tool"):
        tpm_support.require_tools(("no-such-tpm-tool",))
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-such-tpm-tool"):
        tpm_support.require_tools(("no-such-tpm-tool",))


def test_missing_tpm2_pytss_names_the_extra(tmp_path):
    """Without tpm2_pytss on the path, the first use says how to install it, in one line."""
    module_dirs = [os.path.dirname(os.path.abspath(mds.__file__)), REPO]
    code = (
        "import sys; sys.path[:0] = %r\n"
        "import mds\n"
        "try:\n"
        "    mds.TpmSigner.from_options(tpm=True, tpm_path='127.0.0.1:1',\n"
        "                               tpm_persistent_handle='0x81010002')\n"
        "except mds.TpmError as exc:\n"
        "    print('TPMERROR', exc)\n" % (module_dirs,))
    # -I -S: no site-packages, no PYTHONPATH, so tpm2_pytss cannot be found
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                            timeout=60, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr.decode()
    lines = [line for line in result.stdout.decode().splitlines() if line.startswith("TPMERROR")]
    assert len(lines) == 1, result.stdout.decode() + result.stderr.decode()
    assert 'pip install tpm2-pytss==3.0.0' in lines[0] and '".[tpm]"' in lines[0]
    assert "libtss2-dev" in lines[0]


# -- the credential source the lead wires --tpm into: both token modes ------------------------

@pytest.fixture
def fake_google():
    from fake_google import FakeGoogle
    with FakeGoogle() as google:
        yield google


def _tpm_signer_for_account(tools, tcti, account, **options):
    """Import a fake-Google service account's key into the TPM (owner H-2 parent, key file)."""
    key_path = os.path.join(tools.workdir, "account.pem")
    with open(key_path, "w") as handle:
        handle.write(account.key_pem())
    parent = tools.h2_primary()
    pub, prv = tools.import_key(key_path, parent, policy=options.pop("policy", None))
    os.remove(key_path)  # from here on the private key exists only inside the TPM
    pem_path = tools.encode(parent, pub, prv, "account.tss.pem")
    return mds.TpmSigner.from_options(tpm=True, tpm_path=tcti, tpm_key_file=pem_path,
                                      key_id=account.key_id, **options)


def test_oauth_mode_assertion_signed_in_tpm(tools, swtpm, fake_google):
    account = fake_google.add_service_account()
    signer = _tpm_signer_for_account(tools, swtpm, account)
    try:
        source = mds.build_credential_source(
            {"type": "key-file", "client_email": account.email,
             "token_uri": fake_google.token_uri, "token_mode": "oauth"}, signer=signer)
        token = source.access_token(("https://www.googleapis.com/auth/cloud-platform",))
        # the fake verified the assertion's RS256 signature against the account's public key
        assert token.value in fake_google.issued_tokens
        header, claims = fake_google.last_assertion
        assert header["kid"] == account.key_id and claims["iss"] == account.email
        id_token = source.id_token("https://service.example")
        google_claims = json.loads(base64.urlsafe_b64decode(
            id_token.value.split(".")[1] + "=" * (-len(id_token.value.split(".")[1]) % 4)))
        assert google_claims["aud"] == "https://service.example"
        assert fake_google.last_assertion[1]["target_audience"] == "https://service.example"
        assert signer.fingerprint() not in (token.value, id_token.value)
    finally:
        signer.close()


def _verified_claims(token, public_key):
    head, body, signature = token.split(".")
    verify(public_key, base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
           (head + "." + body).encode())
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_self_signed_mode_tokens_signed_in_tpm_and_pcr_failure_is_5xx(tools, swtpm,
                                                                      fake_google):
    account = fake_google.add_service_account()
    signer = _tpm_signer_for_account(tools, swtpm, account,
                                     policy=tools.pcr_policy("sha256:23"), tpm_pcrs="23")
    try:
        source = mds.build_credential_source(
            {"type": "key-file", "client_email": account.email,
             "token_uri": fake_google.token_uri, "token_mode": "self-signed"}, signer=signer)
        public_key = account.private_key.public_key()
        access = source.access_token(("https://www.googleapis.com/auth/cloud-platform",))
        assert _verified_claims(access.value, public_key)["iss"] == account.email
        identity = source.id_token("https://service.example")
        assert _verified_claims(identity.value, public_key)["aud"] == "https://service.example"
        assert fake_google.count() == 0  # fully offline
        tools.pcr_extend(23)
        with pytest.raises(mds.CredentialError) as failure:
            source.id_token("https://service.example")
        assert failure.value.status >= 500
        assert "PCR policy does not hold" in str(failure.value)
        tools.pcr_reset(23)
        identity = source.id_token("https://other.example")
        assert _verified_claims(identity.value, public_key)["aud"] == "https://other.example"
    finally:
        signer.close()
