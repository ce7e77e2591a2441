"""Chat-template parity: tokenizer.Tokenizer renders the two real templates in
../shared/fixtures/chat_templates byte-for-byte as transformers' apply_chat_template does, encodes to the same
ids, and unions the stop ids."""
import json

import pytest

from conftest import SPECIALS, make_hf_model, make_tokenizer_json, shared_or_skip
from model import load_model
from tokenizer import Tokenizer

R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TEMPLATES = {  # name -> (template file, special tokens written into tokenizer_config.json)
    "qwen": ("qwen2.5-instruct.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                        "bos_token": None}),
    "r1": ("deepseek-r1-distill.jinja", {"bos_token": R1_BOS, "eos_token": R1_EOS}),
}

USER = {"role": "user", "content": "What is 7*6? Answer briefly: ✓ ünïcödé 中文\n  (two spaces)"}
SYSTEM = {"role": "system", "content": "You are a careful mathematician.\nThink step by step."}
CONVERSATIONS = {
    "user_only": [USER],
    "with_system": [SYSTEM, USER],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Compute 2+2."},
        {"role": "assistant", "content": "<think>\nTwo plus two: 2+2=4.\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "Compute 2+2."},
        {"role": "assistant", "content": "<think>2+2 is 4</think>4"},
        {"role": "user", "content": "And 3+3?"},
    ],
}


def template_text(name):
    return shared_or_skip("fixtures", "chat_templates", TEMPLATES[name][0]).read_text()


def make_folder(path, name, as_jinja_file=False):
    """tokenizer.json (byte-level + chat specials) and tokenizer_config.json with the template's bos/eos, the
    template either inline in tokenizer_config.json or (as_jinja_file) in chat_template.jinja."""
    tpl = template_text(name)
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer_json(path / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **TEMPLATES[name][1]}
    if as_jinja_file:
        (path / "chat_template.jinja").write_text(tpl)
    else:
        cfg["chat_template"] = tpl
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def hf_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))  # a local folder: no network


def hf_ids(hf, messages):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("as_jinja_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_and_ids_match_transformers(tmp_path, name, conv, as_jinja_file):
    folder = make_folder(tmp_path / name, name, as_jinja_file)
    ours, hf = Tokenizer(folder), hf_tokenizer(folder)
    assert ours.chat_template == template_text(name)
    msgs = CONVERSATIONS[conv]
    got = ours.apply_chat_template(msgs, add_generation_prompt=True)
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got.encode("utf-8") == want.encode("utf-8")
    ids = ours.encode(got)
    assert ids == hf_ids(hf, msgs)
    # the chat specials are single tokens, never spelled out byte by byte
    specials = {ours.tok.token_to_id(s) for s in SPECIALS}
    assert sum(i in specials for i in ids) >= 2
    assert ours.decode(ids, skip_special_tokens=False) == got


def test_qwen_default_system_prompt_injected(tmp_path):
    ours = Tokenizer(make_folder(tmp_path / "q", "qwen"))
    no_sys = ours.apply_chat_template([USER])
    assert no_sys.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert no_sys.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with_sys = ours.apply_chat_template([SYSTEM, USER])
    assert QWEN_DEFAULT_SYSTEM not in with_sys
    assert with_sys.startswith(f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n")
    assert not ours.apply_chat_template([USER], add_generation_prompt=False).endswith("assistant\n")


def test_r1_bos_think_prefill_and_reasoning_stripped(tmp_path):
    ours = Tokenizer(make_folder(tmp_path / "r", "r1"))
    s = ours.apply_chat_template(CONVERSATIONS["multi_turn"])
    assert s.startswith(R1_BOS + SYSTEM["content"] + "<｜User｜>Compute 2+2.")
    assert s.endswith("<｜Assistant｜><think>\n")
    # earlier reasoning dropped
    assert s.count("<think>") == 1 and "</think>" not in s and "Two plus two" not in s
    assert "<｜Assistant｜>\n\nThe answer is 4." + R1_EOS in s
    assert ours.apply_chat_template([USER]) == (R1_BOS + "<｜User｜>" + USER["content"]
                                                + "<｜Assistant｜><think>\n")


def test_jinja_file_overrides_tokenizer_config(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json's chat_template, as in transformers."""
    folder = make_folder(tmp_path / "q", "qwen", as_jinja_file=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "WRONG TEMPLATE"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    got = Tokenizer(folder).apply_chat_template([USER])
    assert got == hf_tokenizer(folder).apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert QWEN_DEFAULT_SYSTEM in got


SEMANTICS_TEMPLATE = (  # the renderer's semantics that the two real templates leave unexercised
    "{% if tools is not none %}TOOLS{% endif %}{% if documents is not none %}DOCS{% endif %}"
    "[{{ bos_token }}]\n"
    "{% for m in messages %}\n"          # trim_blocks: the newline after a block tag is dropped
    "    {% if m['role'] == 'stop' %}\n"  # lstrip_blocks: the indentation before a block tag too
    "        {% break %}\n"               # loopcontrols
    "    {% endif %}\n"
    "    {{ m | tojson }}\n"              # transformers' tojson: ensure_ascii=False
    "{% endfor %}\n"
    "{{ eos_token }}")


@pytest.mark.parametrize("bos", [R1_BOS, None], ids=["bos", "no_bos"])
def test_renderer_semantics_match_transformers(tmp_path, bos):
    """transformers passes tools=None / documents=None explicitly (`tools is not none` is false), leaves an
    unset bos_token undefined (renders as ''), uses trim_blocks + lstrip_blocks, loopcontrols and a non-ASCII
    tojson."""
    folder = tmp_path / "t"
    folder.mkdir()
    make_tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": SEMANTICS_TEMPLATE, "bos_token": bos,
        "eos_token": R1_EOS}))
    msgs = [USER, {"role": "stop", "content": "x"}, USER]
    got = Tokenizer(folder).apply_chat_template(msgs)
    assert got == hf_tokenizer(folder).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got == f"[{bos or ''}]\n    " + json.dumps(USER, ensure_ascii=False) + "\n" + R1_EOS


def test_stop_ids_union(tmp_path):
    """config.json, generation_config.json and tokenizer_config.json disagree: every eos id is a stop id."""
    d = tmp_path / "m"
    make_hf_model(d, "qwen2")
    ids = make_tokenizer_json(d / "tokenizer.json")
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = ids[R1_EOS]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|endoftext|>"],
                                                                           ids["</think>"]]}))
    # last: tokenizer_config
    want = sorted({ids[R1_EOS], ids["<|endoftext|>"], ids["</think>"], ids["<|im_end|>"]})
    _, tok = load_model(str(d))
    assert tok.stop_ids == want
    assert Tokenizer(d).stop_ids == want  # the Tokenizer alone reads config.json too
    assert tok.pad_id == ids["<|endoftext|>"]
    # a scalar eos in generation_config.json, and no generation_config.json at all
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<think>"]}))
    assert Tokenizer(d).stop_ids == sorted({ids[R1_EOS], ids["<think>"], ids["<|im_end|>"]})
    (d / "generation_config.json").unlink()
    assert Tokenizer(d).stop_ids == sorted({ids[R1_EOS], ids["<|im_end|>"]})
