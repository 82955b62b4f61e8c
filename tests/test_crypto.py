"""Tests for the crypto section of mds (DER, RSA, JWT, X.509, PKCS#7).

Every signature and structure is checked by an independent implementation: `cryptography`
(OpenSSL), google-auth, PyJWT and the `openssl` CLI. Tampered variants are checked too, so a
verifier that accepted anything would make these tests fail.
"""

import base64
import datetime
import hashlib
import http.server
import json
import math
import os
import shutil
import subprocess
import threading

import pytest

import mds
from clients import in_ci

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7



def require_module(name):
    """Import an optional verifier; in CI its absence is a failure, locally a skip."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        if in_ci():
            pytest.fail("%s is required in CI" % name)
        pytest.skip("%s not installed" % name)


def require_openssl():
    path = shutil.which("openssl")
    if path is None:
        if in_ci():
            pytest.fail("the openssl CLI is required in CI")
        pytest.skip("openssl CLI not installed")
    return path


PKCS1 = serialization.PrivateFormat.TraditionalOpenSSL
PKCS8 = serialization.PrivateFormat.PKCS8
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
NO_ENCRYPTION = serialization.NoEncryption()

MESSAGES = [
    b"",
    b"a",
    b'{"alg":"RS256","typ":"JWT"}.payload',
    "caf\u00e9 \u2603 metadata".encode("utf-8"),
    bytes(range(256)) * 40,
    os.urandom(3000),
]


def private_pem(key, fmt):
    return key.private_bytes(PEM, fmt, NO_ENCRYPTION)


def reference_sign(key, message):
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def reference_verify(public_key, message, signature):
    public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


@pytest.fixture(scope="module")
def reference_keys():
    """cryptography-generated keys, including odd sizes and e=3."""
    sizes = [1024, 1025, 1536, 2047, 2048, 2049, 3072, 4096]
    keys = [(size, 65537, rsa.generate_private_key(65537, size)) for size in sizes]
    keys += [(2048, 65537, rsa.generate_private_key(65537, 2048)) for _ in range(3)]
    keys.append((2048, 3, rsa.generate_private_key(3, 2048)))
    assert {1025, 2047} <= {key.key_size for _, _, key in keys}  # odd moduli really covered
    return keys


@pytest.fixture(scope="module")
def key_pair():
    """One (mds key, cryptography key) pair for tests that need any key."""
    reference = rsa.generate_private_key(65537, 2048)
    return mds.RsaKey.from_pem(private_pem(reference, PKCS8)), reference


class CryptographySigner:
    """A signer that is not an RsaKey (stands in for the TPM signer)."""

    def __init__(self, key, key_id):
        self._key = key
        self.key_id = key_id

    def sign(self, message):
        return reference_sign(self._key, message)

    def public_numbers(self):
        numbers = self._key.public_key().public_numbers()
        return numbers.n, numbers.e


# ---- RSA signatures vs cryptography ----

@pytest.mark.parametrize("fmt", [PKCS1, PKCS8], ids=["pkcs1", "pkcs8"])
def test_signatures_byte_identical_to_cryptography(reference_keys, fmt):
    for size, exponent, reference in reference_keys:
        key = mds.RsaKey.from_pem(private_pem(reference, fmt))
        numbers = reference.public_key().public_numbers()
        assert key.public_numbers() == (numbers.n, numbers.e)
        # OpenSSL 3 rounds some requested sizes (2049 comes out as 2048), so the
        # reference key's own size is the truth.
        assert key.bits == reference.key_size
        for message in MESSAGES:
            signature = key.sign(message)
            assert len(signature) == (reference.key_size + 7) // 8
            assert signature == reference_sign(reference, message), (size, exponent, message[:20])


def test_from_der_accepts_pkcs1_and_pkcs8(reference_keys):
    for _, _, reference in reference_keys[:4]:
        for fmt in (PKCS1, PKCS8):
            key = mds.RsaKey.from_der(reference.private_bytes(DER, fmt, NO_ENCRYPTION))
            assert key.sign(b"der") == reference_sign(reference, b"der")


def test_exports_match_cryptography(reference_keys):
    for size, _, reference in reference_keys[:5]:
        key = mds.RsaKey.from_pem(private_pem(reference, PKCS1))
        spki = reference.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert key.public_der() == spki
        assert key.fingerprint() == hashlib.sha256(spki).hexdigest()
        assert key.key_id == hashlib.sha256(spki).hexdigest()[:40]
        assert key.to_der() == reference.private_bytes(DER, PKCS8, NO_ENCRYPTION)
        reloaded = serialization.load_pem_private_key(key.to_pem().encode(), None)
        assert reloaded.private_numbers() == reference.private_numbers()
        public = serialization.load_pem_public_key(key.public_pem().encode())
        assert public.public_numbers() == reference.public_key().public_numbers()


def test_rsa_verify_accepts_only_valid_signatures(key_pair):
    key, reference = key_pair
    n, e = key.public_numbers()
    signature = reference_sign(reference, b"message")
    assert mds.rsa_verify(n, e, b"message", signature)
    assert not mds.rsa_verify(n, e, b"messagf", signature)
    tampered = bytearray(signature)
    tampered[-1] ^= 1
    assert not mds.rsa_verify(n, e, b"message", bytes(tampered))
    assert not mds.rsa_verify(n, e, b"message", signature[1:])
    assert not mds.rsa_verify(n, e, b"message", b"\xff" * len(signature))
    # A valid PKCS#1 v1.5 signature with SHA-1 must not pass as SHA-256.
    sha1_signature = reference.sign(b"message", padding.PKCS1v15(), hashes.SHA1())
    assert not mds.rsa_verify(n, e, b"message", sha1_signature)


# ---- key generation ----

@pytest.mark.parametrize("bits", [1024, 2047, 2048])
def test_generated_keys_load_and_verify_in_cryptography(bits):
    key = mds.RsaKey.generate(bits)
    # load_pem_private_key validates the key (RSA_check_key: p, q prime, d, CRT values).
    loaded = serialization.load_pem_private_key(key.to_pem().encode(), None)
    assert loaded.key_size == bits
    numbers = loaded.private_numbers()
    assert (numbers.public_numbers.n, numbers.public_numbers.e) == key.public_numbers()
    assert numbers.public_numbers.e == 65537
    assert numbers.p != numbers.q
    assert math.gcd(65537, numbers.p - 1) == 1 and math.gcd(65537, numbers.q - 1) == 1
    for message in MESSAGES[:4]:
        signature = key.sign(message)
        reference_verify(loaded.public_key(), message, signature)
        assert signature == reference_sign(loaded, message)


def test_generated_modulus_always_has_exact_bit_length():
    sizes = {mds.RsaKey.generate(bits).public_numbers()[0].bit_length() - bits
             for bits in (1024, 1025, 1031, 1100)}
    assert sizes == {0}


def test_generated_keys_differ():
    assert mds.RsaKey.generate(1024).public_numbers() != mds.RsaKey.generate(1024).public_numbers()


def test_generate_refuses_short_keys():
    with pytest.raises(ValueError):
        mds.RsaKey.generate(512)


# ---- rejected inputs ----

def assert_key_error(loader, data, *fragments):
    with pytest.raises(mds.KeyFormatError) as info:
        loader(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert isinstance(info.value, ValueError)
    return message


def test_rejects_encrypted_pkcs8():
    reference = rsa.generate_private_key(65537, 1024)
    encrypted = reference.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"pw"))
    assert b"ENCRYPTED PRIVATE KEY" in encrypted
    message = assert_key_error(mds.RsaKey.from_pem, encrypted, "encrypted", "openssl")
    assert "PRIVATE KEY-----" not in message
    encrypted_der = reference.private_bytes(DER, PKCS8, serialization.BestAvailableEncryption(b"pw"))
    assert_key_error(mds.RsaKey.from_der, encrypted_der, "encrypted")


def test_rejects_traditional_encrypted_pem():
    reference = rsa.generate_private_key(65537, 1024)
    encrypted = reference.private_bytes(PEM, PKCS1, serialization.BestAvailableEncryption(b"pw"))
    assert b"Proc-Type: 4,ENCRYPTED" in encrypted
    assert_key_error(mds.RsaKey.from_pem, encrypted, "encrypted", "openssl")


@pytest.mark.parametrize("fmt", [PKCS1, PKCS8], ids=["traditional", "pkcs8"])
def test_rejects_ec_keys(fmt):
    reference = ec.generate_private_key(ec.SECP256R1())
    assert_key_error(mds.RsaKey.from_pem, reference.private_bytes(PEM, fmt, NO_ENCRYPTION),
                     "not an RSA key", "EC")
    assert_key_error(mds.RsaKey.from_der, reference.private_bytes(DER, fmt, NO_ENCRYPTION),
                     "not an RSA key", "EC")


def test_rejects_ed25519_and_dsa_keys():
    ed = ed25519.Ed25519PrivateKey.generate()
    assert_key_error(mds.RsaKey.from_pem, ed.private_bytes(PEM, PKCS8, NO_ENCRYPTION),
                     "not an RSA key", "Ed25519")
    dsa_key = dsa.generate_private_key(1024)
    assert_key_error(mds.RsaKey.from_pem, dsa_key.private_bytes(PEM, PKCS8, NO_ENCRYPTION),
                     "not an RSA key", "DSA")
    assert_key_error(mds.RsaKey.from_pem, dsa_key.private_bytes(PEM, PKCS1, NO_ENCRYPTION),
                     "not an RSA key", "DSA")


def test_rejects_garbage_and_public_material(key_pair):
    key, reference = key_pair
    assert_key_error(mds.RsaKey.from_pem, "hello world", "no PEM block found")
    assert_key_error(mds.RsaKey.from_pem, b"", "no PEM block found")
    assert_key_error(mds.RsaKey.from_pem, '{"type": "service_account", "private_key": 1}',
                     "no PEM block found", "private_key")
    assert_key_error(mds.RsaKey.from_pem,
                     "-----BEGIN PRIVATE KEY-----\n!!!notbase64\n-----END PRIVATE KEY-----\n",
                     "base64")
    assert_key_error(mds.RsaKey.from_pem,
                     mds.pem_encode("PRIVATE KEY", b"\x30\x03\x02\x01\x00"), "malformed")
    assert_key_error(mds.RsaKey.from_pem, mds.pem_encode("PRIVATE KEY", b"\x04\x02ab"), "DER")
    assert_key_error(mds.RsaKey.from_pem, key.public_pem(), "no private key", "PUBLIC KEY")
    cert_pem = mds.pem_encode("CERTIFICATE", mds.x509_self_signed(key, "c"))
    assert_key_error(mds.RsaKey.from_pem, cert_pem, "no private key", "CERTIFICATE")
    truncated = reference.private_bytes(DER, PKCS1, NO_ENCRYPTION)[:-10]
    assert_key_error(mds.RsaKey.from_der, truncated, "DER")
    assert_key_error(mds.RsaKey.from_der, b"\x30\x40" + hashlib.sha512(b"noise").digest(), "DER")
    with pytest.raises(ValueError):
        mds.pkcs7_signed_data(b"x", key, b"\x30\x03\x02\x01\x01")  # not a certificate


def test_rejects_inconsistent_key_but_repairs_bad_crt_values():
    reference = rsa.generate_private_key(65537, 1024)
    numbers = reference.private_numbers()
    bad_d = rsa.RSAPrivateNumbers(numbers.p, numbers.q, numbers.d + 2, numbers.dmp1 + 2,
                                  numbers.dmq1, numbers.iqmp, numbers.public_numbers)
    pem = bad_d.private_key(unsafe_skip_rsa_key_validation=True).private_bytes(PEM, PKCS1, NO_ENCRYPTION)
    assert_key_error(mds.RsaKey.from_pem, pem, "inconsistent")
    bad_crt = rsa.RSAPrivateNumbers(numbers.p, numbers.q, numbers.d, numbers.dmp1 + 2,
                                    numbers.dmq1, numbers.iqmp, numbers.public_numbers)
    pem = bad_crt.private_key(unsafe_skip_rsa_key_validation=True).private_bytes(PEM, PKCS1, NO_ENCRYPTION)
    key = mds.RsaKey.from_pem(pem)
    assert key.sign(b"x") == reference_sign(reference, b"x")
    assert serialization.load_pem_private_key(key.to_pem().encode(), None).private_numbers() == numbers


def test_from_pem_accepts_bytes_escaped_newlines_and_surrounding_text(key_pair):
    key, reference = key_pair
    pem = private_pem(reference, PKCS8).decode()
    assert mds.RsaKey.from_pem(pem.encode()).public_numbers() == key.public_numbers()
    escaped = json.dumps(pem)[1:-1]  # what a key looks like inside a JSON file's raw text
    assert "\\n" in escaped and "\n" not in escaped
    assert mds.RsaKey.from_pem(escaped).public_numbers() == key.public_numbers()
    bundle = "comment line\n" + key.public_pem() + private_pem(reference, PKCS1).decode()
    assert mds.RsaKey.from_pem(bundle).public_numbers() == key.public_numbers()


# ---- CRT fault check ----

@pytest.mark.parametrize("attribute", ["_dp", "_dq", "_qinv"])
def test_crt_fault_never_yields_a_faulty_signature(attribute):
    reference = rsa.generate_private_key(65537, 2048)
    key = mds.RsaKey.from_pem(private_pem(reference, PKCS1))
    message = b"fault injection"
    setattr(key, attribute, getattr(key, attribute) ^ (1 << 100))
    # The raw CRT path now really is faulty, and the fault leaks a factor of n
    # (Boneh-DeMillo-Lipton); without this, the assertions below would prove nothing.
    faulty = key._sign_crt(message)
    with pytest.raises(InvalidSignature):
        reference_verify(reference.public_key(), message, faulty)
    n, e = key.public_numbers()
    numbers = reference.private_numbers()
    encoded = int.from_bytes(mds_encoded_message(message, n), "big")
    assert math.gcd(pow(int.from_bytes(faulty, "big"), e, n) - encoded, n) in (numbers.p, numbers.q)
    # The public method still returns the correct signature.
    assert key.sign(message) == reference_sign(reference, message)


def mds_encoded_message(message, n):
    """EMSA-PKCS1-v1_5 SHA-256 encoding, written out independently of mds."""
    length = (n.bit_length() + 7) // 8
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (length - len(digest_info) - 3) + b"\x00" + digest_info


def test_sign_raises_when_private_exponent_is_also_corrupt():
    key = mds.RsaKey.generate(1024)
    key._dp ^= 2
    key._d ^= 2
    with pytest.raises(RuntimeError):
        key.sign(b"m")


def test_repr_and_fingerprint_hide_private_material(key_pair):
    key, reference = key_pair
    numbers = reference.private_numbers()
    shown = repr(key) + str(key) + key.fingerprint() + json.dumps(key.jwk())
    for secret in (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp):
        assert str(secret) not in shown
        assert "%x" % secret not in shown
        assert mds.b64url_encode(secret.to_bytes((secret.bit_length() + 7) // 8, "big")) not in shown
    assert key.to_pem().splitlines()[1] not in shown
    assert key.key_id in repr(key)


# ---- base64url and JWT ----

def test_b64url_roundtrip_against_stdlib():
    for length in range(0, 40):
        data = os.urandom(length)
        padded = base64.urlsafe_b64encode(data).decode()
        assert mds.b64url_encode(data) == padded.rstrip("=")
        assert "=" not in mds.b64url_encode(data)
        assert mds.b64url_decode(padded.rstrip("=")) == data
        assert mds.b64url_decode(padded) == data


def test_jwk_matches_public_numbers(key_pair):
    key, reference = key_pair
    jwk = key.jwk()
    numbers = reference.public_key().public_numbers()
    assert {k: jwk[k] for k in ("kty", "alg", "use", "kid")} == {
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": key.key_id}
    assert int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="), "big") == numbers.n
    assert base64.urlsafe_b64decode(jwk["e"] + "==") == b"\x01\x00\x01"
    assert not jwk["n"].startswith("AA")  # no leading zero octet (RFC 7518 6.3.1.1)


def id_token_claims(audience):
    now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
    return {"aud": audience, "azp": "1234567890", "email": "sa@p.iam.gserviceaccount.com",
            "email_verified": True, "exp": now + 3600, "iat": now,
            "iss": "https://accounts.google.com", "sub": "1234567890"}


def test_jwt_header_matches_gce_format(key_pair):
    key, _ = key_pair
    token = mds.jwt_encode({"a": 1}, key)
    header_segment, payload_segment, signature_segment = token.split(".")
    # gce.md 10.2: header exactly {"alg":"RS256","kid":"<key id>","typ":"JWT"}, compact JSON.
    assert base64.urlsafe_b64decode(header_segment + "==") == (
        '{"alg":"RS256","kid":"%s","typ":"JWT"}' % key.key_id).encode()
    assert base64.urlsafe_b64decode(payload_segment + "==") == b'{"a":1}'
    assert "=" not in token
    assert mds.jwt_decode_unverified(token) == (
        {"alg": "RS256", "kid": key.key_id, "typ": "JWT"}, {"a": 1})
    key.key_id = "0123456789abcdef"  # a Google key file's private_key_id
    try:
        header, _ = mds.jwt_decode_unverified(mds.jwt_encode({"a": 1}, key, header={"x5t": "t"}))
    finally:
        key.key_id = key.fingerprint()[:40]
    assert header == {"alg": "RS256", "kid": "0123456789abcdef", "typ": "JWT", "x5t": "t"}


def test_jwt_verifies_with_google_auth_pem_key_and_cert(key_pair):
    google_jwt = require_module("google.auth.jwt")
    google_exceptions = require_module("google.auth.exceptions")
    key, _ = key_pair
    claims = id_token_claims("https://service.example")
    token = mds.jwt_encode(claims, key)
    cert_pem = mds.pem_encode("CERTIFICATE", mds.x509_self_signed(key, "mds"))
    for public in (key.public_pem(), cert_pem):
        decoded = google_jwt.decode(token, certs={key.key_id: public}, audience="https://service.example")
        assert decoded == claims
    with pytest.raises(google_exceptions.GoogleAuthError):
        google_jwt.decode(token, certs={key.key_id: key.public_pem()}, audience="https://other")
    header, payload, signature = token.split(".")
    forged = header + "." + mds.b64url_encode(json.dumps(dict(claims, aud="x")).encode()) + "." + signature
    with pytest.raises(ValueError):
        google_jwt.decode(forged, certs={key.key_id: key.public_pem()}, verify=True, audience="x")
    other = mds.RsaKey.generate(1024)
    with pytest.raises(ValueError):
        google_jwt.decode(token, certs={key.key_id: other.public_pem()}, audience="https://service.example")


class _JsonServer:
    """A local HTTP server on 127.0.0.1 serving one JSON document (stands in for
    Google's certs endpoints)."""

    def __init__(self, document):
        body = json.dumps(document).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/certs" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_jwt_verifies_with_google_auth_verify_token_pem_and_jwks_urls(key_pair):
    id_token = require_module("google.oauth2.id_token")
    transport = require_module("google.auth.transport.requests")
    requests = require_module("requests")
    require_module("jwt")  # google-auth needs PyJWT for the JWKS format
    key, _ = key_pair
    claims = id_token_claims("aud-1")
    token = mds.jwt_encode(claims, key)
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through a proxy from the environment
    request = transport.Request(session=session)
    cert_pem = mds.pem_encode("CERTIFICATE", mds.x509_self_signed(key, "mds"))
    for document in ({key.key_id: cert_pem}, {"keys": [key.jwk()]}):
        with _JsonServer(document) as server:
            assert id_token.verify_token(token, request, audience="aud-1", certs_url=server.url) == claims
    other = mds.RsaKey.generate(2048)
    other.key_id = key.key_id
    with _JsonServer({"keys": [other.jwk()]}) as server:
        with pytest.raises(Exception):
            id_token.verify_token(token, request, audience="aud-1", certs_url=server.url)


def test_jwt_verifies_with_pyjwt(key_pair):
    pyjwt = require_module("jwt")
    key, _ = key_pair
    claims = id_token_claims("aud-2")
    token = mds.jwt_encode(claims, key)
    assert pyjwt.decode(token, key.public_pem(), algorithms=["RS256"], audience="aud-2") == claims
    assert pyjwt.get_unverified_header(token) == mds.jwt_decode_unverified(token)[0]
    jwk = pyjwt.PyJWK(key.jwk())
    assert pyjwt.decode(token, jwk.key, algorithms=["RS256"], audience="aud-2") == claims
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
                     key.public_pem(), algorithms=["RS256"], audience="aud-2")


