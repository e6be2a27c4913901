"""Generation: one image or video + prompt, or a whole data split to JSONL, batched with LEFT padding.

Prompts are the conversation without its final assistant turn, rendered by the processor's own chat template
with ``add_generation_prompt=True``; the final assistant turn is the reference. Greedy unless a temperature
is given. A model folder can be a full model, or a PEFT adapter folder whose adapter_config.json names its
base (a LoRA run's ``final/``), or a base plus ``adapter``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune.config import ModelConfig, Recipe, RecipeError
from vlmtune.data.dataset import ConversationDataset
from vlmtune.data.media import load_image
from vlmtune.data.video import load_video, resolve_sampling
from vlmtune.encode import make_encoder, media_of
from vlmtune.errors import GenerateError, SampleError
from vlmtune.families import Family
from vlmtune.model import autocast_dtype, load_model, pick_device
from vlmtune.peft import adapter_base, attach_adapter, is_adapter_dir

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def has_processor(folder: str | Path | None) -> bool:
    """Whether a processor was saved in `folder` (vlmtune saves one beside every adapter)."""
    return folder is not None and any((Path(folder) / f).is_file() for f in PROCESSOR_FILES)


def load_for_inference(model_path: str | Path, adapter: str | Path | None = None, device: torch.device | None = None,
                       model_cfg: ModelConfig | None = None) -> tuple[torch.nn.Module, object, Family]:
    """(model in eval mode, processor, family) from a full model folder / hub id, or an adapter folder.

    `model_cfg` supplies dtype, attention and processor options (e.g. a recipe's ``model`` section); its
    name_or_path is replaced. The processor saved beside an adapter wins over the base's.
    """
    model_path = str(model_path)
    if is_adapter_dir(model_path):
        if adapter is not None:
            raise GenerateError(f"{model_path} is itself an adapter folder; pass its base model as the model")
        adapter, model_path = model_path, adapter_base(model_path)
    cfg = (model_cfg or ModelConfig(name_or_path=model_path)).model_copy(update={"name_or_path": model_path})
    model, processor, family = load_model(cfg, device or torch.device("cpu"),
                                          processor_path=adapter if has_processor(adapter) else None)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, processor, family


def split_conversation(conversation: list[dict]) -> tuple[list[dict], str | None]:
    """(the messages before the final assistant turn, that turn's text); no assistant turn: (all, None)."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    if last is None:
        return conversation, None
    text = "".join(p["text"] for p in conversation[last]["content"] if p["type"] == "text")
    return conversation[:last], text



@dataclass
class Generator:
    """Callable: prompt conversations -> answers, as one left-padded batch."""

    model: torch.nn.Module
    processor: object
    family: Family
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.encoder = make_encoder(self.processor, self.family, max_length=2**31)
        gc = copy.deepcopy(self.model.generation_config)
        sample = self.temperature > 0
        # Stop at the family's end of turn as well as at the model's own end tokens.
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        stop = list(dict.fromkeys([*(i for i in eos if i is not None), *self.encoder.stop_ids()]))
        gc.update(max_new_tokens=self.max_new_tokens, do_sample=sample, pad_token_id=pad, eos_token_id=stop,
                  temperature=self.temperature if sample else None, top_p=self.top_p if sample else None,
                  top_k=gc.top_k if sample else None)
        self.generation_config = gc
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        amp = autocast_dtype(self.device, self.dtype)
        self.amp = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext

    def prompt(self, conversation: list[dict]) -> str:
        return self.encoder.prompt_text(conversation)

    def encode(self, conversations: Sequence[list[dict]]) -> dict:
        """The family's prompt inputs (vlmtune/encode.py), left-padded, on the model's device and dtype."""
        batch = self.encoder.prompt_inputs(conversations)
        return {k: (v.to(self.device).to(self.dtype) if k in self.family.cast_to_model_dtype and v.is_floating_point()
                    else v.to(self.device)) for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, conversations: Sequence[list[dict]], **kwargs):
        """(``model.generate``'s output, prompt width): the new tokens of row i are ``out[i, width:]`` (an
        encoder-decoder's output starts with its decoder prompt too)."""
        inputs = self.encode(conversations)
        with self.amp():
            out = self.model.generate(**inputs, generation_config=self.generation_config, **kwargs)
        return out, inputs[self.encoder.ids_key].shape[1]

    def __call__(self, conversations: Sequence[list[dict]], **kwargs) -> list[str]:
        out, width = self.generate(conversations, **kwargs)
        return [self.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]


def generate_one(model_path: str, image: str | None, prompt: str, adapter: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, device: str = "auto",
                 model_cfg: ModelConfig | None = None, video: str | None = None, video_cfg=None) -> str:
    """The answer of the model to one image and/or video (optional) and a prompt; `video_cfg`: a recipe's
    ``data.video`` (frame sampling; default: the model's video processor settings)."""
    content: list[dict] = []
    if image is not None:
        if not Path(image).is_file():
            raise GenerateError(f"--image {image!r} does not exist")
        try:  # decoded as for training: EXIF orientation, high bit depth, transparency
            content.append({"type": "image", "image": load_image(Path(image).resolve(), None, 0)})
        except SampleError as e:
            raise GenerateError(f"--image {image!r}: {e}") from e
    if video is not None and not Path(video).exists():
        raise GenerateError(f"--video {video!r} does not exist")
    model, processor, family = load_for_inference(model_path, adapter, pick_device(device), model_cfg)
    if video is not None:
        content.append({"type": "video", "video": _decode_video(video, processor, video_cfg)})
    content.append({"type": "text", "text": prompt})
    gen = Generator(model, processor, family, max_new_tokens, temperature)
    return gen([[{"role": "user", "content": content}]])[0]


def _decode_video(path: str, processor, video_cfg) -> object:
    if getattr(processor, "video_processor", None) is None:
        raise GenerateError(f"--video: the model's processor ({type(processor).__name__}) takes no video")
    sampling = resolve_sampling(video_cfg, processor.video_processor)
    try:
        return load_video(str(Path(path).absolute()), None, 0, sampling)
    except SampleError as e:
        raise GenerateError(f"--video {path!r}: {str(e).removeprefix('row 0: ')}") from None


def default_model(recipe: Recipe) -> str:
    """What ``generate -c RECIPE`` uses without --model: the run's final model if it exists, else the base."""
    final = Path(recipe.output_dir) / "final"
    return str(final) if final.is_dir() else recipe.model.name_or_path


def _batches(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start:start + size])


def predict(gen: Generator, ds: ConversationDataset, indices: Sequence[int], batch_size: int,
            skipped: list | None = None, **generate_kwargs) -> Iterator[dict]:
    """A prediction row per sample of `indices`: ``{"index", "prompt", "reference", "prediction"}``, plus
    ``"parsed"`` where the processor reads its model's output into structure (Nemotron-Parse: the page's blocks).
    The prompt is the conversation without its final assistant turn, which is the reference. Samples whose record
    cannot be read are appended to `skipped` (index, reason) and left out."""
    parse = getattr(gen.processor, "parse", None)
    for idx in _batches(indices, batch_size):
        items = []
        for i in idx:
            try:
                items.append((i, *split_conversation(ds.conversation(i))))
            except SampleError as e:
                if skipped is not None:
                    skipped.append((i, e.reason))
        if not items:
            continue
        predictions = gen([conv for _, conv, _ in items], **generate_kwargs)
        for (i, conv, reference), prediction in zip(items, predictions, strict=True):
            row = {"index": i, "prompt": gen.prompt(conv), "reference": reference, "prediction": prediction}
            if callable(parse):
                row["parsed"] = parse(prediction, media_of(conv, "image")[0].size)
            yield row


def generate_split(recipe: Recipe, split: str, out: str | Path, model_path: str | None = None,
                   adapter: str | None = None, limit: int | None = None, batch_size: int = 8,
                   max_new_tokens: int = 128, temperature: float = 0.0) -> tuple[Path, int, int]:
    """Predictions for a data split as JSONL (see :func:`predict`), one line per sample.

    Returns (path, samples written, samples skipped because their record could not be read).
    """
    model, processor, family, ds = split_model_and_data(recipe, split, model_path, adapter, "generate")
    gen = Generator(model, processor, family, max_new_tokens, temperature)
    n = len(ds) if limit is None else min(limit, len(ds))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped: list = []
    written = 0
    with out.open("w") as f:
        for row in predict(gen, ds, range(n), batch_size, skipped):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written += 1
    for i, reason in skipped:
        print(f"vlmtune generate: skipped sample {i} ({reason})", file=sys.stderr)
    return out, written, len(skipped)


def split_model_and_data(recipe: Recipe, split: str, model_path: str | None, adapter: str | None,
                         command: str) -> tuple[torch.nn.Module, object, Family, ConversationDataset]:
    """The model to generate with (`model_path`, else the run's final/ folder, else the base) and the split."""
    spec = split_spec(recipe, split, command)
    model_path = model_path or default_model(recipe)
    print(f"vlmtune {command}: model {model_path}" + (f" + adapter {adapter}" if adapter else ""), file=sys.stderr)
    model, processor, family = load_for_inference(model_path, adapter, pick_device(recipe.train.device), recipe.model)
    return model, processor, family, split_dataset(recipe, split, spec, processor)


def split_spec(recipe: Recipe, split: str, command: str):
    spec = recipe.data.train if split == "train" else recipe.data.validation
    if spec is None:
        raise RecipeError(f"{command} --split {split}: the recipe has no data.{split}")
    return spec


def split_dataset(recipe: Recipe, split: str, spec, processor) -> ConversationDataset:
    """A split's conversations as training reads them: the recipe's image cap and video sampling (for this
    processor)."""
    video = resolve_sampling(recipe.data.video, getattr(processor, "video_processor", None))
    return ConversationDataset(spec, f"data.{split}", recipe.data.max_image_pixels, video)
