"""
Data for PTE: the training set, the evaluation benchmarks, the prompts, and the reward.

The paper trains with GRPO on DAPO-Math-17K using an outcome reward: r(y) = 1 if the final answer of the
completion is correct, else 0 (rule-based exact matching, no format or length shaping; README choice 14).
It evaluates on MATH500, OlympiadBench, AMC23, AIME24/25 and (probably) Minerva Math (README choice 15).
This file holds:

  load_train(spec)           DAPO-Math-17k from the hub (deduplicated), or a local JSONL of
                             {"problem", "answer"}
  load_benchmark(name)       one of BENCHMARKS, from --data-dir / $PTE_DATA_DIR (offline copies)
                             or from the hub
  build_user_message(p)      the user turn: "boxed" (Qwen2.5-Math style) or "dapo" (the DAPO template)
  extract_answer(text)       the final answer of a completion: after its last marker (\\boxed{}, "Answer:",
                             "The final answer is", "####", "the answer is"), else the whole completion if it
                             is only an answer; strict=True: only the prompt style's own marker
  is_equiv(pred, gold)       the comparison: normalise -> integers -> numbers -> lists/intervals ->
                             math-verify
  grade(text, gold)          extract + compare in one pass -> (answer or None, correct), lenient unless strict
  is_correct(text, gold)     grade's verdict, lenient (evaluation)
  reward(text, gold)         1.0 / 0.0, the GRPO reward: strict by default (training teaches the asked format)

Usage:
  from data import load_benchmark, build_user_message, reward
  probs = load_benchmark("aime24", data_dir="../shared/data")
  msg = build_user_message(probs[0]["problem"], style="dapo")
  r = reward(completion_text, probs[0]["answer"], truncated=hit_max_tokens)

Every bad input raises DataError with a one-line message. Records are {"id", "problem", "answer"}.
"""
import json
import os
import re
import signal
import threading
from fractions import Fraction
from pathlib import Path

BENCHMARKS = {"math500": "math500.jsonl", "olympiadbench": "olympiadbench.jsonl", "amc23": "amc23.jsonl",
              "aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "minerva": "minerva_math.jsonl",
              "gsm8k": "gsm8k.jsonl"}
# name -> (hub dataset, config, split); see shared/data/SOURCES.md. We read the hub's auto-converted parquet
# branch, which has the same layout <config>/<split>/*.parquet for every dataset whatever its original format.
HUB_BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "default", "test"),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
    "amc23": ("math-ai/amc23", "default", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "default", "train"),
    "aime25": ("math-ai/aime25", "default", "test"),
    "minerva": ("math-ai/minervamath", "default", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}
DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
DAPO_FILE = "data/dapo-math-17k.parquet"
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("boxed", "dapo")


class DataError(ValueError):
    """Bad data or a bad data argument. The message is one line, meant for the user."""


def _one_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"

# -----------------------------------------------------------------------------
# reading data


