"""TokenLayout: which positions of a prompt are audio, video, question, last...

A layout is derived from ``input_ids`` and the model's special token ids alone (plus, for the chunks of an
audio-in-video span, the video grids the inputs were built with), so it is the same whoever built the prompt.
Groups are boolean masks of shape (B, L) over a left-padded batch. Analyses name groups by string:

- ``system``, ``question`` (user text outside media spans), ``audio``, ``video``, ``image``,
- ``last`` (the last prompt position), ``generated`` (positions produced by generation),
- ``clip0``, ``clip1``... (the media spans of each clip of a multi-clip prompt, markers included),
- ``chunk0``, ``chunk1``... (the video+audio tokens of each interleaved time chunk),
- ``all`` (every non-padding position),
- any group added later with :meth:`TokenLayout.with_group` (e.g. ``sinks``).

Expressions combine groups: ``"last+generated"`` is a union, ``"clip1&audio"`` an intersection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import UnknownGroupError


@dataclass(frozen=True)
class SpecialIds:
    """The token ids a layout is derived from, read from a model's config and tokenizer.

    ``turn_start``/``turn_end`` delimit chat turns; ``system_header``/``user_header`` are the ids a turn of that
    role starts with (e.g. ``<|im_start|>user\\n``). Ids a model does not have are None.
    """

    audio: int | None
    video: int | None
    image: int | None
    audio_start: int | None
    audio_end: int | None
    vision_start: int | None
    vision_end: int | None
    turn_end: int | None
    system_header: tuple[int, ...] = ()
    user_header: tuple[int, ...] = ()
    pad: int | None = None

    def media_ids(self) -> set[int]:
        """Placeholder and marker ids, which never count as text."""
        ids = (self.audio, self.video, self.image, self.audio_start, self.audio_end)
        return {i for i in (*ids, self.vision_start, self.vision_end) if i is not None}


@dataclass(frozen=True)
class VideoGrid:
    """What the chunking of an interleaved (audio-in-video) span needs to know.

    ``times``: the time of every video token of the span in position-id units, shape (n_video,);
    ``audio_times``: the same for its audio tokens, shape (n_audio,).
    """

    times: torch.Tensor
    audio_times: torch.Tensor


ChunkRule = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps (video token times, audio token times) of one interleaved span to chunk ids for each."""


