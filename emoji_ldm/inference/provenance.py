"""Signed provenance: a C2PA manifest in every emoji (PNG, APNG, GIF, WebP) and set, and its verification.

Why: the PNG text chunks (`pngmeta`) say what made an emoji, but anyone can write them. A C2PA manifest is
signed by the operator's certificate, binds a hash of the file's bytes, and is read by any C2PA tool
(c2pa-python's Reader, c2patool, the Content Credentials site), so a change of one pixel shows.

Each manifest holds:
- `c2pa.actions`: `c2pa.created` with the IPTC digital source type `trainedAlgorithmicMedia`;
- `org.emoji-ldm.lineage` (`LINEAGE_LABEL`): the model's URI and content id, its latent table and dataset (URI
  and version), seed and settings, and the sha256 of the prompt, never the prompt itself (`lineage_of`);
- no thumbnail: c2pa's default one (a JPEG of the image) costs tens of KB, a large part of Slack's 128 KB cap.
A set's manifest is embedded in its contact sheet and lists the set's emoji as ingredients (`sign_set`;
`sign_set_files` signs the files `serve.sets.set_files` makes, items and sheet, and records it in manifest.json).

`signed_files` checks a target's byte cap after signing: when the embedded manifest takes the file over it,
the file is written unsigned beside `<stem>.c2pa`, a sidecar manifest store, and the lineage says so
(`placement`). `verify` reads either.

Keys come from the operator: `EMOJI_LDM_C2PA_CERT` (a PEM chain, end-entity first) and `EMOJI_LDM_C2PA_KEY` (its
PEM private key) name files (`SigningKeys.from_env`); they are never logged. `EMOJI_LDM_C2PA_TRUST` optionally
names a PEM of trust anchors for `verify`. c2pa refuses a self-signed signer: `emoji-ldm provenance dev-cert`
makes a CA and an end-entity chain for local use, whose files verify with only `signingCredential.untrusted`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from emoji_ldm.errors import UserError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
LINEAGE_LABEL = "org.emoji-ldm.lineage"
CERT_ENV, KEY_ENV, TRUST_ENV = "EMOJI_LDM_C2PA_CERT", "EMOJI_LDM_C2PA_KEY", "EMOJI_LDM_C2PA_TRUST"
SIDECAR_SUFFIX = ".c2pa"
MEDIA_TYPES = {"png": "image/png", "apng": "image/png", "gif": "image/gif", "webp": "image/webp"}
UNTRUSTED = "signingCredential.untrusted"  # the one notice a file signed with a dev (or unlisted) certificate gets
# what the lineage copies from an image's generation parameters (`pngmeta.FIELDS`) and its model's card
_PARAM_KEYS = ("model", "model_content_id", "seed", "steps", "guidance", "scheduler", "size", "code_version",
               "adapter_uri", "adapter_content_id", "target", "loop")
_CARD_KEYS = ("dataset", "dataset_version", "latent_table", "latent_table_version")
_SECRET_KEYS = ("prompt", "negative_prompt", "parameters")  # texts a lineage must carry only as hashes
# no network while reading or signing: no remote manifests, no OCSP; no thumbnail (see the module docstring)
_SETTINGS = {"builder": {"thumbnail": {"enabled": False}},
             "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}


def _alg_of(private_key) -> str:
    """The c2pa signing algorithm for a private key (cryptography's key object)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ED25519"
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "PS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if private_key.curve.name in algs:
            return algs[private_key.curve.name]
    raise UserError(f"the C2PA signing key is a {type(private_key).__name__}: use an EC P-256/P-384/P-521, RSA or "
                    "Ed25519 key (`emoji-ldm provenance dev-cert` makes an EC P-256 one)")


@dataclass(frozen=True)
class SigningKeys:
    """The operator's certificate chain (PEM, end-entity first, then its CAs) and private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never printed, logged or written into a manifest
    alg: str = ""  # from the key when empty: ES256 for P-256, PS256 for RSA, ED25519 for Ed25519

    def __post_init__(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            chain = x509.load_pem_x509_certificates(self.cert_pem)
        except ValueError:
            raise UserError(f"{CERT_ENV}: not a PEM certificate chain: give the end-entity certificate followed "
                            "by its CA certificates, in PEM") from None
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError):
            raise UserError(f"{KEY_ENV}: not an unencrypted PEM private key: give the signing certificate's key "
                            "in PEM, without a password") from None
        leaf = chain[0]
        if leaf.issuer == leaf.subject:
            raise UserError(f"{CERT_ENV}: the signing certificate {leaf.subject.rfc4514_string()!r} is self-signed, "
                            "which C2PA refuses: sign with a certificate issued by a CA (`emoji-ldm provenance "
                            "dev-cert` makes a CA and an end-entity chain for local use)")
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
            raise UserError(f"{KEY_ENV}: the private key is not the key of the first certificate of {CERT_ENV}: "
                            "give the end-entity certificate's own key")
        object.__setattr__(self, "alg", (self.alg or _alg_of(key)).upper())

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path) -> "SigningKeys":
        try:
            return cls(Path(cert_path).read_bytes(), Path(key_path).read_bytes())
        except OSError as e:
            raise UserError(f"cannot read a C2PA signing file: {e.filename}: {e.strerror}") from None

    @classmethod
    def from_env(cls, environ=None) -> "SigningKeys | None":
        """The keys whose files `EMOJI_LDM_C2PA_CERT` and `EMOJI_LDM_C2PA_KEY` name; None when neither is set."""
        env = os.environ if environ is None else environ
        cert, key = env.get(CERT_ENV, "").strip(), env.get(KEY_ENV, "").strip()
        if not cert and not key:
            return None
        if not (cert and key):
            missing = KEY_ENV if cert else CERT_ENV
            raise UserError(f"{missing} is not set: C2PA signing needs both {CERT_ENV} (the PEM certificate chain) "
                            f"and {KEY_ENV} (its PEM private key), or neither (no signing)")
        return cls.from_files(cert, key)

    def subject(self) -> str:
        """The signing certificate's subject, as readers show the signer ("CN=...,O=...")."""
        from cryptography import x509

        return x509.load_pem_x509_certificates(self.cert_pem)[0].subject.rfc4514_string()

    def signer(self):
        import c2pa

        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.alg, self.cert_pem, self.key_pem, None))