def _numbered_jsonl(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append((n, rec))
    return out


def read_jsonl(path):
    """All records of a JSONL file (blank lines skipped)."""
    return [rec for _, rec in _numbered_jsonl(path)]


def _answer_str(a):  # Qwen's amc23 stores answers as floats (27.0): an integer-valued float becomes "27"
    return "" if a is None else str(int(a) if isinstance(a, float) and a.is_integer() else a).strip()


def _records(numbered, where, prefix, dedup=False):
    """[(line, raw record)] -> [{"id", "problem", "answer"}]: check the two fields every record needs,
    drop repeated problems if asked (keeping the first), and give records without an id f"{prefix}-{i}"."""
    out, seen = [], set()
    for n, rec in numbered:
        for field in ("problem", "answer"):
            if _answer_str(rec.get(field)) == "":
                raise DataError(f"{where}:{n}: record has no {field!r} field")
        if dedup and rec["problem"] in seen:
            continue
        seen.add(rec["problem"])
        rid = rec.get("id")
        out.append({"id": f"{prefix}-{len(out)}" if rid in (None, "") else str(rid),
                    "problem": str(rec["problem"]), "answer": _answer_str(rec["answer"])})
    if not out:
        raise DataError(f"{where}: no records")
    return out


def _read_dapo_parquet(path):
    """Yield (row number, record) from DAPO's parquet: prompt=[{"role": "user", "content": <DAPO template
    around the problem>}], reward_model={"ground_truth": "<int>"}. A generator, so that the caller keeps only
    the ~17.9k unique problems of the 1.79M rows; read by batches of strings rather than a dict per row."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    n = 0
    for b in pq.ParquetFile(path).iter_batches(columns=["prompt", "reward_model"], batch_size=65536):
        texts = pc.struct_field(pc.list_element(b.column("prompt"), 0), "content").to_pylist()
        golds = pc.struct_field(b.column("reward_model"), "ground_truth").to_pylist()
        for text, gold in zip(texts, golds):
            n += 1
            problem = (text or "").removeprefix(DAPO_PREFIX).removesuffix(DAPO_SUFFIX).strip()
            yield n, {"problem": problem, "answer": gold}


def load_train(spec=DAPO_HUB_ID, data_dir=None):
    """Training problems, deduplicated by problem text: from a local JSONL (a path, or a file name inside
    data_dir / $PTE_DATA_DIR) of {"problem", "answer"[, "id"]}, or from a hub dataset
    in DAPO-Math-17k's schema."""
    data_dir, spec = data_dir or os.environ.get("PTE_DATA_DIR"), str(spec)
    path = Path(spec)
    if not path.exists() and data_dir and (Path(data_dir) / spec).exists():
        path = Path(data_dir) / spec
    if path.exists() or spec.endswith(".jsonl"):
        return _records(_numbered_jsonl(path), path, "train", dedup=True)
    try:
        from huggingface_hub import hf_hub_download
        local = hf_hub_download(spec, DAPO_FILE, repo_type="dataset")
    except Exception as e:  # offline (HF_HUB_OFFLINE or no network), unknown repo, ...
        raise DataError(f"cannot download {spec}: {_one_line(e)}; pass a local --train-data JSONL") from None
    return _records(_read_dapo_parquet(local), spec, "train", dedup=True)


def _hub_benchmark(name):
    """[(row, record)] of a benchmark from the hub's parquet branch, in the fields of the offline copies."""
    repo, config, split = HUB_BENCHMARKS[name]
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo, repo_type="dataset", revision="refs/convert/parquet",
                                   allow_patterns=[f"{config}/{split}/*.parquet"])
        files = sorted(Path(folder).glob(f"{config}/{split}/*.parquet"))
        rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    except Exception as e:
        raise DataError(f"cannot download {repo}: {_one_line(e)}; "
                        "pass --data-dir with offline JSONL copies") from None
    if not files:
        raise DataError(f"{repo} has no {config}/{split}/*.parquet on its refs/convert/parquet branch; "
                        "pass --data-dir")
    out = []
    for n, row in enumerate(rows, 1):
        answer = row.get("final_answer", row.get("answer"))
        if isinstance(answer, (list, tuple)):  # OlympiadBench: a one-element list of "$...$" strings
            answer = answer[0].strip("$") if answer else None
        if name == "gsm8k" and answer:  # the rationale ends with "#### <answer>"
            answer = answer.split("####")[-1].strip()
        out.append((n, {"id": row.get("unique_id") or row.get("id"), "answer": answer,
                        "problem": row.get("problem") or row.get("question")}))
    return out


def load_benchmark(name, data_dir=None, limit=None):
    """A benchmark as [{"id", "problem", "answer"}]: from data_dir (or $PTE_DATA_DIR) if set, else the hub."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    data_dir = data_dir or os.environ.get("PTE_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / BENCHMARKS[name]
        if not path.is_file():
            raise DataError(f"{path}: file not found (the {name} benchmark in --data-dir {data_dir})")
        recs = _records(_numbered_jsonl(path), path, name)
    else:
        recs = _records(_hub_benchmark(name), HUB_BENCHMARKS[name][0], name)
    return recs if limit is None else recs[:limit]

# -----------------------------------------------------------------------------
# prompts


def build_user_message(problem, style="boxed"):
    """The user turn for a problem. "boxed": Qwen2.5-Math's CoT instruction;
    "dapo": DAPO-Math-17k's template."""
    if style not in PROMPT_STYLES:
        raise DataError(f"unknown prompt style {style!r}; valid styles: {', '.join(PROMPT_STYLES)}")
    return problem + BOXED_SUFFIX if style == "boxed" else DAPO_PREFIX + problem + DAPO_SUFFIX


