"""The signed repository, without processes: what the server and a device accept and refuse."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Role

from edgefleet import device_trust, model_targets, signing
from edgefleet.errors import (
    HashMismatchError,
    InvalidRequestError,
    MetadataExpiredError,
    MetadataRefusedError,
    SignatureError,
    TransportError,
)


class Repo:
    """An in-memory server: OnlineRoles plus a dict of published files."""

    def __init__(self, folder: Path):
        self.keys = signing.init_keys(folder / "keys")
        self.root = self.keys.trust_root.read_bytes()
        self.online = signing.OnlineRoles(self.root, signing.load_signer(self.keys.online))
        self.targets_signer = signing.load_signer(self.keys.targets)
        self.root_signer = signing.load_signer(self.keys.root)
        self.files: dict[str, bytes] = {"1.root": self.root}
        self.versions = (0, 0, 0)  # targets, snapshot, timestamp
        self.current: bytes | None = None

    def publish(self, path: str, data: bytes, signer=None) -> None:
        signed = signing.sign_targets(
            self.current, [signing.target_file(path, data, {"k": "v"})], signer or self.targets_signer
        )
        md = self.online.check_targets(signed, self.versions[0])
        release = self.online.release(
            md,
            targets_version=self.versions[0],
            snapshot_version=self.versions[1],
            timestamp_version=self.versions[2],
        )
        self.files.update(release.files)
        self.versions = (release.targets_version, release.snapshot_version, release.timestamp_version)
        self.current = signed

    def get(self, name: str) -> bytes:
        if name == "root":
            name = "1.root"
        if name not in self.files:
            raise FileNotFoundError(name)
        return self.files[name]


def device(tmp_path: Path, repo: Repo, name: str = "dev") -> device_trust.DeviceTrust:
    folder = tmp_path / name
    if not (folder / "pinned-root.json").exists():
        device_trust.DeviceTrust.pin_root(folder, repo.root)
    return device_trust.DeviceTrust(folder, repo.get)


def test_published_target_is_verified_by_a_device(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("m/1/float32.tflite", b"model-bytes")
    target = device(tmp_path, repo).target("m/1/float32.tflite")
    (tmp_path / "f").write_bytes(b"model-bytes")
    device_trust.verify_file(target, tmp_path / "f")
    assert target.custom == {"k": "v"}


@pytest.mark.parametrize("tampered", [b"model-bytez", b"model-bytes!", b"short"])
def test_bytes_that_differ_from_the_signed_hash_are_refused(tmp_path: Path, tampered: bytes) -> None:
    repo = Repo(tmp_path)
    repo.publish("m/1/float32.tflite", b"model-bytes")
    target = device(tmp_path, repo).target("m/1/float32.tflite")
    (tmp_path / "f").write_bytes(tampered)
    with pytest.raises(HashMismatchError):
        device_trust.verify_file(target, tmp_path / "f")


def test_targets_signed_by_an_untrusted_key_are_refused(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    intruder = signing.load_signer(signing.init_keys(tmp_path / "intruder").targets)
    with pytest.raises(SignatureError):
        repo.publish("m/1/float32.tflite", b"x", signer=intruder)


def test_targets_signed_by_the_online_key_are_refused(tmp_path: Path) -> None:
    """Holding the server's key is not enough to add a model."""
    repo = Repo(tmp_path)
    with pytest.raises(SignatureError):
        repo.publish("m/1/float32.tflite", b"x", signer=signing.load_signer(repo.keys.online))


