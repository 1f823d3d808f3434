"""Response lengths for the simulated engine: from a distribution spec or a recorded trace.

This module sits below the engines: the simulated engine needs only the `LengthModel`
protocol (`length()`, `cap`), which `Workload` implements.

A `Workload` knows, for each prompt, the lengths of its `group_size` responses. The first
attempt at a response gets its recorded length; a response regenerated from scratch draws
again from the same prompt's recorded lengths, since a prompt's difficulty, not chance alone,
sets how long its answers run.

Spec grammar (see `parse_lengths_spec`)::

    spec      := term ("+" term)*
    term      := [weight "*"] dist
    dist      := "lognormal:median=M,sigma=S[,prompt_sigma=P]"
               | "fixed:length=N"
               | "uniform:min=A,max=B"

`prompt_sigma` adds one log-offset per prompt, shared by all its samples (and by all terms of
a mixture), so that the responses of one prompt are correlated as in real data.

Everything here is deterministic in (seed, prompt_id, sample_index, attempt): random numbers
come from SHAKE-128 of those, never from Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Protocol

from sortedrl.errors import ConfigError, InputFileError

_inv_normal = NormalDist().inv_cdf
_U64 = 2.0**-64


def _index(seed: int, key: str, n: int) -> int:
    raw = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little") % n


class LengthModel(Protocol):
    """What the simulated engine asks about response lengths."""

    @property
    def cap(self) -> int:
        """The longest response any call to `length` returns."""
        ...

    def length(self, prompt_id: str, sample_index: int, attempt: int = 0) -> int:
        """Total length of this attempt at this response (deterministic)."""
        ...


# --- distributions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    weight: float
    kind: str  # lognormal | fixed | uniform
    a: float  # lognormal: log(median); fixed: length; uniform: min
    b: float = 0.0  # lognormal: sigma; uniform: max
    prompt_sigma: float = 0.0


@dataclass(frozen=True)
class LengthDistribution:
    """A parsed length spec: draws the `group_size` lengths of one prompt."""

    spec: str
    terms: tuple[_Term, ...]
    cap: int

    def draw_group(self, seed: int, prompt_id: str, group_size: int, epoch: int = 0) -> list[int]:
        # 1 + 2G uniforms: the prompt's offset, then (term choice, value) per sample. A later
        # epoch keeps the prompt's offset (its difficulty) and draws its samples afresh.
        n = 1 + 2 * group_size
        key = f"{seed}\x00group\x00{prompt_id}"
        u = struct.unpack(f"<{n}Q", hashlib.shake_128(key.encode()).digest(8 * n))
        if epoch:
            fresh = hashlib.shake_128(f"{key}\x00epoch\x00{epoch}".encode()).digest(8 * n)
            u = u[:1] + struct.unpack(f"<{n}Q", fresh)[1:]
        inv, exp, cap, terms = _inv_normal, math.exp, self.cap, self.terms
        z_prompt = inv((u[0] + 0.5) * _U64)
        out = []
        for i in range(1, 1 + 2 * group_size, 2):
            if len(terms) == 1:
                t = terms[0]
            else:
                t = terms[-1]
                pick, acc = u[i] * _U64, 0.0
                for cand in terms:
                    acc += cand.weight
                    if pick < acc:
                        t = cand
                        break
            v = (u[i + 1] + 0.5) * _U64
            if t.kind == "lognormal":
                x = int(exp(t.a + t.prompt_sigma * z_prompt + t.b * inv(v)) + 0.5)
            elif t.kind == "fixed":
                x = int(t.a)
            else:  # uniform over the integers min..max
                x = int(t.a + math.floor(v * (t.b - t.a + 1)))
            out.append(cap if x > cap else (x if x > 1 else 1))
        return out


_TERM_SPLIT = re.compile(r"\+(?=\s*(?:[^*+:]*\*)?\s*[A-Za-z_]+\s*:|\s*$)")

_PARAMS = {
    "lognormal": ({"median", "sigma"}, {"prompt_sigma"}),
    "fixed": ({"length"}, set()),
    "uniform": ({"min", "max"}, set()),
}


def parse_lengths_spec(spec: str, cap: int) -> LengthDistribution:
    """Parse a length spec (module docstring); a bad spec is a ConfigError saying what is wrong."""
    if cap < 1:
        raise ConfigError(f"length cap must be >= 1, got {cap}")
    text = spec.strip()
    if not text:
        raise ConfigError("length spec is empty")
    # Split at a '+' that starts a new term, not at the sign of an exponent like 1e+3.
    raw_terms = [t.strip() for t in _TERM_SPLIT.split(text)]
    terms: list[_Term] = []
    explicit: list[bool] = []
    for raw in raw_terms:
        where = f"length spec '{spec}', term '{raw}'"
        if not raw:
            raise ConfigError(f"length spec '{spec}': empty term (stray '+')")
        weight: float | None = None
        body = raw
        if "*" in raw:
            w_text, body = (s.strip() for s in raw.split("*", 1))
            try:
                weight = float(w_text)
            except ValueError:
                raise ConfigError(f"{where}: weight '{w_text}' is not a number") from None
            if not (weight > 0 and math.isfinite(weight)):
                raise ConfigError(f"{where}: weight must be positive, got {w_text}")
        kind, sep, arg_text = body.partition(":")
        kind = kind.strip()
        if kind not in _PARAMS:
            raise ConfigError(
                f"{where}: unknown distribution '{kind}'; known: {', '.join(sorted(_PARAMS))}"
            )
        if not sep:
            raise ConfigError(f"{where}: expected '{kind}:name=value,...'")
        params: dict[str, float] = {}
        for item in arg_text.split(","):
            name, eq, value = (s.strip() for s in item.partition("="))
            if not eq or not name:
                raise ConfigError(f"{where}: expected name=value, got '{item.strip()}'")
            required, optional = _PARAMS[kind]
            if name not in required | optional:
                allowed = ", ".join(sorted(required | optional))
                raise ConfigError(f"{where}: unknown parameter '{name}' (allowed: {allowed})")
            if name in params:
                raise ConfigError(f"{where}: parameter '{name}' given twice")
            try:
                params[name] = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {name}='{value}' is not a number") from None
            if not math.isfinite(params[name]):
                raise ConfigError(f"{where}: {name} must be finite")
        missing = _PARAMS[kind][0] - params.keys()
        if missing:
            raise ConfigError(f"{where}: missing parameter(s) {', '.join(sorted(missing))}")
        terms.append(_make_term(kind, params, weight, where))
        explicit.append(weight is not None)
    if len(terms) > 1 and not all(explicit):
        raise ConfigError(f"length spec '{spec}': every term of a mixture needs a weight 'w*'")
    total = sum(t.weight for t in terms)
    # Weights are normalised, so 0.33+0.33+0.34 and 1+1+1 both work.
    normed = tuple(
        _Term(1.0 if len(terms) == 1 else t.weight / total, t.kind, t.a, t.b, t.prompt_sigma)
        for t in terms
    )
    return LengthDistribution(spec=spec, terms=normed, cap=cap)


def _make_term(kind: str, p: dict[str, float], weight: float | None, where: str) -> _Term:
    w = weight if weight is not None else 1.0
    if kind == "lognormal":
        if p["median"] <= 0:
            raise ConfigError(f"{where}: median must be positive, got {p['median']:g}")
        if p["sigma"] < 0:
            raise ConfigError(f"{where}: sigma must be >= 0, got {p['sigma']:g}")
        ps = p.get("prompt_sigma", 0.0)
        if ps < 0:
            raise ConfigError(f"{where}: prompt_sigma must be >= 0, got {ps:g}")
        return _Term(w, kind, math.log(p["median"]), p["sigma"], ps)
    if kind == "fixed":
        if p["length"] < 1 or p["length"] != int(p["length"]):
            raise ConfigError(f"{where}: length must be a positive integer, got {p['length']:g}")
        return _Term(w, kind, p["length"])
    lo, hi = p["min"], p["max"]
    if lo < 1 or lo != int(lo) or hi != int(hi) or hi < lo:
        raise ConfigError(f"{where}: need integers 1 <= min <= max, got min={lo:g} max={hi:g}")
    return _Term(w, kind, lo, hi)


def default_lengths_spec(cap: int) -> str:
    """A long-tailed spec typical of reasoning RL at this response cap.

    At 16k: median ~2k, 90% of responses under ~8k, ~2-3% cut at the cap, long answers
    concentrated on hard prompts. Other caps scale the same shape.
    """
    s = cap / 16384
    return (
        f"0.85*lognormal:median={max(1, round(1800 * s))},sigma=0.55,prompt_sigma=0.35"
        f"+0.15*lognormal:median={max(1, round(8000 * s))},sigma=0.6,prompt_sigma=0.35"
    )


# --- traces -------------------------------------------------------------------------------------


def _json_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; anything malformed is
    an InputFileError naming the file and the line."""
    try:
        f = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except OSError as e:
        raise InputFileError(str(path), f"cannot read trace: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputFileError(
                    path, f"not valid UTF-8 ({e.reason} at byte {e.start})", line=lineno
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(path, f"invalid JSON: {e.msg}", line=lineno) from None
            except RecursionError:
                raise InputFileError(path, "invalid JSON: nested too deeply", line=lineno) from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise InputFileError(path, f"invalid JSON: {str(e)[:200]}", line=lineno) from None
            if not isinstance(obj, dict):
                raise InputFileError(path, "expected a JSON object", line=lineno)
            yield lineno, obj


def load_trace(path: str) -> tuple[dict[str, list[int]], int]:
    """Read a JSONL trace of response lengths, in either of two layouts (told apart by the
    first line):

    - grouped: `{"prompt_id": str, "lengths": [int, ...]}`, one line per prompt;
    - per response: `{"prompt": str, "response_length": int}` (or `"prompt_id"` for the
      prompt), one line per response, as an RL run's rollout dump has them (verl, OpenRLHF
      and TRL can all write one); the lines of one prompt (its text or its id) form its
      group, in file order, and other fields are ignored.

    Returns (lengths by prompt id, group size). Blank lines are skipped; anything else
    malformed is an InputFileError naming the file, the line and the field.
    """
    rows = _json_rows(path)
    first = next(rows, None)
    if first is None:
        raise InputFileError(path, "trace holds no prompts")
    if "response_length" in first[1]:
        return _per_response(path, itertools.chain([first], rows))
    return _grouped(path, itertools.chain([first], rows))


def _grouped(
    path: str, rows: Iterable[tuple[int, dict[str, Any]]]
) -> tuple[dict[str, list[int]], int]:
    out: dict[str, list[int]] = {}
    group_size: int | None = None
    first_line = 0
    for lineno, obj in rows:
        pid = obj.get("prompt_id")
        if "prompt_id" not in obj:
            raise InputFileError(path, "missing", line=lineno, field="prompt_id")
        if not isinstance(pid, str) or not pid:
            raise InputFileError(
                path, f"must be a non-empty string, got {pid!r}", line=lineno, field="prompt_id"
            )
        if pid in out:
            raise InputFileError(
                path, f"duplicate prompt_id {pid!r}", line=lineno, field="prompt_id"
            )
        if "lengths" not in obj:
            raise InputFileError(path, "missing", line=lineno, field="lengths")
        lengths = obj["lengths"]
        if not isinstance(lengths, list) or not lengths:
            raise InputFileError(
                path, "must be a non-empty list of integers", line=lineno, field="lengths"
            )
        for i, x in enumerate(lengths):
            # bool is an int in Python; a JSON true is not a length.
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise InputFileError(
                    path,
                    f"element {i} must be a positive integer, got {x!r}",
                    line=lineno,
                    field="lengths",
                )
        if group_size is None:
            group_size, first_line = len(lengths), lineno
        elif len(lengths) != group_size:
            raise InputFileError(
                path,
                f"group of {len(lengths)} responses, but line {first_line} has {group_size}",
                line=lineno,
                field="lengths",
            )
        out[pid] = lengths
    assert group_size is not None  # the caller saw a first line
    return out, group_size


def _per_response(
    path: str, rows: Iterable[tuple[int, dict[str, Any]]]
) -> tuple[dict[str, list[int]], int]:
    out: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}  # where each prompt's group starts
    for lineno, obj in rows:
        key = "prompt" if "prompt" in obj else "prompt_id"
        if key not in obj:
            raise InputFileError(path, "missing (or prompt_id)", line=lineno, field="prompt")
        pid = obj[key]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
            raise InputFileError(
                path, f"must be a non-empty string or an id, got {pid!r}", line=lineno, field=key
            )
        if "response_length" not in obj:
            raise InputFileError(path, "missing", line=lineno, field="response_length")
        n = obj["response_length"]
        # A dump may write lengths as floats (123.0); a fraction, a bool or a string is not one.
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputFileError(
                path, f"must be a positive integer, got {n!r}", line=lineno, field="response_length"
            )
        pid = str(pid)
        out.setdefault(pid, []).append(n)
        first_line.setdefault(pid, lineno)
    sizes = {len(ls) for ls in out.values()}
    if len(sizes) > 1:
        # Name the two prompts whose groups differ, by the line each starts on.
        first_pid = next(iter(out))
        odd = next(p for p in out if len(out[p]) != len(out[first_pid]))
        raise InputFileError(
            path,
            f"the prompt starting at line {first_line[odd]} has {len(out[odd])} responses, but "
            f"the one starting at line {first_line[first_pid]} has {len(out[first_pid])}: every "
            "prompt needs the same number of responses (one group each)",
            line=first_line[odd],
            field="response_length",
        )
    return out, sizes.pop()


