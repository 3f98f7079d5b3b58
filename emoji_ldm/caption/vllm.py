"""The `vllm` captioner: Qwen2.5-VL through `ray.data.llm` on GPU clusters.

An optional extra (`pip install 'emoji-ldm[vllm]'`, which installs vLLM): it
needs CUDA GPUs, so it is documented and built here but never run on the CPU
machines this project is developed on. The stage hands it the dataset and
gets back rows with `id`, `caption`, `error`, like the other captioners.
"""

from __future__ import annotations

import base64

from emoji_ldm.caption.prompt import clean_caption, render
from emoji_ldm.errors import UserError


def vllm_caption(ds, model: str, template: str, max_new_tokens: int, concurrency: int, batch_size: int):
    """`ds` (id, image, title, _file) -> (id, caption, error, _file), through vLLM engine replicas on Ray."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("the vllm captioner needs vLLM and a GPU: pip install 'emoji-ldm[vllm]'") from None
    from ray.data.llm import PrepareMultimodalStageConfig, build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={"max_model_len": 4096, "limit_mm_per_prompt": {"image": 1}, "dtype": "bfloat16"},
        concurrency=concurrency,
        batch_size=batch_size,
        # the multimodal preparation stage loads the images named in the chat messages
        prepare_multimodal_stage=PrepareMultimodalStageConfig(enabled=True, chat_template_content_format="openai"),
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
        should_continue_on_error=True,  # a failed row gets __inference_error__, never fails the job
    )

    def preprocess(row: dict) -> dict:
        url = "data:image/png;base64," + base64.b64encode(row["image"]).decode()
        return {
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": render(template, row["title"])},
            ]}],
            "sampling_params": {"temperature": 0.0, "max_tokens": max_new_tokens},
            "id": row["id"],
            "_file": row["_file"],
        }

    def postprocess(row: dict) -> dict:
        text = clean_caption(row.get("generated_text") or "")
        return {"id": row["id"], "caption": text or None, "error": None if text else "empty generation",
                "_file": row["_file"]}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    rows = processor(ds)
    # rows that failed inference bypass postprocess and carry the engine's message instead
    return rows.map(lambda r: r if "caption" in r else {
        "id": r["id"], "caption": None, "error": f"generate: {r.get('__inference_error__', 'failed')}"[:200],
        "_file": r["_file"]})
