"""The text side of generation, framework-neutral: tokenizer, chat template, eos ids, sampling
defaults from generation_config.json, and incremental detokenization for streaming.

Everything reads a Hugging Face checkpoint directory: tokenizer.json (the `tokenizers`
library), tokenizer_config.json (special tokens, `chat_template`), chat_template.jinja (newer
exports keep the template there), generation_config.json. Errors are `TextError`s naming the
file and what was expected.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TextError(ValueError):
    """A missing or malformed tokenizer / template / generation-config file."""


def read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A JSON object from `path`; {} when it is absent and not required."""
    if not path.is_file():
        if required:
            raise TextError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TextError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TextError(f"{path}: expected a JSON object")
    return data


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise TextError(f"{path}: missing tokenizer.json (needed to tokenize prompts and decode output)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TextError(f"{path}: cannot load tokenizer ({e})") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as transformers passes them to a chat template."""
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(tokenizer_config.get(key))
        if text is not None:
            out[key] = text
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
    return out


def chat_template(model_dir: str | Path) -> str:
    """The checkpoint's chat template: tokenizer_config.json's `chat_template` (a string, or a list
    of named templates of which "default" is used), else chat_template.jinja."""
    d = Path(model_dir)
    tpl = read_json(d / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if isinstance(tpl, str) and tpl:
        return tpl
    jinja_file = d / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    raise TextError(f"{d / TOKENIZER_CONFIG}: no chat_template (nor a {CHAT_TEMPLATE_FILE} in {d})")


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The environment transformers' apply_chat_template uses.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(template: str, messages: list[dict], tokenizer_config: dict | None = None, *,
                add_generation_prompt: bool = True, **kwargs) -> str:
    """Render a chat template the way transformers' apply_chat_template does (tools and
    documents None, the special tokens as variables; `kwargs` override them)."""
    import jinja2

    try:
        compiled = _environment().from_string(template)
        variables = {**special_tokens(tokenizer_config or {}), **kwargs}
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise TextError(f"chat template: {e}") from None


def _eos_value(path: Path) -> list[int]:
    eos = read_json(path).get("eos_token_id")
    if eos is None or eos == []:
        return []
    values = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in values):
        raise TextError(f"{path}: eos_token_id={eos!r}, expected an integer or a list of integers")
    return list(dict.fromkeys(values))


def eos_token_ids(model_dir: str | Path, tokenizer=None) -> list[int]:
    """generation_config.json's eos_token_id (int or list), else tokenizer_config.json's
    eos_token (looked up in `tokenizer`), else config.json's eos_token_id; [] when none is set."""
    d = Path(model_dir)
    ids = _eos_value(d / GENERATION_CONFIG)
    if ids:
        return ids
    text = _token_text(read_json(d / TOKENIZER_CONFIG).get("eos_token"))
    if text is not None and tokenizer is not None and tokenizer.token_to_id(text) is not None:
        return [tokenizer.token_to_id(text)]
    return _eos_value(d / "config.json")


def sampling_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """temperature, top_k, top_p from generation_config.json: its values when it samples
    (do_sample true), else greedy. Absent keys: temperature 1.0, top_k 0 (off), top_p 1.0."""
    path = Path(model_dir) / GENERATION_CONFIG
    gc = read_json(path)
    out = {"temperature": 0.0, "top_k": int(gc.get("top_k") or 0), "top_p": float(gc.get("top_p") or 1.0)}
    if gc.get("do_sample"):
        t = gc.get("temperature", 1.0)
        out["temperature"] = float(1.0 if t is None else t)
    return out


class StreamDecoder:
    """Turns a growing list of token ids into text increments that are safe to print.

    Each `push(new_ids)` decodes the whole list so far and returns only the new suffix, holding
    back a trailing partial UTF-8 character (decoded as U+FFFD) until the bytes that complete it
    arrive; `finish()` returns whatever is still held back.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.printed = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)

    def _emit(self, text: str, final: bool) -> str:
        # A decoder that rewrites earlier characters (not byte-level BPE) is printed by position at the end.
        if not (final or text.startswith(self.printed)):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in new_ids)
        return self._emit(self.text().rstrip("\ufffd"), final=False)

    def finish(self) -> str:
        return self._emit(self.text(), final=True)