def encode_prompt(tok, problem, style="boxed"):
    """Token ids of the whole prompt: the model's own chat template around build_user_message, ready for the
    assistant's turn. The one place prompts are built (training, evaluation and the demo)."""
    text = tok.apply_chat_template([{"role": "user", "content": build_user_message(problem, style)}],
                                   add_generation_prompt=True)
    return tok.encode(text)

# -----------------------------------------------------------------------------
# answer extraction: grade the completion only, and never guess (no "last number in the text" fallback).
# The answer follows the LAST final-answer marker of the completion, whatever the prompt style asked for: a
# model that boxes 5 and then ends with "Answer: 7" answered 7. The markers, all of equal rank:
#   \boxed{X}, \fbox{X}           Qwen2.5-Math's CoT prompt (style "boxed"), MATH solutions
#   a line "Answer: X"            DAPO's prompt (style "dapo"); also "**Answer:** X", "Final Answer: X"
#   "The final answer is $X$",    Minerva's format ("Final Answer: The final answer is $X$. I hope it is ...")
#   "the answer is X"             and plain English; only at the start of a sentence or after
#                                 so/thus/hence/..., and only if X looks like an answer (a $..$ or **..**
#                                 span, or text that starts like math), so that
#                                 "\boxed{5}. So the answer is correct." stays 5
#   "#### X"                      GSM8K's format; X must start like a number ("#### Step 2" is a heading)
# A marker inside the last box is part of the box. With no marker at all, the answer is the completion itself
# when it is nothing but an answer ("7/2", "$x = 3$", "**Paris**"), else its last line when that is a bold
# span ("**12**"); prose and worked equations ("12 + 30 = 42") are no answer.
# strict=True keeps only the prompt style's own marker ("boxed": boxes, "dapo": Answer lines, None: either)
# and has no fallback: the training reward (see reward()).

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE = re.compile(r"(?im)^[ \t*#>_]*(?:final )?answer[*_]*[ \t]*:[ \t*_]*(.*?)[ \t]*$")
_PHRASE = re.compile(r"(?im)(?:^|(?<=[.!?:;])[ \t]+|\b(?:so|thus|hence|therefore|then)\b,?[ \t]+)[ \t>#]*"
                     r"(\*\*)?the[ \t]+(?:final[ \t]+|correct[ \t]+)?answer[ \t]+is\b"
                     r"[ \t:]*(?(1)(?:\*\*[ \t:]*)?)")
# "#### 18", "#### **18**", but not a markdown heading "#### Step 2", "#### 1. Setup"
_HASHES = re.compile(r"####[ \t]*(?=\**[-+\d.$\\(\[\u2212])(?!\**\d+[.)][ \t]+[A-Za-z])([^\n]*)")
# a delimited answer: $$..$$, $..$ (escaped \$ inside), \(..\), \[..\], **..**; several $..$ ("$69$, $84$")
_SPAN = re.compile(r"\$\$(.+?)\$\$|\$((?:\\.|[^\\$])+)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]|\*\*([^*]+)\*\*", re.S)
_SPANS = re.compile(r"\$(?:\\.|[^\\$])+\$(?:[ \t]*(?:,|and|or)[ \t]*\$(?:\\.|[^\\$])+\$)+")
MARKERS = ("box", "line", "phrase", "hashes")
STRICT_MARKERS = {"boxed": ("box",), "dapo": ("line",), None: ("box", "line")}  # prompt style -> its marker
ANSWER_MAX_CHARS = 100  # undelimited text longer than this, bare or after "the answer is", is prose
SPAN_MAX_CHARS = 1000  # but a $..$ span may be long (Minerva's formulas): how far we look for one


