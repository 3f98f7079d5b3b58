"""Captioning: describe every emoji in words, as a new version of the dataset.

Input: an emoji dataset (Delta) at its latest version. Output: a new version in
which the captioned rows carry `caption`, `caption_model` and
`caption_prompt_id` (earlier captions stay readable at earlier versions).
Failures (an undecodable image, an empty generation) are recorded per row with
a reason under `_emoji_ldm/caption-failures/` and never fail the job.

Captioners, by `CaptionConfig.captioner` (`stage._run_captioner` picks one):
  metadata    no model: the title/CLDR name, tag, measured colours and background
  qwen2.5-vl  transformers Qwen2_5_VLForConditionalGeneration in Ray Data actors
  vllm        the same model through ray.data.llm (GPU clusters; not run here)

Entry point: `stage.caption_dataset(CaptionConfig)` (`emoji-ldm dataset caption`).
"""
