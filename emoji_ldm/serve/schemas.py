"""The HTTP API's request bodies: pydantic models whose errors name the field.

FastAPI turns a failed validation into a 422 whose JSON names the field
(`{"error": "...", "field": "n"}`, see `app.validation_error`); the limits
here are the API contract documented in the README.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer, model_validator

from emoji_ldm.errors import UserError
from emoji_ldm.inference.animation import FORMATS, MAX_FRAMES, MIN_FRAMES, AnimationSettings
from emoji_ldm.inference.settings import MAX_COUNT, MAX_PROMPT_CHARS, SCHEDULERS, SamplerSettings, check
from emoji_ldm.serve.sets import MAX_REDRAWS

MAX_SET_ITEMS = 256      # per /v1/emoji-sets request
# what one pipeline call draws on a replica or a job's drawer, images x size^2 (args.max_batch_pixels): 16 images at
# 512 px, 4 at 1024; a batch or a request over it is drawn in several calls, so memory does not grow with size
MAX_BATCH_PIXELS = 16 * 512 * 512
MAX_TEMPLATE_CHARS = 200
MAX_SET_PROMPT_CHARS = MAX_PROMPT_CHARS  # a prompt a template makes, as long as a /v1/generate prompt may be
PLACEHOLDERS = ("item", "theme")


def images_per_call(size: int, max_batch_size: int, max_batch_pixels: int = MAX_BATCH_PIXELS) -> int:
    """Images of `size` px one pipeline call draws: at most max_batch_size and at most max_batch_pixels pixels (at
    least one: a request for one image over the budget is refused, `http.check_pixels`)."""
    return max(1, min(max_batch_size, max_batch_pixels // (size * size)))


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
    guidance: float | None = Field(None, description="classifier-free guidance scale (default: the model's own, "
                                                     "`guidance` in GET /v1/model)")
    seed: int = Field(0, description="image i of a request starts from the noise of seed + i")
    scheduler: str = Field("dpmpp", description=f"one of {', '.join(SCHEDULERS)}")
    size: int | None = Field(None, description="image size in pixels, a multiple of 8 (default: the model's)")
    adapter: str | None = Field(None, max_length=64, description="a LoRA adapter the server loaded (GET /v1/model "
                                                                 "lists them); default: the base model")

    @field_validator("negative_prompt", "steps", "guidance", "seed", "scheduler", "size")
    @classmethod
    def _sampler_rules(cls, value, info):
        if info.field_name == "negative_prompt" and isinstance(value, str):  # one line of plain text, as a prompt
            value = _plain(" ".join(value.split()), "negative_prompt")
        return _checked(info.field_name, value)

    def sampler(self, count: int = 1) -> SamplerSettings:
        return SamplerSettings(self.negative_prompt, self.steps, self.guidance, self.seed, self.scheduler,
                               self.size, count)


class Animation(BaseModel):
    """An animated loop per image (`inference.animation.AnimationSettings`, the same rules as `--frames` and
    `--format`); frames 0: still PNGs."""

    model_config = ConfigDict(extra="forbid")

    frames: int = Field(0, description=f"frames of the loop, {MIN_FRAMES}-{MAX_FRAMES}; 0: a still PNG")
    format: str = Field("apng", description=f"the animated file: {', '.join(FORMATS)}")
    motion: float = Field(0.3, description="how far the loop strays from the still image, above 0, at most 1")
    fps: int = Field(12, description="frames per second, 1-50")
    matte: str = Field("light", description="GIF only: the background its soft edges are blended onto: light, "
                                            "dark or #rrggbb")

    @field_validator("frames", "format", "motion", "fps", "matte")
    @classmethod
    def _rules(cls, value, info):
        try:
            AnimationSettings(**{info.field_name: value})  # the others at their (valid) defaults
        except UserError as e:
            raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _frames_for_format(self):
        if self.frames == 0 and self.model_fields_set & {"format", "motion", "fps", "matte"}:
            raise ValueError(f"frames is 0 (a still PNG) but {', '.join(sorted(self.model_fields_set - {'frames'}))} "
                             f"was given: ask for frames from {MIN_FRAMES} to {MAX_FRAMES} for an animated loop")
        return self

    def settings(self) -> AnimationSettings:
        return AnimationSettings(self.frames, self.format, self.motion, self.fps, self.matte)


def _check_animation(body) -> None:
    try:
        body.animation.settings().check_scheduler(body.scheduler)
    except UserError as e:
        raise ValueError(str(e)) from None


TARGET_HELP = ("slack, discord, github: every file at 128 x 128 under the platform's file-size limit (an animated "
               "one by frames, palette and size in that order, or a 422), named <name>.png/.gif/.webp; raw: as drawn")


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """(literal text, "item" | "theme" | None) pieces of a set template; ValueError naming what is wrong.

    A template is literal text with the exact placeholders {item} and {theme} (`{{` and `}}` are literal
    braces): no format spec, conversion, index or attribute, so it is never a format string (`{item:>2000000000}`
    would allocate gigabytes, `{item.__class__}` reach into objects)."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}; write a literal brace as {{{{ or }}}}") from None
    parts = []
    for literal, field, spec, conversion in pieces:
        if field is None:
            parts.append((literal, None))
            continue
        if field not in PLACEHOLDERS or spec or conversion is not None:
            shown = "{" + field + (f"!{conversion}" if conversion is not None else "") + (f":{spec}" if spec else "")
            shown += "}"
            raise ValueError(f"template {template!r}: {shown} is not allowed; a template is text with the "
                             "placeholders {item} and {theme} only (no format spec, conversion, index or "
                             "attribute), e.g. '{item} {theme}'")
        parts.append((literal, field))
    if not any(field == "item" for _, field in parts):
        raise ValueError("template must contain {item}, e.g. '{item} {theme}'")
    return parts


