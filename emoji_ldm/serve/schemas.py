"""The HTTP API's request bodies: pydantic models whose errors name the field.

FastAPI turns a failed validation into a 422 whose JSON names the field
(`{"error": "...", "field": "n"}`, see `app.validation_error`); the limits
here are the API contract documented in the README.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from emoji_ldm.models.builders import SCHEDULERS

MAX_IMAGES = 16          # per /v1/generate request
MAX_SET_ITEMS = 256      # per /v1/emoji-sets request
MAX_PROMPT_CHARS = 500
MAX_STEPS = 200
MAX_SEED = 2**32 - 1


class Settings(BaseModel):
    """Sampler settings shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(25, ge=1, le=MAX_STEPS, description="sampler steps")
    guidance: float = Field(5.0, ge=0.0, le=30.0, description="classifier-free guidance scale")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="image i of a request starts from the noise of seed + i")
    scheduler: str = Field("dpmpp", description=f"one of {', '.join(SCHEDULERS)}")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}: use one of {', '.join(SCHEDULERS)}")
        return value


def _text(value: str, what: str) -> str:
    value = " ".join(value.split())  # one line: prompts are plain text
    if not value:
        raise ValueError(f"{what} is empty: describe the emoji, e.g. 'smiling cat face'")
    return value


class GenerateRequest(Settings):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, examples=["smiling cat face"])
    n: int = Field(1, ge=1, le=MAX_IMAGES, description=f"images, 1-{MAX_IMAGES}")
    format: Literal["json", "png"] = Field(
        "json", description="json: base64 PNGs; png: the raw image/png (n must be 1). "
                            "An `Accept: image/png` header asks for png too.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _text(value, "prompt")


class EmojiSetRequest(Settings):
    theme: str = Field(..., max_length=MAX_PROMPT_CHARS, examples=["blob"], description="the style shared by the set")
    items: list[str] = Field(..., min_length=1, max_length=MAX_SET_ITEMS, examples=[["happy", "sad", "thinking"]],
                             description=f"1-{MAX_SET_ITEMS} item prompts")
    template: str = Field("{item} {theme}", max_length=200,
                          description="how an item and the theme make a prompt; must contain {item}")
    format: Literal["zip", "json"] = Field("zip", description="zip: PNGs + manifest.json; json: base64 PNGs")
    store: bool = Field(False, description="write the set under the server's --sets-uri and return its URIs")

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