def _balanced(s, i):
    """s[i] == "{": the index of its closing brace, or None. Escaped braces \\{ \\} don't count."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i
        i += 1
    return None


def _box(text, m):
    """(argument, end) of the box whose command m matched: argument None if empty or unterminated (an
    unterminated box runs to the end of the text)."""
    rest = text[m.end():]
    j = len(rest) - len(rest.lstrip())
    if rest[j:j + 1] == "{":
        end = _balanced(rest, j)
        if end is None:
            return None, len(text)
        return rest[j + 1:end].strip() or None, m.end() + end + 1
    t = re.match(r"\s+([^\s$]+)", rest)  # "\boxed 5" (TeX allows a single-token argument)
    return (t.group(1).rstrip(".") if t else None), m.end() + (t.end() if t else 0)


def _tidy(s):
    """ "**$34$**." -> "34": markdown bold, $ or \\( \\) around the answer, a final period; a box inside ->
    its argument ("Answer: $\\boxed{34}$" under strict "dapo")."""
    s = s.strip(" \t*$").rstrip(".").strip(" \t*$")
    m = re.fullmatch(r"\\\((.*)\\\)|\\\[(.*)\\\]", s, re.S)
    s = next((g for g in m.groups() if g is not None), "").strip() if m else s
    boxes = list(_BOX.finditer(s))
    return (_box(s, boxes[-1])[0] if boxes else s) or None


def _answer_like(s, delimited=False, word=False):
    """Does s look like an answer rather than prose? A delimited span ($..$, **..**) does (an equation too:
    "$5x - 7y = 0$"); else s must not be a worked equation ("12 + 30 = 42"; "x = 3" is fine), and must be a
    single word if word, or start like math ("42", "-x", "\\frac", "(B) 12", "x \\ge 2", "B.") and carry at
    most a unit's few words."""
    s = s.strip()
    if not s or delimited:
        return bool(s)
    if len(s) > ANSWER_MAX_CHARS:
        return False
    lhs, eq, _ = s.partition("=")
    if eq and not re.fullmatch(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\([A-Za-z]\))?\s*", lhs):
        return False
    if word and re.fullmatch(r"[A-Za-z]+", s):
        return True
    words = re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", re.sub(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}", "", s))
    starts = re.match(r"[-+\d.$\\(\[\u2212]|[A-Za-z](?=\s*(?:[=<>)\].:,]|\\[lg]|$))", s)
    return bool(starts) and len(words) <= 3


def _line_answer(text, m):
    """The answer of an "Answer:" line, or of the next lines up to a blank one if it stops after the colon."""
    ans = m.group(1)
    if not ans.strip(" \t*_$"):
        ans = " ".join(text[m.end():].lstrip("\n").split("\n\n", 1)[0].split("\n"))
    return _tidy(ans)


def _phrase_answer(text, m):
    """(answer, delimited) after "the answer is": a leading $..$ or **..** span, else the sentence's rest."""
    rest = text[m.end():m.end() + SPAN_MAX_CHARS].lstrip()  # a window: a hostile text repeats the phrase
    spans, span = _SPANS.match(rest), _SPAN.match(rest)
    if spans:
        return spans.group(0), True
    if span:
        return next(g for g in span.groups() if g is not None).strip(), True
    return re.split(r"\.(?=[\s*_]|$)", rest.split("\n", 1)[0], maxsplit=1)[0].strip(), False


def _last_marker(text, kinds):
    """(start, answer) of the last final-answer marker of the given kinds in text,
    or None if there is none."""
    found, box_span = [], (0, 0)
    boxes = list(_BOX.finditer(text)) if "box" in kinds else []
    if boxes:
        ans, end = _box(text, boxes[-1])
        found.append((boxes[-1].start(), ans))
        box_span = (boxes[-1].start(), end)
    if "line" in kinds:
        found += [(m.start(), _line_answer(text, m)) for m in list(_ANSWER_LINE.finditer(text))[-1:]]
    if "hashes" in kinds:
        found += [(m.start(), _tidy(m.group(1))) for m in list(_HASHES.finditer(text))[-1:]]
    if "phrase" in kinds:
        for m in reversed(list(_PHRASE.finditer(text))):  # the last one followed by something answer-like
            ans, delimited = _phrase_answer(text, m)
            if _answer_like(ans, delimited):
                found.append((m.start(), _tidy(ans)))
                break
    found = [f for f in found if not box_span[0] < f[0] < box_span[1]]  # "\boxed{\text{Answer: 5}}" is a box
    return max(found, key=lambda f: f[0]) if found else None


