"""Chat prompts: a model's own chat template, rendered the way transformers' apply_chat_template does
(a sandboxed jinja2 environment with trim_blocks/lstrip_blocks, loopcontrols, a non-escaping tojson,
raise_exception, strftime_now; the special tokens passed by name), so a Hugging Face model gets the
prompt it was fine-tuned on. Velocis' own models use VELOCIS_TEMPLATE over the tokenizer's role
tokens: <|system|>, <|user|>, <|assistant|>, each turn closed by <|end|> (which stops generation).

    tpl = find_chat_template(model_dir, tokenizer)     # None: the model has no chat format
    text = tpl.render(messages, add_generation_prompt=True)
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from velocis.errors import VelocisError
from velocis.tokenizer import ASSISTANT, END, SYSTEM, USER, VELOCIS_TEMPLATE  # noqa: F401 (re-exported)


def _compile(source: str):
    """transformers' environment (chat_template_utils._cached_compile_jinja_template), minus the
    {% generation %} tracker, which only matters for training masks."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise VelocisError(f"the model's chat template does not parse: {e}") from None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], stop_token_ids: list[int] | None = None,
                 builtin: bool = False):
        self.source = source
        self.special_tokens = special_tokens  # bos_token, eos_token, ... as transformers passes them
        self.stop_token_ids = list(stop_token_ids or [])  # what ends an assistant turn besides EOS
        self.builtin = builtin
        self._template = _compile(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; a template's raise_exception or a template bug is a VelocisError."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise VelocisError(f"the chat template refused the messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise VelocisError(f"the chat template failed on these messages: {e}") from None


def _token_name(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(config: dict, model_dir: Path) -> str | None:
    """tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}: the
    "default" one), else chat_template.jinja / chat_template.json (newer transformers)."""
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str) and tpl.strip():
        return tpl
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        try:
            tpl = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            tpl = None
        if isinstance(tpl, str) and tpl.strip():
            return tpl
    return None


def find_chat_template(model_dir: str | Path, tokenizer) -> ChatTemplate | None:
    """The model's chat template, Velocis' default when its tokenizer has the role tokens, or None."""
    model_dir = Path(model_dir)
    config = {}
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError:
            config = {}
    special = {}
    for name, tid in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                      ("pad_token", tokenizer.pad_id)):
        special[name] = _token_name(config.get(name)) or (tokenizer.id_to_token(tid) if tid is not None else None)
    if _token_name(config.get("unk_token")):
        special["unk_token"] = _token_name(config.get("unk_token"))
    special = {k: v for k, v in special.items() if v is not None}
    source = _template_source(config, model_dir)
    roles = [tokenizer.token_to_id(t) for t in (SYSTEM, USER, ASSISTANT, END)]
    velocis_roles = all(r is not None for r in roles)
    # a Velocis model dir saves its template in tokenizer_config.json (tokenizer.py): still Velocis' own
    if source is not None and not (velocis_roles and source == VELOCIS_TEMPLATE):
        return ChatTemplate(source, special)
    if velocis_roles:
        return ChatTemplate(VELOCIS_TEMPLATE, special, [roles[-1]], builtin=True)
    return None