def render_template(template: str, item: str, theme: str) -> str:
    """The prompt of one item: the template's text with {item} and {theme} put in (never str.format), on one
    line."""
    values = {"item": item, "theme": theme, None: ""}
    return " ".join("".join(literal + values[field] for literal, field in template_parts(template)).split())


def _check_prompts(template: str, theme: str, items: list[str] | None) -> None:
    for i, item in enumerate(items or ()):
        prompt = render_template(template, item, theme)
        if len(prompt) > MAX_SET_PROMPT_CHARS:
            raise ValueError(f"the prompt of item {i} ({len(prompt)} characters from the template, the item and the "
                             f"theme) is longer than {MAX_SET_PROMPT_CHARS} characters, the limit of a prompt: "
                             "shorten the theme, the item or the template")


def _text(value: str, what: str) -> str:
    value = _plain(" ".join(value.split()), what)  # one line: prompts are plain text
    if not value:
        raise ValueError(f"{what} is empty: describe the emoji, e.g. 'smiling cat face'")
    return value


# Bidirectional embeddings, overrides and isolates: they make a PNG viewer show text in another order than it is
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _plain(value: str, what: str) -> str:
    """`value` with no control character (a NUL, an escape, a line break left) and no bidi control: such text would
    reach the PNG text chunks and the web UI `parameters` line, where it could pose as other fields. Emoji joiners
    (U+200D) and variation selectors are text, and pass."""
    import unicodedata

    for i, ch in enumerate(value):
        if ch in BIDI_CONTROLS or unicodedata.category(ch) == "Cc":
            raise ValueError(f"{what} has a control character (U+{ord(ch):04X}) at {i}: send plain text")
    return value


class GenerateRequest(Settings):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, examples=["smiling cat face"])
    n: int = Field(1, description=f"images, 1-{MAX_COUNT}")
    format: Literal["json", "png"] = Field(
        "json", description="json: base64 files; png: the raw file (n must be 1; image/png, or the animation's "
                            "type). An `Accept: image/png` header asks for png too.")
    animation: Animation = Field(default_factory=Animation, description="an animated loop per image: "
                                 '{"frames": 8, "format": "gif"}; frames 0 (default): still PNGs')
    target: Literal["slack", "discord", "github", "raw"] = Field("raw", description=TARGET_HELP)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _text(value, "prompt")

    @field_validator("n")
    @classmethod
    def _count(cls, value: int) -> int:
        return _checked("count", value)

    @model_validator(mode="after")
    def _animation_sampler(self):
        _check_animation(self)
        return self


