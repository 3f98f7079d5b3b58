"""Evaluation: how good is a trained model, measured against its data.

- `judge.py`: `emoji-ldm train-judge`, a small classifier of Unicode subgroups whose features and
  predictions give emoji-FID and prompt accuracy;
- `evaluate.py`: `emoji-ldm eval`: emoji-FID/KID, precision/recall, prompt accuracy, held-out loss and
  memorisation of a model, from its card's latent table; the measures are in `scores.py`, the held-out
  and training rows they compare with in `reference.py`.
"""