def test_jwt_encode_accepts_any_signer_and_decodes_foreign_tokens():
    pyjwt = require_module("jwt")
    reference = rsa.generate_private_key(65537, 2048)
    signer = CryptographySigner(reference, "tpm-key-1")
    token = mds.jwt_encode({"sub": "x"}, signer)
    public_pem = reference.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pyjwt.decode(token, public_pem, algorithms=["RS256"]) == {"sub": "x"}
    assert pyjwt.get_unverified_header(token)["kid"] == "tpm-key-1"
    foreign = pyjwt.encode({"iss": "me", "n": [1, 2]}, reference, algorithm="RS256", headers={"kid": "k"})
    header, claims = mds.jwt_decode_unverified(foreign)
    assert claims == {"iss": "me", "n": [1, 2]}
    assert header["kid"] == "k" and header["alg"] == "RS256"


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "!!.e30.x", "e30.W10.x", "bm90anNvbg.e30.x"])
def test_jwt_decode_unverified_rejects_malformed(token):
    with pytest.raises(ValueError):
        mds.jwt_decode_unverified(token)


# ---- DER / PEM ----

def test_oid_encoding_matches_x690():
    assert mds.oid_encode("1.2.840.113549.1.1.11") == bytes.fromhex("2a864886f70d01010b")
    assert mds.oid_encode("2.999.3") == bytes.fromhex("883703")  # X.690 8.19.5 example
    for dotted in ("1.2.840.113549.1.1.11", "2.999.3", "0.9.2342.19200300.100.1.1",
                   "2.25.329800735698586629295641978511506172918", "1.3.101.112"):
        assert mds.oid_decode(mds.oid_encode(dotted)) == dotted
        assert x509.ObjectIdentifier(dotted).dotted_string == dotted
    with pytest.raises(ValueError):
        mds.oid_encode("3.1")