class EmojiSetRequest(Settings):
    theme: str = Field(..., max_length=MAX_PROMPT_CHARS, examples=["blob"], description="the style shared by the set")
    items: list[str] = Field(..., min_length=1, max_length=MAX_SET_ITEMS, examples=[["happy", "sad", "thinking"]],
                             description=f"1-{MAX_SET_ITEMS} item prompts")
    template: str = Field("{item} {theme}", max_length=MAX_TEMPLATE_CHARS,
                          description="how an item and the theme make a prompt: text with {item} (required) and "
                                      f"{{theme}}, nothing else in braces; each prompt at most "
                                      f"{MAX_SET_PROMPT_CHARS} characters")
    format: Literal["zip", "json"] = Field("zip", description="zip: PNGs + manifest.json; json: base64 PNGs")
    store: bool = Field(False, description="write the set under the server's --sets-uri and return its URIs")
    target: Literal["slack", "discord", "github", "raw"] = Field("raw", description=TARGET_HELP)
    animation: Animation = Field(default_factory=Animation, description="an animated loop per item, as for "
                                                                        "/v1/generate")
    min_legibility: float | None = Field(None, ge=0, le=1, description="redraw an item (next seed, a bounded number "
                                         "of times) whose legibility at chat size is below this share of the chat "
                                         "themes; needs a judge on the server")
    max_redraws: int = Field(MAX_REDRAWS, ge=0, le=MAX_REDRAWS,
                             description="redraws per item at most, for legibility or consistency")

    @field_validator("theme")
    @classmethod
    def _theme(cls, value: str) -> str:
        return _plain(" ".join(value.split()), "theme")

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
        template_parts(value)
        return _plain(value, "template")

    @model_validator(mode="after")
    def _prompt_lengths(self):
        _check_prompts(self.template, self.theme, self.items)
        _check_animation(self)
        return self

    def prompts(self) -> list[str]:
        return [render_template(self.template, item, self.theme) for item in self.items]


MAX_JOB_IMAGES = 4096    # per /v1/jobs request: a set's items, or prompts x per_prompt
MAX_JOB_FRAMES = 8 * MAX_JOB_IMAGES  # pipeline images an animated job draws (loops x frames): 4096 loops of 8 frames
MAX_CALLBACK_CHARS = 2048


