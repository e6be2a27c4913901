"""Conversation -> token ids + labels (assistant-only): the one module that encodes.

:func:`SampleEncoder.__call__` is the one place that owns token ids and the loss mask together: it renders
the conversation with the processor's own chat template, lets the processor expand image tokens, then marks
as trained exactly the assistant answers plus the token(s) that end each assistant turn, using the family's
markers. It checks its own work by decoding the trained spans and comparing them with the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import jinja2
import torch

from vlmtune.data.dataset import ConversationDataset
from vlmtune.data.video import Video, resolve_sampling, video_inputs
from vlmtune.errors import ModelLoadError, SampleError
from vlmtune.families import Family

IGNORE = -100


@dataclass
class Encoded:
    """One processed sample. ``tensors`` holds every processor output; sequence-aligned ones are 1-D."""

    index: int
    tensors: dict[str, torch.Tensor]
    seq_keys: tuple[str, ...]  # keys aligned with the token ids (padded in batches); the rest are concatenated
    shortened: str = ""  # how a sample over train.max_length was made to fit (train.overlong), counted in the summary
    ids_key: str = "input_ids"  # the token ids ``labels`` is aligned with (an encoder-decoder's: the decoder's)
    # Each image and video as the processor expanded it, in order: {"type", "tokens"} (+ "frames" for a video).
    media: tuple[dict, ...] = ()

    @property
    def length(self) -> int:
        return int(self.tensors[self.ids_key].numel())

    @property
    def supervised(self) -> int:
        return int((self.tensors["labels"] != IGNORE).sum())


@dataclass
class Skipped:
    index: int
    reason: str
    message: str


def find_subsequence(seq: list[int], sub: list[int], start: int) -> int:
    """Index of the first occurrence of `sub` in `seq` at or after `start`, or -1."""
    n = len(sub)
    first = sub[0]
    for i in range(start, len(seq) - n + 1):
        if seq[i] == first and seq[i : i + n] == sub:
            return i
    return -1


def assistant_spans(ids: list[int], start_ids: list[int], end_ids: list[int],
                    skip_prefixes: Sequence[list[int]] = ()) -> list[tuple[int, int]]:
    """[begin, end) token spans of each assistant answer including its end marker.

    `skip_prefixes`: token runs a template may put between the marker and the answer (an empty think block);
    they are not trained.
    """
    spans, pos = [], 0
    while (s := find_subsequence(ids, start_ids, pos)) >= 0:
        begin = s + len(start_ids)
        for prefix in skip_prefixes:
            if prefix and ids[begin : begin + len(prefix)] == prefix:
                begin += len(prefix)
                break
        e = find_subsequence(ids, end_ids, begin)
        if e < 0:  # an answer that never ends (cut off): not trainable
            break
        spans.append((begin, e + len(end_ids)))
        pos = e + len(end_ids)
    return spans


def _answers(conversation: list[dict]) -> list[str]:
    return ["".join(p["text"] for p in m["content"] if p["type"] == "text")
            for m in conversation if m["role"] == "assistant"]


def _append_text(message: dict, suffix: str) -> dict:
    """`message` with `suffix` glued to its last text part (a new part only if it has none). A separate part would
    let the template put its part separator (LLaVA 1.5: a space) between the answer and the suffix."""
    content = list(message["content"])
    last = max((i for i, p in enumerate(content) if p["type"] == "text"), default=None)
    if last is None:
        content.append({"type": "text", "text": suffix})
    else:
        content[last] = {**content[last], "text": content[last]["text"] + suffix}
    return {**message, "content": content}


def media_of(conversation: list[dict], kind: str) -> list:
    """The images (PIL) or videos (lists of PIL frames) of a conversation, in order."""
    return [p[kind] for m in conversation for p in m["content"] if p["type"] == kind]


@dataclass
class SampleEncoder:
    """Callable Conversation -> Encoded. Picklable, so DataLoader workers can run it."""

    ids_key: ClassVar[str] = "input_ids"

    processor: object
    family: Family
    max_length: int
    overlong: str = "drop"  # or "truncate_text": cut text after the last image; "fewer_frames": fewer video frames
    vision_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        self.start_ids = tok(self.family.assistant_start, add_special_tokens=False)["input_ids"]
        self.end_ids = tok(self.family.assistant_end, add_special_tokens=False)["input_ids"]
        self.skip_prefixes = [tok(p, add_special_tokens=False)["input_ids"] for p in self.family.answer_prefixes]
        ids = {getattr(self.processor, a, None) for a in ("image_token_id", "video_token_id")}
        ids |= {getattr(tok, a, None) for a in ("image_token_id", "video_token_id")}
        self.vision_token_ids = frozenset(self.vision_token_ids | {i for i in ids if isinstance(i, int)})
        self._check_template()

    def _check_template(self) -> None:
        """Render a plain two-turn chat once: a template that cannot render (none, a syntax error, one transformers'
        sandbox refuses) stops here with one message, not in every sample of the run."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
        try:
            self.render(probe)
        except (jinja2.TemplateError, ValueError) as e:
            why = ("transformers' sandbox refused it (it calls something a template may not)"
                   if isinstance(e, jinja2.exceptions.SecurityError) else str(e).splitlines()[0])
            raise ModelLoadError(
                f"the model's chat template cannot render a plain user/assistant chat: {why}. vlmtune renders every "
                "sample with it; fix chat_template.jinja (or the processor's chat_template) in the model folder")\
                from e

    def render(self, conversation: list[dict]) -> str:
        if self.family.append_eos:  # the template ends assistant turns with no EOS: add it to the answer text
            eos = self.processor.tokenizer.eos_token
            conversation = [_append_text(m, eos) if m["role"] == "assistant" else m for m in conversation]
        return self.processor.apply_chat_template(conversation, tokenize=False)

    def __call__(self, conversation: list[dict], index: int) -> Encoded:
        out, media = self.process(conversation, index)
        shortened = ""
        if out["input_ids"].shape[1] > self.max_length and self.overlong == "fewer_frames":
            conversation, out, media = self.fewer_frames(conversation, out, media, index)
            shortened = self.overlong
        ids = out["input_ids"][0].tolist()
        labels = self.labels(ids, conversation, index)
        length = len(ids)
        seq_keys = tuple(k for k, v in out.items()
                         if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == out["input_ids"].shape)
        tensors = {k: (v[0] if k in seq_keys else v) for k, v in out.items() if isinstance(v, torch.Tensor)}
        tensors["labels"] = torch.tensor(labels)
        if length > self.max_length:
            tensors, shortened = self.shorten(tensors, seq_keys, index, length), self.overlong
        enc = Encoded(index, tensors, (*seq_keys, "labels"), shortened, media=media)
        if enc.supervised == 0:
            raise SampleError("no_supervised_tokens", f"sample {index}: no assistant tokens to train on")
        return enc

    def process(self, conversation: list[dict], index: int) -> tuple[dict, tuple[dict, ...]]:
        """The processor's output for the rendered conversation, and how it expanded each image and video."""
        text = self.render(conversation)
        images, videos = media_of(conversation, "image"), media_of(conversation, "video")
        if images and videos and self.family.no_images_with_video:
            why = self.family.no_images_with_video
            raise SampleError("images_with_video", f"sample {index}: images and a video in one sample cannot be "
                                                   f"trained with {self.family.name}: {why}; put them in separate "
                                                   "samples")
        media = {**({"images": images} if images else {}), **video_inputs(videos)}
        # A template that writes the BOS itself (Gemma, Llama 4) must not get a second one from the tokenizer:
        # the rule of transformers' own apply_chat_template(tokenize=True).
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        no_bos = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        try:
            out = self.processor(text=[text], **media, **no_bos, return_tensors="pt",
                                 return_text_replacement_offsets=True)
        except (ValueError, RuntimeError) as e:  # processors raise these on token/image count mismatches
            raise SampleError("placeholder_mismatch", f"sample {index}: the processor rejected it: {e}") from e
        return out, self._expansions(out.pop("text_replacement_offsets", None), videos)

    def _expansions(self, offsets, videos: list) -> tuple[dict, ...]:
        """{"type", "tokens"} per image / video (+ "frames"), from the processor's replacement texts."""
        # A sample without media comes back as None, or as an empty (1, 0) tensor where return_tensors="pt"
        # converted the empty list (InternVL).
        if offsets is None or len(offsets) == 0 or len(offsets[0]) == 0:
            return ()
        frames = iter(videos)
        tok = self.processor.tokenizer
        out = []
        for r in offsets[0]:
            item = {"type": r["type"], "tokens": len(tok(r["replacement"], add_special_tokens=False)["input_ids"])}
            if r["type"] == "video":
                item["frames"] = len(next(frames, ()))
            out.append(item)
        return tuple(out)

    def fewer_frames(self, conversation: list[dict], out: dict, media: tuple[dict, ...],
                     index: int) -> tuple[list[dict], dict, tuple[dict, ...]]:
        """train.overlong=fewer_frames: the sample's videos with fewer of their frames (spread uniformly, multiples of
        the temporal patch), fewer each round, until it fits; too_long when one frame per video (one patch) is still
        too long. Only the frame count changes: never a cut through video tokens."""
        for _ in range(16):
            length = out["input_ids"].shape[1]
            if length <= self.max_length:
                return conversation, out, media
            videos = media_of(conversation, "video")
            share = _keep_share(length, self.max_length, media)
            new = [_fewer(v, share) for v in videos]
            if not videos or all(len(n) == len(v) for n, v in zip(new, videos, strict=True)):
                break
            conversation = _with_videos(conversation, new)
            out, media = self.process(conversation, index)
        frames = ", ".join(str(len(v)) for v in media_of(conversation, "video")) or "no video"
        raise SampleError("too_long", f"sample {index}: {out['input_ids'].shape[1]} tokens > train.max_length="
                                      f"{self.max_length} with the fewest frames ({frames}); raise train.max_length, "
                                      "lower the video resolution (model.processor_kwargs) or shorten the text")

    def labels(self, ids: list[int], conversation: list[dict], index: int) -> list[int]:
        spans = assistant_spans(ids, self.start_ids, self.end_ids, self.skip_prefixes)
        answers = _answers(conversation)
        if len(spans) != len(answers):
            raise SampleError(
                "assistant_markers",
                f"sample {index}: found {len(spans)} assistant turn(s) marked by {self.family.assistant_start!r}"
                f"...{self.family.assistant_end!r} in the rendered chat, but the conversation has {len(answers)}; "
                f"the {self.family.name} family rule in vlmtune/families.py does not match this chat template",
            )
        labels = [IGNORE] * len(ids)
        tok = self.processor.tokenizer
        for (b, e), answer in zip(spans, answers, strict=True):
            labels[b:e] = ids[b:e]
            # Self-check: what we train on must decode to the answer and the end-of-turn marker, nothing else.
            got = tok.decode(ids[b:e])
            want = answer + self.family.assistant_end
            # Templates that trim message text (Gemma, Llama 4) drop the whitespace around an answer.
            if got.strip() not in (want.strip(), (answer.strip() + self.family.assistant_end).strip()):
                raise SampleError("label_mismatch",
                                  f"sample {index}: trained span decodes to {got!r}, expected {want!r}")
        return labels

    def prompt_text(self, conversation: list[dict]) -> str:
        """What the model reads before it answers: the chat up to the assistant's turn."""
        return self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def prompt_inputs(self, conversations: Sequence[list[dict]]) -> dict[str, torch.Tensor]:
        """Generation inputs for conversations without their answer, as one batch LEFT-padded (generation appends
        on the right); the prompt ids are under ``input_ids``."""
        texts = [self.prompt_text(c) for c in conversations]
        # Per sample, nested: some processors (Gemma 3) count images per prompt and reject a flat list.
        per_sample = [media_of(c, "image") for c in conversations]
        images = {"images": per_sample} if any(per_sample) else {}
        videos = video_inputs([v for c in conversations for v in media_of(c, "video")])
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = self.processor(text=texts, **images, **videos, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: the family's end-of-turn marker (when it is one token) and EOS."""
        tok = self.processor.tokenizer
        ids = [self.end_ids[0]] if len(self.end_ids) == 1 else []
        return [*ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])]

    def shorten(self, tensors: dict, seq_keys: Sequence[str], index: int, length: int) -> dict:
        ids = tensors["input_ids"]
        vision_pos = [i for i, t in enumerate(ids.tolist()) if t in self.vision_token_ids]
        last_vision = vision_pos[-1] if vision_pos else -1
        if self.overlong == "truncate_text" and last_vision < self.max_length:
            cut = {k: (v[: self.max_length] if k in (*seq_keys, "labels") else v) for k, v in tensors.items()}
            self._never_end_a_cut_answer(cut["labels"], tensors["labels"])
            if (cut["labels"] != IGNORE).any():
                return cut
        raise SampleError(
            "too_long",
            f"sample {index}: {length} tokens > train.max_length={self.max_length} (image tokens end at "
            f"{last_vision + 1}); raise train.max_length, lower the image resolution (model.processor_kwargs), "
            "or set train.overlong=truncate_text to cut text after the last image",
        )


    def _never_end_a_cut_answer(self, cut: torch.Tensor, full: torch.Tensor) -> None:
        """An answer the cut goes through keeps its trained text, but never a piece of its end-of-turn marker:
        a cut answer is not taught to end. (Single-token markers cannot be split; multi-token ones can.)"""
        n = cut.shape[0]
        if n == 0 or full[n - 1] == IGNORE or full[n] == IGNORE:  # the cut is not inside an answer
            return
        tail = cut.tolist()
        for k in range(len(self.end_ids) - 1, 0, -1):
            if tail[-k:] == self.end_ids[:k]:
                cut[n - k:] = IGNORE
                return


