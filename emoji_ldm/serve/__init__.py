"""Serving and bulk generation.

Input: a trained model folder/URI (a diffusers pipeline with model_card.json).
Output: PNGs over HTTP (`app`: Ray Serve + FastAPI, with a web page), emoji
sets as zips or under the operator's sets URI (`sets`), and bulk PNGs with a
Delta manifest table written by a Ray Data job (`bulk`).

Entry points: `app.build_app` (Serve config import path), `run.serve_forever`
(`emoji-ldm serve`), `bulk.bulk_generate` (`emoji-ldm bulk`).
"""