@dataclass
class TokenLayout:
    """Named token groups of a batch.

    Attributes:
        groups: name -> bool mask (B, L).
        valid: bool (B, L), False on left padding.
    """

    groups: dict[str, torch.Tensor]
    valid: torch.Tensor
    order: list[str] = field(default_factory=list)

    # -- access -------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def names(self) -> list[str]:
        """Group names, in a stable reading order."""
        return [n for n in self.order if n in self.groups] + sorted(set(self.groups) - set(self.order))

    def mask(self, expr: str) -> torch.Tensor:
        """Bool mask (B, L) of a group expression: names joined by '+' (union) or '&' (intersection).

        Raises:
            UnknownGroupError: a name that is not in the layout (the message lists the known ones).
        """
        expr = expr.strip()
        if "+" in expr:
            parts = [self.mask(p) for p in expr.split("+")]
            return torch.stack(parts).any(0)
        if "&" in expr:
            parts = [self.mask(p) for p in expr.split("&")]
            return torch.stack(parts).all(0)
        if expr == "all":
            return self.valid
        if expr not in self.groups:
            raise UnknownGroupError(f"unknown token group '{expr}' (this layout has: {', '.join(self.names)})")
        return self.groups[expr]

    def positions(self, expr: str, row: int) -> torch.Tensor:
        """Positions (n,) of a group in one row of the batch."""
        return self.mask(expr)[row].nonzero().flatten()

    def counts(self, row: int) -> dict[str, int]:
        """Number of tokens of every group in one row."""
        return {n: int(self.groups[n][row].sum()) for n in self.names}

    def describe(self, row: int = 0) -> list[dict]:
        """Each group of one row with its count and its positions as contiguous ranges."""
        out = []
        for name in self.names:
            pos = self.positions(name, row).tolist()
            if pos:
                out.append({"group": name, "count": len(pos), "ranges": _ranges(pos)})
        return out

    # -- derivation ---------------------------------------------------------------------------------------
    def select(self, rows: Sequence[int] | torch.Tensor) -> TokenLayout:
        """The layout of a subset (or a repetition) of the batch rows."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, groups={k: v[idx] for k, v in self.groups.items()}, valid=self.valid[idx])

    def with_group(self, name: str, mask: torch.Tensor) -> TokenLayout:
        """A copy with one more group (bool (B, L), e.g. detected sink tokens); a group of that name is replaced."""
        if mask.shape != self.valid.shape:
            raise ValueError(f"group '{name}' has shape {tuple(mask.shape)}, layout is {tuple(self.valid.shape)}")
        order = self.order if name in self.order else [*self.order, name]
        return replace(self, groups={**self.groups, name: mask.bool() & self.valid}, order=order)

    def extend(self, n: int) -> TokenLayout:
        """A copy with ``n`` more positions, all in the ``generated`` group."""
        b = self.batch_size
        groups = {k: torch.cat([v, v.new_zeros(b, n)], 1) for k, v in self.groups.items()}
        groups["generated"][:, -n:] = True
        valid = torch.cat([self.valid, self.valid.new_ones(b, n)], 1)
        return replace(self, groups=groups, valid=valid)

    @classmethod
    def from_ids(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ids: SpecialIds,
        *,
        interleaved: Sequence[Sequence[VideoGrid]] | None = None,
        chunk_rule: ChunkRule | None = None,
    ) -> TokenLayout:
        """Derive the layout of a left-padded batch.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 0 on padding.
            ids: the model's special ids.
            interleaved: per row, one :class:`VideoGrid` per audio-in-video span, in order (needed for chunks).
            chunk_rule: the model's rule mapping token times to chunk ids.
        """
        b, n = input_ids.shape
        valid = attention_mask.bool()
        groups: dict[str, torch.Tensor] = {
            name: torch.zeros(b, n, dtype=torch.bool)
            for name in ("system", "question", "audio", "video", "image", "last", "generated")
        }
        for name, tok in (("audio", ids.audio), ("video", ids.video), ("image", ids.image)):
            if tok is not None:
                groups[name] = (input_ids == tok) & valid
        for row in range(b):
            row_ids = input_ids[row].tolist()
            present = valid[row].nonzero().flatten()
            first = int(present.min())
            groups["last"][row, int(present.max())] = True
            spans = _media_spans(row_ids, first, ids)
            _mark_turn_text(groups["system"], row, row_ids, first, ids.system_header, ids, spans)
            _mark_turn_text(groups["question"], row, row_ids, first, ids.user_header, ids, spans)
            for k, clip in enumerate(_clips(spans)):
                name = f"clip{k}"
                groups.setdefault(name, torch.zeros(b, n, dtype=torch.bool))
                for s, e in clip:
                    groups[name][row, s:e] = True
            grids = list(interleaved[row]) if interleaved is not None else []
            mixed = [s for s in spans if _is_interleaved(row_ids, s, ids)]
            for (s, e), grid in zip(mixed, grids, strict=False):
                if chunk_rule is None:
                    raise ValueError("an interleaved span needs the model's chunk rule")
                _mark_chunks(groups, row, row_ids, s, e, grid, chunk_rule, ids, b, n)
        order = ["system", "audio", "video", "image", "question", "last", "generated"]
        order += sorted((k for k in groups if k.startswith("clip")), key=_index)
        order += sorted((k for k in groups if k.startswith("chunk")), key=_index)
        return cls(groups=groups, valid=valid, order=order)


def _index(name: str) -> int:
    return int("".join(c for c in name if c.isdigit()) or 0)


def _ranges(pos: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in pos:
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out


def _media_spans(row_ids: list[int], first: int, ids: SpecialIds) -> list[tuple[int, int]]:
    """Top-level media spans [start, end) including their start/end markers.

    A span opens at a vision or audio start marker and closes at the matching end marker; an audio span
    nested in a vision span (audio-in-video) belongs to the vision span.
    """
    spans, depth, start = [], 0, 0
    opens = {ids.vision_start, ids.audio_start} - {None}
    closes = {ids.vision_end, ids.audio_end} - {None}
    for i in range(first, len(row_ids)):
        t = row_ids[i]
        if t in opens:
            if depth == 0:
                start = i
            depth += 1
        elif t in closes and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _is_interleaved(row_ids: list[int], span: tuple[int, int], ids: SpecialIds) -> bool:
    inner = row_ids[span[0] : span[1]]
    return ids.video in inner and ids.audio in inner


def _clips(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Group media spans into clips: adjacent spans (a video and its separate audio) form one clip, any token
    between two spans (e.g. "clip 2:") starts a new one."""
    clips: list[list[tuple[int, int]]] = []
    for span in spans:
        if clips and clips[-1][-1][1] == span[0]:
            clips[-1].append(span)
        else:
            clips.append([span])
    return clips


def _mark_turn_text(
    mask: torch.Tensor,
    row: int,
    row_ids: list[int],
    first: int,
    header: tuple[int, ...],
    ids: SpecialIds,
    spans: list[tuple[int, int]],
) -> None:
    """Mark the text of every turn that starts with ``header``, outside media spans."""
    if not header:
        return
    h = len(header)
    in_span = [False] * len(row_ids)
    for s, e in spans:
        in_span[s:e] = [True] * (e - s)
    i = first
    while i <= len(row_ids) - h:
        if tuple(row_ids[i : i + h]) == header:
            j = i + h
            while j < len(row_ids) and row_ids[j] != ids.turn_end:
                if not in_span[j] and row_ids[j] not in ids.media_ids():
                    mask[row, j] = True
                j += 1
            i = j
        else:
            i += 1


def _mark_chunks(
    groups: dict[str, torch.Tensor],
    row: int,
    row_ids: list[int],
    start: int,
    end: int,
    grid: VideoGrid,
    chunk_rule: ChunkRule,
    ids: SpecialIds,
    b: int,
    n: int,
) -> None:
    """Mark ``chunk{j}`` for the video and audio tokens of one interleaved span, in the model's own order."""
    video_chunk, audio_chunk = chunk_rule(grid.times, grid.audio_times)
    vi = ai = 0
    for pos in range(start, end):
        t = row_ids[pos]
        if t == ids.video:
            j = int(video_chunk[vi])
            vi += 1
        elif t == ids.audio:
            j = int(audio_chunk[ai])
            ai += 1
        else:
            continue
        name = f"chunk{j}"
        groups.setdefault(name, torch.zeros(b, n, dtype=torch.bool))
        groups[name][row, pos] = True
