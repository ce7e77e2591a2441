"""Tests for data.py: answer extraction and comparison (the GRPO reward), loaders, prompts.

Run: python -m pytest tests/test_data.py -q
The table tests need nothing outside the repo (gold strings are copied from ../shared/data literally).
Tests that read the offline benchmark copies skip when the shared folder is absent (override: $PTE_SHARED).
Nothing here touches the network: hub code paths are exercised with monkeypatched download functions.
"""
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that plain `pytest` finds data.py too
import data  # noqa: E402
from data import (BENCHMARKS, DataError, build_user_message, extract_answer, grade, is_correct,  # noqa: E402
                  is_equiv, load_benchmark, load_train, read_jsonl, reward)

SHARED = Path(os.environ.get("PTE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline benchmark copies not found at {DATA} "
                                  "(set PTE_SHARED to the shared folder)")


def box(ans):  # a typical completion: some reasoning, then the boxed answer
    return ("First, set up the equation.\nWe get 2x + 3 = 11, so x = 4.\nChecking: 2(4) + 3 = 11.\n\n"
            f"Thus the answer is $\\boxed{{{ans}}}$.")


# (completion, gold, expected). Golds are literal strings from ../shared/data/*.jsonl unless marked.
CASES = [
    # --- extraction: where the answer is taken from -------------------------------------------------------
    ("Let me compute.\n3 + 4 = 7\nTherefore the answer is \\boxed{7}.", "7", True),
    ("<think>\nMaybe 5? Let me write \\boxed{5}... no, recheck.\n</think>\nThe answer is \\boxed{6}.",
     "6", True),
    ("<think>\nMaybe 5? Let me write \\boxed{5}... no, recheck.\n</think>\nThe answer is \\boxed{6}.",
     "5", False),
    ("<think>I get \\boxed{6}</think>\nSo the result is 6", "6", False),  # only what follows </think> counts
    ("<think>\nx = 12 works.\n</think>\n\nAnswer: 12", "12", True),
    ("Step 1: ...\nStep 2: so a+b+c = 34.\nAnswer: 34", "34", True),  # the DAPO format
    ("We find a+b+c = 34.\n\nAnswer: $34$", "34", True),
    ("We find a+b+c = 34.\n\nAnswer: 34.", "34", True),
    ("We find 34.\n\n**Answer:** 34", "34", True),
    ("We find 34.\n\nFinal Answer: 34", "34", True),
    ("Answer: 34\nWait, that is wrong.\nAnswer: 35", "34", False),  # the last Answer line counts
    ("Answer: 34\nWait, that is wrong.\nAnswer: 35", "35", True),
    ("The answer is 34.", "34", True),  # no box and no Answer line: the phrase (but never the last number)
    ("So there are 42 apples in total, i.e. 42.", "42", False),
    ("2 + 2 = 4, and 4 * 3 = 12. Hence 12", "12", False),
    ("Answer:", "0", False),
    ("Hence the answer is \\boxed{}.", "0", False),  # empty box
    ("Hence the answer is \\boxed{  }.", "0", False),
    ("Hence the answer is \\boxed{12", "12", False),  # unterminated box
    ("Hence the answer is \\boxed{\\frac{1}{2}", "\\frac{1}{2}", False),
    ("So $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),  # nested braces
    ("So $\\boxed{\\frac{\\sqrt{3}}{3}}$.", "\\frac{\\sqrt{3}}{3}", True),
    ("\\fbox{8}", "8", True),
    ("The answer is $\\boxed 5$.", "5", True),  # TeX single-token argument
    ("The answer is \\boxed 5", "5", True),
    ("First \\boxed{3}, but that double counts, so \\boxed{4}.", "4", True),  # the last box counts
    ("First \\boxed{3}, but that double counts, so \\boxed{4}.", "3", False),
    ("\\boxed{4}\n\nAnswer: 5", "4", False),  # the last marker counts, a box or an Answer line alike
    ("\\boxed{4}\n\nAnswer: 5", "5", True),
    ("The set is $\\boxed{\\{1,2\\}}$.", "\\{1,2\\}", True),  # escaped braces don't close the box
    ("", "1", False),
    # --- integers: AIME (leading zeros), AMC, DAPO -------------------------------------------------------
    (box("025"), "25", True),
    (box("25"), "25", True),
    (box("073"), "73", True),
    (box("73.0"), "73", True),
    (box("204"), "204", True),
    (box("205"), "204", False),
    (box("204.5"), "204", False),
    (box("113"), "113", True),
    (box("588"), "588", True),
    (box("70"), "70", True),
    (box("7"), "70", False),
    (box("27"), "27", True),
    (box("27.0"), "27", True),
    (box("-1"), "-1", True),
    (box("-1.0"), "-1", True),
    (box("\u22121"), "-1", True),  # unicode minus
    (box("1"), "-1", False),
    (box("3159"), "3159", True),
    (box("3,159"), "3159", True),
    (box("1{,}625"), "1625", True),
    (box("x = 34"), "34", True),
    (box("n=45"), "45", True),
    (box("25.0000001"), "25", False),  # integer golds are exact, no tolerance
    (box("\\frac{50}{2}"), "25", True),
    (box("2^{10}"), "1024", True),  # an integer power is still an exact number
    (box("25, 30"), "25", False),  # hedging with several answers is wrong
    (box("25 \\text{ or } 30"), "25", False),
    (box("10201"), "10201", True),
    (box("40320"), "40320", True),
    (box("0"), "0", True),
    (box("0.0"), "0", True),
    (box("\\$18"), "18", True),
    (box("18 dollars"), "18", True),
    (box("18"), "18", True),
    (box("18\\%"), "18", True),
    (box("10 \\text{ inches}"), "10", True),
    (box("5\\text{ cm}"), "5", True),
    (box("5 \\mathrm{~cm}"), "5", True),
    # --- GSM8K: $ and thousands separators ---------------------------------------------------------------
    (box("2125"), "2,125", True),
    (box("2,125"), "2,125", True),
    (box("\\$1,450,000"), "1,450,000", True),
    (box("1450000"), "1,450,000", True),
    (box("145000"), "1,450,000", False),
    (box("114,200"), "114,200", True),
    (box("\\$70,000"), "70000", True),
    (box("1,000"), "1000", True),
    (box("1{,}000"), "1000", True),
    (box("10,080"), "10,\\!080", True),
    (box("10080"), "10,\\!080", True),
    (box("11111111100"), "11,\\! 111,\\! 111,\\! 100", True),
    (box("32,348"), "\\$32,\\!348", True),
    (box("58500"), "58,500", True),
    # --- plain numbers: decimals, fractions, percentages (relative 1e-6) ---------------------------------
    (box("0.5"), "\\frac{1}{2}", True),
    (box("1/2"), "\\frac{1}{2}", True),
    (box("\\frac12"), "\\frac{1}{2}", True),
    (box("\\dfrac{1}{2}"), "\\frac{1}{2}", True),
    (box("0.333"), "\\frac{1}{3}", False),
    (box("0.3333333333"), "\\frac{1}{3}", True),
    (box("1/3"), "1/3", True),
    (box("\\frac{4}{3}"), "\\frac43", True),
    (box("\\frac{5}{9}"), "\\frac 59", True),
    (box("\\frac{9}{19}"), "\\frac9{19}", True),
    (box("\\frac{14}{3}"), "\\frac{14}{3}", True),
    (box("\\frac{13}{3}"), "\\frac{14}{3}", False),
    (box("-\\frac{35}{9}"), "-\\frac{35}{9}", True),
    (box("\\frac{-35}{9}"), "-\\frac{35}{9}", True),
    (box("\\frac{35}{9}"), "-\\frac{35}{9}", False),
    (box("0.34"), "\\dfrac{17}{50}", True),
    (box("\\frac{33}{100}"), "\\dfrac{33}{100}", True),
    (box("1.25"), "1.25", True),
    (box("\\frac{5}{4}"), "1.25", True),
    (box("1.250"), "1.25", True),
    (box("0.0000672"), ".0000672", True),
    (box("6.72 \\times 10^{-5}"), ".0000672", True),
    (box("0.35625"), ".35625", True),
    (box("\\frac{9}{5}"), "1\\frac{4}{5}", True),  # MATH writes mixed numbers
    (box("1.8"), "1\\frac{4}{5}", True),
    (box("137.5"), "137 \\frac{1}{2}", True),
    (box("\\frac{275}{2}"), "137 \\frac{1}{2}", True),
    (box("18.90"), "\\$18.90", True),
    (box("18.9"), "\\$18.90", True),
    (box("\\$36"), "\\$36", True),
    (box("36"), "\\$36", True),
    (box("0.625"), "62.5%", True),
    (box("62.5\\%"), "62.5%", True),
    (box("62.5"), "62.5%", True),
    (box("0.65"), "62.5%", False),
    (box("8\\%"), "8 \\%", True),
    (box("0.08"), "8 \\%", True),
    (box("15\\%"), "0.15", True),
    (box("0.15"), "0.15", True),
    (box("-\\frac{1}{3}"), "-1./3", True),
    (box("-0.5"), "-1./3", False),
    (box("\\frac{-1}{1997}"), "\\frac{-1}{1997}", True),
    (box("-\\frac{1}{1997}"), "\\frac{-1}{1997}", True),
    # --- units, degrees, text ----------------------------------------------------------------------------
    (box("90"), "90^\\circ", True),
    (box("90^{\\circ}"), "90^\\circ", True),
    (box("90°"), "90^\\circ", True),
    (box("90 \\text{ degrees}"), "90^\\circ", True),
    (box("\\frac{\\pi}{2}"), "90^\\circ", False),  # degrees are not converted to radians
    (box("145"), "145^\\circ", True),
    (box("45"), "45^{\\circ}", True),
    (box("18.8"), "18.8^{\\circ}", True),
    (box("\\frac{270}{7}"), "\\frac{270}7\\text{ degrees}", True),
    (box("\\frac{270}{7}^\\circ"), "\\frac{270}7\\text{ degrees}", True),
    (box("5.4"), "5.4 \\text{ cents}", True),
    (box("5.4 \\text{ cents}"), "5.4 \\text{ cents}", True),
    (box("864"), "864 \\mbox{ inches}^2", True),
    (box("864 \\text{ inches}^2"), "864 \\mbox{ inches}^2", True),
    (box("15"), "15\\mbox{ cm}^2", True),
    (box("16"), "15\\mbox{ cm}^2", False),
    (box("\\text{Evelyn}"), "\\text{Evelyn}", True),
    (box("Evelyn"), "\\text{Evelyn}", True),
    (box("Evelny"), "\\text{Evelyn}", False),  # sympy would call both a product of the same letters
    (box("\\text{Navin}"), "\\text{Evelyn}", False),
    (box("East"), "\\text{east}", True),
    (box("\\text{west}"), "\\text{east}", False),
    (box("\\text{ellipse}"), "\\text{ellipse}", True),
    (box("\\text{(C)}"), "\\text{(C)}", True),
    (box("C"), "\\text{(C)}", True),
    (box("(C)"), "\\text{(C)}", True),
    (box("\\textbf{(C)}"), "\\text{(C)}", True),
    (box("(B)"), "\\text{(C)}", False),
    (box("2k"), "2k", True),
    (box("2"), "2k", False),  # a one-letter "unit" is a variable
    # --- x = 3 style --------------------------------------------------------------------------------------
    (box("x = 3"), "3", True),
    (box("3"), "x=5", False),
    (box("5"), "x=5", True),  # MATH: "find all values of x"
    (box("x=5"), "x=5", True),
    (box("1"), "k=1", True),  # OlympiadBench: "the smallest k"
    (box("k = 1"), "k=1", True),
    (box("n = k+4"), "n=k+4", True),
    (box("k + 4"), "n=k+4", True),
    (box("y = 2x + 3"), "y = 2x + 3", True),
    (box("y=3+2x"), "y = 2x + 3", True),
    (box("y = 2x - 3"), "y = 2x + 3", False),
    (box("f(x) = 2x"), "f(x)=2 x", True),
    # --- tuples, intervals, sets, lists ------------------------------------------------------------------
    (box("\\left( 3, \\frac{\\pi}{2} \\right)"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    (box("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    (box("(3, \\pi/2)"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    (box("(\\frac{\\pi}{2}, 3)"), "\\left( 3, \\frac{\\pi}{2} \\right)", False),  # a tuple is ordered
    (box("(3, 90^\\circ)"), "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    (box("(6,31,-1)"), "(6,31,-1)", True),
    (box("(6, 31, -1)"), "(6,31,-1)", True),
    (box("6, 31, -1"), "(6,31,-1)", True),  # a tuple may be written without parentheses
    (box("(6,31,1)"), "(6,31,-1)", False),
    (box("(15,-29)"), "(15,-29)", True),
    (box("(1.5, -13)"), "\\left( \\frac{3}{2}, -13 \\right)", True),
    (box("(3,4]"), "(3,4]", True),
    (box("(3,4)"), "(3,4]", False),  # the bracket type of an interval matters
    (box("[3,4]"), "(3,4]", False),
    (box("\\left(\\frac{3}{5},\\frac{8}{3}\\right]"), "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", True),
    (box("(0.6, \\frac{8}{3}]"), "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", True),
    (box("(0.6, \\frac{8}{3})"), "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", False),
    (box("(-\\infty,0]"), "(-\\infty, 0]", True),
    (box("(-\\infty,0)"), "(-\\infty, 0]", False),
    (box("(2, \\infty)"), "(2,\\infty)", True),
    (box("[2, \\infty)"), "(2,\\infty)", False),
    (box("[-2,7]"), "x \\in [-2,7]", True),
    (box("x \\in [-2, 7]"), "x \\in [-2,7]", True),
    (box("(-2,7)"), "x \\in [-2,7]", False),
    (box("(0,9)\\cup(9,36)"), "(0,9) \\cup (9,36)", True),
    (box("(0,36)"), "(0,9) \\cup (9,36)", False),
    (box("(-\\infty,2)\\cup(3,\\infty)"), "(-\\infty, 2) \\cup (3, \\infty)", True),
    (box("[\\frac{1}{2}, 8]"), "[\\frac{1}{2}, 8]", True),
    (box("[0.5, 8]"), "[\\frac{1}{2}, 8]", True),
    (box("(\\frac{1}{2}, 8)"), "[\\frac{1}{2}, 8]", False),
    (box("(-\\infty, -5)"), "(-\\infty,-5)", True),
    (box("1, -2"), "1,-2", True),
    (box("-2, 1"), "1,-2", True),  # a bare list of roots is unordered
    (box("\\{1,-2\\}"), "1,-2", True),
    (box("x=1 \\text{ or } x=-2"), "1,-2", True),
    (box("-2 \\text{ and } 1"), "1,-2", True),
    (box("1"), "1,-2", False),
    (box("1, -2, 3"), "1,-2", False),
    (box("7, 5, 3"), "3, 5, 7", True),
    (box("3, 5"), "3, 5, 7", False),
    (box("84, 69"), "69$,$84", True),  # OlympiadBench multiple answers, with inner $
    (box("69,84"), "69$,$84", True),
    (box("69"), "69$,$84", False),
    (box("-1, 2, -2"), "-1$,$2$,$-2", True),
    (box("f(n)=n, g(n)=1"), "f(n)=n$, $g(n)=1", True),
    (box("90^\\circ, 60^\\circ"), "90^{\\circ}$,$60^{\\circ}", True),
    (box("(1,8,19), (2,7,13), (4,5,7)"), "(1,8,19), (2,7,13), (4,5,7)", True),
    (box("(4,5,7),(1,8,19),(2,7,13)"), "(1,8,19), (2,7,13), (4,5,7)", True),
    (box("(1,8,19),(2,7,13)"), "(1,8,19), (2,7,13), (4,5,7)", False),
    (box("(8,1,19),(2,7,13),(4,5,7)"), "(1,8,19), (2,7,13), (4,5,7)", False),
    (box("(6,3),(9,3),(9,5),(54,5)"), "(6,3),(9,3),(9,5),(54,5)", True),
    (box("10^{100}, 10^{1/100}"), "10^{100}$,$10^{1 / 100}", True),
    (box("1+\\sqrt{19}, 1-\\sqrt{19}"), "1 \\pm \\sqrt{19}", True),
    (box("1 \\pm \\sqrt{19}"), "1 \\pm \\sqrt{19}", True),
    (box("1+\\sqrt{19}"), "1 \\pm \\sqrt{19}", False),
    (box("\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}"), "\\{1\\pm\\sqrt{5},-2\\}", True),
    (box("\\{1,2\\}"), "\\{2,1\\}", True),  # (not a data gold) sets are unordered
    # --- symbolic (math-verify), with the traps ----------------------------------------------------------
    (box("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}", True),
    (box("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", True),
    (box("\\frac{1}{\\sqrt{3}}"), "\\frac{\\sqrt{3}}{3}", True),
    (box("1/2^99"), "1/2^98", False),  # math-verify alone rounds both to 0
    (box("\\frac{1}{2^{99}}"), "\\frac{1}{2^{98}}", False),
    (box("\\frac{1}{2^{98}}"), "1/2^98", True),
    (box("2^{-98}"), "\\frac{1}{2^{98}}", True),
    (box("2^{1009}"), "2^{1009}", True),
    (box("2^{1008}"), "2^{1009}", False),
    (box("3\\sqrt{13}"), "3\\sqrt{13}", True),
    (box("\\sqrt{117}"), "3\\sqrt{13}", True),
    (box("3\\sqrt{12}"), "3\\sqrt{13}", False),
    (box("11\\sqrt{2}"), "11\\sqrt2", True),
    (box("\\sqrt{242}"), "11\\sqrt2", True),
    (box("\\frac{3\\sqrt3}{4}"), "\\frac{3\\sqrt{3}}{4}", True),
    (box("\\pi"), "\\pi", True),
    (box("3.14"), "\\pi", False),
    (box("288\\pi"), "288 \\pi", True),
    (box("2\\pi + 18"), "18+2\\pi", True),
    (box("18+2\\pi"), "18+\\pi", False),
    (box("-q + p"), "p - q", True),
    (box("q - p"), "p - q", False),
    (box("6-5i"), "6 - 5i", True),
    (box("6+5i"), "6 - 5i", False),
    (box("\\cot x"), "\\cot x", True),
    (box("\\frac{\\cos x}{\\sin x}"), "\\cot x", True),
    (box("\\tan x"), "\\cot x", False),
    (box("x^5-x^4+x^3-x^2+x-1"), "x^5 - x^4 + x^3 - x^2 + x - 1", True),
    (box("-1+x-x^2+x^3-x^4+x^5"), "x^5 - x^4 + x^3 - x^2 + x - 1", True),
    (box("x^5-x^4+x^3-x^2+x+1"), "x^5 - x^4 + x^3 - x^2 + x - 1", False),
    (box("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),
    (box("\\begin{pmatrix}-\\frac13\\\\\\frac23\\\\\\frac53\\end{pmatrix}"),
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),
    (box("\\begin{pmatrix}-\\frac13\\\\\\frac23\\\\\\frac43\\end{pmatrix}"),
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", False),
    (box("\\binom{2n}{n}"), "\\binom{2n}{n}", True),
    (box("\\frac{1}{2n+2}"), "\\frac{1}{2 n+2}", True),
    (box("\\frac{1}{2(n+1)}"), "\\frac{1}{2 n+2}", True),
    (box("\\frac{1}{2n+1}"), "\\frac{1}{2 n+2}", False),
    (box("n^2 - n"), "n(n-1)", True),
    (box("\\frac{\\ln 2}{\\ln 2 - \\ln 3}"), "\\frac{\\log 2}{\\log 2-\\log 3}", True),
    (box("\\frac{2}{3}\\frac{C}{S}"), "\\frac{2}{3} \\frac{C}{S}", True),
    (box("\\frac{2C}{3S}"), "\\frac{2}{3} \\frac{C}{S}", True),
    (box("e^t/3"), "e^{t} / 3", True),
    (box("1+i\\sqrt{3}"), "1+\\sqrt{3} i", True),
    # --- Minerva: scientific notation, rounded golds with units ------------------------------------------
    (box("1.6"), "1.6", True),
    (box("1.6 \\text{ cm}"), "1.6", True),
    (box("1.60"), "1.6", True),
    (box("1.59"), "1.6", False),  # strict: the stated precision is not used as a tolerance
    (box("4.5 \\times 10^{33}"), "4.5e33", True),
    (box("4.5\\times10^{33} \\text{ erg}"), "4.5e33", True),
    (box("4.5e33"), "4.5e33", True),
    (box("4.6 \\times 10^{33}"), "4.5e33", False),
    (box("3.83 \\times 10^{35}"), "3.83e35", True),
    (box("10^{-5}"), "1e-5", True),
    (box("1 \\times 10^{-5}"), "1e-5", True),
    (box("2.7778 \\cdot 10^{-6}"), "2.7778e-6", True),
    (box("6.5 \\times 10^{-2}"), "6.5e-2", True),
    (box("0.065"), "6.5e-2", True),
    (box("0.1"), "0.10", True),
    (box("56"), "56.0", True),
    (box("0.006"), "0.006", True),
    (box("0.006 \\mathrm{~cm}"), "0.006", True),
    (box("\\frac{1}{s+a}"), "\\frac{1}{s+a}", True),
    (box("(s+a)^{-1}"), "\\frac{1}{s+a}", True),
    # --- the last final-answer marker counts, whatever the prompt style asked for ------------------------
    # (from here on, golds the data has no example of are made up and named in their section's header;
    # here: \text{The answer is 5})
    ("We get \\boxed{5}.\nOn reflection that misses two cases.\nAnswer: 7", "7", True),
    ("We get \\boxed{5}.\nOn reflection that misses two cases.\nAnswer: 7", "5", False),
    ("Answer: 7\n\nNo: recounting, the total is $\\boxed{5}$.", "5", True),
    ("Answer: 7\n\nNo: recounting, the total is $\\boxed{5}$.", "7", False),
    ("The answer is 3.\nWait, I missed one: \\boxed{4}", "4", True),
    ("So \\boxed{4}.\n\nHmm, 4 double counts. So the answer is 3.", "3", True),
    ("So \\boxed{4}.\n\nHmm, 4 double counts. So the answer is 3.", "4", False),
    ("\\boxed{4}\n\nFinal Answer: The final answer is $6$. I hope it is correct.", "6", True),
    ("\\boxed{4}. So the answer is correct.", "4", True),  # a verdict on the answer is no answer
    ("\\boxed{4}. Therefore the answer is indeed right, as checked.", "4", True),
    ("\\boxed{18}\n\n#### Verification\nIt checks out.", "18", True),  # a markdown heading is no GSM8K marker
    ("\\boxed{\\text{The answer is 5}}", "\\text{The answer is 5}", True),  # a marker inside a box: the box
    # --- Minerva's format: "Final Answer: The final answer is $X$. I hope it is correct." ----------------
    ("So $v = 1.6$ cm.\nFinal Answer: The final answer is $1.6$. I hope it is correct.", "1.6", True),
    ("Final Answer: The final answer is $1.59$. I hope it is correct.", "1.6", False),
    ("Final Answer: The final answer is $4.5 \\times 10^{33}$. I hope it is correct.", "4.5e33", True),
    ("Final Answer: The final answer is $4.6 \\times 10^{33}$. I hope it is correct.", "4.5e33", False),
    ("Final Answer: The final answer is $\\frac{1}{s+a}$. I hope it is correct.", "\\frac{1}{s+a}", True),
    ("Final Answer: The final answer is 0.1. I hope it is correct.", "0.10", True),
    ("Final Answer: The final answer is 0.2. I hope it is correct.", "0.10", False),
    ("Final Answer: The final answer is $(3,4]$. I hope it is correct.", "(3,4]", True),
    ("Final Answer: The final answer is $(3,4)$. I hope it is correct.", "(3,4]", False),
    ("The final answer is $56$.", "56.0", True),
    # --- GSM8K's "#### X" --------------------------------------------------------------------------------
    ("She sells 16 - 3 - 4 = 9 eggs at $2 each, so 9 * 2 = 18 dollars.\n#### 18", "18", True),
    ("She sells 16 - 3 - 4 = 9 eggs at $2 each, so 9 * 2 = 18 dollars.\n#### 17", "18", False),
    ("The house is worth 1,450,000 dollars.\n#### 1,450,000", "1,450,000", True),
    ("#### $70,000", "70000", True),
    ("#### \\$70,000", "70000", True),
    ("#### 7,000", "70000", False),
    ("So he pays 2 * 1062.5 = 2125 dollars. #### 2125", "2,125", True),
    ("#### Step 1: count the eggs\nThere are 18 eggs.", "18", False),  # a heading, and then prose
    ("#### 1. Setup\nThere are 18 eggs.", "18", False),
    # --- "the answer is X" without a box (made up: 3.5) --------------------------------------------------
    ("6 * 7 = 42. The answer is 42.", "42", True),
    ("6 * 7 = 42. The answer is 43.", "42", False),
    ("So the answer is $42$.", "42", True),
    ("Therefore, the answer is **42**.", "42", True),
    ("Thus the final answer is: $\\frac{7}{2}$", "3.5", True),
    ("The answer is 3.5.", "\\frac{7}{2}", True),
    ("The answer is 42 or 43.", "42", False),  # hedging
    # not a statement of the answer
    ("I wonder whether the answer is 42; 6 * 7 = 42 after all.", "42", False),
    ("The answer is the number of ways to pick 2 of the 9 balls, 36.", "36", False),  # prose, not an answer
    # --- a completion that is only the answer (made up: 3.5) ---------------------------------------------
    ("7/2", "\\frac{7}{2}", True),
    ("$\\frac{7}{2}$", "3.5", True),
    ("  42\n", "42", True),
    ("<think>\n6 * 7 is 42\n</think>\n\n42.", "42", True),
    ("$x = 3$", "3", True),
    ("\\[ (3, \\pi/2) \\]", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("7/3", "\\frac{7}{2}", False),
    ("12 + 30 = 42", "42", False),  # a worked equation is not an answer
    ("The sum is 42", "42", False),
    ("Adding them up we get 7/2", "\\frac{7}{2}", False),
    # --- repeating decimals (made up: \frac{1}{7}, 0.6) --------------------------------------------------
    (box("0.\\overline{6}"), "\\frac{2}{3}", True),
    (box("0.(6)"), "\\frac{2}{3}", True),
    (box("0.\\bar{6}"), "\\frac{2}{3}", True),
    (box("0.1\\overline{6}"), "\\frac{1}{6}", True),
    (box("0.\\overline{142857}"), "\\frac{1}{7}", True),
    (box("1.\\overline{3}"), "\\frac43", True),
    (box("-0.\\overline{3}"), "-1./3", True),
    (box("0.\\overline{3}"), "\\frac{2}{3}", False),
    (box("0.\\overline{6}"), "0.6", False),
    (box("0.(16)"), "\\frac{1}{6}", False),  # 0.161616... = 16/99
    # --- an inequality for an interval (made up: [2,\infty), [2, \infty), (-\infty, 3)) ------------------
    (box("y \\ge 2"), "[2,\\infty)", True),
    (box("y \\geq 2"), "[2, \\infty)", True),
    (box("2 \\le y"), "[2,\\infty)", True),
    (box("y > 2"), "[2,\\infty)", False),
    (box("x < 3"), "(-\\infty, 3)", True),
    (box("x \\le 3"), "(-\\infty, 3)", False),
    (box("x > 3"), "(-\\infty, 3)", False),
    (box("x > 2"), "(2,\\infty)", True),
    (box("x \\ge 2"), "(2,\\infty)", False),
    (box("x < -5"), "(-\\infty,-5)", True),
    (box("-2 \\le x \\le 7"), "x \\in [-2,7]", True),
    (box("-2 < x \\le 7"), "x \\in [-2,7]", False),
    (box("\\frac{3}{5} < x \\le \\frac{8}{3}"), "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", True),
    (box("x < 2 \\text{ or } x > 3"), "(-\\infty, 2) \\cup (3, \\infty)", True),
    (box("x < 2 \\text{ or } x \\ge 3"), "(-\\infty, 2) \\cup (3, \\infty)", False),
    (box("k \\ge 2"), "k \\geqslant 2", True),
    (box("[2, \\infty)"), "k \\geqslant 2", True),
    (box("2"), "k \\geqslant 2", False),
    (box("k > 2"), "k \\geqslant 2", False),
    # --- thousands separators inside a fraction (all made up) --------------------------------------------
    (box("\\frac{10,000}{7}"), "\\frac{10000}{7}", True),
    (box("\\frac{10{,}000}{7}"), "\\frac{10000}{7}", True),
    (box("10,000/7"), "\\frac{10000}{7}", True),
    (box("\\frac{1,000}{7}"), "\\frac{10000}{7}", False),
    (box("\\frac{10,000}{9}"), "\\frac{10000}{7}", False),
    (box("\\frac{1,450,000}{3}"), "\\frac{1450000}{3}", True),
    # --- a bolded answer (made up: \text{Paris}) ---------------------------------------------------------
    ("**Paris**", "\\text{Paris}", True),
    ("**London**", "\\text{Paris}", False),
    ("The capital of France is Paris.\n\n**Paris**", "\\text{Paris}", True),
    ("The answer is **Paris**.", "\\text{Paris}", True),
    ("**Answer:** **Paris**", "\\text{Paris}", True),
    ("Adding the two groups gives 12.\n\n**12**", "12", True),
    ("Adding the two groups gives 12.\n\n**13**", "12", False),
    ("**Step 1.** Count the groups.\nThere are 12.", "12", False),  # a bold heading is not the answer
    ("**Paris** is the capital; the question asks for the river.", "\\text{Paris}", False),
    # --- an option letter followed by its text (made up: B, (B)) -----------------------------------------
    (box("(B) 12"), "B", True),
    (box("(B) 12"), "(B)", True),
    (box("(C) 12"), "\\text{(C)}", True),
    (box("\\textbf{(C)} 12"), "\\text{(C)}", True),
    (box("B. 12"), "B", True),
    ("The answer is (B) 12.", "B", True),
    ("Answer: (B) $12$", "(B)", True),
    (box("(C) 12"), "B", False),
    (box("(B) 12"), "\\text{(C)}", False),
    (box("(B) 12 or (C) 15"), "B", False),  # hedging between two options
    (box("12"), "B", False),  # the option's text alone: we don't know which letter it is
    # --- a number with a text unit against a currency gold (made up: \$45) -------------------------------
    (box("45 \\text{ dollars}"), "\\$45", True),
    (box("45 \\text{ dollars}"), "\\$36", False),
    (box("36 \\text{ dollars}"), "\\$36", True),
    (box("\\textdollar 36"), "\\$36", True),
    (box("18.90 \\text{ dollars}"), "\\$18.90", True),
    (box("18.80 \\text{ dollars}"), "\\$18.90", False),
    (box("32,348 \\text{ dollars}"), "\\$32,\\!348", True),
    (box("32,384 \\text{ dollars}"), "\\$32,\\!348", False),
    ("The answer is 36 dollars.", "\\$36", True),
    ("Answer: 36 dollars", "\\$36", True),
]

# (completion, gold): a completion cut at max tokens gets reward 0 even if it already shows the answer
TRUNCATED = [
    (box("204"), "204"),
    ("Answer: 34", "34"),
    ("<think>\n...</think>\n\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
]


def test_table_is_large_enough():
    assert len(CASES) + len(TRUNCATED) >= 150


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_reward_table(completion, gold, expected):
    assert is_correct(completion, gold) is expected
    assert reward(completion, gold, strict=False) == (1.0 if expected else 0.0)
    # a \boxed{} or "Answer:" answer
    if extract_answer(completion, strict=True) == extract_answer(completion):
        assert reward(completion, gold) == (1.0 if expected else 0.0)


# (completion, gold, prompt style, strict reward): the training reward only accepts the prompt style's marker
STRICT = [
    ("\\boxed{5}\nAnswer: 7", "7", None, 1.0),  # either style's marker, the last one
    ("\\boxed{5}\nAnswer: 7", "5", None, 0.0),
    ("\\boxed{5}\nAnswer: 7", "5", "boxed", 1.0),  # the Answer line is not the boxed style's marker
    ("\\boxed{5}\nAnswer: 7", "7", "boxed", 0.0),
    ("\\boxed{5}\nAnswer: 7", "7", "dapo", 1.0),
    ("\\boxed{5}\nAnswer: 7", "5", "dapo", 0.0),
    ("Answer: $\\boxed{34}$", "34", "dapo", 1.0),
    ("The answer is \\boxed{34}.", "34", "dapo", 0.0),
    ("Answer: 34", "34", "boxed", 0.0),
    ("Final Answer: The final answer is $12$. I hope it is correct.", "12", None, 0.0),
    ("#### 18", "18", None, 0.0),
    ("The answer is 42.", "42", None, 0.0),
    ("7/2", "\\frac{7}{2}", None, 0.0),
    ("**Paris**", "\\text{Paris}", None, 0.0),
    ("\\boxed{4}\n\nSo the answer is 3.", "4", None, 1.0),  # lenient: 3
]


@pytest.mark.parametrize("completion,gold,style,expected", STRICT)
def test_strict_reward(completion, gold, style, expected):
    assert reward(completion, gold, style=style) == expected
    assert is_correct(completion, gold, strict=True, style=style) is (expected == 1.0)


@pytest.mark.parametrize("strict", [False, True])
def test_grade_is_extract_answer_and_is_correct(strict):
    """grade extracts once what extract_answer extracts and judges as is_correct does, strict or lenient
    (eval and grpo take both from it)."""
    cases = [(c, g, s, False) for c, g, s, _ in STRICT] + [("\\boxed{4}", "4", "boxed", True)]
    for completion, gold, style, truncated in cases:
        got = grade(completion, gold, truncated, strict, style)
        assert got == (extract_answer(completion, truncated, strict, style),
                       is_correct(completion, gold, truncated, strict, style)), (completion, gold, style)
    assert grade("The answer is 42.", "42") == ("42", True)
    assert grade("The answer is 42.", "42", strict=True) == (None, False)
    assert grade("\\boxed{41}", "42", strict=True, style="boxed") == ("41", False)


def test_reward_is_strict_and_is_correct_lenient_by_default():
    assert is_correct("The answer is 42.", "42") and reward("The answer is 42.", "42", strict=False) == 1.0
    assert reward("The answer is 42.", "42") == 0.0
    assert reward("Final Answer: The final answer is $12$. I hope it is correct.", "12", truncated=True,
                  strict=False) == 0.0
    with pytest.raises(DataError, match="boxed, dapo"):
        extract_answer("\\boxed{1}", strict=True, style="chatml")


@pytest.mark.parametrize("completion,gold", TRUNCATED)
def test_truncated_gets_no_reward(completion, gold):
    assert is_correct(completion, gold)  # ...it would be right
    assert reward(completion, gold, truncated=True) == 0.0
    assert extract_answer(completion, truncated=True) is None

# -----------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize("completion,expected", [
    ("so \\boxed{42}.", "42"),
    ("so $\\boxed{ 42 }$.", "42"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\fbox{x+1}", "x+1"),
    ("\\boxed 7.", "7"),
    ("\\boxed{}", None),
    ("\\boxed{1} and finally \\boxed{", None),  # the last box is unterminated
    ("\\boxed", None),
    ("<think>\\boxed{1}</think>no answer here", None),
    ("<think>a</think>b</think>\\boxed{3}", "3"),
    ("Answer: 34", "34"),
    ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("  answer: 12.  ", "12"),
    ("The answer: 12", None),  # only a line that starts with Answer:
    ("\\boxed{5} ... Answer: 7", "5"),  # an Answer marker starts its line
    ("**The answer is:** 42", "42"),
    ("**The answer is** **42**.", "42"),
    ("**Therefore, the answer is 42.**", "42"),
    ("\\boxed{5}\nAnswer: 7", "7"),
    ("Answer:\n\\[ 34 \\]", "34"),  # the answer on the lines after a bare "Answer:"
    ("Answer: 3\nRechecking: \\boxed{4", None),  # the last marker, an unterminated box, holds no answer
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("Final Answer: The final answer is 12. I hope it is correct.", "12"),
    ("The final answer is $\\$45$.", "\\$45"),
    ("The final answer is $5x - 7y + 11z + 4 = 0$.", "5x - 7y + 11z + 4 = 0"),  # an equation, written as one
    ("So the answer is $69$, $84$.", "69$, $84"),  # several answers, each in its own $..$
    ("#### 1,450", "1,450"),
    ("We get 18 eggs.\n\n#### **18**", "18"),
    ("#### **1. Setup**\nWe get 18 eggs.", None),
    ("#### Step 2", None),
    ("So the answer is 3.5.", "3.5"),
    ("The answer is **Paris**, of course.", "Paris"),
    ("whether the answer is 3", None),
    ("7/2", "7/2"),
    ("**Paris**", "Paris"),
    ("$x = 3$.", "x = 3"),
    ("Hence 12", None),
    ("12 + 30 = 42", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_math_verify_runs_in_worker_threads():
    # math-verify's own timeouts use SIGALRM (main thread only); ours must work from a thread pool too
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda pg: is_equiv(*pg), [("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
                                                     ("\\sqrt{117}", "3\\sqrt{13}"), ("\\tan x", "\\cot x")]))
    assert got == [True, True, False]


@pytest.mark.parametrize("in_thread", [False, True])
def test_math_verify_time_limit(monkeypatch, in_thread):
    monkeypatch.setattr(data, "MV_TIMEOUT_S", 0.2)
    monkeypatch.setattr(data, "_mv_check", lambda g, p: time.sleep(3) or True)
    t = time.time()
    if in_thread:
        out = []
        th = threading.Thread(target=lambda: out.append(data._math_verify("x", "x")))
        th.start()
        th.join()
        assert out == [False]
    else:
        assert data._math_verify("x", "x") is False
    assert time.time() - t < 2

# -----------------------------------------------------------------------------
# prompts


def test_build_user_message():
    assert build_user_message("What is 1+1?") == (
        "What is 1+1?\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
    msg = build_user_message("What is 1+1?", style="dapo")
    assert msg.startswith("Solve the following math problem step by step. The last line of your response "
                          "should be of the form Answer: $Answer (without quotes) where $Answer is the "
                          "answer to the problem.\n\nWhat is 1+1?")
    assert msg.endswith('What is 1+1?\n\nRemember to put your answer on its own line after "Answer:".')
    with pytest.raises(DataError, match="boxed, dapo"):
        build_user_message("x", style="chatml")

# -----------------------------------------------------------------------------
# loaders on temporary files


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_read_jsonl_malformed_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n')
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert "bad.jsonl:3" in one_line(e)


def test_read_jsonl_skips_blank_lines_and_rejects_non_objects(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n\n   \n{"x": 2}\n')
    assert read_jsonl(f) == [{"x": 1}, {"x": 2}]
    f.write_text('{"x": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"a.jsonl:2"):
        read_jsonl(f)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_load_train_missing_field(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(DataError) as e:
        load_train(str(f))
    assert "'answer'" in one_line(e) and "train.jsonl:2" in one_line(e)
    f.write_text('{"answer": "2"}\n')
    with pytest.raises(DataError, match="'problem'"):
        load_train(str(f))


def test_load_train_empty_and_missing(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_train(str(f))
    with pytest.raises(DataError, match="not found"):
        load_train(str(tmp_path / "nope.jsonl"))


def test_load_train_local_ids_dedup_and_data_dir(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"problem": "A", "answer": 3}\n{"id": "q7", "problem": "B", "answer": "4"}\n'
                 '{"problem": "A", "answer": "3"}\n{"problem": "C", "answer": 27.0}\n')
    recs = load_train(str(f))
    assert recs == [{"id": "train-0", "problem": "A", "answer": "3"},
                    {"id": "q7", "problem": "B", "answer": "4"},
                    {"id": "train-2", "problem": "C", "answer": "27"}]
    assert load_train("t.jsonl", data_dir=tmp_path) == recs


def write_dapo_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "math_dapo",
         "prompt": [{"role": "user", "content": data.DAPO_PREFIX + p + data.DAPO_SUFFIX}],
         "ability": "MATH", "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
         "extra_info": {"index": f"uuid-{i}"}} for i, (p, a) in enumerate(rows)]), path)


def test_load_train_from_hub_schema(tmp_path, monkeypatch):
    # the DAPO parquet layout, served by a fake hf_hub_download: template stripped,
    # duplicates dropped in order
    import huggingface_hub
    path = tmp_path / "dapo.parquet"
    write_dapo_parquet(path, [("What is $1+1$?", "2"), ("Find $x$.", "5"), ("What is $1+1$?", "2"),
                              ("Last.", "-3")])
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append((a, k)) or str(path))
    recs = load_train("BytedTsinghua-SIA/DAPO-Math-17k")
    assert calls[0][0][:2] == ("BytedTsinghua-SIA/DAPO-Math-17k", "data/dapo-math-17k.parquet")
    assert calls[0][1]["repo_type"] == "dataset"
    assert recs == [{"id": "train-0", "problem": "What is $1+1$?", "answer": "2"},
                    {"id": "train-1", "problem": "Find $x$.", "answer": "5"},
                    {"id": "train-2", "problem": "Last.", "answer": "-3"}]


def test_hub_failures_are_one_line(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("Cannot reach https://huggingface.co: offline mode is enabled.\nUnset HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.delenv("PTE_DATA_DIR", raising=False)
    with pytest.raises(DataError) as e:
        load_train("BytedTsinghua-SIA/DAPO-Math-17k")
    assert (one_line(e).startswith("cannot download BytedTsinghua-SIA/DAPO-Math-17k")
            and "--train-data" in str(e.value))
    with pytest.raises(DataError) as e:
        load_benchmark("aime24")
    assert "HuggingFaceH4/aime_2024" in one_line(e) and "--data-dir" in str(e.value)


def test_load_benchmark_from_hub_parquet_branch(tmp_path, monkeypatch):
    # fake the hub's refs/convert/parquet snapshot for gsm8k and OlympiadBench and check the field mapping
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "main/test").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": "Q1", "answer": "so 2+2=<<2+2=4>>4\n#### 1,600"}]),
                   tmp_path / "main/test/0000.parquet")
    (tmp_path / "OE_TO_maths_en_COMP/train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"id": 1606, "question": "Q2", "final_answer": ["$69$, $84$"]}]),
                   tmp_path / "OE_TO_maths_en_COMP/train/0000.parquet")
    seen = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **k: seen.append((repo, k)) or str(tmp_path))
    monkeypatch.delenv("PTE_DATA_DIR", raising=False)
    assert load_benchmark("gsm8k") == [{"id": "gsm8k-0", "problem": "Q1", "answer": "1,600"}]
    assert seen[-1][0] == "openai/gsm8k" and seen[-1][1]["allow_patterns"] == ["main/test/*.parquet"]
    assert load_benchmark("olympiadbench") == [{"id": "1606", "problem": "Q2", "answer": "69$, $84"}]


def test_load_benchmark_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        load_benchmark("aime26", data_dir=tmp_path)
    msg = one_line(e)
    assert all(name in msg for name in BENCHMARKS)
    with pytest.raises(DataError, match="aime24.jsonl"):
        load_benchmark("aime24", data_dir=tmp_path)
    monkeypatch.setenv("PTE_DATA_DIR", str(tmp_path))  # the env var stands in for --data-dir
    (tmp_path / "aime24.jsonl").write_text('{"id": "a", "problem": "p", "answer": "025"}\n')
    assert load_benchmark("aime24") == [{"id": "a", "problem": "p", "answer": "025"}]

# -----------------------------------------------------------------------------
# the offline copies in ../shared/data


@needs_shared
@pytest.mark.parametrize("name,count", [("math500", 500), ("olympiadbench", 675), ("amc23", 40),
                                        ("aime24", 30), ("aime25", 30), ("minerva", 272), ("gsm8k", 1319)])
def test_benchmark_counts(name, count):
    recs = load_benchmark(name, data_dir=DATA)
    assert len(recs) == count
    assert all(r["problem"] and r["answer"] and r["id"] for r in recs)
    assert len({r["id"] for r in recs}) == count
    assert load_benchmark(name, data_dir=DATA, limit=5) == recs[:5]


@needs_shared
def test_train_sample():
    recs = load_train(str(DATA / "train_sample.jsonl"))
    assert len(recs) == 110
    raw = read_jsonl(DATA / "train_sample.jsonl")
    # our DAPO template is the original one, byte for byte
    assert all(build_user_message(r["problem"], "dapo") == r["dapo_prompt"] for r in raw)


@needs_shared
@pytest.mark.parametrize("name", ["aime24", "aime25", "amc23", "math500", "olympiadbench", "minerva",
                                  "gsm8k"])
def test_every_gold_matches_itself(name):
    # each gold, boxed in a completion, must earn reward 1 through the full pipeline
    fails = [r["answer"] for r in load_benchmark(name, data_dir=DATA)
             if not is_correct(f"Reasoning... so the answer is \\boxed{{{r['answer']}}}.", r["answer"])]
    assert fails == []


@needs_shared
@pytest.mark.parametrize("fmt", ["Final Answer: The final answer is ${}$. I hope it is correct.", "${}$"])
def test_minerva_golds_in_minerva_format_and_bare(fmt):
    # Minerva's answer format, and a bare $answer$, on Minerva's golds (long formulas and equations among
    # them); golds with a "$" inside ("x_{0} \\cos (\\omega t)+$ $\\dot{x}_{0}...")
    # can't be written inside $...$
    fails = [r["answer"] for r in load_benchmark("minerva", data_dir=DATA)
             if "$" not in r["answer"] and not is_correct(fmt.format(r["answer"]), r["answer"])]
    assert fails == []


@needs_shared
def test_raw_source_answers_match_cleaned_golds():
    # the sources' own spellings: AIME "025", AMC 27.0, OlympiadBench "$69$, $84$"
    pairs = [(str(r["answer_raw"]), r["answer"]) for n in ("aime24.jsonl", "amc23.jsonl")
             for r in read_jsonl(DATA / n)]
    pairs += [(r["final_answer"][0], r["answer"]) for r in read_jsonl(DATA / "olympiadbench.jsonl")]
    assert [(p, g) for p, g in pairs if not is_correct(f"\\boxed{{{p}}}", g)] == []
