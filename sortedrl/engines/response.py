"""What an engine keeps for each request: the response so far, with its log-probs and the policy
version of every token, checked against the request it came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sortedrl.scheduling.protocol import Generation, Request, VersionSpans


@dataclass
class ResponseTrack:
    """One request's response so far (a resumed prefix included)."""

    request: Request
    token_ids: list[int]
    logprobs: list[float]
    spans: VersionSpans

    @classmethod
    def from_request(cls, req: Request, **extra: Any) -> ResponseTrack:
        """A track for `req`, starting from its resumed partial if it has one.

        Raises ValueError when the request cannot be generated (no prompt, a negative budget)
        or its partial does not hold together (token ids, log-probs and version spans of
        different lengths)."""
        rid = req.request_id
        if not req.prompt_token_ids:
            raise ValueError(f"request {rid!r}: prompt_token_ids must be a non-empty list")
        if req.max_new_tokens < 0:
            raise ValueError(f"request {rid!r}: max_new_tokens must be >= 0")
        p = req.resume
        if p is None:
            return cls(req, [], [], [], **extra)
        if p.token_ids is None or p.logprobs is None:
            raise ValueError(f"request {rid!r}: resume needs the partial's token_ids and logprobs")
        n = len(p.token_ids)
        covered = sum(c for _, c in p.version_spans)
        if len(p.logprobs) != n or p.n_tokens != n or covered != n:
            raise ValueError(
                f"request {rid!r}: resume partial has n_tokens={p.n_tokens}, {n} token_ids, "
                f"{len(p.logprobs)} logprobs and version_spans covering {covered} tokens"
            )
        return cls(
            req,
            [int(t) for t in p.token_ids],
            [float(x) for x in p.logprobs],
            [(int(v), int(c)) for v, c in p.version_spans if c > 0],
            **extra,
        )

    def add(self, tokens: Sequence[int], logprobs: Sequence[float], version: int) -> None:
        """Append tokens sampled under policy `version`."""
        self.token_ids.extend(tokens)
        self.logprobs.extend(logprobs)
        if self.spans and self.spans[-1][0] == version:
            self.spans[-1] = (version, self.spans[-1][1] + len(tokens))
        else:
            self.spans.append((version, len(tokens)))

    def generation(self, finish_reason: str) -> Generation:
        return Generation(
            request_id=self.request.request_id,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            n_tokens=len(self.token_ids),
            version_spans=list(self.spans),
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs),
        )