def _keep_share(length: int, budget: int, media: tuple[dict, ...]) -> float:
    """The share of its frames each video keeps so that the sample would fit, if video tokens scale with frames."""
    video_tokens = sum(m["tokens"] for m in media if m["type"] == "video") or length
    return max(0.0, (video_tokens - (length - budget)) / video_tokens)


def _fewer(video, share: float):
    """`video` (a decoded Video) with `share` of its frames, at least one frame (one temporal patch) fewer."""
    if not isinstance(video, Video) or len(video) <= 1:
        return video
    step = video.multiple if len(video) >= 2 * video.multiple else 1
    return video.fewer(max(min(int(len(video) * share), len(video) - step), 1))  # fewer() keeps whole patches


def _with_videos(conversation: list[dict], videos: list) -> list[dict]:
    """A copy of `conversation` whose video parts are `videos`, in order."""
    it = iter(videos)
    return [{**m, "content": [{**p, "video": next(it)} if p["type"] == "video" else p for p in m["content"]]}
            for m in conversation]


@dataclass
class PromptEncoder:
    """Callable Conversation -> Encoded for encoder-decoder families (``Family.encoding == "prompt"``, e.g.
    Nemotron-Parse): the image goes to the encoder; the decoder reads a prompt (the user turn's text: task tokens,
    never trained) and then writes the answer, trained with its end token. The ids and labels are the decoder's
    (``decoder_input_ids``), aligned as for decoder-only models: ``labels[t]`` is the token at ``t``, -100 where
    nothing is trained, so the loss is the same code. Picklable, so DataLoader workers can run it."""

    ids_key: ClassVar[str] = "decoder_input_ids"
    processor: object
    family: Family
    max_length: int
    overlong: str = "drop"  # or "truncate_text": cut the answer (never taught to end)

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        self.end_ids = [tok.eos_token_id]

    def _parts(self, conversation: list[dict], index: int) -> tuple[str, str | None]:
        answers = _answers(conversation)
        if len(answers) > 1 or len(media_of(conversation, "image")) != 1 or media_of(conversation, "video"):
            raise SampleError("placeholder_mismatch", f"sample {index}: a {self.family.name} sample is one image, "
                                                      "a prompt and at most one answer")
        prompt = "".join(p["text"] for m in conversation if m["role"] == "user" for p in m["content"]
                         if p["type"] == "text")
        return prompt, (answers[0] if answers else None)

    def prompt_text(self, conversation: list[dict]) -> str:
        return self._parts(conversation, -1)[0]

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def __call__(self, conversation: list[dict], index: int) -> Encoded:
        prompt, answer = self._parts(conversation, index)
        tok = self.processor.tokenizer
        prompt_ids = self._prompt_ids(prompt)
        answer_ids = tok(answer or "", add_special_tokens=False)["input_ids"] + self.end_ids
        ids = prompt_ids + answer_ids
        labels = [IGNORE] * len(prompt_ids) + answer_ids
        got, want = tok.decode(answer_ids), (answer or "") + tok.eos_token
        if got.strip() != want.strip():  # self-check, as for chats: the trained tokens are the answer + end
            raise SampleError("label_mismatch", f"sample {index}: trained span decodes to {got!r}, expected {want!r}")
        shortened = ""
        if len(ids) > self.max_length:
            if self.overlong != "truncate_text" or len(prompt_ids) >= self.max_length - 1:
                raise SampleError("too_long", f"sample {index}: {len(ids)} decoder tokens > train.max_length="
                                              f"{self.max_length}; raise train.max_length or set "
                                              "train.overlong=truncate_text to cut the answer")
            # The end token is past the cut: the cut answer is not taught to end.
            ids, labels, shortened = ids[: self.max_length], labels[: self.max_length], self.overlong
        try:
            pixels = self.processor(images=media_of(conversation, "image"), return_tensors="pt")["pixel_values"]
        except (ValueError, RuntimeError, OSError) as e:
            raise SampleError("unreadable_image", f"sample {index}: the image processor rejected it: {e}") from e
        tensors = {"pixel_values": pixels, "decoder_input_ids": torch.tensor(ids),
                   "decoder_attention_mask": torch.ones(len(ids), dtype=torch.long), "labels": torch.tensor(labels)}
        return Encoded(index, tensors, ("decoder_input_ids", "decoder_attention_mask", "labels"), shortened,
                       ids_key=self.ids_key)

    def prompt_inputs(self, conversations: Sequence[list[dict]]) -> dict[str, torch.Tensor]:
        """The images and the decoder prompts, LEFT-padded, under ``decoder_input_ids``."""
        prompts = [self._prompt_ids(self._parts(c, -1)[0]) for c in conversations]
        width, pad = max(map(len, prompts)), self.processor.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        pixels = self.processor(images=[media_of(c, "image")[0] for c in conversations],
                                return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "decoder_input_ids": ids, "decoder_attention_mask": mask}

    def stop_ids(self) -> list[int]:
        return list(self.end_ids)


