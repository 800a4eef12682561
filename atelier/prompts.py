"""What the captioner asks, in each reply language, and how it is put in the model's chat format.

A translator edits this file alone: every text Atelier writes for the model or into a prompt is in
:data:`PROMPTS`, one :class:`Language` row per reply language (the node's ``language`` combo lists them in this
order). A row holds the instruction of each task, the line that asks a custom question's reply in that language,
the words that glue an analysis into a FLUX Fill prompt, and the words that show a value already says what the
glue would add (or says nothing). Reading the model's replies is :mod:`atelier.analysis`; the model itself is
:mod:`atelier.captioner`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .analysis import clean_reply
from .errors import InputError

log = logging.getLogger("atelier")

TASKS: tuple[str, ...] = ("background_analysis", "caption", "inpaint_prompt", "custom")


@dataclass(frozen=True)
class Language:
    """One reply language: what is asked, and the words of the prompt made from an analysis."""

    instructions: Mapping[str, str]  # task → what is asked about the image (every task but custom)
    reply_in: str  # appended to a custom instruction
    light: str  # "{}" = the analysed lighting, when it does not say "light" itself
    light_from: str  # "{}" = the light's direction
    mood: str  # "{}" = the mood
    palette: str  # "{}" = the colours, joined with ", " and ``last_colour`` before the last one
    last_colour: str
    light_words: tuple[str, ...]  # a lighting value with one of these needs no glue
    direction_words: tuple[str, ...]  # likewise for the light's direction
    mood_words: tuple[str, ...]  # likewise for the mood
    unknown: tuple[str, ...]  # values that say nothing (lower case), left out of the prompt


PROMPTS: dict[str, Language] = {
    "en": Language(
        instructions={
            "background_analysis": (
                "Analyse this image as the background into which an object will be composited. Reply with one JSON "
                "object and nothing else, with these keys:\n"
                '"scene": one sentence describing the place,\n'
                '"lighting": the quality and colour temperature of the light,\n'
                '"light_direction": where the main light comes from (left, right, front, back, top, top-left, ...),'
                "\n"
                '"palette": a list of 3 to 6 dominant colours,\n'
                '"mood": a few words,\n'
                '"camera": viewpoint, camera height, angle and perspective,\n'
                '"placement": {"x": ..., "y": ..., "w": ..., "h": ...} the best free region where an object could '
                "stand, as fractions 0-1 of the image width and height (x, y = the region's top-left corner)."),
            "caption": "Describe this image in one detailed paragraph for an image-generation model: the main "
                       "subject, the setting, lighting, colours, camera angle and style. Reply with the "
                       "description only.",
            "inpaint_prompt": "Write a prompt for an inpainting model that repaints part of this image so that the "
                              "new content blends in: describe the scene, its lighting (direction and colour "
                              "temperature), colours and photographic style in one or two sentences. Reply with "
                              "the prompt only.",
        },
        reply_in="Answer in English.",
        light="{} lighting", light_from="light coming from the {}", mood="{} mood", palette="colour palette of {}",
        last_colour=" and ",
        light_words=("light",), direction_words=("light",), mood_words=("mood",),
        unknown=("unknown", "none", "n/a", "na", "null"),
    ),
    "ko": Language(
        instructions={
            "background_analysis": (
                "이 이미지를 물체를 합성해 넣을 배경으로 분석하세요. 다른 말 없이 JSON 객체 하나로만 답하고, 키 이름은 영어 "
                "그대로 두고 값은 한국어로 쓰세요:\n"
                '"scene": 장소를 설명하는 한 문장,\n'
                '"lighting": 빛의 성질과 색온도,\n'
                '"light_direction": 주 광원의 방향 (왼쪽, 오른쪽, 앞, 뒤, 위, 왼쪽 위 등),\n'
                '"palette": 주요 색 3~6개의 목록,\n'
                '"mood": 분위기를 나타내는 몇 단어,\n'
                '"camera": 시점, 카메라 높이, 각도와 원근,\n'
                '"placement": {"x": ..., "y": ..., "w": ..., "h": ...} 물체를 놓기 가장 좋은 빈 영역을 이미지 너비와 높이에 '
                "대한 0-1 비율로 (x, y = 영역의 왼쪽 위 모서리)."),
            "caption": "이미지 생성 모델에 넣을 수 있도록 이 이미지를 한 문단으로 자세히 설명하세요: 주요 대상, 배경, 조명, "
                       "색감, 카메라 각도, 스타일. 설명만 답하세요.",
            "inpaint_prompt": "이 이미지의 일부를 다시 그리는 인페인팅 모델용 프롬프트를 쓰세요. 새로 그린 부분이 자연스럽게 "
                              "어울리도록 장면, 조명(방향과 색온도), 색감, 사진 스타일을 한두 문장으로 묘사하세요. "
                              "프롬프트만 답하세요.",
        },
        reply_in="한국어로 답하세요.",
        light="{} 조명", light_from="{}에서 오는 빛", mood="{} 분위기", palette="색감: {}",
        last_colour=", ",
        light_words=("조명", "빛"), direction_words=("빛", "광"), mood_words=("분위기",),
        unknown=("알 수 없음", "없음"),
    ),
}
LANGUAGES: tuple[str, ...] = tuple(PROMPTS)


# ------------------------------------------------------------------------------------------------ asking


def build_instruction(task: str, language: str = "en", instruction: str = "") -> str:
    """The text asked about the image for ``task`` in ``language`` (``custom`` asks ``instruction``)."""
    row = PROMPTS.get(language)
    if row is None:
        listed = " or ".join(LANGUAGES)
        raise InputError(f"language {listed}", repr(language), f"Pick {listed}.")
    if task == "custom":
        text = (instruction or "").strip()
        if not text:
            raise InputError("an instruction for task 'custom'", "an empty instruction",
                             "Write what to ask about the image in 'instruction', or pick another task.")
        return f"{text}\n{row.reply_in}"
    if task not in row.instructions:
        raise InputError(f"task one of {', '.join(TASKS)}", repr(task), "Pick one of the listed tasks.")
    return row.instructions[task]


def build_messages(task: str, language: str = "en", instruction: str = "") -> list[dict]:
    """One user turn: the image, then the instruction (the chat format of Qwen VL processors)."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": build_instruction(task, language, instruction)}]}]