def _bare(text):
    """The answer of a completion without any marker: all of it if it is nothing but an answer, else its last
    line if that is one bold span; None otherwise."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    whole = " ".join(lines).rstrip(".")
    short = len(whole) <= SPAN_MAX_CHARS
    spans, span = (_SPANS.fullmatch(whole), _SPAN.fullmatch(whole)) if short else (None, None)
    if spans or span:
        ans = spans.group(0) if spans else next(g for g in span.groups() if g is not None)
        return _tidy(ans) if _answer_like(ans, delimited=True) else None
    if _answer_like(whole, word=True):
        return _tidy(whole)
    bold = re.fullmatch(rf"\*\*([^*]{{1,{ANSWER_MAX_CHARS}}})\*\*\.?", lines[-1])
    return _tidy(bold.group(1)) if bold and bold.group(1).strip() else None


def extract_answer(completion, truncated=False, strict=False, style=None):
    """The final answer string of a completion, or None if there is none (reward 0): what follows the last
    final-answer marker, else a completion that is only an answer. strict: only style's own marker counts
    ("boxed": \\boxed{}, "dapo": an "Answer:" line, None: either), and there is no fallback."""
    if style not in STRICT_MARKERS:
        raise DataError(f"unknown prompt style {style!r}; valid styles: {', '.join(PROMPT_STYLES)}")
    if truncated or not completion:  # a cut-off completion has no final answer, whatever it contains
        return None
    text = completion.rsplit("</think>", 1)[-1]  # reasoning models: grade only what follows the thought
    last = _last_marker(text, STRICT_MARKERS[style] if strict else MARKERS)
    if last is not None:
        return last[1]
    return None if strict else _bare(text)

# -----------------------------------------------------------------------------
# answer comparison


def _unsep(s):
    """ "1,450" -> "1450": thousands separators, only in a lone number
    (elsewhere a comma separates a list)."""
    return s.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s) else s


def _normalize(s):
    """Canonical string form: drop what never changes the value (spacing, $, \\left, units' \\text, ...)."""
    s = str(s).strip().replace("\\textdollar", "").replace("\\$", "").replace("$", "")
    s = s.replace("\u2212", "-")  # a unicode minus
    for _ in range(2):  # \text{...} and friends -> their text (twice for one level of nesting)
        s = re.sub(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)"
                   r"\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+(?:or|and)\s+", ",", s)  # "x=1 \text{ or } x=-2" is the list "x=1,x=-2"
    s = re.sub(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle|\\q?quad(?![A-Za-z])"
               r"|(?<!\\)\\[!,;: ]", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s).replace("~", " ")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])", "", s)  # degrees: 90^\circ == 90
    s = s.replace("\\%", "").replace("%", "").replace("{,}", ",")  # percent signs; 1{,}000
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)  # \frac9{19}
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)  # \frac{270}7
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    # spaces: keep one only between two letters, where it separates tokens ("\cot x", "m n")
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?<![A-Za-z]) | (?![A-Za-z])", "", s).rstrip(".")
    s = _unsep(s)
    s = re.sub(r"^[A-Za-z]\\in", "", s)  # "x \in [-2,7]" -> "[-2,7]"
    m = re.fullmatch(r"\(([A-Z])\)", s)  # multiple choice: (C) == C
    return m.group(1) if m else s


_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"  # written so that no input makes the regex backtrack
_BRACED = r"\{((?:[^{}]|\{[^{}]*\})+)\}"  # {...} with one level of nested braces


def _atom(s):
    """A decimal, 4.5e33, 4.5\\times10^{33}, or an integer power 2^{10}, as an exact Fraction (else None)."""
    m = re.fullmatch(rf"({_NUM})(?:(?:[eE]|(?:\\times|\\cdot|\*)10\^)\{{?([+-]?\d+)\}}?)?", s)
    p = re.fullmatch(r"([+-]?)(\d{1,6})\^\{?([+-]?\d+)\}?", s)
    if not (m or p):
        return None
    mant, base, exp = ((m.group(1), 10, int(m.group(2) or 0)) if m
                       else (p.group(1) + "1", int(p.group(2)), int(p.group(3))))  # -2^2 = -(2^2)
    if abs(exp) > 1000:  # don't build 10^(10^9) for a hostile completion
        return None
    try:
        return Fraction(mant) * Fraction(base) ** exp
    except (ValueError, ZeroDivisionError):  # ValueError: int() refuses numbers of > 4300 digits
        return None


