"""What the benchmark peers share: the model, the data and its order, the schedule, and the measurements.

Imported by the child processes (bench/peers.py) and by the GPU benchmark; torch, transformers and vlmtune
are imported inside functions, so importing this module is cheap.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

IGNORE = -100
ASSISTANT_START = "<|im_start|>assistant\n"  # the Qwen chat template's assistant marker
ASSISTANT_END = "<|im_end|>"
# The processor of the tiny bench model: at most 224 x 224 pixels -> 16 x 16 patches -> 64 image tokens (as the
# demo; min_pixels / max_pixels, since the Qwen processor files carry those and they win over `size=`).
BENCH_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}


# ---------------------------------------------------------------------------------------------------------
# The model: Qwen2.5-VL architecture, random weights, the real Qwen processor and 152k vocabulary


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] for head_dim 128, scaled: (t, h, w) sections that sum to head_dim / 2."""
    if head_dim % 16:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 16 for the mrope sections")
    return [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]


def text_config(hidden_size: int, layers: int, heads: int | None = None, kv_heads: int = 2,
                intermediate_size: int | None = None, vocab_size: int = 151936) -> dict:
    heads = heads or max(4, hidden_size // 64)
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(f"hidden_size {hidden_size} / {heads} heads / {kv_heads} kv heads do not divide")
    head_dim = hidden_size // heads
    return dict(hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                vocab_size=vocab_size, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(head_dim)},
                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def vision_config(hidden_size: int, depth: int, out_hidden_size: int, heads: int | None = None,
                  intermediate_size: int | None = None, window_size: int = 112,
                  fullatt_block_indexes: list[int] | None = None) -> dict:
    """Qwen2.5-VL's vision tower: full attention every 8th block (7, 15, 23, 31 in the real one), else windows."""
    heads = heads or max(2, hidden_size // 32)
    if fullatt_block_indexes is None:
        fullatt_block_indexes = list(range(min(7, depth - 1), depth, 8))
    return dict(depth=depth, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                num_heads=heads, out_hidden_size=out_hidden_size, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=fullatt_block_indexes,
                in_channels=3, hidden_act="silu")


def qwen2_5_vl_config(text: dict, vision: dict):
    from transformers import Qwen2_5_VLConfig

    # Token ids are the real Qwen ones (vlmtune/assets/qwen2-vl/added_tokens.json).
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653,
                            tie_word_embeddings=text["tie_word_embeddings"])


def bench_model_config(hidden_size: int = 256, layers: int = 4, vision_hidden: int = 128, vision_depth: int = 4):
    """The CPU comparison's model: ~45M parameters at the defaults, ~39M of them the tied 152k x 256 embedding."""
    return qwen2_5_vl_config(text_config(hidden_size, layers),
                             vision_config(vision_hidden, vision_depth, out_hidden_size=hidden_size))


def build_model(out: Path, config, seed: int = 0, pixels: dict | None = None) -> dict:
    """Write a randomly initialised model and the real Qwen processor to `out` (reused when the config matches)."""
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from vlmtune.demo import ASSETS

    out = Path(out)
    stamp = out / "bench_stamp.json"
    want = {"config": config.to_dict(), "seed": seed, "pixels": pixels or BENCH_PIXELS}
    want = json.loads(json.dumps(want, sort_keys=True, default=str))
    if stamp.is_file() and (out / "model.safetensors").is_file():
        have = json.loads(stamp.read_text())
        if have.get("stamp") == want:
            return have["info"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643, max_new_tokens=64)
    processor = AutoProcessor.from_pretrained(ASSETS, **(pixels or BENCH_PIXELS))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = parameter_counts(model)
    stamp.write_text(json.dumps({"stamp": want, "info": info}, indent=1))
    return info


def parameter_counts(model) -> dict:
    """Unique parameters (tied embedding counted once), split into vision tower (+ merger) and the rest."""
    seen, total, vision = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".visual." in f".{name}":
            vision += p.numel()
    return {"parameters": total, "vision_parameters": vision, "text_parameters": total - vision}


# ---------------------------------------------------------------------------------------------------------
# The data: vlmtune's synthetic cord-v2 receipts, in the order vlmtune's sampler reads them


def write_data(folder: Path, n_train: int, seed: int = 0, image_size: tuple[int, int] = (224, 224)) -> Path:
    from vlmtune.data.synthetic import write_synthetic_cord

    return write_synthetic_cord(Path(folder), n_train=n_train, n_validation=0, seed=seed, image_size=image_size)


# The mixed workload (issue 19): images from 224 x 224 (64 tokens) to 1,280 tokens, answers of 30-400 tokens, one
# sample in five text-only; unpacked micro-batches of 4 carry 30-50% padding. Images are multiples of 28 pixels (a
# merged 2 x 2 patch group of Qwen2-VL ... 2.5-VL) below MIXED_PIXELS, so the processor keeps their size.
MIXED_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 1280 * 28 * 28}
MIXED_VERSION = 1
WORD_TEXT = ("the a of and to in is it that for on with as was at by this from be or are an have not but which "
             "one all they we there can more if about their would so up out what when time new some could them "
             "two other than then only its also first over after into year like most our work used way many where "
             "well may even back any good people these through such long because each just those how both made "
             "part between own same last total price item number date store cash change card paid receipt amount "
             "tax sub order table name list value small large red blue green left right top bottom line text page "
             "image photo shows near under color white black light dark shape round square three four five six "
             "seven eight nine ten")
WORDS = WORD_TEXT.split()