def lineage_of(params: dict, card: dict | None = None) -> dict:
    """The lineage assertion of one image: what `params` (`pngmeta.generation_params`, or `read_params` of its
    text chunks) and its model's card say, the prompt as sha256 only."""
    out = {k: params[k] for k in _PARAM_KEYS if params.get(k) is not None}
    out.update({k: card[k] for k in _CARD_KEYS if card and card.get(k) is not None})
    if card and card.get("content_id") and "model_content_id" not in out:
        out["model_content_id"] = card["content_id"]
    for key in ("prompt", "negative_prompt"):
        if params.get(key):
            out[f"{key}_sha256"] = hashlib.sha256(params[key].encode()).hexdigest()
    return out


def _manifest(title: str, lineage: dict) -> dict:
    from emoji_ldm.version import code_version

    leaked = [k for k in _SECRET_KEYS if k in lineage]
    if leaked:
        raise UserError(f"the lineage to sign holds {', '.join(leaked)}: a manifest carries only their sha256 "
                        "(`provenance.lineage_of` makes the lineage from an image's parameters)")
    return {"title": title,
            "claim_generator_info": [{"name": "emoji-ldm", "version": code_version()}],
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]}},
                {"label": LINEAGE_LABEL, "data": lineage}]}


def _context():
    import c2pa

    return c2pa.Context.from_dict(_SETTINGS)


def _media_type(fmt: str) -> str:
    if fmt.lower().lstrip(".") not in MEDIA_TYPES:
        raise UserError(f"cannot sign a {fmt!r} file: C2PA signing here takes {', '.join(MEDIA_TYPES)}")
    return MEDIA_TYPES[fmt.lower().lstrip(".")]


def _sign(data: bytes, fmt: str, manifest: dict, keys: SigningKeys, embed: bool = True,
          ingredients: dict[str, bytes] | None = None) -> tuple[bytes, bytes]:
    """(the file, the manifest store); `embed=False`: the file as given, the store to keep beside it. c2pa
    verifies what it signed before returning (its `verify_after_sign`), so a bad signature raises here."""
    import c2pa

    mime = _media_type(fmt)
    out = io.BytesIO()
    with _context() as ctx, keys.signer() as signer, c2pa.Builder(manifest, ctx) as builder:
        if not embed:
            builder.set_no_embed()
        for name, item in (ingredients or {}).items():
            builder.add_ingredient({"title": name, "relationship": "componentOf"}, _media_type(_format_of(name)),
                                   io.BytesIO(item))
        try:
            store = builder.sign(signer, mime, io.BytesIO(data), out)
        except c2pa.C2paError as e:
            why = " ".join(str(e).split())[:400]  # c2pa's failures come on the lines after its first
            raise UserError(f"C2PA signing failed: {why}: check {CERT_ENV} and {KEY_ENV} "
                            "(a CA-issued end-entity certificate and its key)") from None
    return (out.getvalue() if embed else data), store


