"""Throwaway TLS material for a test broker on 127.0.0.1.

``make_certs(directory, password)`` writes a CA, a broker key and certificate
signed by it (SAN ``IP:127.0.0.1``, so clients check the host name) in a
PKCS12 keystore, a PKCS12 truststore holding the CA for Java clients, and the
CA as PEM for Python clients (``ssl_cafile``). Keys are EC P-256 (fast to
make), certificates valid for a day. Uses ``cryptography``, which Beam
already depends on.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

HOST = '127.0.0.1'


@dataclasses.dataclass(frozen=True)
class Certs:
  ca_pem: pathlib.Path  # the CA certificate (Python clients: ssl_cafile)
  keystore: pathlib.Path  # PKCS12: broker key + certificate chain
  truststore: pathlib.Path  # PKCS12: the CA as a trusted entry (Java)


def _certificate(subject: str, public_key, issuer: str, signing_key,
                 ca: bool) -> x509.Certificate:
  now = datetime.datetime.now(datetime.timezone.utc)
  builder = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                         subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        issuer)]))
             .public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                            critical=True))
  if ca:
    builder = builder.add_extension(x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True,
        content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, encipher_only=False,
        decipher_only=False), critical=True)
  else:
    builder = builder.add_extension(x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
  return builder.sign(signing_key, hashes.SHA256())


def make_certs(directory: str | pathlib.Path, password: str) -> Certs:
  """Writes ``ca.pem``, ``broker.p12`` and ``truststore.p12`` (both PKCS12
  files encrypted with ``password``) into ``directory``."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = _certificate('rtml test CA', ca_key.public_key(), 'rtml test CA',
                    ca_key, ca=True)
  key = ec.generate_private_key(ec.SECP256R1())
  cert = _certificate(HOST, key.public_key(), 'rtml test CA', ca_key,
                      ca=False)
  encryption = serialization.BestAvailableEncryption(password.encode())
  certs = Certs(directory / 'ca.pem', directory / 'broker.p12',
                directory / 'truststore.p12')
  certs.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  certs.keystore.write_bytes(pkcs12.serialize_key_and_certificates(
      b'broker', key, cert, [ca], encryption))
  certs.truststore.write_bytes(pkcs12.serialize_java_truststore(
      [pkcs12.PKCS12Certificate(ca, b'ca')], encryption))
  for path in (certs.keystore, certs.truststore):
    path.chmod(0o600)
  return certs
