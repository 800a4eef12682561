"""Analysis parsing: a VLM's reply → the analysis dict (pure strings, no model, no torch).

The analysis dict (``AtelierCaption``'s ``analysis`` output, as JSON)::

    {"scene": str, "lighting": str, "light_direction": str, "palette": [str, ...], "mood": str, "camera": str,
     "placement": {"x": float, "y": float, "w": float, "h": float},   # fractions 0–1; x, y = top-left corner
     "found": [keys read from the reply]}                               # the others are defaults

:func:`parse_analysis` survives malformed replies (code fences, single quotes, trailing commas, unquoted keys,
replies cut off at ``max_new_tokens``, ``key: value`` lines, English and Korean key names). :func:`canonical_key`
is the one key normaliser (aliases → our keys): :mod:`atelier.placement` reads the placement region through it.
What is asked of the model lives in :mod:`atelier.prompts`; the model itself in :mod:`atelier.captioner`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

ANALYSIS_KEYS: tuple[str, ...] = ("scene", "lighting", "light_direction", "palette", "mood", "camera", "placement")
DEFAULT_PLACEMENT: dict[str, float] = {"x": 0.3, "y": 0.45, "w": 0.4, "h": 0.5}  # lower middle: where things stand
_SCENE_FALLBACK_CHARS = 1000

_ALIASES: dict[str, tuple[str, ...]] = {
    "scene": ("scene", "description", "summary", "caption", "setting", "scene_description", "background",
              "장면", "배경", "설명"),
    "lighting": ("lighting", "light", "illumination", "light_quality", "lighting_conditions", "조명", "빛"),
    "light_direction": ("light_direction", "lighting_direction", "direction", "light_dir", "direction_of_light",
                        "key_light_direction", "light_source", "light_source_direction", "빛의_방향", "조명_방향",
                        "광원_방향", "광원", "방향"),
    "palette": ("palette", "colour_palette", "color_palette", "colours", "colors", "dominant_colours",
                "dominant_colors", "color_scheme", "colour_scheme", "main_colors", "팔레트", "색상", "색감", "색"),
    "mood": ("mood", "atmosphere", "tone", "feeling", "vibe", "분위기"),
    "camera": ("camera", "perspective", "camera_perspective", "viewpoint", "camera_angle", "angle", "view",
               "point_of_view", "camera_view", "카메라", "시점", "원근"),
    "placement": ("placement", "placement_region", "region", "suggested_placement", "bbox", "box",
                  "placement_box", "object_placement", "free_region", "suggested_region", "배치", "영역"),
}
_KEY_OF = {alias: key for key, aliases in _ALIASES.items() for alias in aliases}
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)


def _norm_key(key: Any) -> str:
    k = str(key).strip().strip("*_`\"' ").lower()
    return re.sub(r"[\s\-/]+", "_", k)


def canonical_key(key: Any) -> str | None:
    """Our analysis key for a key a reply used ("Light Direction", "colour_palette", "배치" …), or None."""
    return _KEY_OF.get(_norm_key(key))


def clean_reply(text: str) -> str:
    """A free-text reply as a prompt: code fences, enclosing quotes and a leading label removed, trimmed."""
    t = (text or "").strip()
    m = _FENCE.search(t)
    if m and t.startswith("```"):
        t = m.group(1).strip()
    t = re.sub(r"^(?:prompt|caption|description|설명|프롬프트)\s*[:：]\s*", "", t, flags=re.I)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'“”":
        t = t[1:-1].strip()
    elif len(t) >= 2 and t[0] == "“" and t[-1] == "”":
        t = t[1:-1].strip()
    return t


def json_brackets(s: str) -> tuple[list[tuple[int, str]], int | None]:
    """The brackets of ``s`` outside JSON strings as (index, char), and where a string left open starts (None when
    every string closes). Shared by the reply repair below and the input guards' nesting check."""
    found, in_str, esc, opened = [], False, False, 0
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str, opened = True, i
        elif ch in "{[]}":
            found.append((i, ch))
    return found, (opened if in_str else None)


def _close_truncated(s: str) -> str:
    """Close the strings, arrays and objects a reply cut off at max_new_tokens left open."""
    brackets, open_string = json_brackets(s)
    stack = []
    for _, ch in brackets:
        if ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif stack:
            stack.pop()
    if open_string is not None:
        s = s[:open_string]  # a value cut mid-word is not worth keeping
    s = s.rstrip()
    while True:
        before = s
        s = re.sub(r"[,:]\s*$", "", s)  # a dangling comma, or a key whose value never came (dropped with it)
        if stack and stack[-1] == "}":
            s = re.sub(r'([{,])\s*"[^"]*"$', r"\1", s)  # a key without its value
        s = s.rstrip()
        if s == before:
            break
    s = re.sub(r",$", "", s)
    return s + "".join(reversed(stack))