_REPEAT = r"([+-]?)(\d{0,30})\.(\d{0,30})(?:\\(?:overline|bar|dot)(?:\{(\d{1,30})\}|(\d))|\((\d{1,30})\))"


def _repeating(s):
    """A repeating decimal as an exact Fraction: 0.\\overline{6} (or \\bar, \\dot) and 0.(6) are 2/3."""
    m = re.fullmatch(_REPEAT, s)
    if not m:
        return None
    sign, whole, fixed, rep = m.group(1), m.group(2), m.group(3), m.group(4) or m.group(5) or m.group(6)
    v = (int(whole or 0) + Fraction(int(fixed or 0), 10 ** len(fixed))
         + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed)))
    return -v if sign == "-" else v


def _to_number(s):
    """s as an exact Fraction if it is a plain number (int, decimal, a/b, \\frac{a}{b}, mixed 1\\frac{4}{5},
    repeating decimal 0.\\overline{6}); "\\frac{10,000}{7}" may carry thousands separators."""
    m = re.fullmatch(r"([+-]?)(\d{1,9})\\frac\{(\d{1,9})\}\{(\d{1,9})\}", s)  # mixed number: MATH's 137 1/2
    if m and int(m.group(4)):
        v = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -v if m.group(1) == "-" else v
    m = re.fullmatch(rf"([+-]?)\\frac{_BRACED}{_BRACED}", s) or re.fullmatch(r"([+-]?)([^/]+)/([^/]+)", s)
    if m:
        a, b = _atom(_unsep(m.group(2))), _atom(_unsep(m.group(3)))
        if a is None or not b:
            return None
        return -a / b if m.group(1) == "-" else a / b
    v = _atom(s)
    return v if v is not None else _repeating(s)


def _strip_units(s):
    """ "5cm", "18dollars", "864inches^2", "1,450dollars" -> the number. Needs a word of 2+ letters, so "2k"
    stays "2k"."""
    m = re.search(r" ?[A-Za-z]{2,}(?: [A-Za-z]+)*(?:\^\{?[23]\}?)?$", s) if len(s) < 200 else None
    num = _unsep(s[:m.start()]) if m else None
    return num if m and _to_number(num) is not None else s


def _split_top(s):
    """Split at commas outside any bracket."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def _brackets(s):
    """(bracket pair, inside) for "(..)", "[..)", "\\{..\\}" wrapping the whole string; ("", s) otherwise."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "{}", s[2:-2]
    if s[:1] in ("(", "[") and s[-1:] in (")", "]"):
        depth = 0
        for i, c in enumerate(s):
            depth += (c in "([{") - (c in ")]}")
            if depth == 0 and i < len(s) - 1:
                return "", s  # "(0,9)\cup(9,36)": the first bracket closes early
        return s[0] + s[-1], s[1:-1]
    return "", s


def _expand_pm(parts):  # "1\pm\sqrt{19}" is the two-element list 1+\sqrt{19}, 1-\sqrt{19}
    pm = lambda p: ([p.replace("\\pm", "+", 1), p.replace("\\pm", "-", 1)]  # noqa: E731
                    if p.count("\\pm") == 1 else [p])
    return [q for p in parts for q in pm(p)]


def _compare_lists(p, g):
    """Tuples, intervals, sets and bare lists, element by element. None if neither side is a list."""
    (gb, gi), (pb, pi) = _brackets(g), _brackets(p)
    ge, pe = _expand_pm(_split_top(gi)), _expand_pm(_split_top(pi))
    if len(ge) < 2 and len(pe) < 2:
        return None
    if len(ge) != len(pe):
        return False
    # an interval's brackets must match; a tuple "(a,b)" may be written bare; a bare list or set is unordered
    if gb != pb and not ((gb == "()" and pb == "") or (gb in ("", "{}") and pb in ("", "{}", "()"))):
        return False
    if gb not in ("", "{}"):
        return all(is_equiv(x, y) for x, y in zip(pe, ge))
    left = list(pe)
    for y in ge:  # greedy matching is enough: equivalence is (almost) transitive
        hit = next((k for k, x in enumerate(left) if x == y), None)  # cheap exact match first
        hit = next((k for k, x in enumerate(left) if is_equiv(x, y)), None) if hit is None else hit
        if hit is None:
            return False
        left.pop(hit)
    return True