def sign(data: bytes, fmt: str, lineage: dict, keys: SigningKeys, title: str | None = None) -> bytes:
    """`data` (a `fmt` file: png, apng, gif or webp) with an embedded C2PA manifest: `c2pa.created` by a
    trained algorithm, and `lineage` (`lineage_of`) as the `org.emoji-ldm.lineage` assertion."""
    return _sign(data, fmt, _manifest(title or f"emoji.{fmt}", lineage), keys)[0]


def sidecar_name(name: str) -> str:
    """`party_parrot.gif` -> `party_parrot.c2pa`: the sidecar beside a file with the same stem."""
    return str(Path(name).with_suffix(SIDECAR_SUFFIX))


def signed_files(name: str, data: bytes, lineage: dict, keys: SigningKeys | None,
                 target=None) -> dict[str, bytes]:
    """{name: the signed file} or, when the embedded manifest takes it over `target`'s cap (`targets.Target`;
    None or no cap: no check), {name: the file unsigned, `sidecar_name(name)`: its manifest store}, the
    lineage's `placement` saying why. Without keys (None: the operator set none), {name: data}."""
    if keys is None:
        return {name: data}
    fmt = _format_of(name, data)
    signed = sign(data, fmt, lineage, keys, Path(name).name)
    cap = getattr(target, "max_bytes", None)
    if cap is None or len(signed) <= cap:
        return {name: signed}
    placement = {"manifest": "sidecar", "sidecar": Path(sidecar_name(name)).name,
                 "reason": f"embedded, the manifest made the file {len(signed)} bytes, over {target.name}'s cap of "
                           f"{cap}: the file is as generated and its manifest is the sidecar"}
    _, store = _sign(data, fmt, _manifest(Path(name).name, {**lineage, "placement": placement}), keys, embed=False)
    return {name: data, sidecar_name(name): store}


def sign_set(sheet: bytes, items: dict[str, bytes], lineage: dict, keys: SigningKeys,
             title: str = "sheet.png") -> bytes:
    """The set's contact sheet (PNG) with the set's manifest: its `lineage` (the set id, model, tables, seed)
    and each item (file name -> the bytes as written, signed themselves) as a `componentOf` ingredient, so a
    set's manifest names and hashes every emoji and carries their own manifests."""
    return _sign(sheet, "png", _manifest(title, lineage), keys, ingredients=items)[0]


def sign_set_files(files: dict[str, bytes], manifest: dict, params: list[dict] | None, keys: SigningKeys | None,
                   target=None, sheet: str = "sheet.png", manifest_file: str = "manifest.json") -> dict[str, bytes]:
    """A set's files (`serve.sets.set_files`: its items, sheet and manifest.json) signed: each item with its own
    lineage (`signed_files`: a sidecar when over `target`'s cap), the sheet with the set's manifest listing the
    items as ingredients (`sign_set`), and the set's `manifest` (updated in place, and as `manifest_file`)
    given a `provenance` record: the signer and the sidecars. Unchanged without keys."""
    if keys is None:
        return files
    model = manifest.get("model") or {}
    out = dict(files)
    for i, item in enumerate(manifest["items"]):
        drawn = {**(params[i] if params else {}), "prompt": item["prompt"], "seed": item["seed"],
                 "model": model.get("uri")}
        out.update(signed_files(item["file"], files[item["file"]], lineage_of(drawn, model), keys, target))
    seed = (manifest.get("settings") or {}).get("seed")
    set_lineage = {"set_id": manifest["id"], "items": len(manifest["items"]),
                   **lineage_of({"model": model.get("uri"), "seed": seed}, model)}
    out[sheet] = sign_set(files[sheet], {i["file"]: out[i["file"]] for i in manifest["items"]}, set_lineage, keys,
                          sheet)
    manifest["provenance"] = {"c2pa": "every item and the sheet (the set's manifest, the items as ingredients)",
                              "signer": keys.subject(), "digital_source_type": DIGITAL_SOURCE_TYPE,
                              "sidecars": sorted(n for n in out if n.endswith(SIDECAR_SUFFIX))}
    out[manifest_file] = json.dumps(manifest, indent=2).encode()
    return out