def fallback_chat(messages: list[dict]) -> str:
    """The Qwen VL chat format, for folders whose processor has no (multimodal) chat template."""
    out = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"]
    for m in messages:
        parts = []
        for c in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
            parts.append("<|vision_start|><|image_pad|><|vision_end|>" if c["type"] == "image" else c["text"])
        out.append(f"<|im_start|>{m['role']}\n{''.join(parts)}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_chat(processor: Any, messages: list[dict]) -> str:
    """The prompt text through the folder's own chat template; Qwen's format when it has none usable."""
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    if getattr(processor, "chat_template", None):
        try:
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a text-only template choking on image content
            log.info("Atelier: the model's chat template failed (%s); using Qwen's chat format", e)
        else:
            if isinstance(text, list):
                text = text[0]
            if image_token in text:
                return text
            log.info("Atelier: the model's chat template has no image slot; using Qwen's chat format")
    return fallback_chat(messages)


# ------------------------------------------------------------------------------- the prompt of an analysis


def _mentions(value: str, words: Any) -> bool:
    return re.search("|".join(re.escape(w) for w in words), value, re.I) is not None


def analysis_prompt(analysis: Mapping, language: str = "en", fallback: str = "") -> str:
    """A FLUX Fill prompt that matches the analysed scene (scene, light, mood, colours, camera), or the cleaned
    ``fallback`` reply when the analysis holds none of them. A value may be in any language of the table, so the
    words that make glue unnecessary (and the ones that say nothing) of every language count."""
    row = PROMPTS.get(language, PROMPTS["en"])
    rows = PROMPTS.values()
    unknown = {""} | {w for r in rows for w in r.unknown}
    parts = []

    def add(value: str) -> None:
        value = value.strip().rstrip(".").strip()
        if value and value.lower() not in unknown:
            parts.append(value)

    def glued(key: str, glue: str, words: str) -> None:
        value = str(analysis.get(key) or "").strip()
        if key != "lighting":
            value = value.rstrip(".")
        if value.lower() not in unknown:
            add(value if _mentions(value, [w for r in rows for w in getattr(r, words)]) else glue.format(value))

    add(str(analysis.get("scene") or ""))
    glued("lighting", row.light, "light_words")
    glued("light_direction", row.light_from, "direction_words")
    glued("mood", row.mood, "mood_words")
    palette = [str(c) for c in analysis.get("palette") or [] if str(c).strip()]
    if palette:
        joined = ", ".join(palette[:-1]) + row.last_colour + palette[-1] if len(palette) > 1 else palette[0]
        add(row.palette.format(joined))
    add(str(analysis.get("camera") or ""))
    if not parts:
        return clean_reply(fallback)
    return ", ".join(parts)
