"""Inference: trained model folders in, images out. Imports nothing from `train/`.

- `sampler.py`: the model-folder lookup (`model_uri`, `model_folder`, `model_card`), `load_pipeline`,
  `Sampler` and `SampleJob` (batched, per-image seeds), `run_pipeline`, `png_bytes`, `image_grid`;
- `settings.py`: `SamplerSettings`, the one type for steps, guidance, seed, scheduler, size and count;
- `pngmeta.py`: the generation parameters and lineage carried in every PNG's text chunks;
- `compile.py`: the torch.compile helpers the sampler and training share;
- `generate.py`: the `emoji-ldm generate` command.
"""