def _repair(s: str) -> str:
    s = s.replace("“", '"').replace("”", '"').replace("‘", "'").replace("’", "'")
    if '"' not in s:
        s = s.replace("'", '"')
    s = re.sub(r"//[^\n\"]*$", "", s, flags=re.M)  # // comments at line ends
    s = re.sub(r"([{,]\s*)([A-Za-z_\uac00-\ud7a3][\w \-\uac00-\ud7a3]*?)\s*:", r'\1"\2":', s)  # unquoted keys
    s = re.sub(r"\bTrue\b", "true", s)
    s = re.sub(r"\bFalse\b", "false", s)
    s = re.sub(r"\bNone\b", "null", s)
    s = re.sub(r",\s*([}\]])", r"\1", s)  # trailing commas
    return s


def json_objects(text: str) -> list[dict]:
    """Every JSON object found in ``text``, strict first, then repaired, then with truncation closed."""
    decoder = json.JSONDecoder()
    bodies = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    found: list[dict] = []
    for body in bodies:
        starts = [i for i, ch in enumerate(body) if ch == "{"]
        for i in starts:
            try:
                obj, _ = decoder.raw_decode(body[i:])
            except ValueError:
                continue
            if isinstance(obj, dict):
                found.append(obj)
                break
        if found:
            return found
    for body in bodies:
        i = body.find("{")
        if i < 0:
            continue
        j = body.rfind("}")
        chunk = body[i:j + 1] if j > i else body[i:]
        for candidate in (_repair(chunk), _close_truncated(_repair(body[i:])), _close_truncated(body[i:])):
            try:
                obj, _ = decoder.raw_decode(candidate)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return [obj]
    return []


_LINE = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?[*_\"'`]*([A-Za-z\uac00-\ud7a3][A-Za-z\uac00-\ud7a3 _\-/]{0,40}?)"
                   r"[*_\"'`]*\s*[:=：]\s*(.*?)\s*,?\s*$")


def _from_lines(text: str) -> dict[str, Any]:
    """``key: value`` / ``"key": "value"`` / ``- **Key**: value`` lines, for replies that are not JSON."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        key = canonical_key(m.group(1))
        if key is None or key in out:
            continue
        value = m.group(2).strip()
        if value[:1] in "\"'" and value and value.count(value[0]) == 1:
            continue  # a quoted value cut off at max_new_tokens
        if key == "placement":
            value = _placement_from_text(text[text.find(line):])
            if value is None:
                continue
        elif key == "palette" and value.startswith("["):
            try:
                value = json.loads(_close_truncated(_repair(value)))
            except ValueError:
                value = value.strip("[]")
        elif key == "palette" and not value:  # a YAML-style list on the next lines
            rest = text[text.find(line) + len(line):].splitlines()
            value = []
            for item in rest:
                bullet = re.match(r"^\s*[-*•]\s+(.+?)\s*$", item)
                if not bullet:
                    if item.strip():
                        break
                    continue
                value.append(bullet.group(1))
        if isinstance(value, str) and value in ("", "{", "["):
            continue
        out[key] = value
    if "placement" not in out:
        region = _placement_from_text(text, need_context=True)
        if region is not None:
            out["placement"] = region
    return out


_NUM = r"(-?\d+(?:\.\d+)?)\s*(%?)"


def _placement_from_text(text: str, need_context: bool = False) -> dict | list | None:
    """x/y/w/h numbers (or a [x, y, w, h] list) after a placement key, from text that is not valid JSON."""
    if need_context:
        m = re.search(r"(placement|region|bbox|배치)", text, re.I)
        if not m:
            return None
        text = text[m.start():]
    lst = re.match(r"[^\[\n{]*?[:=：]\s*\[\s*" + r"\s*,\s*".join([_NUM] * 4), text)
    if lst:
        return [float(lst.group(k)) * (0.01 if lst.group(k + 1) else 1) for k in (1, 3, 5, 7)]
    region: dict[str, float] = {}
    window = text[:400]
    for name, value, pct in re.findall(r"[\"']?\b(x|y|w|h|width|height|left|top)\b[\"']?\s*[:=]\s*" + _NUM,
                                       window, re.I):
        key = {"width": "w", "height": "h", "left": "x", "top": "y"}.get(name.lower(), name.lower())
        region.setdefault(key, float(value) * (0.01 if pct else 1))
    return region or None


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_as_text(v) for v in value if _as_text(v))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_as_text(v)}" for k, v in value.items() if _as_text(v))
    return str(value).strip().strip("\"'").strip()


def _palette(value: Any) -> list[str]:
    if isinstance(value, str):
        items = re.split(r"\s*(?:,|;|/|\band\b|\n|·|、)\s*", value.strip().strip("[]"))
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if isinstance(v, dict):
                name = v.get("name") or v.get("colour") or v.get("color") or v.get("hex") or next(iter(v.values()), "")
                hexv = v.get("hex")
                items.append(f"{name} ({hexv})" if hexv and hexv != name else str(name))
            else:
                items.append(_as_text(v))
    elif isinstance(value, dict):
        items = [_as_text(v) if not isinstance(k, str) or k.isdigit() else str(k) for k, v in value.items()]
    else:
        items = []
    out = []
    for item in items:
        item = item.strip().strip("\"'.").strip()
        if item and item.lower() not in (x.lower() for x in out):
            out.append(item)
    return out[:8]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*" + _NUM + r"\s*", v)
        if m:
            return float(m.group(1)) * (0.01 if m.group(2) else 1)
    return None


def normalise_placement(value: Any) -> dict[str, float] | None:
    """{x, y, w, h} in 0–1 (top-left corner + size) from a dict, a [x, y, w, h] list or corners; None if unusable.

    Percentages (values up to 100) are scaled; pixel values cannot be (the image size is unknown) and give None.
    """
    nums: dict[str, float] = {}
    if isinstance(value, dict):
        low = {_norm_key(k): v for k, v in value.items()}
        for key, names in (("x", ("x", "left", "x0", "x_min", "xmin")), ("y", ("y", "top", "y0", "y_min", "ymin")),
                           ("w", ("w", "width")), ("h", ("h", "height")),
                           ("x1", ("x1", "right", "x_max", "xmax")), ("y1", ("y1", "bottom", "y_max", "ymax"))):
            for n in names:
                if n in low and _number(low[n]) is not None:
                    nums[key] = _number(low[n])
                    break
    elif isinstance(value, (list, tuple)) and len(value) == 4 and all(_number(v) is not None for v in value):
        x, y, a, b = (_number(v) for v in value)
        nums = {"x": x, "y": y, "w": a, "h": b}
        if (x + a > 1.0001 or y + b > 1.0001) and a > x and b > y and max(x, y, a, b) <= 1.0001:
            nums = {"x": x, "y": y, "x1": a, "y1": b}  # [x0, y0, x1, y1] corners
    else:
        return None
    if "w" not in nums and "x1" in nums and "x" in nums:
        nums["w"] = nums["x1"] - nums["x"]
    if "h" not in nums and "y1" in nums and "y" in nums:
        nums["h"] = nums["y1"] - nums["y"]
    vals = [nums[k] for k in ("x", "y", "w", "h") if k in nums]
    if not vals:
        return None
    if max(vals) > 1.0001:
        if max(vals) > 100.0001:
            return None  # pixels
        nums = {k: v / 100.0 for k, v in nums.items()}
    w = min(1.0, max(0.01, nums.get("w", DEFAULT_PLACEMENT["w"])))
    h = min(1.0, max(0.01, nums.get("h", DEFAULT_PLACEMENT["h"])))
    x = min(max(0.0, nums.get("x", (1.0 - w) / 2)), 1.0 - w)
    y = min(max(0.0, nums.get("y", DEFAULT_PLACEMENT["y"])), 1.0 - h)
    return {"x": round(x, 4), "y": round(y, 4), "w": round(w, 4), "h": round(h, 4)}


def _pairs(obj: Mapping) -> dict[str, Any]:
    """Our keys from a decoded JSON object (aliases, nested {"analysis": {...}} wrappers)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = canonical_key(k)
        if key is not None and key not in out:
            out[key] = v
    if not out:
        for v in obj.values():
            if isinstance(v, Mapping):
                nested = _pairs(v)
                if nested:
                    return nested
    if "light_direction" not in out and isinstance(out.get("lighting"), Mapping):
        light = {_norm_key(k): v for k, v in out["lighting"].items()}
        if "direction" in light:
            out["light_direction"] = light["direction"]
    return out