def test_der_integer_and_lengths():
    expected = {0: "020100", 127: "02017f", 128: "02020080", 256: "02020100",
                -1: "0201ff", -128: "020180", -129: "0202ff7f"}
    for number, encoded in expected.items():
        assert mds.der_integer(number).hex() == encoded
        tag, value, end = mds.der_read(bytes.fromhex(encoded))
        assert tag == 0x02 and mds.der_decode_integer(value) == number and end == len(encoded) // 2
    long_value = os.urandom(300)
    encoded = mds.der_octet_string(long_value)
    assert encoded[:4] == b"\x04\x82\x01\x2c"
    assert mds.der_unwrap(encoded, 0x04) == long_value
    for bad in (b"\x30\x80\x00\x00", b"\x04\x05abc", b"\x04", b"\x1f\x01\x00"):
        with pytest.raises(ValueError):
            mds.der_read(bad)
    with pytest.raises(ValueError):
        mds.der_unwrap(b"\x05\x00\x05\x00", 0x05)


def test_pem_decode_and_encode_against_cryptography(key_pair):
    key, reference = key_pair
    public = reference.public_key()
    pem_text = public.public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    label, der = mds.pem_decode(pem_text, ["CERTIFICATE", "PUBLIC KEY"])
    assert label == "PUBLIC KEY"
    assert der == public.public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert mds.pem_encode("PUBLIC KEY", der) == pem_text
    with pytest.raises(mds.KeyFormatError) as info:
        mds.pem_decode(pem_text, "CERTIFICATE")
    assert "PUBLIC KEY" in str(info.value)
    with pytest.raises(mds.KeyFormatError):
        mds.pem_decode("nothing here", "CERTIFICATE")