ENCODERS = {"chat": SampleEncoder, "prompt": PromptEncoder}


def make_encoder(processor, family: Family, max_length: int, overlong: str = "drop") -> SampleEncoder | PromptEncoder:
    """The family's encoder (``Family.encoding``): chats through the chat template, or an encoder-decoder's
    prompt + answer."""
    return ENCODERS[family.encoding](processor, family, max_length, overlong)


class EncodedDataset:
    """A data source's samples, encoded: each item is an :class:`Encoded` sample, or a :class:`Skipped` record
    saying why not. DataLoader workers run it (decoding, the processor and the labels)."""

    def __init__(self, conversations: ConversationDataset, encoder: SampleEncoder):
        self.conversations, self.encoder = conversations, encoder

    @classmethod
    def of(cls, spec, encoder: SampleEncoder, where: str, **options) -> EncodedDataset:
        """The encoded samples of data source `spec` (a DataSource; `where`: its key path, for messages;
        `options`: ConversationDataset's, ``video`` the recipe's ``data.video``, completed by the model's video
        processor settings)."""
        video = resolve_sampling(options.pop("video", None), getattr(encoder.processor, "video_processor", None))
        return cls(ConversationDataset(spec, where, video=video, **options), encoder)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Encoded | Skipped:
        try:
            return self.encoder(self.conversations.conversation(index), index)
        except SampleError as e:
            return Skipped(index, e.reason, str(e))