class JobRequest(Settings):
    """A set (`theme` + `items`, every item from one seed, as /v1/emoji-sets) or a bulk spec (`prompts`, each
    drawn `per_prompt` times from seeds seed, seed+1, ..., as `emoji-ldm bulk`), run as a durable job."""

    theme: str = Field("", max_length=MAX_PROMPT_CHARS, description="a set: the style shared by the items")
    items: list[str] | None = Field(None, max_length=MAX_JOB_IMAGES, description="a set: the item prompts")
    template: str = Field("{item} {theme}", max_length=MAX_TEMPLATE_CHARS,
                          description="a set: how an item and the theme make a prompt (as for /v1/emoji-sets)")
    prompts: list[str] | None = Field(None, max_length=MAX_JOB_IMAGES, description="a bulk spec: the prompts")
    per_prompt: int = Field(1, ge=1, le=MAX_COUNT, description="a bulk spec: images per prompt")
    target: Literal["slack", "discord", "github", "raw"] = Field("raw", description="as for /v1/emoji-sets")
    animation: Animation = Field(default_factory=Animation, description="an animated loop per image, as for "
                                                                        "/v1/emoji-sets")
    callback_url: str | None = Field(None, max_length=MAX_CALLBACK_CHARS,
                                     description="POSTed the job's final state, signed with the key's webhook "
                                                 "secret (public http(s) addresses only)")
    callback_events: list[Literal["queued", "started", "progress", "completed", "failed", "cancelled"]] | None = \
        Field(None, max_length=6, description="the events POSTed to callback_url (progress: once per chunk "
                                              "drawn); left out: completed, failed and cancelled")
    min_legibility: float | None = Field(None, ge=0, le=1, description="as for /v1/emoji-sets: redraw an image "
                                         "whose legibility at chat size is below this share of the chat themes "
                                         "(next seed, at most max_redraws times); needs a judge on the server")
    max_redraws: int = Field(MAX_REDRAWS, ge=0, le=MAX_REDRAWS, description="redraws per image at most, for "
                                                                           "legibility")
    priority: Literal["high", "normal", "low"] = Field("normal", description="the job's place in the queue: "
                                                       "high before normal before low (high needs a key whose "
                                                       "max_priority is high); keys share each level round-robin")

    @field_validator("items", "prompts")
    @classmethod
    def _lines(cls, values: list[str] | None, info) -> list[str] | None:
        if values is None:
            return None
        for i, value in enumerate(values):
            if len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"{info.field_name}[{i}] is longer than {MAX_PROMPT_CHARS} characters")
        return [_text(v, f"{info.field_name}[{i}]") for i, v in enumerate(values)]

    _theme = field_validator("theme")(EmojiSetRequest._theme.__func__)
    _template = field_validator("template")(EmojiSetRequest._template.__func__)

    @field_serializer("animation")
    def _animation_json(self, value: Animation) -> dict:
        """A still job's body holds no animation fields ({}), so that it validates again (a runner reads it)."""
        return value.model_dump() if value.frames else {}

    @model_serializer(mode="wrap")
    def _quiet_defaults(self, handler) -> dict:
        """A body that asks for no legibility floor holds neither field, so that its hash (its Idempotency-Key's
        body check) is what it was before jobs took them."""
        data = handler(self)
        if self.min_legibility is None and self.max_redraws == MAX_REDRAWS:
            data.pop("min_legibility", None)
            data.pop("max_redraws", None)
        if self.callback_events is None:  # likewise for a job that takes the default webhook events
            data.pop("callback_events", None)
        if self.priority == "normal":  # and for one of the default priority
            data.pop("priority", None)
        return data

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        """Its syntax, at once (a 422): the one parse the delivery connects by. Where its host resolves, and
        whether that may be called, the ingress checks (a 400)."""
        from emoji_ldm.serve.webhooks import parse_callback

        if value is not None:
            parse_callback(value)
        return value

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.items is None) == (self.prompts is None):
            raise ValueError("give either items (a set, with theme) or prompts (a bulk spec), not both or neither")
        if self.items is not None and self.per_prompt != 1:
            raise ValueError("per_prompt is for prompts; a set draws each item once")
        if not (self.items or self.prompts):
            raise ValueError("the job has no items or prompts")
        if self.images() > MAX_JOB_IMAGES:
            raise ValueError(f"the job asks for {self.images()} images; at most {MAX_JOB_IMAGES} per job "
                             "(use `emoji-ldm bulk` for more)")
        if self.images() * self.animation.frames > MAX_JOB_FRAMES:
            raise ValueError(f"animation.frames: {self.images()} loops of {self.animation.frames} frames are "
                             f"{self.images() * self.animation.frames} frames to draw; at most {MAX_JOB_FRAMES} per "
                             "job: ask for fewer frames or images, or split the job")
        _check_prompts(self.template, self.theme, self.items)
        _check_animation(self)
        return self

    @property
    def kind(self) -> str:
        return "set" if self.items is not None else "bulk"

    def images(self) -> int:
        return len(self.items) if self.items is not None else len(self.prompts) * self.per_prompt

    def draws(self) -> list[tuple[str, str, int]]:
        """(item label, prompt, seed) per image, in order."""
        if self.items is not None:
            return [(item, render_template(self.template, item, self.theme), self.seed) for item in self.items]
        return [(p, p, self.seed + k) for p in self.prompts for k in range(self.per_prompt)]

    def redraw_seed(self, index: int, tries: int) -> int:
        """The seed of image `index`'s redraw number `tries` (1, 2, ...): a set's item the next seed (its items share
        one), a bulk image past its prompt's other images (seed + k + tries x per_prompt), never a sibling's."""
        if self.items is not None:
            return self.seed + tries
        return self.seed + index % self.per_prompt + tries * self.per_prompt