def parse_analysis(text: str) -> dict:
    """The model's reply → the analysis dict (see the module docstring). Never raises.

    Reads the first JSON object (code fences, text around it, single quotes, trailing commas, unquoted keys and a
    reply cut off mid-object are all tolerated), then ``key: value`` lines for whatever is still missing. Fields
    not found get defaults (empty text, no colours, a lower-middle placement); ``found`` lists the others. When
    nothing is found, ``scene`` is the reply itself so the text is not lost.
    """
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    raw: dict[str, Any] = {}
    for obj in json_objects(text):
        for k, v in _pairs(obj).items():
            raw.setdefault(k, v)
    for k, v in _from_lines(text).items():
        raw.setdefault(k, v)

    result: dict[str, Any] = {"scene": "", "lighting": "", "light_direction": "", "palette": [], "mood": "",
                              "camera": "", "placement": dict(DEFAULT_PLACEMENT)}
    found = []
    for key in ANALYSIS_KEYS:
        if key not in raw:
            continue
        if key == "palette":
            value = _palette(raw[key])
        elif key == "placement":
            value = normalise_placement(raw[key])
        elif key == "lighting" and isinstance(raw[key], Mapping):
            light = {_norm_key(k): v for k, v in raw[key].items()}
            value = _as_text({k: v for k, v in light.items() if k != "direction"}) or _as_text(raw[key])
        else:
            value = _as_text(raw[key])
        if value:
            result[key] = value
            found.append(key)
    if not found:
        result["scene"] = clean_reply(text)[:_SCENE_FALLBACK_CHARS]
    result["found"] = found
    return result


def analysis_json(analysis: Mapping) -> str:
    """The analysis as the node's JSON text (non-ASCII kept readable)."""
    return json.dumps(analysis, ensure_ascii=False)
