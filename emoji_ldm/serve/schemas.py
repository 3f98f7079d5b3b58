"""The HTTP API's request bodies: pydantic models whose errors name the field.

FastAPI turns a failed validation into a 422 whose JSON names the field
(`{"error": "...", "field": "n"}`, see `app.validation_error`); the limits
here are the API contract documented in the README.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from emoji_ldm.errors import UserError
from emoji_ldm.inference.settings import MAX_COUNT, MAX_PROMPT_CHARS, SCHEDULERS, SamplerSettings, check

MAX_SET_ITEMS = 256      # per /v1/emoji-sets request


def _checked(name: str, value):
    """`sampling.check` for pydantic: the same limits and words as the CLI and bulk."""
    try:
        return check(name, value)
    except UserError as e:
        raise ValueError(str(e)) from None


class Settings(BaseModel):
    """Sampler settings shared by both endpoints: the fields of `SamplerSettings` but the count."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str = Field("", description=f"at most {MAX_PROMPT_CHARS} characters")
    steps: int = Field(25, description="sampler steps")
    guidance: float = Field(5.0, description="classifier-free guidance scale")
    seed: int = Field(0, description="image i of a request starts from the noise of seed + i")
    scheduler: str = Field("dpmpp", description=f"one of {', '.join(SCHEDULERS)}")
    size: int | None = Field(None, description="image size in pixels, a multiple of 8 (default: the model's)")
    adapter: str | None = Field(None, max_length=64, description="a LoRA adapter the server loaded (GET /v1/model "
                                                                 "lists them); default: the base model")

    @field_validator("negative_prompt", "steps", "guidance", "seed", "scheduler", "size")
    @classmethod
    def _sampler_rules(cls, value, info):
        return _checked(info.field_name, value)

    def sampler(self, count: int = 1) -> SamplerSettings:
        return SamplerSettings(self.negative_prompt, self.steps, self.guidance, self.seed, self.scheduler,
                               self.size, count)


def _text(value: str, what: str) -> str:
    value = " ".join(value.split())  # one line: prompts are plain text
    if not value:
        raise ValueError(f"{what} is empty: describe the emoji, e.g. 'smiling cat face'")
    return value


class GenerateRequest(Settings):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, examples=["smiling cat face"])
    n: int = Field(1, description=f"images, 1-{MAX_COUNT}")
    format: Literal["json", "png"] = Field(
        "json", description="json: base64 PNGs; png: the raw image/png (n must be 1). "
                            "An `Accept: image/png` header asks for png too.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _text(value, "prompt")

    @field_validator("n")
    @classmethod
    def _count(cls, value: int) -> int:
        return _checked("count", value)


class EmojiSetRequest(Settings):
    theme: str = Field(..., max_length=MAX_PROMPT_CHARS, examples=["blob"], description="the style shared by the set")
    items: list[str] = Field(..., min_length=1, max_length=MAX_SET_ITEMS, examples=[["happy", "sad", "thinking"]],
                             description=f"1-{MAX_SET_ITEMS} item prompts")
    template: str = Field("{item} {theme}", max_length=200,
                          description="how an item and the theme make a prompt; must contain {item}")
    format: Literal["zip", "json"] = Field("zip", description="zip: PNGs + manifest.json; json: base64 PNGs")
    store: bool = Field(False, description="write the set under the server's --sets-uri and return its URIs")
    target: Literal["slack", "discord", "github", "raw"] = Field(
        "raw", description="slack, discord, github: every PNG at 128 x 128 under the platform's file-size limit, "
                           "named <name>.png; raw: as drawn")

    @field_validator("theme")
    @classmethod
    def _theme(cls, value: str) -> str:
        return " ".join(value.split())

    @field_validator("items")
    @classmethod
    def _items(cls, values: list[str]) -> list[str]:
        for i, value in enumerate(values):
            if len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"item {i} is longer than {MAX_PROMPT_CHARS} characters")
        return [_text(v, f"item {i}") for i, v in enumerate(values)]

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{item}" not in value:
            raise ValueError("template must contain {item}, e.g. '{item} {theme}'")
        try:
            value.format(item="x", theme="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {value!r} may only use {{item}} and {{theme}} ({e})") from None
        return value

    def prompts(self) -> list[str]:
        return [" ".join(self.template.format(item=item, theme=self.theme).split()) for item in self.items]
