"""Test certificates, made at run time with `cryptography` into a temporary directory (no
private key is ever committed).

`Pki(dir)` makes two server CAs (A and B) with a server certificate each for localhost,
127.0.0.1 and ::1, a client CA with a client certificate (CN "alice"), and a second client
CA with a client certificate (CN "mallory") that the broker must not trust. Every file is
PEM; keys are P-256 (fast to make, understood by OpenSSL, rustls and Node).
"""

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]


class Issued:
    """A certificate and its key, as objects and as PEM files."""

    def __init__(self, cert, key, cert_path, key_path):
        self.cert = cert
        self.key = key
        self.cert_path = str(cert_path)
        self.key_path = str(key_path)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory, stem, cert, key):
    cert_path = Path(directory) / f"{stem}.pem"
    key_path = Path(directory) / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Issued(cert, key, cert_path, key_path)


def _builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2)))


def make_ca(directory, stem, cn):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(cn), _name(cn), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return _write(directory, stem, cert, key)


def issue(directory, stem, ca, cn, server):
    """A leaf certificate signed by `ca`: for a server (the localhost names) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(_name(cn), ca.cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(SERVER_NAMES), critical=False)
    return _write(directory, stem, builder.sign(ca.key, hashes.SHA256()), key)


class Pki:
    def __init__(self, directory):
        d = Path(directory)
        self.dir = d
        self.ca_a = make_ca(d, "ca-a", "mqttd test CA A")
        self.server_a = issue(d, "server-a", self.ca_a, "localhost", server=True)
        self.ca_b = make_ca(d, "ca-b", "mqttd test CA B")
        self.server_b = issue(d, "server-b", self.ca_b, "localhost", server=True)
        self.client_ca = make_ca(d, "client-ca", "mqttd test client CA")
        self.alice = issue(d, "alice", self.client_ca, "alice", server=False)
        self.rogue_ca = make_ca(d, "rogue-ca", "untrusted client CA")
        self.mallory = issue(d, "mallory", self.rogue_ca, "mallory", server=False)
