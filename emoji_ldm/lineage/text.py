"""The lineage report as text: `format_chain` (a `trace` result) and `format_row` (a `row_origin` result)."""

from __future__ import annotations


def _settings_text(p: dict) -> str:
    parts = [f"seed {p['seed']}" if "seed" in p else None, f"{p['steps']} steps" if "steps" in p else None,
             f"guidance {p['guidance']:g}" if "guidance" in p else None, p.get("scheduler"), p.get("size")]
    return ", ".join(x for x in parts if x)


def _commit_text(c: dict) -> str:
    op = c["operation"]
    if op == "build":
        crawl = c.get("crawl")
        what = c.get("source") or "?"
        if crawl:
            what += f" (profile {crawl.get('profile')}, tag {crawl.get('tag')}, pages {crawl.get('pages')})"
        what += f": {c.get('images_in')} in, {c.get('added')} added"
        if c.get("rejected"):
            what += f", {c['rejected']} rejected"
        what += f"; build {c.get('build_id')}"
    elif op == "caption":
        what = (f"captioner {c.get('captioner')}, model {c.get('caption_model')}, prompt {c.get('caption_prompt_id')}"
                + (f": {c['captioned']} captioned" if c.get("captioned") is not None else ""))
    elif op == "restore":
        what = f"back to version {c.get('restored_version')}"
    else:
        what = c.get("note", "")
    if c.get("message"):
        what += f'; "{c["message"]}"'
    if c.get("undone_by") is not None:
        what += f" (undone by the restore in version {c['undone_by']})"
    return f"v{c['version']:<4} {c.get('time', ''):19}  {op:8} {what}"


def _link_lines(link: dict) -> list[tuple[str, str]]:
    kind = link["link"]
    if kind == "png":
        lines = [("image", link["uri"])]
        if "prompt" in link:
            neg = f', negative "{link["negative_prompt"]}"' if link.get("negative_prompt") else ""
            lines.append(("", f'"{link["prompt"]}"{neg}, {_settings_text(link)}'
                              + (f"; code {link['code_version']}" if link.get("code_version") else "")))
        return lines
    if kind == "set":
        return [("set", link["uri"]), ("", f"{link.get('id')}: theme \"{link.get('theme')}\", {link['items']} items, "
                                           f"{_settings_text(link.get('settings') or {})}")]
    if kind == "bulk_manifest":
        return [("bulk", f"{link['uri']} @ {link['version']}"), ("", f"prompts {link.get('prompts')}")]
    if kind == "model":
        t = link.get("training") or {}
        lr = (link.get("train_config") or {}).get("lr")
        loss = link.get("final_loss")
        run = (f"preset {link.get('preset')}, {link.get('steps')} steps on {t.get('workers')} workers "
               f"(ZeRO-{t.get('zero_stage')}, global batch {t.get('global_batch')}"
               + (f", lr {lr:g}" if isinstance(lr, (int, float)) else "") + ")"
               + (f", final loss {loss:.4f}" if isinstance(loss, (int, float)) else ""))
        encoders = f"{_vae(link)}, text encoder {link.get('text_encoder')}"
        lines = [("model", link["uri"]), ("", f"content id {link.get('content_id') or 'not recorded'}"), ("", run),
                 ("", f"{encoders}; code {link.get('code_version')}")]
        if link.get("note"):
            lines.append(("", f"note: {link['note']}"))
        return lines
    if kind == "latent_table":
        return [("latents", f"{link['uri']} @ {link['version']}"),
                ("", f"encode with preset {link.get('preset')}: {_vae(link)}, text encoder "
                     f"{link.get('text_encoder')}; code {link.get('code_version')}")]
    lines = [("dataset", f"{link['uri']} @ {link['version']} ({link['rows']} rows)"),
             ("", "commits that made its rows:")]
    if link.get("earlier_commits"):
        lines.append(("", f"(versions before {link['earlier_commits']} not listed: --commits N lists more)"))
    return lines + [("", "  " + _commit_text(c)) for c in link["commits"]]


def format_chain(result: dict) -> str:
    out = []
    for link in result["chain"]:
        out += [f"{label:9} {text}" for label, text in _link_lines(link)]
    if result["missing"]:
        out.append(f"missing link: {result['missing']['link']}: {result['missing']['reason']}")
    return "\n".join(out)


def format_row(result: dict) -> str:
    v, a = result["values"], result["arrived"]
    lines = [f"row {result['row']} of {result['dataset']} @ {result['version']}",
             f"  arrived in  {_commit_text(a)}",
             f"  source      {v.get('source')}: {v.get('source_url')}"
             + (f" (page {v['page_url']})" if v.get("page_url") else ""),
             f"  title       {v.get('title')!r}, tag {v.get('tag')!r}; ingested {v.get('ingested_at')}"]
    if v.get("caption") is not None:
        by = (f"caption model {v.get('caption_model')}, prompt {v.get('caption_prompt_id')}"
              if v.get("caption_model") else "from the source")
        cp = result.get("caption_pass")
        if cp:
            by += (f"; captioner {cp.get('captioner')} in version {cp['version']}" if cp["operation"] == "caption"
                   else f"; set by the {cp['operation']} in version {cp['version']}")
        lines.append(f"  caption     {v['caption']!r} ({by})")
    else:
        lines.append("  caption     none")
    for c in result["rewritten_by"]:
        lines.append(f"  rewritten   {_commit_text(c)}")
    lines.append(f"  data file   {result['file']}")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    return "\n".join(lines)


def _vae(link: dict) -> str:
    """The VAE a model or latent table was made with; a pixel-space model (none recorded) says so."""
    return f"VAE {link['vae']}" if link.get("vae") else "no VAE (the model draws pixels)"