def mixed_sample(rng, index: int) -> dict:
    """One row of the mixed workload: ``images`` (0 or 1 PIL image) and ``messages`` (user, assistant)."""
    from PIL import Image, ImageDraw

    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 400)))
    if rng.random() < 0.2:  # text only
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) + "?"
        return {"images": [], "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}
    tokens = rng.randint(64, 1280)
    aspect = rng.uniform(0.5, 2.0)
    rows = max(2, min(40, round((tokens / aspect) ** 0.5)))
    cols = max(2, min(tokens // rows, 1280 // rows))
    image = Image.new("RGB", (28 * cols, 28 * rows), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.randrange(image.width), rng.randrange(image.height)
        draw.rectangle((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    question = f"Sample {index}: what does this image show?"
    return {"images": [image], "messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}


def write_mixed_data(folder: Path, n_train: int, seed: int = 0) -> Path:
    """The mixed workload as a ``messages``-format parquet dataset (vlmtune reads it; TRL's conversational vision
    format too), reused when it exists with the same arguments."""
    import random

    import datasets

    folder = Path(folder)
    stamp, data = folder / "mixed_stamp.json", folder / "data" / "train-00000-of-00001.parquet"
    want = {"version": MIXED_VERSION, "n_train": n_train, "seed": seed}
    if stamp.is_file() and data.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    rng = random.Random(seed)
    rows = [mixed_sample(rng, i) for i in range(n_train)]
    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "messages": [turn]})
    data.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features).to_parquet(str(data))
    stamp.write_text(json.dumps(want))
    return folder


def vlmtune_order(n_rows: int, n_samples: int, seed: int) -> list[int]:
    """The row indices vlmtune's training loop reads, in order (one seeded permutation per epoch)."""
    from vlmtune.data.dataset import EpochSampler

    sampler, order, epoch = EpochSampler(n_rows, seed), [], 0
    while len(order) < n_samples:
        order += sampler.order(epoch)
        epoch += 1
    return order[:n_samples]


def peer_rows(data_dir: Path, order: list[int]) -> list[dict]:
    """For the peers: each row's prompt and answer text, exactly as vlmtune's cord_v2 format builds them."""
    from datasets import load_dataset

    from vlmtune.config import DataSource
    from vlmtune.data.formats import to_conversation

    rows = load_dataset(str(data_dir), split="train")
    spec = DataSource(source=str(data_dir), format="cord_v2", split="train")
    out = []
    for i in sorted(set(order)):
        conv = to_conversation(rows[i], "cord_v2", spec, Path(data_dir), i)
        user, assistant = conv
        kinds = [p["type"] for p in user["content"]]
        if (user["role"], assistant["role"], kinds) != ("user", "assistant", ["image", "text"]):
            raise RuntimeError(f"row {i}: unexpected conversation shape {kinds}")
        out.append({"row": i, "prompt": user["content"][1]["text"],
                    "answer": "".join(p["text"] for p in assistant["content"])})
    return out


def peer_dataset(data_dir: Path, order: list[int], rows: list[dict]):
    """A datasets.Dataset in TRL's conversational vision format ({images, messages}), already in training
    order, so a sequential sampler reads exactly what vlmtune's sampler reads. `rows` empty: the data are
    already in that format (the mixed workload)."""
    import datasets

    if not rows:
        src = datasets.load_dataset(str(data_dir), split="train")
        return src.select(order).add_column("row", list(order))

    text = {r["row"]: r for r in rows}
    src = datasets.load_dataset(str(data_dir), split="train")
    images = [[src[i]["image"]] for i in order]
    messages = [[{"role": "user", "content": text[i]["prompt"]}, {"role": "assistant", "content": text[i]["answer"]}]
                for i in order]
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "row": datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict({"images": images, "messages": messages, "row": list(order)},
                                      features=features)


# ---------------------------------------------------------------------------------------------------------
# Measurements


def sample_lengths(batch: dict) -> list[int]:
    """Tokens of each sample of a micro-batch: padded rows (attention_mask), or one packed row (vlmtune packing:
    no attention_mask, the 1-D text positions restart at 0 for each sample)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1).tolist()
    pos = batch["position_ids"]
    pos = pos[0, 0] if pos.dim() == 3 else pos[0]  # Qwen packed: (4, 1, N), row 0 holds the text positions
    starts = [*(pos == 0).nonzero().flatten().tolist(), pos.numel()]
    return [b - a for a, b in itertools.pairwise(starts)]


def batch_stats(batch: dict) -> dict:
    """Tokens of one collated micro-batch: non-pad, padded (rows x width), supervised (labels[:, 1:] != -100:
    the positions a causal LM loss actually scores), samples."""
    labels, lengths = batch["labels"], sample_lengths(batch)
    return {"tokens": sum(lengths), "padded": int(labels.numel()),
            "supervised": int((labels[:, 1:] != IGNORE).sum()), "samples": len(lengths)}


class CountingCollator:
    """Wraps a collate function; records batch_stats of every batch it builds, in order."""

    def __init__(self, inner, log: list):
        self.inner, self.log = inner, log

    def __call__(self, items, *args, **kwargs):
        batch = self.inner(items, *args, **kwargs)
        if "labels" in batch:
            self.log.append(batch_stats(batch))
        return batch


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def vm_hwm_kib() -> int | None:
    """Peak resident set size of this process so far (VmHWM), in KiB."""
    return _status_kib("VmHWM")


def vm_rss_kib() -> int | None:
    """Resident set size of this process now (VmRSS), in KiB."""
    return _status_kib("VmRSS")


def now() -> float:
    return time.perf_counter()


def cpu_now() -> float:
    """CPU time of this process, all its threads, in seconds: less sensitive than wall time to other load."""
    return time.process_time()


def offline_env(extra: dict | None = None) -> dict:
    """The environment of a child run: no network (everything comes from disk), no telemetry."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"})
    env.update(extra or {})
    return env


def write_json(path: Path, obj: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
