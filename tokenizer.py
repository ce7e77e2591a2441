"""
tokenizer.py: the model's own tokenizer (tokenizer.json via `tokenizers`) and its own chat template
(tokenizer_config.json "chat_template" or chat_template.jinja), rendered with jinja2 in a sandbox exactly as
transformers' apply_chat_template does, so prompts are byte-identical to what the model was trained on.

Stop ids are the union of the eos ids of generation_config.json, config.json and tokenizer_config.json:
Qwen2.5-Instruct must stop on both <|im_end|> and <|endoftext|> (QwenLM/Qwen3 #927: the files disagree).
"""
import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _content(tok):  # special tokens are "str" or {"content": "str", ...} in tokenizer_config.json
    return tok.get("content") if isinstance(tok, dict) else tok


def _raise(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TokenizerError(ValueError):
    """A model folder without a usable tokenizer. One line; model.load_model reports it as a ModelError."""


class Tokenizer:
    def __init__(self, folder, extra_eos=()):
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise TokenizerError(f"missing tokenizer.json in {folder}")
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = self.config.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        self.special = {k: _content(self.config.get(k))
                        for k in ("bos_token", "eos_token", "unk_token", "pad_token")}

        eos = set(extra_eos)
        # the docstring's union, even without load_model
        for name in ("generation_config.json", "config.json"):
            path = folder / name
            if path.exists():
                e = json.loads(path.read_text()).get("eos_token_id")
                eos |= set(e if isinstance(e, list) else [] if e is None else [e])
        if self.special["eos_token"] and self.tok.token_to_id(self.special["eos_token"]) is not None:
            eos.add(self.tok.token_to_id(self.special["eos_token"]))
        self.stop_ids = sorted(eos)
        pad = self.special["pad_token"]
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None else \
            (self.stop_ids[0] if self.stop_ids else 0)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # the chat template already wrote every special token as text, so add none here (as transformers does)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template "
                             "(tokenizer_config.json / chat_template.jinja)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        specials = {k: v for k, v in self.special.items() if v is not None}
        # transformers passes tools and documents explicitly (None when absent): `tools is not none` is false
        context = {"tools": None, "documents": None, **specials, **kwargs}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context)