def _format_of(name: str, data: bytes | None = None) -> str:
    """png | apng | gif | webp, from the bytes when given (an APNG is named .png), else from the name."""
    if data is not None:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "apng" if b"acTL" in data[:data.find(b"IDAT")] else "png"
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return "gif"
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return "webp"
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in MEDIA_TYPES:
        raise UserError(f"{name!r} is not a PNG, APNG, GIF or WebP file: provenance covers those")
    return ext


def verify(file: bytes | str | Path, sidecar: bytes | None = None, trust_pem: bytes | None = None,
           name: str | None = None) -> dict:
    """What a C2PA reader says of `file` (bytes or a path; a path's `<stem>.c2pa` beside it is read when the
    file holds no manifest; `name` names bytes in messages): {"signed", "valid", "trusted", "state", "signer",
    "status", "embedded", "lineage", "ingredients"}. `valid`: the signature and the file's hash hold; `status`:
    the failure codes (a file signed with a dev certificate has only "signingCredential.untrusted"); trust
    anchors from `trust_pem` or the PEM file `EMOJI_LDM_C2PA_TRUST` names."""
    import c2pa

    if not isinstance(file, (bytes, bytearray)):
        path = Path(file)
        name, data = path.name, _read(path)
        beside = path.with_suffix(SIDECAR_SUFFIX)
        if sidecar is None and beside.is_file() and beside != path:
            sidecar = _read(beside)
    else:
        data = bytes(file)
    mime = _media_type(_format_of(name or "file.png", data))
    _check_image(data, name)
    settings = dict(_SETTINGS)
    trust_pem = trust_pem if trust_pem is not None else _trust_from_env()
    if trust_pem:
        settings["trust"] = {"user_anchors": trust_pem.decode()}
    with c2pa.Context.from_dict(settings) as ctx:
        try:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, ctx)
            if reader is None and sidecar is not None:
                reader = c2pa.Reader(mime, io.BytesIO(data), sidecar, ctx)
        except c2pa.C2paError as e:
            return {"file": name, "signed": True, "valid": False, "trusted": False, "state": "Invalid",
                    "status": [str(e).splitlines()[0]], "signer": None, "lineage": None, "ingredients": []}
        if reader is None:
            return {"file": name, "signed": False, "valid": False, "trusted": False, "state": None, "status": [],
                    "signer": None, "lineage": None, "ingredients": []}
        with reader:
            return {"file": name, **_report(reader)}


def _check_image(data: bytes, name: str | None) -> None:
    """A UserError for bytes that are no image: c2pa's answer for them ("asset could not be parsed") would read
    as a broken manifest."""
    from PIL import Image, UnidentifiedImageError

    try:
        Image.open(io.BytesIO(data)).close()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise UserError(f"{name or 'the file'} is not a readable PNG, GIF or WebP image: give an emoji file") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror}: give the path of a signed emoji") from None


def _trust_from_env() -> bytes | None:
    path = os.environ.get(TRUST_ENV, "").strip()
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{TRUST_ENV}={path!r}: {e.strerror}: name a PEM file of trust anchors, or unset it") from None


def _report(reader) -> dict:
    store = json.loads(reader.json())
    active = store["manifests"][store["active_manifest"]]
    state = reader.get_validation_state()
    lineage = next((a["data"] for a in active.get("assertions", []) if a.get("label") == LINEAGE_LABEL), None)
    sig = active.get("signature_info") or {}
    ingredients = [{"title": i.get("title"), "relationship": i.get("relationship"),
                    "signed": bool(i.get("active_manifest")),
                    "status": [c["code"] for c in
                               ((i.get("validation_results") or {}).get("activeManifest") or {}).get("failure", [])]}
                   for i in active.get("ingredients", [])]
    return {"signed": True, "valid": state in ("Valid", "Trusted"), "trusted": state == "Trusted", "state": state,
            "status": sorted({c["code"] for c in store.get("validation_status") or []}),
            "signer": {k: sig.get(k) for k in ("common_name", "issuer", "alg", "time") if sig.get(k)},
            "embedded": reader.is_embedded(), "lineage": lineage, "ingredients": ingredients}
