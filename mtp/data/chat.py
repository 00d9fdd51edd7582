"""Chat templates: a model's Jinja template rendered the way transformers renders it.

    render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                bos_token="<|im_start|>", eos_token="<|im_end|>")

Hub templates are untrusted code, so they run in jinja2's immutable sandbox, with
transformers' settings (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension)
and globals (`raise_exception`, `strftime_now`, a JSON `tojson` that keeps non-ASCII).
The template sees `messages`, `add_generation_prompt`, `tools` and `documents` (None)
and the tokenizer's special tokens (`bos_token`, `eos_token`, `pad_token`) as variables.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mtp.errors import ConvertError


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template; ConvertError if it is not valid Jinja."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConvertError(f"chat_template: not a valid Jinja template ({e})") from None


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    **tokens: str | None,
) -> str:
    """`messages` ({'role', 'content'} dicts) rendered by `template`; `tokens` are the special
    token variables (bos_token=..., eos_token=...). The template's own `raise_exception`
    (e.g. for a role it does not know) raises jinja2's TemplateError."""
    return compile_template(template).render(
        messages=[dict(m) for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **tokens,
    )
