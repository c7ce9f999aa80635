"""Throw-away PKI for the test control plane.

A single CA signs the apiserver serving certificate and the admin client
certificate (CN=kubernetes-admin, O=system:masters, which bypasses RBAC), and,
through :func:`issue`, the client certificates of controllers that run under
their own RBAC identity and the serving certificates of webhook servers on
127.0.0.1. A separate key pair signs ServiceAccount tokens. EC P-256 keys keep
generation instant; everything is valid for a day because no test cluster
lives longer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of the generated files (all PEM)."""

    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def apiserver_crt(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_crt(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def generate(directory: Path, service_ip: str = "10.96.0.1") -> Pki:
    """Write CA, apiserver, admin and ServiceAccount key material into *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)

    ca_key = _new_key()
    ca_name = _name("llavarun-test-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(pki.ca_key, ca_key)
    pki.ca_crt.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    dns = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    issue(
        pki,
        pki.apiserver_crt,
        pki.apiserver_key,
        "kube-apiserver",
        server=True,
        dns=dns,
        ips=("127.0.0.1", service_ip),
    )
    issue(pki, pki.admin_crt, pki.admin_key, "kubernetes-admin", org="system:masters")

    sa_key = _new_key()
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def issue(
    pki: Pki,
    cert_path: Path,
    key_path: Path,
    cn: str,
    *,
    org: str | None = None,
    server: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Sign a leaf certificate with the cluster CA and write it and its key (PEM).

    A client certificate (``server=False``) authenticates to the apiserver as user *cn* in
    group *org*; a serving certificate carries the *dns* and *ips* SANs (what a webhook
    URL's host must match). Returns ``(cert_path, key_path)``.
    """
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(cn, org), ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


#: Hard-coded in the training-operator (pkg/cert): where the Secret would be mounted in its pod.
TRAINING_OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")


def training_operator_webhook_certs(directory: Path = TRAINING_OPERATOR_CERT_DIR) -> dict[str, bytes]:
    """Webhook serving certs for the training-operator, created once and shared by every cluster.

    Out of a pod nobody mounts its cert Secret, and its cert rotator waits (and the operator never
    becomes ready) until tls.crt exists in a fixed directory. We pre-fill the Secret with these
    files, which the rotator accepts as valid (10-year CA with SAN "training-operator-ca", server
    cert for training-operator.kubeflow.svc), so every cluster on the machine writes identical
    bytes and concurrent sessions never see a mismatched pair. Returns the Secret data.
    """
    import fcntl

    from cryptography.hazmat.primitives.asymmetric import rsa

    names = ("ca.crt", "ca.key", "tls.crt", "tls.key")
    directory.mkdir(parents=True, exist_ok=True)
    with (directory.parent / ".llavarun.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = {n: (directory / n) for n in names}
        if all(p.exists() for p in existing.values()) and _still_valid(existing["tls.crt"]):
            return {n: p.read_bytes() for n, p in existing.items()}

        now = dt.datetime.now(dt.UTC)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = _name("training-operator-ca", "training-operator")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("training-operator-ca")]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        dns = "training-operator.kubeflow.svc"
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(dns))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        def pkcs1(k: rsa.RSAPrivateKey) -> bytes:
            return k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )

        data = {
            "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
            "ca.key": pkcs1(ca_key),
            "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
            "tls.key": pkcs1(key),
        }
        for n, content in data.items():
            tmp = directory / f".{n}.tmp"
            tmp.write_bytes(content)
            tmp.replace(directory / n)
        return data


def _still_valid(cert_path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