_INEQ = r"(<=|>=|≤|≥|<|>|\\(?:leqslant|geqslant|leq|geq|le|ge|lt|gt)(?![A-Za-z]))"
_VAR = r"(?!\\infty)(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?"


def _interval(s):
    """A one-variable inequality as the interval it means: "y\\ge2" -> "[2,\\infty)", "-1<x\\le3" -> "(-1,3]",
    "x<2,x>3" ("x<2 or x>3") -> a union. None if s is not one; the bounds must hold no letter ("x<y" is a
    relation, not an interval)."""
    parts = _split_top(s)
    if len(parts) > 1:
        ivs = [_interval(q) for q in parts]
        return "\\cup".join(ivs) if all(ivs) else None
    t = [x.strip() for x in re.split(_INEQ, s)]  # "2\le x": a space stays between two letters
    less = [op in ("<", "<=", "≤") or op[1:3] in ("le", "lt") for op in t[1::2]]
    const = [len(x) > 0 and not re.search(r"(?<![\\A-Za-z])[A-Za-z]", x) for x in t[0::2]]
    if len(t) == 3 and re.fullmatch(_VAR, t[0]) and const[1]:  # x < b, x > b
        lo, lo_op, hi, hi_op = ("-\\infty", "<", t[2], t[1]) if less[0] else (t[2], t[1], "\\infty", "<")
    elif len(t) == 3 and re.fullmatch(_VAR, t[2]) and const[0]:  # a < x, a > x
        lo, lo_op, hi, hi_op = (t[0], t[1], "\\infty", "<") if less[0] else ("-\\infty", "<", t[0], t[1])
    elif (len(t) == 5 and re.fullmatch(_VAR, t[2]) and const[0] and const[2]
          and less[0] == less[1]):  # a < x < b
        lo, lo_op, hi, hi_op = (t[0], t[1], t[4], t[3]) if less[0] else (t[4], t[3], t[0], t[1])
    else:
        return None
    closed = lambda op: op not in ("<", ">", "\\lt", "\\gt")  # noqa: E731
    return f"{'[' if closed(lo_op) else '('}{lo},{hi}{']' if closed(hi_op) else ')'}"


def _option(p):
    """ "(B)12", "B.12", "B)twelve" -> "B": a multiple-choice letter followed by the option's text (one letter
    only: "(B),(C)" hedges)."""
    m = re.match(r"\(([A-Z])\)|([A-Z])[).:]", p)
    return (m.group(1) or m.group(2)) if m and not re.search(r"\([A-Z]\)", p[m.end():]) else p


class _Timeout(BaseException):
    """A BaseException, so math-verify's and sympy's `except Exception` can't swallow it."""


MV_TIMEOUT_S = 5.0


def _mv_check(g, p):
    import math_verify
    import sympy
    try:
        G, P = (math_verify.parse(f"${g}$", parsing_timeout=None),
                math_verify.parse(f"${p}$", parsing_timeout=None))
        if not G or not P or not math_verify.verify(G, P, timeout_seconds=None):
            return False
        a, b = G[0], P[0]
        # math-verify rounds numbers to 6 decimals, so it finds 1/2^98 == 1/2^99:
        # re-check them at relative 1e-6
        if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number:
            return bool(abs((a - b).evalf(30)) <= 1e-6 * max(abs(a.evalf(30)), abs(b.evalf(30))))
        return True
    except Exception:
        return False


