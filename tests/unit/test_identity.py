"""Ed25519 identities, signed digests, the key registry, and the CA / enrollment commands."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.keyring import KeyRing
from fedge.errors import ConfigError, InvalidUpdate
from fedge.identity import (
    SigningKey,
    VerifyKey,
    calib_block,
    load_signing_key,
    load_verify_key,
    model_digest,
    save_signing_key,
    save_verify_key,
    update_digest,
)
from fedge_cli import pki

FAST = settings(max_examples=60, deadline=None)

# RFC 8032, section 7.1, TEST 1 (empty message).
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
    "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- keys -----------------------------------------------------------------------------------


def test_rfc8032_vector() -> None:
    # Prepare
    key = SigningKey.from_bytes(RFC_SEED)
    # Execute
    signature = key.sign(b"")
    # Assert
    assert key.verify_key.to_bytes() == RFC_PUBLIC
    assert signature == RFC_SIGNATURE
    assert VerifyKey.from_bytes(RFC_PUBLIC).verify(b"", RFC_SIGNATURE)


@pytest.mark.parametrize(
    ("message", "signature_edit"),
    [
        (b"hello!", None),  # another message
        (b"hello", lambda s: s[:-1]),  # truncated
        (b"hello", lambda s: s + b"\x00"),  # too long
        (b"hello", lambda s: bytes([s[0] ^ 1]) + s[1:]),  # one bit flipped
        (b"hello", lambda s: b"\x00" * 64),  # zeros
    ],
)
def test_verify_refuses_tampering(message: bytes, signature_edit: object) -> None:
    key = SigningKey.generate()
    signature = key.sign(b"hello")
    if callable(signature_edit):
        signature = signature_edit(signature)
    assert key.verify_key.verify(message, signature) is False


def test_verify_refuses_other_key() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    assert a.verify_key.verify(b"m", a.sign(b"m"))
    assert not b.verify_key.verify(b"m", a.sign(b"m"))


@pytest.mark.parametrize("raw", [False, True])
def test_save_and_load_keys(tmp_path: Path, raw: bool) -> None:
    # Prepare
    key = SigningKey.generate()
    # Execute
    save_signing_key(tmp_path / "k", key, raw=raw)
    save_verify_key(tmp_path / "k.pub", key.verify_key, raw=raw)
    loaded = load_signing_key(tmp_path / "k")
    public = load_verify_key(tmp_path / "k.pub")
    # Assert
    assert _mode(tmp_path / "k") == 0o600
    assert (tmp_path / "k").stat().st_size == (32 if raw else len(key.to_pem()))
    assert loaded.to_bytes() == key.to_bytes()
    assert public == key.verify_key
    assert public.verify(b"x", loaded.sign(b"x"))


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_signing_key(path, SigningKey.generate())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_signing_key(path)


def test_wrong_key_files_are_config_errors(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec").write_bytes(pem)
    os.chmod(tmp_path / "ec", 0o600)
    (tmp_path / "junk").write_bytes(b"not a key at all")
    os.chmod(tmp_path / "junk", 0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_signing_key(tmp_path / "ec")
    with pytest.raises(ConfigError, match="PEM"):
        load_signing_key(tmp_path / "junk")
    with pytest.raises(ConfigError, match="PEM"):
        load_verify_key(tmp_path / "junk")
    with pytest.raises(ConfigError, match="cannot read"):
        load_verify_key(tmp_path / "missing")


def test_signing_key_repr_hides_the_secret() -> None:
    key = SigningKey.from_bytes(RFC_SEED)
    assert RFC_SEED.hex() not in repr(key)
    assert key.verify_key.fingerprint in repr(key)


# --- digests: exact bytes ----------------------------------------------------------------------


def test_update_digest_layout() -> None:
    # Prepare
    payload_hash = hashlib.sha256(b"delta").digest()
    nonce = bytes(range(16))
    expected = (
        b"fedge.update.v2\x00"
        + b"\x02d1"
        + bytes.fromhex("00000007")  # round 7
        + bytes.fromhex("00000003")  # base version 3
        + bytes.fromhex("0000000000000064")  # 100 samples
        + b"\x04fp32"
        + b"\x10"
        + nonce
        + payload_hash
        + hashlib.sha256(b"\x00\x00").digest()  # no calibration ranges: count 0
    )
    # Execute
    got = update_digest("d1", 7, nonce, payload_hash, base_version=3, num_samples=100, codec="fp32")
    # Assert
    assert got == expected
    assert got == update_digest(
        "d1", 7, nonce, payload_hash.hex(), base_version=3, num_samples=100, codec="fp32"
    )


def test_model_digest_layout() -> None:
    sha = hashlib.sha256(b"onnx").hexdigest()
    expected = b"fedge.model.v1\x00\x00" + bytes.fromhex("0000002a") + bytes.fromhex(sha)
    assert model_digest(42, sha) == expected
    assert model_digest(42, bytes.fromhex(sha)) == expected


def test_signature_vectors_of_docs_security_md() -> None:
    # Ed25519 is deterministic: these pin the vectors published for other languages.
    key = SigningKey.from_bytes(RFC_SEED)
    update = update_digest(
        "d1",
        7,
        bytes(range(16)),
        hashlib.sha256(b"delta").digest(),
        base_version=3,
        num_samples=100,
        codec="fp32",
    )
    model = model_digest(42, hashlib.sha256(b"onnx").hexdigest())
    calibrated = update_digest(
        "d1",
        7,
        bytes(range(16)),
        hashlib.sha256(b"delta").digest(),
        base_version=3,
        num_samples=100,
        codec="fp32",
        calib={"logits": (-7.5, 9.25), "input": (0.0, 16.0)},
    )
    assert key.sign(update).hex() == (
        "39c33cddb7e7d451548edd097426a913e5347ecc02dee640b5db1d875babb156"
        "e5201f6530dd084250fc7521be4c84861c1b1e49a4907fa832ab23fe4c644b09"
    )
    assert key.sign(calibrated).hex() == (
        "b4ff871a223a5a25a231acfbc40d40decc0ca34c2d051fb34a191b7be8ddc7c4"
        "e1b11bc0af50850094532378e7d5ada880c28d06cbdc7782b8a5a9980df1990d"
    )
    assert key.sign(model).hex() == (
        "6a1dc828f682458e7795ce68395dbbb42749889318200d74a76f16065db3d454"
        "8ccf5b2a4bbbb7017269d071c5185433d12e507b7cbaf67fb6d6e1163ca93f07"
    )


def test_calibration_ranges_are_signed() -> None:
    # Prepare: a signed update with ranges, and what a relay could make of them
    from dataclasses import replace

    from fedge.envelopes import ModelUpdate

    key = SigningKey.generate()
    u = ModelUpdate("d1", 1, 0, "u", bytes(16), 10, "fp32", b"blob", calib={"x": (0.0, 1.0)})
    u = replace(u, signature=key.sign(u.digest()))
    # Execute
    back = ModelUpdate.from_bytes(u.to_bytes())
    widened = replace(back, calib={"x": (0.0, 1e30)})
    dropped = replace(back, calib={})
    # Assert
    assert key.verify_key.verify(back.digest(), back.signature)
    assert not key.verify_key.verify(widened.digest(), back.signature)
    assert not key.verify_key.verify(dropped.digest(), back.signature)
    assert calib_block({"b": (1.0, 2.0), "a": (0.0, 1.0)}) == (
        bytes.fromhex("0002") + b"\x00\x01a" + bytes.fromhex("0000000000000000 3ff0000000000000")
        + b"\x00\x01b" + bytes.fromhex("3ff0000000000000 4000000000000000")
    )  # fmt: skip


def test_update_and_model_digests_never_coincide() -> None:
    # The tags differ in their first 16 bytes, so an update signature is never a model one.
    sha = bytes(32)
    u = update_digest("d", 1, b"", sha, base_version=0, num_samples=1, codec="c")
    m = model_digest(1, sha)
    assert u[:16] != m[:16]


_update_fields = st.tuples(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=24),
    st.binary(min_size=32, max_size=32),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.from_regex(r"\A[a-z0-9+]{1,12}\Z"),
)


@FAST
@given(_update_fields, _update_fields)
def test_update_digest_is_injective(a: tuple, b: tuple) -> None:
    def digest(f: tuple) -> bytes:
        return update_digest(
            f[0], f[1], f[2], f[3], base_version=f[4], num_samples=f[5], codec=f[6]
        )

    assert (digest(a) == digest(b)) == (a == b)


def test_length_prefixes_separate_adjacent_fields() -> None:
    # Plain concatenation would make these equal: "fp32" + "x" vs "fp32x" + "".
    sha = bytes(32)
    a = update_digest("d", 1, b"x", sha, base_version=0, num_samples=1, codec="fp32")
    b = update_digest("d", 1, b"", sha, base_version=0, num_samples=1, codec="fp32x")
    assert a != b


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device": "a/b"},
        {"device": ""},
        {"round": -1},
        {"round": 2**32},
        {"round": True},
        {"nonce": "text"},
        {"nonce": b"n" * 256},
        {"payload_sha256": b"short"},
        {"payload_sha256": "zz" * 32},
        {"num_samples": 2**64},
        {"codec": ""},
        {"codec": "fp32é"},
    ],
)
def test_update_digest_rejects_bad_fields(kwargs: dict) -> None:
    args = {
        "device": "d1",
        "round": 1,
        "nonce": b"n",
        "payload_sha256": bytes(32),
        "base_version": 0,
        "num_samples": 1,
        "codec": "fp32",
    }
    args.update(kwargs)
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        update_digest(**args)


@pytest.mark.parametrize(("version", "sha"), [(-1, bytes(32)), (2**32, bytes(32)), (1, "ab")])
def test_model_digest_rejects_bad_fields(version: int, sha: bytes | str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        model_digest(version, sha)


# --- password file -----------------------------------------------------------------------------


def test_hash_password_matches_mosquitto_passwd(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    # Prepare: an entry written by Mosquitto's own tool
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run([tool, "-b", str(passwd), "dev1", "s3cret"], check=True, capture_output=True)
    entry = passwd.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(entry.split("$")[3])
    # Execute / Assert
    assert pki.hash_password("s3cret", salt, 101) == entry
    assert pki.verify_password(entry, "s3cret")
    assert not pki.verify_password(entry, "s3cret!")


def test_password_file_without_mosquitto_passwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no mosquitto_passwd on PATH -> the module writes the format itself
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    passwd = tmp_path / "passwd"
    # Execute
    pki.set_password(passwd, "a", "pw-a")
    pki.set_password(passwd, "b", "pw-b")
    pki.set_password(passwd, "a", "pw-a2")
    removed = pki.remove_password(passwd, "b")
    removed_again = pki.remove_password(passwd, "b")
    # Assert
    entries = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert set(entries) == {"a"}
    assert pki.verify_password(entries["a"], "pw-a2")
    assert (removed, removed_again) == (True, False)
    assert _mode(passwd) == 0o640


# --- CA, enrollment, revocation, key registry ----------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> pki.CaDir:
    return pki.init_ca(tmp_path / "ca")


def _ca_cert(ca: pki.CaDir) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.ca_crt.read_bytes())


def test_enroll_writes_a_complete_identity(ca: pki.CaDir, tmp_path: Path) -> None:
    # Execute
    out = pki.enroll(ca.root, "dev1", tmp_path / "dev1")
    # Assert: files and modes
    for name in ("password", "client.key", "signing.key"):
        assert _mode(out / name) == 0o600, name
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    cert.verify_directly_issued_by(_ca_cert(ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # the device's key is registered, and the aggregator's key travels with the device
    assert load_verify_key(ca.keys / "devices" / "dev1.pub") == load_verify_key(out / "signing.pub")
    assert (out / "aggregator.pub").read_bytes() == (ca.aggregator / "signing.pub").read_bytes()
    entries = dict(line.split(":", 1) for line in ca.passwd.read_text().splitlines())
    assert pki.verify_password(entries["dev1"], (out / "password").read_text())
    assert json.loads((out / "identity.json").read_text())["username"] == "dev1"


def test_server_certificate_names_the_broker(ca: pki.CaDir) -> None:
    cert = x509.load_pem_x509_certificate(ca.server_crt.read_bytes())
    cert.verify_directly_issued_by(_ca_cert(ca))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize("name", ["aggregator", "a/b", "+", ""])
def test_enroll_refuses_reserved_or_invalid_names(ca: pki.CaDir, tmp_path: Path, name: str) -> None:
    with pytest.raises((ConfigError, ValueError)):
        pki.enroll(ca.root, name, tmp_path / "out")


def test_enroll_twice_is_refused(ca: pki.CaDir, tmp_path: Path) -> None:
    pki.enroll(ca.root, "dev1", tmp_path / "a")
    with pytest.raises(ConfigError, match="already enrolled"):
        pki.enroll(ca.root, "dev1", tmp_path / "b")


def test_keyring_verifies_enrolled_devices_only(ca: pki.CaDir, tmp_path: Path) -> None:
    # Prepare
    d1 = load_signing_key(pki.enroll(ca.root, "dev1", tmp_path / "dev1") / "signing.key")
    d2 = load_signing_key(pki.enroll(ca.root, "dev2", tmp_path / "dev2") / "signing.key")
    ring = KeyRing(ca.keys)
    digest = update_digest(
        "dev1", 3, b"n" * 16, bytes(32), base_version=2, num_samples=5, codec="fp32"
    )
    # Execute / Assert
    assert ring.devices == {"dev1", "dev2"}
    assert ring.verify_update("dev1", digest, d1.sign(digest))
    assert not ring.verify_update("dev1", digest, d2.sign(digest))  # another device's key
    assert not ring.verify_update("dev2", digest, d1.sign(digest))
    assert not ring.verify_update("ghost", digest, d1.sign(digest))
    with pytest.raises(InvalidUpdate) as bad:
        ring.check_update("dev1", digest, d2.sign(digest))
    with pytest.raises(InvalidUpdate) as unknown:
        ring.check_update("ghost", digest, d1.sign(digest))
    assert (bad.value.reason, unknown.value.reason) == ("bad_signature", "unknown_device")


def test_revoke_takes_effect_everywhere(ca: pki.CaDir, tmp_path: Path) -> None:
    # Prepare
    out = pki.enroll(ca.root, "dev1", tmp_path / "dev1")
    key = load_signing_key(out / "signing.key")
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    ring = KeyRing(ca.keys, max_age=3600)  # change noticed through the directory, not a timer
    digest = model_digest(1, bytes(32))
    assert ring.verify_update("dev1", digest, key.sign(digest))
    # Execute
    serials = pki.revoke(ca.root, "dev1")
    # Assert: the key, the password and the certificate are all gone
    assert serials == [format(cert.serial_number, "x")]
    assert not ring.verify_update("dev1", digest, key.sign(digest))
    with pytest.raises(InvalidUpdate) as err:
        ring.check_update("dev1", digest, key.sign(digest))
    assert err.value.reason == "revoked_device"
    assert ring.is_revoked("dev1")
    assert "dev1:" not in ca.passwd.read_text()
    crl = x509.load_pem_x509_crl(ca.crl.read_bytes())
    assert crl.is_signature_valid(_ca_cert(ca).public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_revoked_key_copied_back_stays_refused(ca: pki.CaDir, tmp_path: Path) -> None:
    out = pki.enroll(ca.root, "dev1", tmp_path / "dev1")
    key = load_signing_key(out / "signing.key")
    pki.revoke(ca.root, "dev1")
    shutil.copyfile(out / "signing.pub", ca.keys / "devices" / "dev1.pub")
    digest = model_digest(1, bytes(32))
    assert not KeyRing(ca.keys).verify_update("dev1", digest, key.sign(digest))


def test_reenrolled_device_gets_a_new_trusted_key(ca: pki.CaDir, tmp_path: Path) -> None:
    old = load_signing_key(pki.enroll(ca.root, "dev1", tmp_path / "a") / "signing.key")
    pki.revoke(ca.root, "dev1")
    new = load_signing_key(pki.enroll(ca.root, "dev1", tmp_path / "b") / "signing.key")
    ring = KeyRing(ca.keys)
    digest = model_digest(1, bytes(32))
    assert ring.verify_update("dev1", digest, new.sign(digest))
    assert not ring.verify_update("dev1", digest, old.sign(digest))
    assert not ring.is_revoked("dev1")


def test_keyring_skips_a_corrupt_file(ca: pki.CaDir, tmp_path: Path) -> None:
    key = load_signing_key(pki.enroll(ca.root, "dev1", tmp_path / "dev1") / "signing.key")
    (ca.keys / "devices" / "broken.pub").write_bytes(b"garbage")
    ring = KeyRing(ca.keys)
    digest = model_digest(1, bytes(32))
    assert ring.devices == {"dev1"}
    assert ring.verify_update("dev1", digest, key.sign(digest))


def test_keyring_needs_a_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedge enroll"):
        KeyRing(tmp_path)


def test_render_broker_config_leaves_only_runtime_placeholders(ca: pki.CaDir) -> None:
    import re

    text = pki.render_broker_config(ca.root, mtls_port=8884, bind="127.0.0.1")
    left = set(re.findall(r"\{(\w+)\}", text))
    assert left == {"port", "data_dir", "log_file"}
    assert f"crlfile {ca.crl}" in text
    assert f"password_file {ca.passwd}" in text


def test_the_intake_refuses_an_update_whose_ranges_were_rewritten(tmp_path: Path) -> None:
    # Prepare: dev1 signs an update with calibration ranges; a relay widens them
    from dataclasses import replace

    import numpy as np

    from aggregator.rounds import OpenRound
    from aggregator.validation import validate_update
    from fedge.codecs import parse_codec
    from fedge.envelopes import ModelUpdate, RoundTask, TrainHyper
    from fedge.key_registry import KeyRegistry
    from fedge.limits import DEFAULT_LIMITS

    key = SigningKey.generate()
    KeyRegistry(tmp_path).create().add("dev1", key.verify_key)
    task = RoundTask(3, 2, 1000.0, "fp32", TrainHyper(calibrate=True), bytes(16))
    delta = {"w": np.ones(4, np.float32)}
    u = ModelUpdate("dev1", 3, 2, "u", bytes(16), 10, "fp32", parse_codec("fp32").encode(delta),
                    calib={"input": (0.0, 16.0)})  # fmt: skip
    u = replace(u, signature=key.sign(u.digest()))
    relayed = replace(u, calib={"input": (-1e30, 1e30)})

    def check(x: ModelUpdate) -> object:
        rnd = OpenRound(task=task, opened_at=0.0)
        ring = KeyRing(tmp_path)
        return validate_update("dev1", x.to_bytes(), rnd, {"w": (4,)}, DEFAULT_LIMITS, 10**5, ring)

    # Execute / Assert
    assert check(u) is not None
    with pytest.raises(InvalidUpdate) as e:
        check(relayed)
    assert e.value.reason == "bad_signature"


def test_task_digest_layout_and_vector() -> None:
    """The example of docs/protocol.md §5.2.1 (aggregator key: RFC 8032 test 2)."""
    from fedge.envelopes import RoundTask, TrainHyper

    seed = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"
    key = SigningKey.from_bytes(bytes.fromhex(seed))
    t = RoundTask(
        round=7,
        base_version=6,
        deadline=1700000120.0,
        codec="fp32",
        hyper=TrainHyper(epochs=1, batch_size=32, lr=0.05),
        nonce=bytes(range(16)),
        selected=("dev-01",),
        issued=1700000000.0,
    )
    d = t.digest()
    assert d.hex() == (
        "66656467652e7461736b2e7631000000000000070000000641d954fc5e00000041d954fc40000000"
        "046670333200000001000000203fa999999999999a00000000000000000000000000000000000000"
        "0000000000000000000000000000000000000010000102030405060708090a0b0c0d0e0f01000000"
        "01066465762d303100000000"
    )
    assert key.sign(d).hex() == (
        "8753657c1b1381fdf2b8dfa8592ecfe00e78ebbee69fc609483d44df6a7477ba"
        "461877af53a3292f20a9a2f0801ae22b536796df57e5bd3c2237832f301b9005"
    )
    signed = replace(t, signature=key.sign(d))
    back = RoundTask.from_bytes(signed.to_bytes())
    assert back == signed
    assert key.verify_key.verify(back.digest(), back.signature)
    # Every field is covered: changing any one breaks the signature.
    for change in (
        {"round": 8},
        {"base_version": 5},
        {"deadline": 1700000121.0},
        {"issued": 1.0},
        {"codec": "fp16"},
        {"hyper": TrainHyper(epochs=2, batch_size=32, lr=0.05)},
        {"nonce": bytes(16)},
        {"selected": None},
        {"accepts_from": 7},
    ):
        assert not key.verify_key.verify(replace(t, **change).digest(), signed.signature), change
    assert b"signature" not in t.to_bytes()  # unsigned fleets send what v1 devices know
