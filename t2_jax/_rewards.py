"""Rewards for generated answers: exact numbers, and code run against its tests in the sandbox.

    numeric_reward("... so she has 18 dollars left.", "18")                      # 1.0
    code_reward("```python\\ndef add(a, b):\\n    return a + b\\n```", "assert add(1, 2) == 3")  # 1.0

numeric: the answer's last \\boxed{} if it has one (it must hold a number), else the last number
written (commas, a leading $ and a trailing .0 allowed; a/b and \\frac{a}{b} read as one number),
compared exactly with the gold number (GSM8K's "#### 18" form or a plain number). code: the first fenced block of the answer (or the whole answer when there is no
fence), after `prefix` (HumanEval's prompt) and before `tests` (MBPP's asserts, HumanEval's
check(entry_point)), run by t2_jax._sandbox.run_python; 1.0 when the program exits cleanly.
"""

from __future__ import annotations

import re
from fractions import Fraction

from t2_jax._sandbox import SandboxLimits, run_python

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
CODE_LIMITS = SandboxLimits(wall_s=10.0, cpu_s=10, memory_bytes=1 << 30)


def parse_number(text: str) -> Fraction | None:
    """A number as written ("1,234", "$5", "-2.50", "3/4"), exactly; None if it is not one."""
    text = text.strip().replace(",", "").replace("$", "")
    try:
        if "/" in text:
            numerator, denominator = (part.strip() for part in text.split("/", 1))
            return Fraction(Fraction(numerator), Fraction(denominator))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} of `text` (braces balanced), None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth < 0:
            return text[begin:index]
    return None


def extract_number(answer: str) -> Fraction | None:
    """The number in the last \\boxed{} of `answer` if it has one, else its last number written;
    LaTeX fractions \\frac{a}{b} (and \\dfrac, \\tfrac) read as a/b. None: there is none."""
    boxed = _last_boxed(answer)
    if boxed is not None:  # the final answer by convention: a number, or not a number at all
        for junk in ("\\!", "\\,", "\\%", "%", "\\$", "^\\circ", "^{\\circ}"):
            boxed = boxed.replace(junk, "")
        return parse_number(_LATEX_FRACTION.sub(r"\1\2/\3", _TEXT.sub("", boxed)))
    return _number_in(answer)


def _number_in(text: str) -> Fraction | None:
    text = _LATEX_FRACTION.sub(r"\1\2/\3", text)
    for match in reversed(_NUMBER.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def gold_number(gold: str) -> Fraction:
    """GSM8K's "reasoning #### 18" or a plain number; ValueError if neither."""
    value = parse_number(gold.rsplit("####", 1)[-1])
    if value is None:
        raise ValueError(f"gold answer {gold!r} is not a number (nor GSM8K's '... #### n')")
    return value


def numeric_reward(answer: str, gold: str) -> float:
    """1.0 if the last number of `answer` equals the gold number exactly, else 0.0."""
    predicted = extract_number(answer)
    return float(predicted is not None and predicted == gold_number(gold))


def extract_code(answer: str) -> str:
    """The first fenced code block of `answer` (an unclosed fence runs to the end), else all of it."""
    match = _FENCE.search(answer)
    return match.group(1) if match else answer


def code_reward(answer: str, tests: str, prefix: str = "", limits: SandboxLimits = CODE_LIMITS) -> float:
    """1.0 if prefix + the answer's code + tests runs to a clean exit in the sandbox, else 0.0."""
    program = f"{prefix}{extract_code(answer)}\n\n{tests}\n"
    return float(run_python(program, limits).ok)