def _math_verify(g, p):
    """math-verify's symbolic check under a hard time limit of our own. math-verify's own timeouts use
    SIGALRM, which works only in the main thread, so we switch them off and bound the whole check ourselves:
    with a timer signal in the main thread, else by abandoning a daemon thread.
    Errors and timeouts -> False."""
    import math_verify.grader
    import math_verify.parser
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True  # we time it
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise _Timeout()
        old = signal.signal(signal.SIGALRM, on_alarm)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, MV_TIMEOUT_S)
                return _mv_check(g, p)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:  # a late alarm can fire inside the inner finally: caught here too
            return False
        finally:
            signal.signal(signal.SIGALRM, old)
    result = []  # another thread: run it in a daemon thread, and abandon that thread if it runs too long
    t = threading.Thread(target=lambda: result.append(_mv_check(g, p)), daemon=True)
    t.start()
    t.join(MV_TIMEOUT_S)
    return bool(result and result[0])


def is_equiv(pred, gold):
    """Is the predicted answer string equivalent to the gold one? The rules run from cheap and strict to
    symbolic: normalised strings (an inequality read as its interval), integers, numbers (repeating decimals
    included), lists/intervals/sets, then math-verify."""
    p, g = _normalize(pred), _normalize(gold)
    p, g = _interval(p) or p, _interval(g) or g  # "y \ge 2" answers "[2,\infty)"
    p = _option(p) if re.fullmatch(r"[A-Z]", g) else p  # "(B) 12" answers "B" and "(B)"
    # "x=3" answers "3", and "5" answers the gold "x=5" (MATH "find all x") or "k=1" (Olympiad "smallest k"):
    # drop a leading "name=" from one side when the other side is not an equation
    lhs = r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?=(?=[^=]+$)"
    p = p if "=" in g else re.sub(lhs, "", p)
    g = g if "=" in p else re.sub(lhs, "", g)
    p = p if _to_number(g) is None else _strip_units(p)  # "5 cm" answers "5"
    g = g if _to_number(p) is None else _strip_units(g)  # "5.4 \text{ cents}" is answered by "5.4"
    if not p or not g:
        return False
    if p == g or (re.fullmatch(r"[A-Za-z ]{2,}", g) and p.lower() == g.lower()):
        return True
    gn, pn = _to_number(g), _to_number(p)
    # integer golds (AIME, AMC, DAPO): the prediction must be exactly that integer, decided here
    if re.fullmatch(r"[+-]?\d+", g) and pn is not None and "%" not in str(gold):
        return pn == gn
    # plain numbers: equal within relative 1e-6 (0.5 == 1/2); "62.5%" also equals 0.625
    if gn is not None and pn is not None:
        gs = [gn] + ([gn / 100] if "%" in str(gold) else [])
        ps = [pn] + ([pn / 100] if "%" in str(pred) else [])
        return any(abs(x - y) <= abs(y) * Fraction(1, 10**6) for x in ps for y in gs)  # 0.333 != 1/3
    lists = _compare_lists(p, g)
    if lists is not None:
        return lists
    # a word answer ("Evelyn", "east") needs the same word: sympy would read it as a product of letters
    if re.fullmatch(r"[A-Za-z ]{2,}", g):
        return False
    # sympy and math-verify's regexes can hang in C code, where no timer reaches: don't feed them essays
    return len(p) <= max(500, 2 * len(g)) and _math_verify(g, p)


def grade(completion, gold, truncated=False, strict=False, style=None):
    """-> (the completion's final answer (extract_answer; lenient unless strict) or None, is it equivalent to
    gold?). Callers that report both (eval's no-answer rate, grpo's no_answer) extract each answer once."""
    pred = extract_answer(completion, truncated, strict, style)
    return pred, pred is not None and is_equiv(pred, gold)


def is_correct(completion, gold, truncated=False, strict=False, style=None):
    """Is the completion's final answer (extract_answer; lenient unless strict) equivalent to gold?"""
    return grade(completion, gold, truncated, strict, style)[1]


def reward(completion, gold, truncated=False, strict=True, style=None):
    """The GRPO outcome reward r(y) (README choice 14): 1.0 for a correct final answer, else 0.0.

    Strict by default, unlike is_correct (evaluation): only the marker the prompt asked for counts (style
    "boxed", "dapo", or None for either), whichever comes last. The policy is then rewarded for the format it
    was asked to write, so the no-answer rate stays a format signal, and it can't learn to lean on the lenient
    fallbacks ("the answer is ...", a bare completion), which are heuristics with their own blind spots.
    strict=False grades as evaluation does."""
    return 1.0 if is_correct(completion, gold, truncated, strict, style) else 0.0