# ---- X.509 ----

def test_self_signed_certificate_loads_and_verifies(key_pair):
    key, _ = key_pair
    before = datetime.datetime.now(datetime.timezone.utc)
    der = mds.x509_self_signed(key, "metadata.google.internal")
    cert = x509.load_der_x509_certificate(der)
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    assert cert.public_key().public_numbers().n == key.public_numbers()[0]
    assert cert.version == x509.Version.v3
    assert cert.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSA_WITH_SHA256
    common_names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert [attr.value for attr in common_names] == ["metadata.google.internal"]
    assert cert.issuer == cert.subject
    assert cert.serial_number > 0
    assert abs((cert.not_valid_before_utc - (before - datetime.timedelta(hours=1))).total_seconds()) < 60
    assert 3650 <= (cert.not_valid_after_utc - before).days <= 3653
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is False and constraints.critical
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    # A flipped bit in the signed part must break the signature check.
    tbs = bytearray(cert.tbs_certificate_bytes)
    tbs[-5] ^= 1
    with pytest.raises(InvalidSignature):
        cert.public_key().verify(cert.signature, bytes(tbs), padding.PKCS1v15(), hashes.SHA256())


def test_certificate_validity_serial_and_time_encodings(key_pair):
    key, _ = key_pair
    not_before = datetime.datetime(2049, 12, 31, 23, 59, 58)  # last UTCTime year
    not_after = datetime.datetime(2061, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    der = mds.x509_self_signed(key, "caf\u00e9", not_before=not_before, not_after=not_after,
                               serial=(1 << 158) + 12345)
    cert = x509.load_der_x509_certificate(der)
    assert cert.not_valid_before_utc == not_before.replace(tzinfo=datetime.timezone.utc)
    assert cert.not_valid_after_utc == not_after
    assert cert.serial_number == (1 << 158) + 12345
    assert cert.subject.rfc4514_string() == "CN=caf\u00e9"
    assert b"\x17\x0d491231235958Z" in der and b"\x18\x0f20610203040506Z" in der
    serials = {x509.load_der_x509_certificate(mds.x509_self_signed(key, "x")).serial_number
               for _ in range(5)}
    assert len(serials) == 5 and all(0 < s < 1 << 159 for s in serials)


def test_certificate_from_foreign_signer_verifies_with_openssl(tmp_path):
    openssl = require_openssl()
    reference = rsa.generate_private_key(65537, 2048)
    der = mds.x509_self_signed(CryptographySigner(reference, "k"), "tpm")
    cert = x509.load_der_x509_certificate(der)
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    path = tmp_path / "cert.der"
    path.write_bytes(der)
    out = subprocess.run([openssl, "x509", "-inform", "DER", "-in", str(path), "-noout", "-subject"],
                         capture_output=True, text=True, check=True).stdout
    assert "CN = tpm" in out or "CN=tpm" in out


# ---- PKCS#7 / CMS ----

IDENTITY_DOCUMENT = (
    b'{\n  "accountId" : "123456789012",\n  "architecture" : "x86_64",\n'
    b'  "availabilityZone" : "us-east-1a",\n  "billingProducts" : null,\n'
    b'  "instanceId" : "i-1234567890abcdef0",\n  "region" : "us-east-1",\n'
    b'  "version" : "2017-09-30"\n}')


@pytest.fixture(scope="module")
def ec2_signer():
    key = mds.RsaKey.generate(2048)
    return key, mds.x509_self_signed(key, "ec2.amazonaws.com")


def run_openssl(args, tmp_path, **files):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return subprocess.run([require_openssl()] + args, cwd=str(tmp_path), capture_output=True)


@pytest.mark.parametrize("content", [IDENTITY_DOCUMENT, b"", b"line\r\nwith crlf\r\n\x00\xff" + os.urandom(500)],
                         ids=["document", "empty", "binary"])
def test_pkcs7_verifies_with_openssl_cms(ec2_signer, tmp_path, content):
    key, cert = ec2_signer
    der = mds.pkcs7_signed_data(content, key, cert)
    result = run_openssl(["cms", "-verify", "-binary", "-inform", "DER", "-in", "sig.der",
                          "-noverify", "-out", "out.bin"], tmp_path, **{"sig.der": der})
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / "out.bin").read_bytes() == content


