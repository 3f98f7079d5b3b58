"""Serving: Ray Serve in front of a trained model.

Input: a trained model folder/URI (a diffusers pipeline with model_card.json).
Output: PNGs over HTTP (`app`: the Ingress and the application, `generator`: the
batched model deployment, `http`: errors, body limit and API keys, with a web
page), emoji sets as zips or under the operator's sets URI (`sets`), and durable
jobs (`job_routes` over `durable`, with `webhooks`).

Entry points: `app.build_app` (Serve config import path), `run.serve_forever`
(`emoji-ldm serve`).
"""
