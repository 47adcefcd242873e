"""`data.chat_template`: which chat template renders conversations, when the tokenizer's own is not the
one wanted (a base model has none, and scaletune's Alpaca-style rendering is then used)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileutil import missing

# ChatML turns. An assistant turn ends in <|im_end|> and the tokenizer's eos token, with nothing after it
# (what is trained on ends in the eos): generation stops at the eos token, which a base model's vocabulary
# has, where <|im_end|> is usually plain text to it.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILT_IN = {"chatml": CHATML, "default": None}

# scaletune's own (Alpaca-style) rendering (render._render_default) as a chat template, for a merged model's
# tokenizer: `apply_chat_template` there gives the text training and `predict` gave the model. Tool use is
# not in it (the rendering turns schemas and calls into JSON text first).
ALPACA_STYLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n### Response:\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '### Tool result:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] != 'user' %}{{ '### Response:\n' }}{% endif %}"
    "{{ m['content'] + eos_token }}{% if not loop.last or add_generation_prompt %}{{ '\n\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages and messages[-1]['role'] != 'user' %}{{ '### Response:\n' }}{% endif %}"
)


def alpaca_style_template(tokenizer: object) -> str:
    """ALPACA_STYLE for `tokenizer`, led by its BOS token where training led with it (a tokenizer that adds
    BOS itself): `apply_chat_template(..., tokenize=True)` adds no special tokens of its own."""
    from ..tasks.causal_lm import leading_bos

    return bos_led(tokenizer, ALPACA_STYLE) if leading_bos(tokenizer) is not None else ALPACA_STYLE


def bos_led(tokenizer: Any, template: str) -> str:
    """`template` led by `{{ bos_token }}`, so that `apply_chat_template(..., tokenize=True)` (which adds no special
    tokens) gives training's ids: BOS + the rendered text tokenised alone. A SentencePiece-style tokenizer that
    marks only a text's very start with "▁" (Metaspace prepend_scheme "first": Mistral v0.3, Llama 2 converted
    without legacy) leaves that mark off the text after a special token ("<s>###" is `<s>` `###`, training's
    `<s>` `▁###`): there a space after the BOS gives it back, and that lead is taken where it gives training's ids."""
    plain, spaced = "{{ bos_token }}" + template, "{{ bos_token }} " + template
    chat = [{"role": "user", "content": "Hi"}]
    try:
        text = tokenizer.apply_chat_template(chat, chat_template=template, add_generation_prompt=True, tokenize=False)
        want = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]

        def ids(lead: str) -> list:
            return list(tokenizer.apply_chat_template(chat, chat_template=lead, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False))

        if ids(plain) != want and ids(spaced) == want:
            return spaced
    except Exception:  # noqa: BLE001  (a template needing more than one user turn: led as it always was)
        pass
    return plain


# Other tools' template names with a scaletune counterpart besides the tokenizer's own
_OTHER_TOOLS = {"alpaca": "; LLaMA-Factory's and axolotl's alpaca template is scaletune's default (its Alpaca-style "
                          "rendering)",
                "tokenizer_default": " (axolotl's tokenizer_default)"}


def chat_template_text(spec: str) -> str | None:
    """The Jinja text `spec` names: a built-in name, or a file; None: scaletune's own rendering."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if not spec.strip():
        raise ConfigError(f"data.chat_template: empty; give {' | '.join(BUILT_IN)} or a template file")
    path = Path(spec)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else missing(path)
        # (a bare name is another tool's template name: LLaMA-Factory's llama3, axolotl's chatml ...)
        own = "; leave the key out (null) for the tokenizer's own" if re.fullmatch(r"[\w-]+", spec) else ""
        own += _OTHER_TOOLS.get(spec.lower(), "")
        raise ConfigError(f"data.chat_template: {spec!r} is neither {' | '.join(BUILT_IN)} nor a template file "
                          f"({path.absolute()} {what}){own}")
    from jinja2 import Environment, TemplateSyntaxError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.chat_template: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():  # (else scaletune's own rendering would be used without a word)
        raise ConfigError(f"data.chat_template: {path} is empty")
    try:
        Environment().parse(text)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"data.chat_template: {path}:{exc.lineno}: {exc.message}") from None
    return text