def test_pkcs7_follows_aws_rsa2048_verification_steps(ec2_signer, tmp_path):
    # AWS verify-rsa2048: wrap the served base64 in PKCS7 PEM lines, then
    # `openssl smime -verify -in pkcs7 -inform PEM -certfile certificate -noverify`.
    key, cert = ec2_signer
    der = mds.pkcs7_signed_data(IDENTITY_DOCUMENT, key, cert, include_certificate=False)
    served = base64.encodebytes(der)
    pem = b"-----BEGIN PKCS7-----\n" + served + b"-----END PKCS7-----\n"
    cert_pem = mds.pem_encode("CERTIFICATE", cert).encode()
    result = run_openssl(["smime", "-verify", "-in", "pkcs7", "-inform", "PEM", "-certfile",
                          "certificate", "-noverify"], tmp_path, pkcs7=pem, certificate=cert_pem)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == IDENTITY_DOCUMENT
    # Without the certificate embedded or supplied there is nothing to verify against.
    result = run_openssl(["smime", "-verify", "-in", "pkcs7", "-inform", "PEM", "-noverify"],
                         tmp_path, pkcs7=pem)
    assert result.returncode != 0


def test_pkcs7_embeds_certificate_and_signed_attributes(ec2_signer, tmp_path):
    key, cert = ec2_signer
    signing_time = datetime.datetime(2026, 11, 22, 10, 0, 0, tzinfo=datetime.timezone.utc)
    der = mds.pkcs7_signed_data(IDENTITY_DOCUMENT, key, cert, signing_time=signing_time)
    assert pkcs7.load_der_pkcs7_certificates(der) == [x509.load_der_x509_certificate(cert)]
    result = run_openssl(["smime", "-verify", "-inform", "DER", "-in", "sig.der", "-noverify"],
                         tmp_path, **{"sig.der": der})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == IDENTITY_DOCUMENT
    printed = run_openssl(["cms", "-cmsout", "-print", "-inform", "DER", "-in", "sig.der"],
                          tmp_path, **{"sig.der": der}).stdout.decode()
    assert "contentType" in printed and "messageDigest" in printed and "signingTime" in printed
    assert "Nov 22 10:00:00 2026" in printed
    assert hashlib.sha256(IDENTITY_DOCUMENT).hexdigest()[:8] in printed.replace(" ", "").replace("-", "").lower()


def test_pkcs7_tampering_is_detected_by_openssl(ec2_signer, tmp_path):
    key, cert = ec2_signer
    der = mds.pkcs7_signed_data(IDENTITY_DOCUMENT, key, cert)
    position = der.index(b"i-1234567890abcdef0")
    tampered = der[:position] + b"i-0" + der[position + 3:]
    result = run_openssl(["cms", "-verify", "-binary", "-inform", "DER", "-in", "sig.der", "-noverify"],
                         tmp_path, **{"sig.der": tampered})
    assert result.returncode != 0
    # Signed by a key that is not the certificate's.
    other = mds.RsaKey.generate(2048)
    wrong = mds.pkcs7_signed_data(IDENTITY_DOCUMENT, other, cert)
    result = run_openssl(["cms", "-verify", "-binary", "-inform", "DER", "-in", "sig.der", "-noverify"],
                         tmp_path, **{"sig.der": wrong})
    assert result.returncode != 0
