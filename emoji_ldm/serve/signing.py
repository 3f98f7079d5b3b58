"""C2PA signing of /v1/generate's files with the operator's keys (inference/provenance.py); a set's files are
signed by `serve.sets.set_files` (`provenance.sign_set_files`)."""

from __future__ import annotations


def signed_outputs(made: list[tuple[bytes, dict]], target) -> list[tuple[bytes, dict]]:
    """/v1/generate's files C2PA-signed with the operator's keys (none set: as made). A file the manifest would
    take over the target's cap goes out unsigned, its manifest store base64 in its metadata's `c2pa_sidecar`."""
    import base64

    from emoji_ldm.inference.provenance import SigningKeys, lineage_of, signed_files

    keys = SigningKeys.from_env()
    if keys is None:
        return made
    out = []
    for data, params in made:
        drawn_as = ((params.get("animation") or {}).get("file") or {}).get("format")  # a loop's; a still: PNG
        name = "emoji." + {"gif": "gif", "webp": "webp"}.get(drawn_as, "png")
        files = signed_files(name, data, lineage_of(params), keys, target)
        sidecar = next((v for k, v in files.items() if k != name), None)
        out.append((files[name], params if sidecar is None else
                    {**params, "c2pa_sidecar": base64.b64encode(sidecar).decode()}))
    return out
