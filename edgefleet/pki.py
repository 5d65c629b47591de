"""The fleet's own certificate authority, for mutual TLS between devices, operators and the server.

    ca.key / ca.crt          created by the server on first start (its data folder, 0600 key)
    server.key / server.crt  the server's TLS identity, issued by the CA
    operator.key / .crt      a client certificate for the CLI (role "operator")
    device key               generated on the device, never leaves it; the server signs its CSR at enrollment
                             (role "device", common name = the device id the server chose)

The role is the certificate's organizational unit. A device's identity is read from the certificate its TLS
channel was authenticated with, never from a request field.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.durable import fsync_dir, write_atomic
from edgefleet.errors import InvalidRequestError

DEVICE = "device"
OPERATOR = "operator"
SERVER = "server"
ROLES = (DEVICE, OPERATOR, SERVER)

# Trailing metadata with which the server says why it refused a device, so the agent can tell "revoked, stop"
# from "try again later" without parsing a message.
REFUSAL_METADATA = "edgefleet-refusal"
REFUSAL_REVOKED = "revoked"


# Certificates start this long before they are issued, so a device whose clock is up to a year behind (no
# RTC, a dead battery) can still complete a TLS handshake and report its skew instead of going dark.
BACKDATE = datetime.timedelta(days=400)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def load_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidRequestError("expected an EC private key")
    return key


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "edgefleet fleet CA", days: int = 3650) -> CertificateAuthority:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - BACKDATE)
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, folder: Path) -> CertificateAuthority:
        key_path, cert_path = Path(folder) / "ca.key", Path(folder) / "ca.crt"
        if key_path.exists() and cert_path.exists():
            return cls(
                load_key(key_path.read_bytes()), x509.load_pem_x509_certificate(cert_path.read_bytes())
            )
        ca = cls.create()
        write_atomic(key_path, key_pem(ca.key), mode=0o600)
        write_atomic(cert_path, cert_pem(ca.cert))
        return ca

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        role: str,
        *,
        days: float = 365,
        not_before: datetime.datetime | None = None,
        dns_names: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> x509.Certificate:
        if role not in ROLES:
            raise InvalidRequestError(f"unknown role {role!r}")
        start = not_before or _now() - BACKDATE
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(
                _now() + datetime.timedelta(days=days)
                if not_before is None
                else start + datetime.timedelta(days=days)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def sign_csr(self, csr_pem: bytes, common_name: str, role: str, days: float = 365) -> x509.Certificate:
        """Issues a certificate for the CSR's key. The subject is ours to choose, whatever the CSR asks for.
        Raises InvalidRequestError for a malformed CSR or one not signed by its own key."""
        public_key = load_csr_checked(csr_pem).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return self.issue(public_key, common_name, role, days=days)


def load_csr_checked(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Raises InvalidRequestError unless this is a CSR signed by its own EC P-256 key."""
    if len(csr_pem) > 16 * 1024:
        raise InvalidRequestError("certificate signing request is too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as e:
        raise InvalidRequestError(f"malformed certificate signing request: {e}") from e
    if not valid:
        raise InvalidRequestError("the CSR is not signed by the key it carries")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidRequestError("device keys must be EC P-256")
    return csr


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "device")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    role: str
    name: str  # the device id for devices
    serial: int
    not_after: datetime.datetime


@lru_cache(maxsize=65536)
def identity_of(pem: bytes) -> Identity:
    """Who a (TLS-verified) certificate names. Cached: every call on a channel presents the same one."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(ou[0].value) if ou else ""
    return Identity(
        role if role in ROLES else "",
        str(cn[0].value) if cn else "",
        cert.serial_number,
        cert.not_valid_after_utc,
    )


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS material lives: its key and certificate and the CA certificate it trusts."""

    folder: Path

    @property
    def key(self) -> Path:
        return self.folder / "tls.key"

    @property
    def cert(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def exists(self) -> bool:
        return self.key.exists() and self.cert.exists() and self.ca.exists()

    def write(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, ca: x509.Certificate) -> None:
        write_atomic(self.ca, cert_pem(ca))
        write_atomic(self.cert, cert_pem(cert))
        write_atomic(self.key, key_pem(key), mode=0o600)

    def _next(self, path: Path) -> Path:
        return path.with_name(path.name + ".next")

    def replace_key_and_cert(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        """A renewal: the new pair is written whole (temp, fsync, rename) beside the old one first, then
        moved in; `finish_replacement` completes a move a crash interrupted, so the key and the certificate
        on disk always belong together."""
        write_atomic(self._next(self.key), key_pem(key), mode=0o600)
        write_atomic(self._next(self.cert), cert_pem(cert))
        self.finish_replacement()

    def finish_replacement(self) -> None:
        """Moves a fully written pending pair into place (a no-op when there is none)."""
        key_next, cert_next = self._next(self.key), self._next(self.cert)
        if cert_next.exists():  # written last: both are complete
            if key_next.exists():
                key_next.replace(self.key)
            cert_next.replace(self.cert)
            fsync_dir(self.folder)
        elif key_next.exists():  # the crash came before the certificate: the old pair still stands
            key_next.unlink()