def test_threshold_cannot_be_met_by_one_key_signing_twice_or_listed_twice(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    signed = signing.sign_targets(None, [signing.target_file("a", b"x", {})], repo.targets_signer)
    md = Metadata.from_bytes(signed)
    root = Metadata.from_bytes(repo.root).signed
    root.roles["targets"].threshold = 2
    md.sign(repo.targets_signer, append=True)  # the same key signs again: still one signature
    assert len(md.signatures) == 1
    with pytest.raises(Exception, match="signed by 1/2"):
        root.verify_delegate("targets", md.signed_bytes, md.signatures)
    keyid = root.roles["targets"].keyids[0]
    with pytest.raises(ValueError, match="unique"):
        Role([keyid, keyid], 2)  # listing a key twice to count it twice is refused outright


def test_key_rotation_new_root_signed_by_old_and_new_is_accepted_and_the_revoked_key_is_not(
    tmp_path: Path,
) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    device(tmp_path, repo).target("a")
    old_root_signer = signing.load_signer(repo.keys.root)
    old_targets = repo.targets_signer
    new_root, new_targets = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()

    rotated = Metadata.from_bytes(repo.root)
    root = rotated.signed
    root.revoke_key(old_root_signer.public_key.keyid, "root")
    root.revoke_key(old_targets.public_key.keyid, "targets")
    root.add_key(new_root.public_key, "root")
    root.add_key(new_targets.public_key, "targets")
    root.version = 2
    rotated.signatures.clear()
    only_new = Metadata.from_bytes(rotated.to_bytes())
    only_new.sign(new_root)
    rotated.sign(old_root_signer)  # the old root vouches for the new one...
    rotated.sign(new_root, append=True)  # ...and the new key signs too

    repo.files["2.root"] = only_new.to_bytes()  # without the old root's signature: not a valid rotation
    with pytest.raises(MetadataRefusedError):
        device(tmp_path, repo).target("a")
    repo.files["2.root"] = rotated.to_bytes()
    repo.root = rotated.to_bytes()
    repo.online = signing.OnlineRoles(repo.root, signing.load_signer(repo.keys.online))

    with pytest.raises(SignatureError):  # the revoked targets key can no longer publish
        repo.publish("b", b"2", signer=old_targets)
    repo.publish("b", b"2", signer=new_targets)
    assert device(tmp_path, repo).target("b").length == 1


def test_targets_version_must_follow_the_published_one(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    stale = signing.sign_targets(
        None, [signing.target_file("b", b"2", {})], repo.targets_signer
    )  # version 1 again
    with pytest.raises(InvalidRequestError, match="does not follow"):
        repo.online.check_targets(stale, repo.versions[0])


def test_rollback_is_refused_also_when_the_stored_metadata_has_since_expired(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    old_files = dict(repo.files)
    repo.publish("b", b"2")
    md = Metadata.from_bytes(repo.files["timestamp"])  # the newer timestamp, short-lived
    md.signed.expires = signing.utcnow() + timedelta(seconds=2)
    md.signatures.clear()
    md.sign(signing.load_signer(repo.keys.online))
    repo.files["timestamp"] = md.to_bytes()
    device(tmp_path, repo).target("b")
    time.sleep(3)  # what the device stored has now expired; it still marks the floor
    repo.files = old_files
    with pytest.raises(MetadataRefusedError, match="BadVersionNumber|version"):
        device(tmp_path, repo).target("a")


def test_new_timestamp_version_rollback_is_refused_also_after_restart(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    old_files = dict(repo.files)
    repo.publish("b", b"2")
    device(tmp_path, repo).target("b")  # the device has seen the newer release
    repo.files = old_files  # a server (or network) replays the older, validly signed release
    with pytest.raises(MetadataRefusedError):
        device(tmp_path, repo).target("a")  # a new DeviceTrust: the floor came from disk


def test_expired_timestamp_is_refused_as_a_freeze_attack(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    md = Metadata.from_bytes(repo.files["timestamp"])
    md.signed.expires = signing.utcnow().replace(year=2020)
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signing.load_signer(repo.keys.online))
    repo.files["timestamp"] = md.to_bytes()
    # Refused and reported, but as "try later" (MetadataExpiredError), never as a bad model: the same error
    # is what a device with a wrong clock sees.
    with pytest.raises(MetadataExpiredError, match="expired"):
        device(tmp_path, repo).target("a")


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b'{"signed": 1}', b"\xff" * 100])
def test_malformed_metadata_gives_a_clean_error(tmp_path: Path, garbage: bytes) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    repo.files["timestamp"] = garbage
    with pytest.raises(MetadataRefusedError):
        device(tmp_path, repo).target("a")
    with pytest.raises(InvalidRequestError):
        repo.online.check_targets(garbage, 1)


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    with pytest.raises(SignatureError, match="not in the signed targets"):
        device(tmp_path, repo).target("b")


def test_unreachable_server_is_a_transport_error(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")

    def down(name: str) -> bytes:
        raise TransportError("no route")

    device_trust.DeviceTrust.pin_root(tmp_path / "d", repo.root)
    with pytest.raises(TransportError):
        device_trust.DeviceTrust(tmp_path / "d", down).target("a")


def test_floats_are_signed_as_strings_and_read_back(tmp_path: Path) -> None:
    custom = model_targets.canonical_safe({"atol": 1e-4, "nested": [0.5, {"x": 2.0}], "n": 3})
    assert custom == {"atol": "0.0001", "nested": ["0.5", {"x": "2.0"}], "n": 3}


# ---- the chain of roots starts at the pinned one ------------------------------------------------------------


def _rotate(repo: Repo, new_root: CryptoSigner, new_targets: CryptoSigner | None = None) -> None:
    """A real rotation: the next root.json names `new_root` (and `new_targets`) and is signed by the old root
    keys' threshold and the new one's; the repository serves it as `N.root`."""
    md = Metadata.from_bytes(repo.root)
    old_signers = [repo.root_signer]
    root = md.signed
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(new_root.public_key, "root")
    if new_targets is not None:
        for keyid in list(root.roles["targets"].keyids):
            root.revoke_key(keyid, "targets")
        root.add_key(new_targets.public_key, "targets")
        repo.targets_signer = new_targets
    root.version += 1
    md.signatures.clear()
    for signer in [*old_signers, new_root]:
        md.sign(signer, append=True)
    repo.root, repo.root_signer = md.to_bytes(), new_root
    repo.files[f"{root.version}.root"] = repo.root
    repo.online = signing.OnlineRoles(repo.root, signing.load_signer(repo.keys.online))


def _self_signed_root(version: int, root_key: CryptoSigner, targets_key: CryptoSigner, like: bytes) -> bytes:
    """What an attacker with keys of their own writes: a root.json that only vouches for itself."""
    md = Metadata.from_bytes(like)
    root = md.signed
    for role in ("root", "targets"):
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
    root.add_key(root_key.public_key, "root")
    root.add_key(targets_key.public_key, "targets")
    root.version = version
    md.signatures.clear()
    md.sign(root_key)
    return md.to_bytes()


def _write_from_another_process(files: dict[Path, bytes]) -> None:
    """Another process (with the agent's uid) replaces the files: rename over them, symlinks included."""
    script = (
        "import os, sys, json\n"
        "for path, hexdata in json.loads(sys.stdin.read()).items():\n"
        "    open(path + '.new', 'wb').write(bytes.fromhex(hexdata))\n"
        "    os.replace(path + '.new', path)\n"
    )
    payload = json.dumps({str(p): data.hex() for p, data in files.items()})
    subprocess.run([sys.executable, "-c", script], input=payload.encode(), check=True, timeout=30)


def test_legitimate_root_rotations_are_followed_from_the_pinned_root_also_offline(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    device(tmp_path, repo).target("a")
    _rotate(repo, CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519())  # new targets key too
    _rotate(repo, CryptoSigner.generate_ed25519())
    repo.publish("b", b"2")
    assert device(tmp_path, repo).target("b").length == 1
    # At every load, offline: pinned v1 -> stored v2 -> stored v3, each signed by the one before.
    offline = device_trust.DeviceTrust(tmp_path / "dev", _offline)
    assert offline.chained_root()[0].version == 3
    assert offline.local_target("b").length == 1


def test_stored_root_written_by_another_process_is_never_trusted_and_the_real_one_is_fetched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = Repo(tmp_path)
    repo.publish("a", b"1")
    _rotate(repo, CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519())
    repo.publish("b", b"2")
    assert device(tmp_path, repo).target("b").length == 1
    folder = tmp_path / "dev"

    # The attacker's own keys: a root that vouches for itself, and targets it signs for its own bytes.
    evil_root, evil_targets = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    forged = signing.sign_targets(None, [signing.target_file("evil", b"666", {})], evil_targets)
    forged_md = Metadata.from_bytes(forged)
    forged_md.signed.version = 99
    forged_md.signatures.clear()
    forged_md.sign(evil_targets)
    for replaced in (
        {folder / "root_history" / "2.root.json": _self_signed_root(2, evil_root, evil_targets, repo.root)},
        {folder / "root_history" / "3.root.json": _self_signed_root(3, evil_root, evil_targets, repo.root)},
        {folder / "root.json": _self_signed_root(99, evil_root, evil_targets, repo.root)},
    ):
        _write_from_another_process({**replaced, folder / "targets.json": forged_md.to_bytes()})
        offline = device_trust.DeviceTrust(folder, _offline)
        with pytest.raises(MetadataRefusedError):
            offline.local_target("evil")
        with pytest.raises(MetadataRefusedError):  # nor anything else until the real chain is back
            offline.local_target("b")
        # Online, the chain is walked from the pinned root again: the real root 2 and targets come back.
        assert device(tmp_path, repo).target("b").length == 1
        assert offline.chained_root()[0].version == 2
        assert offline.local_target("b").length == 1
        with pytest.raises(SignatureError):
            offline.local_target("evil")
    assert "does not chain from the pinned root" in caplog.text
    assert "is not the root chained from the pinned one" in caplog.text


def _offline(name: str) -> bytes:
    raise TransportError("offline")
