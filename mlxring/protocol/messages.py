"""The messages that travel around the ring, as small frozen dataclasses.

`codec` turns them into frames and back, reading each field's name and type hint here: a field
is defined once, in its dataclass. Inside a process messages are passed as they are, so a
`Forward` between two shard actors of one process carries the mx.array itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import mlx.core as mx

#: Where an actor sends a message: the next node of the ring, a peer, a queue.
Send = Callable[["Message"], Awaitable[None]]


@dataclass(frozen=True)
class AtLeast:
    """The least value the codec accepts for a number it receives (`Annotated[int, AtLeast(0)]`)."""

    bound: int


NonNegInt = Annotated[int, AtLeast(0)]
NonNegFloat = Annotated[float, AtLeast(0)]


@dataclass(frozen=True)
class SamplingParams:
    """What the last shard needs to turn logits into a token (mlx-lm samplers and processors)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    # Number of top log-probabilities to return with each token; None: no logprobs at all.
    logprobs: int | None = None
    # llguidance's grammar JSON the output must match (`api.structured`); None: free text.
    grammar: str | None = None


@dataclass(frozen=True)
class Hello:
    """First frame each way on a new link: who sends it, a fresh nonce, and its side's SPAKE2
    message (`pake`, 33 bytes). `pake` is None only in a hello of protocol 4 or older, which the
    version check then refuses; `proof` travels empty so that such an older node can read this
    hello and name the version it does not speak."""

    version: int
    cluster: str
    node: str
    nonce: bytes
    proof: bytes = b""
    pake: bytes | None = None


@dataclass(frozen=True)
class Proof:
    """Key confirmation: an HMAC, under the key both sides' SPAKE2 derived, of both hellos: the
    connector's (third handshake frame), then, once it is checked, the acceptor's (fourth)."""

    proof: bytes


@dataclass(frozen=True)
class Ping:
    sent: float


@dataclass(frozen=True)
class Pong:
    sent: float


@dataclass(frozen=True)
class Tensor:
    """Tensor bytes as they came off the wire; the shard that computes on them makes them an
    mx.array (mx arrays belong to the stream of the thread that creates them)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Forward:
    """One step of one request through one shard.

    `tokens` are the token ids of the positions this step covers: the first shard embeds them,
    the last shard appends them to the history its logits processors see. `h` is the hidden
    state entering the receiving shard (None when it goes to the first shard). The last shard
    samples only when `sample` is set (not for prompt chunks before the final token).
    """

    rid: str
    seq: int
    tokens: tuple[NonNegInt, ...]
    sample: bool
    h: mx.array | Tensor | None = None
    # The first layer the receiver must run: a step that reaches a shard holding other layers
    # (the ring re-planned under it) fails instead of computing garbage.
    layer: int = 0
    params: SamplingParams | None = None  # sent once, with a request's first step
    # Sent with a request's first step when it starts from a prompt-cache entry: every shard
    # starts from entry `reuse`'s caches cut to `reused` positions (shard/prefix.py), and the
    # step's tokens follow them.
    reuse: str = ""
    reused: NonNegInt = 0
    # Speculative decoding (engine/speculate.py): the step's last `draft` tokens are drafted;
    # the last shard samples at every position and keeps the run the model agrees with.
    # `trim`: positions every shard drops from the request's caches first (the drafts its
    # previous step rejected).
    draft: NonNegInt = 0
    trim: NonNegInt = 0
    # Per-hop timing of decode steps (mlxring/ring/hoptime.py): seconds spent inside processes so
    # far, and network hops taken.
    spent: NonNegFloat = 0.0
    hops: NonNegInt = 0

    @property
    def is_decode(self) -> bool:
        """One token in, one sampled out: a decode step (or a prompt's last token), not a
        prompt chunk; one that trims its caches first is not one (`is_speculative`)."""
        return self.sample and len(self.tokens) == 1 and not self.trim

    @property
    def is_speculative(self) -> bool:
        """A sampled step with drafts to verify (the last token and the drafts) or a trim
        first: a decode step of several positions, which joins a batched pass only where the
        shards' caches take rows of several positions (`shard.convoys.wide_rows`)."""
        return self.sample and bool(self.draft or self.trim) and len(self.tokens) == 1 + self.draft


@dataclass(frozen=True)
class ForwardBatch:
    """Decode steps of several requests run as one forward pass: each row carries its
    request's fields (with `h` None) and `h` is their hidden states, [B, L, D] in row order:
    L is 1, or the most positions a row carries (drafts to verify); a row of fewer is padded
    on the right (causal attention keeps the padding from its real positions).
    A received batch has at least one row and a tensor of one row per row (codec checks)."""

    rows: tuple[Forward, ...]
    h: mx.array | Tensor | None = None


def rows_of(parts: Sequence[Forward | ForwardBatch]) -> list[Forward]:
    """The request steps of a pass made of single steps and batches, in order."""
    return [r for p in parts for r in (p.rows if isinstance(p, ForwardBatch) else (p,))]


@dataclass(frozen=True)
class Token:
    """The last shard's sampled token, sent back to the head."""

    rid: str
    seq: int
    token: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()
    spent: NonNegFloat = 0.0  # the step's, carried home (see Forward)
    hops: NonNegInt = 0
    # A step with drafts: the tokens after `token` it decided too (each draft the model
    # agreed with was the input of the next position, so each of these follows).
    more: tuple[NonNegInt, ...] = ()


@dataclass(frozen=True)
class End:
    """A request is finished, cancelled or failed: every shard frees its caches for it, or,
    with `keep`, keeps them as a prompt-cache entry under its id when they hold exactly `keep`
    positions (the head's count of what it sent). `drop`: entries the head no longer reuses."""

    rid: str
    reason: str = "done"
    keep: NonNegInt = 0
    drop: tuple[str, ...] = ()
    trim: NonNegInt = 0  # as Forward's: the last step's rejected drafts, dropped before keeping


@dataclass(frozen=True)
class Failure:
    """A shard could not run a step; travels on to the head, freeing caches on the way."""

    rid: str
    message: str
    origin: str = ""
    # "cache_miss": the prompt-cache entry the request started from was not there; the head
    # starts it again without one.
    kind: str = ""


@dataclass(frozen=True)
class NodeStats:
    """What a node reports of itself as a probe passes: memory and how busy its shard is."""

    name: str
    active_bytes: int  # MLX memory in use (weights + KV caches + buffers)
    peak_bytes: int
    total_bytes: int  # the machine's memory
    busy_s: float  # compute time of its shard since start
    steps: int
    requests: int  # requests holding KV caches there
    # The part of busy_s and steps that ran single-token steps (decode), for `mlxring bench`.
    decode_busy_s: float = 0.0
    decode_steps: int = 0
    cache_bytes: int = 0  # its prompt cache's (shard/prefix.py)
    cache_entries: int = 0


@dataclass(frozen=True)
class Probe:
    """Sent by the head around the ring: each shard adds (node, start, end) and its stats; its
    return proves the whole ring is up and shows the live layout."""

    origin: str
    sent: float
    hops: tuple[tuple[str, int, int], ...] = ()
    stats: tuple[NodeStats, ...] = ()


Message = Hello | Proof | Ping | Pong | Forward | ForwardBatch | Token | End | Failure | Probe
