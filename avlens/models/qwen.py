"""What the Qwen multimodal families share: loading, chat-template prompts, placeholder expansion, batching.

A family file (qwen2_5_omni.py, qwen3_omni.py, qwen2_5_vl.py) subclasses :class:`QwenAdapter` and sets its
model classes and the two rules that differ between families: how many tokens an audio gets and how an
audio-in-video span interleaves video and audio tokens.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ModelNotFoundError
from ..layout import SpecialIds, TokenLayout, VideoGrid
from ..media import AudioProcessor, AudioTrack, VideoClip, VisionProcessor, decode_audio, load_image, load_video
from .base import Adapter, Clip, Embedded, Inputs, Media, Sample


def chat_template(tokens: dict[str, str]) -> str:
    """A ChatML template in the layout of Qwen's own, for a family's special token strings.

    Used for a tokenizer that ships no chat template, and by the word-level tokenizer of the tiny models and the
    organism (models/tokenizer.py).
    """
    t = tokens
    audio = f"{t['audio_start']}{t['audio']}{t['audio_end']}" if "audio" in t else ""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        f"{{% if c['type'] == 'image' %}}{t['vision_start']}{t['image']}{t['vision_end']}"
        f"{{% elif c['type'] == 'video' %}}{t['vision_start']}{t['video']}{t['vision_end']}"
        f"{{% elif c['type'] == 'audio' %}}{audio}"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


@dataclass
class PrepareOptions:
    """How media become inputs.

    Attributes:
        fps: video frames sampled per second (an adapter's default: its checkpoint's video preprocessor config's
            ``fps``, else Qwen's 2).
        max_frames: cap on sampled frames.
        interleave: lay each video and its audio out as time-interleaved chunks (Qwen-Omni's
            ``use_audio_in_video``) instead of separate video and audio spans. None (default): interleave when
            every video of the batch brings its own audio track; True: interleave every clip that has a video
            and an audio (every video then needs one); False: never.
        video_max_pixels / video_min_pixels: per-frame pixel budget (None: the model's preprocessor config).
        add_generation_prompt: end the prompt with the assistant turn header.
    """

    fps: float = 2.0
    max_frames: int | None = 64
    interleave: bool | None = None
    video_max_pixels: int | None = None
    video_min_pixels: int | None = None
    add_generation_prompt: bool = True


@dataclass
class _LoadedClip:
    video: VideoClip | None
    audio: np.ndarray | None
    image: np.ndarray | None
    audio_from_video: bool
    used: dict[str, Any]  # what of the media is used (Inputs.media)


class QwenAdapter(Adapter):
    """Shared implementation for Qwen-style multimodal models (a ``model.model.language_model`` text decoder,
    ``model.lm_head``, chat-template prompts with placeholder tokens expanded to the media's token counts)."""

    model_class: ClassVar[Any] = None
    full_model_types: ClassVar[tuple[str, ...]] = ()  # checkpoints holding the model as ``thinker.*`` (Omni)
    video_second_kwarg: ClassVar[str] = "video_second_per_grid"
    tokens: ClassVar[dict[str, str]] = {
        "vision_start": "<|vision_bos|>",
        "vision_end": "<|vision_eos|>",
        "audio_start": "<|audio_bos|>",
        "audio_end": "<|audio_eos|>",
        "image": "<|IMAGE|>",
        "video": "<|VIDEO|>",
        "audio": "<|AUDIO|>",
    }
    """The family's special token strings (its chat template writes these)."""
    interleave_kwarg: ClassVar[str | None] = "use_audio_in_video"
    token_types: ClassVar[bool] = False  # pass mm_token_type_ids (0 text, 1 image, 2 video, 3 audio)
    default_video_pixels: ClassVar[tuple[int, int]] = (128 * 28 * 28, 768 * 28 * 28)

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        source: str = "",
        *,
        preprocessor: dict | None = None,
        video_preprocessor: dict | None = None,
    ) -> None:
        super().__init__(model, tokenizer, source)
        preprocessor = preprocessor or {}
        self.vision = VisionProcessor.from_config(preprocessor)
        if video_preprocessor:
            self.video_vision = VisionProcessor.from_config(video_preprocessor)
        else:  # the pixel budget of Qwen's reference video loader (qwen-omni-utils / qwen-vl-utils)
            low, high = self.default_video_pixels
            self.video_vision = replace(self.vision, min_pixels=low, max_pixels=high)
        self.audio = AudioProcessor.from_config(preprocessor) if self.has_audio else None
        # Frames per second to sample: the checkpoint's own (its video preprocessor config), else Qwen's 2.
        self.options = PrepareOptions(fps=float((video_preprocessor or {}).get("fps") or PrepareOptions.fps))
        self.check_supported()

    # -- loading --------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
    ) -> QwenAdapter:
        """Load a checkpoint (local directory or hub id) with its tokenizer and preprocessor config.

        Only safetensors weights are read. ``dtype`` defaults to float32 on CPU and the checkpoint's dtype
        when a ``device_map`` is given (the bf16 GPU path).
        """
        from transformers import AutoConfig, AutoTokenizer

        name = str(name)
        try:  # the config first, then the tokenizer, so that each failure is named as what it is
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(_not_found(name, e)) from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
            if Path(name).is_dir() and not any((Path(name) / f).exists() for f in files):
                raise ModelNotFoundError(f"model '{name}': no tokenizer in the directory ({' / '.join(files)})") from e
            reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # all of it, on one line
            raise ModelNotFoundError(f"model '{name}': its tokenizer could not be loaded ({reason})") from e
        if dtype is None:
            dtype = "auto" if device_map is not None else torch.float32
        kwargs = dict(dtype=dtype, device_map=device_map, use_safetensors=True, trust_remote_code=trust_remote_code)
        if config.model_type in cls.full_model_types:
            # A full Omni checkpoint: build only the thinker from its weights (the talker and vocoder are not
            # needed to trace, and their loader wants a pickled speaker file).
            model = cls.model_class.from_pretrained(
                name, config=config.thinker_config, key_mapping={r"^thinker\.": ""}, **kwargs
            )
        else:
            model = cls.model_class.from_pretrained(name, **kwargs)
        model.eval()
        pre, video_pre = read_preprocessor_config(name)
        return cls(model, tokenizer, name, preprocessor=pre, video_preprocessor=video_pre)

    # -- structure ------------------------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    # -- the decoder contract (see avlens.models.decoder) ------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, rope_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model.rotary_emb(hidden, rope_positions)

    def split_positions(self, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        # (3, B, L) multimodal rotary ids (temporal, height, width); some families put text ids first (4, B, L).
        return (position_ids[0], position_ids[1:]) if position_ids.shape[0] == 4 else (None, position_ids)

    def next_positions(self, position_ids: torch.Tensor, step: int) -> torch.Tensor:
        # After a multimodal prompt Qwen's ids go on from the largest id so far, the same in all three rows (the
        # model's rope_deltas), whatever the padding.
        nxt = position_ids.amax(dim=(0, 2)) + 1 + step  # (B,)
        return nxt[None, :, None].expand(position_ids.shape[0], -1, 1)

    def call_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        *,
        text_positions: torch.Tensor | None,
        cache: Any,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        # The mask is the attention function's business (the engine's): the layer gets none.
        return self.layers[index](
            hidden,
            attention_mask=None,
            position_ids=text_positions,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=rotary,
        )

    def site_module(self, index: int, site: str) -> nn.Module:
        layer = self.layers[index]
        modules = {"attn_in": layer.input_layernorm, "attn_out": layer.self_attn, "mlp_out": layer.mlp}
        if site not in modules:
            raise ValueError(f"no module for site {site!r} (sites inside a layer: {', '.join(modules)})")
        return modules[site]

    @property
    def special_ids(self) -> SpecialIds:
        cfg, tok = self.model.config, self.tokenizer

        def cfg_id(*names: str, token: str | None = None) -> int | None:
            for n in names:
                value = getattr(cfg, n, None)
                if value is not None:
                    return int(value)
            if token is not None:
                i = tok.convert_tokens_to_ids(token)
                return None if i is None or i == tok.unk_token_id else int(i)
            return None

        return SpecialIds(
            audio=cfg_id("audio_token_id", "audio_token_index"),
            video=cfg_id("video_token_id", "video_token_index"),
            image=cfg_id("image_token_id", "image_token_index"),
            audio_start=cfg_id("audio_start_token_id", token=self.tokens.get("audio_start")),
            audio_end=cfg_id("audio_end_token_id", token=self.tokens.get("audio_end")),
            vision_start=cfg_id("vision_start_token_id", token=self.tokens["vision_start"]),
            vision_end=cfg_id("vision_end_token_id", token=self.tokens["vision_end"]),
            turn_end=tok.convert_tokens_to_ids("<|im_end|>"),
            system_header=tuple(tok.encode("<|im_start|>system\n", add_special_tokens=False)),
            user_header=tuple(tok.encode("<|im_start|>user\n", add_special_tokens=False)),
            pad=tok.pad_token_id,
        )

    @property
    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None and i >= 0)

    # -- family rules ---------------------------------------------------------------------------------------
    def audio_token_count(self, n_frames: int) -> int:
        """LLM tokens for an audio of ``n_frames`` mel frames."""
        raise NotImplementedError

    def interleave_order(self, video_times: np.ndarray, audio_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ids for the video tokens (n_v,) and audio tokens (n_a,) of an audio-in-video span, given their
        times in position-id units. Tokens are laid out chunk by chunk, video before audio in each chunk."""
        raise NotImplementedError

    @property
    def position_id_per_second(self) -> float:
        return float(getattr(self.model.config, "position_id_per_seconds", 25))

    def _chunk_rule(self, video_times: torch.Tensor, audio_times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, a = self.interleave_order(video_times.numpy(), audio_times.numpy())
        return torch.as_tensor(v), torch.as_tensor(a)

    # -- what follows from ids alone (Adapter.inputs_from_ids, and _collate) -----------------------------------
    def _tensors_from_ids(self, input_ids: torch.Tensor, given: dict[str, Any]) -> dict[str, Any]:
        """Model inputs that follow from the ids alone: ``mm_token_type_ids`` (B, L) (0 text, 1 image, 2 video,
        3 audio) for a family that takes them."""
        if not self.token_types or "mm_token_type_ids" in given:
            return {}
        sid = self.special_ids
        types = torch.zeros_like(input_ids, dtype=torch.int)
        for value, tok in ((1, sid.image), (2, sid.video), (3, sid.audio)):
            if tok is not None:
                types[input_ids == tok] = value
        return {"mm_token_type_ids": types}

    def _interleaved_from_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tensors: dict[str, Any]
    ) -> list[list[VideoGrid]] | None:
        """Per row, the :class:`VideoGrid` of each interleaved span (None when the batch is not interleaved)."""
        flag = self.interleave_kwarg
        grid_thw = tensors.get("video_grid_thw")
        if not flag or not tensors.get(flag) or grid_thw is None:
            return None
        sid = self.special_ids
        seconds = tensors.get(self.video_second_kwarg)
        per_second = float(self.position_id_per_second)
        out: list[list[VideoGrid]] = []
        video = 0  # the media tensors hold the batch's videos in order, row after row
        for row in range(input_ids.shape[0]):
            row_ids = input_ids[row][attention_mask[row].bool()].tolist()
            grids: list[VideoGrid] = []
            start = None
            for i, t in enumerate(row_ids):
                if t == sid.vision_start:
                    start = i
                elif t == sid.vision_end and start is not None:
                    span, start = row_ids[start:i], None
                    if sid.video not in span:
                        continue
                    if video >= len(grid_thw):
                        raise InputError(f"the ids have more video spans than video_grid_thw's {len(grid_thw)} rows")
                    steps = int(grid_thw[video][0])
                    spg = 1.0 if seconds is None else float(seconds[video])
                    video += 1
                    if sid.audio not in span:
                        continue
                    per_step = span.count(sid.video) // steps
                    times = np.repeat(np.arange(steps) * spg * per_second, per_step)
                    audio_times = np.arange(span.count(sid.audio), dtype=np.float64)
                    grids.append(VideoGrid(torch.as_tensor(times), torch.as_tensor(audio_times)))
            out.append(grids)
        return out

    # -- inputs ---------------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[Sample], **options: Any) -> Inputs:
        opts = PrepareOptions(**{**self.options.__dict__, **options})
        errors: list[InputError] = []
        loaded: list[tuple[Sample, list[_LoadedClip]]] = []
        for i, sample in enumerate(samples):
            sample.id = sample.id or str(i)
            try:
                loaded.append((sample, [self._load_clip(c, opts) for c in sample.all_clips()]))
            except InputError as e:
                errors.append(e.for_sample(sample.id))
        videos = [c for _, clips in loaded for c in clips if c.video is not None]
        if self.interleave_kwarg is None or not videos or opts.interleave is False:
            interleave = False
        elif opts.interleave is None:
            interleave = all(c.audio_from_video for c in videos)
        else:
            interleave = True
            loaded, dropped = _require_audio(loaded)
            errors += dropped
        rows, kept = [], []
        for sample, clips in loaded:
            try:
                rows.append(self._build_row(sample, clips, opts, interleave))
                rows[-1]["media"] = {"id": sample.id, "clips": [c.used for c in clips]}
                kept.append(sample)
            except InputError as e:
                errors.append(e.for_sample(sample.id))
        if not rows:
            if len(errors) == 1:
                raise errors[0]
            raise InputError(f"none of the {len(errors)} samples could be built; the first: {errors[0]}")
        return self._collate(rows, kept, errors, interleave)

    def _load_clip(self, clip: Clip, opts: PrepareOptions) -> _LoadedClip:
        if not self.has_audio and clip.audio is not None:
            raise InputError(f"{self.family} takes no audio input")
        video = None
        if clip.video is not None:
            video = _as_video(clip.video, opts)
        track, from_video = None, False
        if self.has_audio:
            rate = self.audio.sampling_rate
            if clip.audio is not None:
                track = _as_audio(clip.audio, rate)
            elif clip.video is not None and clip.video_audio:
                if not isinstance(clip.video, str | Path):
                    raise InputError("in-memory frames carry no audio track: pass audio= or video_audio=False")
                track, from_video = decode_audio(clip.video, sampling_rate=rate), True
        image = None
        if clip.image is not None:
            image = clip.image if isinstance(clip.image, np.ndarray) else load_image(clip.image)
        used = _clip_used(clip, video, track, from_video, image)
        return _LoadedClip(video, None if track is None else track.samples, image, from_video, used)

    def _build_row(self, sample: Sample, clips: list[_LoadedClip], opts: PrepareOptions, interleave: bool) -> dict:
        content: list[dict] = []
        media: list[tuple[str, Any]] = []  # in prompt order: ("video", (pixels, grid, spg, audio?)), ...
        for k, clip in enumerate(clips):
            if len(clips) > 1:
                content.append({"type": "text", "text": sample.clip_label.format(k=k + 1)})
            if clip.image is not None:
                pixels, grid = self.vision.images([clip.image])
                content.append({"type": "image"})
                media.append(("image", (pixels, grid)))
            if clip.video is not None:
                vision = self._vision_for_video(opts)
                pixels, grid = vision.video(clip.video.frames)
                spg = self.vision.temporal_patch_size / clip.video.fps
                inner = clip.audio if interleave else None
                content.append({"type": "video"})
                media.append(("video", (pixels, grid, spg, inner)))
            if clip.audio is not None and not (interleave and clip.video is not None):
                content.append({"type": "audio"})
                media.append(("audio", clip.audio))
        content.append({"type": "text", "text": sample.prompt})
        messages = [{"role": "user", "content": content}]
        if sample.system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": sample.system}]})
        text = self._render(messages, opts.add_generation_prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            warnings.warn(
                oov_message(sample.id, self.source or self.family, unknown_words(self.tokenizer, sample.prompt)),
                stacklevel=3,
            )
        ids, features, grids = self._expand(ids, media)
        if len(ids) > self.max_length:
            raise InputError(f"prompt is {len(ids)} tokens, longer than the model's context ({self.max_length})")
        return {"ids": ids, **features, "grids": grids}

    def _vision_for_video(self, opts: PrepareOptions) -> VisionProcessor:
        if opts.video_max_pixels is None and opts.video_min_pixels is None:
            return self.video_vision
        return replace(
            self.video_vision,
            max_pixels=opts.video_max_pixels or self.video_vision.max_pixels,
            min_pixels=opts.video_min_pixels or self.video_vision.min_pixels,
        )

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = getattr(self.tokenizer, "chat_template", None) or chat_template(self.tokens)
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _expand(self, ids: list[int], media: list[tuple[str, Any]]) -> tuple[list[int], dict, list[VideoGrid]]:
        """Replace each single placeholder token by as many tokens as its media gives (in prompt order)."""
        sid = self.special_ids
        placeholders = {sid.audio: "audio", sid.video: "video", sid.image: "image"}
        merge = self.vision.merge_size**2
        out: list[int] = []
        feats: dict[str, list] = {"audio": [], "video": [], "image": []}
        grids: list[VideoGrid] = []
        queue = list(media)
        for t in ids:
            kind = placeholders.get(t)
            if kind is None:
                out.append(t)
                continue
            if not queue or queue[0][0] != kind:
                raise InputError(f"the chat template put a {kind} placeholder where none was expected")
            _, item = queue.pop(0)
            if kind == "audio":
                n = self._audio_tokens(item)
                out += [sid.audio] * n
                feats["audio"].append(item)
            elif kind == "image":
                pixels, grid = item
                out += [sid.image] * int(grid.prod() // merge)
                feats["image"].append((pixels, grid[0]))
            else:
                pixels, grid, spg, inner = item
                n_video = int(np.prod(grid) // merge)
                feats["video"].append((pixels, grid, spg))
                if inner is None:
                    out += [sid.video] * n_video
                    continue
                n_audio = self._audio_tokens(inner)
                feats["audio"].append(inner)
                per_frame = n_video // int(grid[0])
                v_times = np.repeat(np.arange(grid[0]) * spg * self.position_id_per_second, per_frame)
                a_times = np.arange(n_audio, dtype=np.float64)
                v_chunk, a_chunk = self.interleave_order(v_times, a_times)
                out.append(sid.audio_start)
                out += _interleave_tokens(v_chunk, a_chunk, sid.video, sid.audio)
                out.append(sid.audio_end)
                grids.append(VideoGrid(torch.as_tensor(v_times), torch.as_tensor(a_times)))
        if queue:
            raise InputError("the chat template dropped a media item of the prompt")
        return out, feats, grids

    def _audio_tokens(self, waveform: np.ndarray) -> int:
        return self.audio_token_count(self.audio.n_frames(len(waveform)))

    def _collate(self, rows: list[dict], samples: list[Sample], errors: list[InputError], interleave: bool) -> Inputs:
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.eos_ids[0]
        length = max(len(r["ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, length - len(r["ids"]) :] = torch.tensor(r["ids"])
            attention_mask[i, length - len(r["ids"]) :] = 1
        tensors: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        audios = [a for r in rows for a in r["audio"]]
        if audios:
            feats, mask = self.audio.features(audios)
            tensors["input_features"], tensors["feature_attention_mask"] = feats, mask
        videos = [v for r in rows for v in r["video"]]
        if videos:
            tensors["pixel_values_videos"] = torch.from_numpy(np.concatenate([v[0] for v in videos]))
            tensors["video_grid_thw"] = torch.from_numpy(np.stack([v[1] for v in videos]))
            tensors[self.video_second_kwarg] = torch.tensor([v[2] for v in videos], dtype=torch.float)
        images = [im for r in rows for im in r["image"]]
        if images:
            tensors["pixel_values"] = torch.from_numpy(np.concatenate([im[0] for im in images]))
            tensors["image_grid_thw"] = torch.from_numpy(np.stack([im[1] for im in images]))
        if interleave and self.interleave_kwarg:
            tensors[self.interleave_kwarg] = True
        tensors |= self._tensors_from_ids(input_ids, tensors)
        layout = TokenLayout.from_ids(
            input_ids,
            attention_mask,
            self.special_ids,
            interleaved=[r["grids"] for r in rows],
            chunk_rule=self._chunk_rule,
        )
        media = [r["media"] for r in rows]
        return Inputs(tensors=tensors, layout=layout, samples=samples, errors=errors, media=media)

    # -- the decoder's inputs ---------------------------------------------------------------------------------
    def model_inputs(self, inputs: Inputs) -> dict[str, Any]:
        """The batch's tensors on the model's device (floating point in the model's dtype)."""
        out = {}
        for k, v in inputs.tensors.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, self.dtype if v.is_floating_point() else None)
            out[k] = v
        return out

    def embed(self, inputs: Inputs) -> Embedded:
        captured: dict[str, Any] = {}

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.update(kwargs)
            raise _Embedded

        handle = self.text_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**self.model_inputs(inputs), use_cache=False)
        except _Embedded:
            pass
        finally:
            handle.remove()
        embeds = captured["inputs_embeds"]
        return Embedded(
            embeds=embeds,
            position_ids=captured["position_ids"],
            attention_mask=captured["attention_mask"],
            additions=self._additions(captured, embeds),
        )

    def _additions(self, captured: dict[str, Any], embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-layer residual additions a family's text model makes (none for most)."""
        return {}


class _Embedded(Exception):
    """Raised by the pre-hook to stop the model's forward once the decoder's inputs are known."""


def _require_audio(loaded: list[tuple[Sample, list[_LoadedClip]]]) -> tuple[list, list[InputError]]:
    """Samples whose every video has an audio (needed to interleave), and errors for the others."""
    ok, errors = [], []
    for sample, clips in loaded:
        if any(c.video is not None and c.audio is None for c in clips):
            errors.append(InputError("interleave=True needs an audio for every video", sample=sample.id))
        else:
            ok.append((sample, clips))
    return ok, errors


def _interleave_tokens(v_chunk: np.ndarray, a_chunk: np.ndarray, video_id: int, audio_id: int) -> list[int]:
    out: list[int] = []
    n_chunks = int(max(v_chunk.max(initial=-1), a_chunk.max(initial=-1))) + 1
    for j in range(n_chunks):
        out += [video_id] * int((v_chunk == j).sum())
        out += [audio_id] * int((a_chunk == j).sum())
    return out


def chunked_index(times: np.ndarray, tokens_per_chunk: float) -> np.ndarray:
    """Chunk id of each of a monotone sequence of token times, by the rule of Qwen's processors
    (``get_chunked_index``: a new chunk starts at the first token at or past the next boundary)."""
    ids = np.zeros(len(times), dtype=np.int64)
    current = 1
    for i, t in enumerate(times):
        if t >= current * tokens_per_chunk:
            current += 1
        ids[i] = current - 1
    return ids


def _as_video(v: Media, opts: PrepareOptions) -> VideoClip:
    if isinstance(v, VideoClip):
        return v
    if isinstance(v, np.ndarray):
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
            raise InputError(f"video frames must be uint8 (T, H, W, 3), got {v.dtype} {v.shape}")
        return VideoClip(frames=v, fps=opts.fps, duration=len(v) / opts.fps, source_fps=opts.fps)
    return load_video(v, fps=opts.fps, max_frames=opts.max_frames)


def _as_audio(a: Media, rate: int) -> AudioTrack:
    if isinstance(a, np.ndarray):
        if a.ndim != 1 or a.size == 0:
            raise InputError(f"a waveform must be a non-empty 1-D array, got shape {a.shape}")
        return AudioTrack(a.astype(np.float32), rate, None)
    return decode_audio(a, sampling_rate=rate)


def _clip_used(
    clip: Clip, video: VideoClip | None, track: AudioTrack | None, from_video: bool, image: np.ndarray | None
) -> dict[str, Any]:
    """What of a clip's media the model gets (one entry of ``Inputs.media[row]["clips"]``)."""
    image_used = (
        None if image is None else {"file": _file(clip.image), "height": image.shape[0], "width": image.shape[1]}
    )
    return {
        "video": None if video is None else _video_used(clip.video, video),
        "audio": None if track is None else _audio_used(clip.video if from_video else clip.audio, track, from_video),
        "image": image_used,
    }


def _file(media: Any) -> str | None:
    return str(media) if isinstance(media, str | Path) else None


def _video_used(source: Media, clip: VideoClip) -> dict[str, Any]:
    return {
        "file": _file(source),
        "seconds": float(clip.duration),
        "frames": len(clip.frames),
        "fps": float(clip.fps),
        "source_fps": float(clip.source_fps),
    }


def _audio_used(source: Media, track: AudioTrack, from_video: bool) -> dict[str, Any]:
    # The whole track is used: the audio processor keeps audio longer than its window (media/audio.py).
    return {
        "file": _file(source),
        "from_video": from_video,
        "seconds_used": track.seconds,
        "seconds_total": track.seconds,
        "sampling_rate": track.sampling_rate,
        "source_rate": track.source_rate,
    }


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The distinct words of ``text`` that the tokenizer maps to its unknown token, in order of first use."""
    unk = tokenizer.unk_token_id
    return [w for w in dict.fromkeys(text.split()) if unk in tokenizer.encode(w, add_special_tokens=False)]


def oov_message(sample: str | None, model: str, words: list[str], limit: int = 10) -> str:
    """One line naming the first ``limit`` distinct out-of-vocabulary words and how many more there are (a long
    prompt must not print every word of it)."""
    shown = ", ".join(words[:limit]) + (f" and {len(words) - limit} more" if len(words) > limit else "")
    return f"sample {sample}: {len(words)} word(s) outside {model}'s vocabulary: {shown}"


def _not_found(name: str, error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if Path(name).exists():
        return f"model '{name}': not a loadable checkpoint directory ({first})"
    return (
        f"model '{name}' is not a local directory and could not be fetched from the hub "
        f"(offline, or no such repository): {first}; see `avlens models`, or use `organism` (the bundled model)"
    )


def read_preprocessor_config(name: str) -> tuple[dict, dict]:
    """The checkpoint's preprocessor_config.json (audio features, image patches) and
    video_preprocessor_config.json (video patches), each {} if absent."""
    from transformers.utils import cached_file

    out = []
    for filename in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
        out.append(json.loads(Path(path).read_text()) if path else {})
    return out[0], out[1]
