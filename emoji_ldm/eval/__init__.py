"""Evaluation: how good is a trained model, measured against its data, by one frozen instrument.

- `judge_net.py`: the emoji judge as an instrument (a small classifier of Unicode subgroups whose features and
  predictions give emoji-FID and prompt accuracy; its labels, loading and content id); `judge.py`: `emoji-ldm
  train-judge`; `fit.py`, its training loop;
- `frozen_judge.py`: the frozen judge shipped in `frozen/`, its content id, and how it is rebuilt;
- `evaluate.py`: `emoji-ldm eval`: prompt accuracy with its interval beside its baselines (`protocol.py`,
  `judged.py`, `retrieval.py`), emoji-FID/KID, precision/recall, held-out loss and memorisation of a model,
  from its card's latent table; the measures are in `scores.py`, the held-out and training rows they compare
  with in `reference.py`;
- `compare.py`: reports compare only when one judge measured them.
"""
