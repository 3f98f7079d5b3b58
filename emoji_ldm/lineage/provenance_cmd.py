"""`emoji-ldm provenance dev-cert` (a CA and an end-entity chain for local signing) and the C2PA part of
`emoji-ldm lineage FILE` (`verify_target`, `provenance_lines`).

    emoji-ldm provenance dev-cert --out DIR [--days 90] [--force]

c2pa refuses a self-signed signer, so dev-cert makes two certificates: a CA (its key is thrown away once it has
signed, so nothing more can be issued under it) and an end-entity certificate for signing: digital signature,
the email-protection EKU (c2pa's default EKU list refuses id-kp-documentSigning: "certificate missing required
EKU"), and an Organization in its subject (older c2pa-rs reported `claimSignature.mismatch` for a signer without
one). Its key is EC P-256 (ES256): the algorithm every C2PA reader verifies (c2pa-js reads no Ed25519), and a
smaller manifest than PS256's (an RSA signature and chain add about 1 KB). The chain is checked before it is
written: a probe image is signed and verified, and a chain whose probe shows anything but
`signingCredential.untrusted` is made anew (three tries).
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.inference.provenance import CERT_ENV, KEY_ENV, SIDECAR_SUFFIX, TRUST_ENV, UNTRUSTED

TRIES = 3


@dataclass(frozen=True)
class DevCertConfig:
    out: str = opt(help="a local folder for ca.pem, chain.pem and key.pem")
    days: int = opt(90, help="how long the certificates are valid, in days")
    force: bool = opt(False, help="replace the files of an earlier dev-cert in --out")

    def __post_init__(self):
        if not 1 <= self.days <= 3650:
            raise UserError(f"--days must be between 1 and 3650, got {self.days}")


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "emoji-ldm local development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer, public_key, signing_key, days: int, ca: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.timezone.utc)
    usage = dict(digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(**usage), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if not ca:
        from cryptography.x509.oid import ExtendedKeyUsageOID

        builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                                  critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def make_dev_chain(days: int = 90) -> tuple[bytes, bytes, bytes]:
    """(chain PEM: end-entity then CA, the end-entity's PEM key, the CA's PEM certificate)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(_name("emoji-ldm dev CA"), _name("emoji-ldm dev CA"), ca_key.public_key(), ca_key, days, True)
    leaf = _certificate(_name("emoji-ldm dev signer"), ca.subject, key.public_key(), ca_key, days, False)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem, ca.public_bytes(pem)


def _probe_ok(chain: bytes, key: bytes) -> bool:
    """Whether a probe PNG signed with the chain verifies with only the untrusted-signer notice."""
    from PIL import Image

    from emoji_ldm.inference.provenance import SigningKeys, sign, verify

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 200, 0, 255)).save(buf, "PNG")
    try:
        result = verify(sign(buf.getvalue(), "png", {"probe": True}, SigningKeys(chain, key)), trust_pem=b"")
    except UserError:
        return False
    return result["valid"] and set(result["status"]) <= {UNTRUSTED}


def dev_cert(config: DevCertConfig) -> dict:
    """Write ca.pem, chain.pem and key.pem (owner-only) under --out; returns their paths."""
    out = Path(config.out)
    paths = {"ca": out / "ca.pem", "chain": out / "chain.pem", "key": out / "key.pem"}
    if not config.force and any(p.exists() for p in paths.values()):
        raise UserError(f"{out} already holds a dev certificate ({', '.join(p.name for p in paths.values())}): "
                        "give another --out, or --force to replace it")
    for _ in range(TRIES):
        chain, key, ca = make_dev_chain(config.days)
        if _probe_ok(chain, key):
            break
    else:
        raise UserError(f"{TRIES} fresh dev certificate chains failed their probe signature: the installed "
                        "c2pa-python cannot verify what it signs; check its version (pyproject.toml pins it)")
    out.mkdir(parents=True, exist_ok=True)
    paths["ca"].write_bytes(ca)
    paths["chain"].write_bytes(chain)
    paths["key"].touch(mode=0o600)
    paths["key"].chmod(0o600)  # before the key goes in: never readable by others, even for a moment
    paths["key"].write_bytes(key)
    return {k: str(p.resolve()) for k, p in paths.items()} | {"days": config.days}


def dev_cert_report(result: dict) -> str:
    return "\n".join([
        f"provenance dev-cert: a CA and an ES256 end-entity chain, valid {result['days']} days, for local use only "
        "(readers show `signingCredential.untrusted`)",
        f"  export {CERT_ENV}={result['chain']}", f"  export {KEY_ENV}={result['key']}",
        f"  export {TRUST_ENV}={result['ca']}   # optional: verify against this CA (state Trusted)"])


def verify_target(uri: str) -> dict:
    """`provenance.verify` of a local or S3 file, with its `<stem>.c2pa` sidecar when one is beside it."""
    from emoji_ldm.inference.provenance import verify
    from emoji_ldm.store.artifacts import exists, read_bytes

    data = read_bytes(uri)
    stem = uri.rsplit(".", 1)[0] if "." in uri.rsplit("/", 1)[-1] else uri
    sidecar = read_bytes(stem + SIDECAR_SUFFIX) if exists(stem + SIDECAR_SUFFIX) else None
    return {**verify(data, sidecar, name=uri), "file": uri, "sidecar": stem + SIDECAR_SUFFIX if sidecar else None}


def format_provenance(result: dict) -> str:
    return "\n".join(f"{label:9} {text}" for label, text in provenance_lines(result))


def provenance_lines(result: dict) -> list[tuple[str, str]]:
    """(label, text) lines for `lineage`'s report of a `verify_target` result."""
    if not result["signed"]:
        return [("c2pa", "no C2PA manifest (unsigned: no signing keys were set, or it was stripped)")]
    signer = result.get("signer") or {}
    who = f'signed by "{signer.get("common_name", "?")}" (issuer "{signer.get("issuer", "?")}", ' \
          f'{signer.get("alg", "?")})'
    verdict = "the signature and the file's hash hold" if result["valid"] else "INVALID: the file or its manifest " \
                                                                               "changed after signing"
    lines = [("c2pa", f"{who}; {result['state']}: {verdict}")]
    if result.get("sidecar"):
        lines.append(("", f"manifest in the sidecar {result['sidecar']}"))
    if result["status"]:
        notes = [c + (" (not on a trust list: a dev certificate, or no EMOJI_LDM_C2PA_TRUST)" if c == UNTRUSTED
                      else "") for c in result["status"]]
        lines.append(("", "status: " + ", ".join(notes)))
    lineage = result.get("lineage") or {}
    table = lineage.get("latent_table") or lineage.get("dataset")
    facts = [f"model {lineage['model_content_id']}" if lineage.get("model_content_id") else None,
             f"table {table} @ {lineage.get('latent_table_version', lineage.get('dataset_version'))}" if table
             else None, f"seed {lineage['seed']}" if "seed" in lineage else None,
             f"prompt sha256 {lineage['prompt_sha256'][:16]}…" if lineage.get("prompt_sha256") else None]
    if any(facts):
        lines.append(("", "lineage: " + ", ".join(f for f in facts if f)))
    items = result.get("ingredients") or []
    if items:
        bad = [i["title"] for i in items if not i["signed"] or set(i["status"]) - {UNTRUSTED}]
        lines.append(("", f"ingredients: {len(items)}" + (f", not signed or not valid: {', '.join(bad)}" if bad
                                                         else ", each signed and valid")))
    return lines