# --- the workload -------------------------------------------------------------------------------


class Workload:
    """Recorded group lengths per prompt, and the rule for regenerated responses.

    Built from a spec, a prompt that was not pre-drawn is drawn on first use (from a hash of
    the seed and its id, so the order of use does not matter); built from a trace, an unknown
    prompt is a ConfigError.
    """

    def __init__(
        self,
        lengths: dict[str, list[int]],
        group_size: int,
        cap: int,
        seed: int = 0,
        distribution: LengthDistribution | None = None,
        source: str = "",
    ):
        if group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.cap = cap
        self.seed = seed
        self.distribution = distribution
        self.source = source
        self._lengths: dict[str, list[int]] = {
            pid: [min(cap, x) for x in ls] for pid, ls in lengths.items()
        }
        self._epoch_lengths: dict[tuple[str, int], list[int]] = {}  # epochs after the first

    @classmethod
    def from_spec(
        cls,
        spec: str | LengthDistribution,
        cap: int,
        group_size: int,
        prompt_ids: Iterable[str] = (),
        seed: int = 0,
    ) -> Workload:
        dist = parse_lengths_spec(spec, cap) if isinstance(spec, str) else spec
        if dist.cap != cap:
            dist = LengthDistribution(dist.spec, dist.terms, cap)
        w = cls({}, group_size, cap, seed, dist, source=f"spec {dist.spec}")
        draw, lengths = dist.draw_group, w._lengths
        for pid in prompt_ids:
            lengths[pid] = draw(seed, pid, group_size)
        return w

    @classmethod
    def from_trace(cls, path: str, cap: int, seed: int = 0) -> Workload:
        lengths, group_size = load_trace(path)
        return cls(lengths, group_size, cap, seed, source=f"trace {path}")

    def __len__(self) -> int:
        return len(self._lengths)

    def prompt_ids(self) -> list[str]:
        return list(self._lengths)

    def group(self, prompt_id: str) -> list[int]:
        """The recorded (first-attempt) lengths of a prompt's group."""
        ls = self._lengths.get(prompt_id)
        if ls is None:
            if self.distribution is None:
                raise ConfigError(f"prompt '{prompt_id}' is not in the workload ({self.source})")
            ls = self.distribution.draw_group(self.seed, prompt_id, self.group_size)
            self._lengths[prompt_id] = ls
        return ls

    def epoch_group(self, prompt_id: str, epoch: int) -> list[int]:
        """The lengths a later pass over the data gives this prompt's group: drawn afresh from
        the prompt's own distribution (a spec keeps the prompt's offset; a trace draws from
        the prompt's recorded lengths), so earlier epochs predict them without fixing them."""
        if epoch == 0:
            return self.group(prompt_id)
        key = (prompt_id, epoch)
        ls = self._epoch_lengths.get(key)
        if ls is None:
            recorded = self.group(prompt_id)
            g = len(recorded)
            if self.distribution is not None:
                ls = self.distribution.draw_group(self.seed, prompt_id, g, epoch)
            else:
                ls = [
                    recorded[_index(self.seed, f"epoch\x00{prompt_id}\x00{i}\x00{epoch}", g)]
                    for i in range(g)
                ]
            self._epoch_lengths[key] = ls
        return ls

    def length(self, prompt_id: str, sample_index: int, attempt: int = 0, epoch: int = 0) -> int:
        """Total response length of this attempt at this sample in this epoch (capped)."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        ls = self.epoch_group(prompt_id, epoch)
        g = len(ls)
        if not 0 <= sample_index < g:
            raise ConfigError(
                f"sample_index {sample_index} out of range for prompt '{prompt_id}' (group of {g})"
            )
        if attempt == 0:
            return ls[sample_index]
        key = f"regen\x00{prompt_id}\x00{sample_index}\x00{attempt}"
        return ls[_index(self.seed, key if epoch == 0 else f"{key}\x00{epoch}", g)]
