"""Throughput of vlmtune's data path alone (no model): samples/s and tokens/s of the training DataLoader.

    python bench/data_path.py                                  # workers 0,1,2,4; micro-batch 2; 800x1200 JPEGs
    python bench/data_path.py --workers 0,2 --batch-sizes 1,2 --samples 128 --out runs/data_path.json
    python bench/data_path.py --model DIR                      # that model folder's processor (and family)
    python bench/data_path.py --video --workers 0,1,2          # video clips (decode + sampling + video processor)

It iterates the stream the train loop draws from (vlmtune.train.train_stream) for each (num_workers, micro-batch
size): vlmtune's
EncodedDataset (row + image decode -> conversation -> chat template -> processor -> assistant-only labels, inside
DataLoader workers), its EpochSampler and DataLoader settings. Where the loader hands lists of samples to the
main process, vlmtune.encode.collate pads them there, as the train loop does, and that time counts too. The
first round of batches (one per worker: process start-up and first batch) is the warm-up, excluded from
samples/s and reported as "start-up" (paid again every epoch: persistent_workers=False). Then the
single-process path is timed stage by stage, so you see where the time goes.

Inputs: vlmtune's synthetic cord-v2 receipts, redrawn as photo-like JPEGs at a real receipt size (default
800x1200, as in naver-clova-ix/cord-v2), and the real Qwen2-VL processor shipped in vlmtune/assets/qwen2-vl with
the cord-v2 recipes' pixel budget (max_pixels 802816: at most 1024 image tokens per receipt).

Is the model starved? Compare with a training run's metrics.jsonl:
  * tokens/s here counts what `tokens_per_s` there counts: the non-pad tokens, image tokens included. But
    `tokens_per_s` is timed over the whole step, batch fetching included, so a starving loader lowers it
    silently: compare, do not read it alone.
  * The model consumes samples/s = tokens_per_s / (tokens per sample, printed here) = global_batch_size / step
    time. With torchrun, `tokens_per_s` is summed over ranks: divide by the world size for one rank; every rank
    runs its own loader with data.num_workers workers, all sharing the machine's CPU cores.
  * At the recipe's data.num_workers, on the training machine, the data path should deliver clearly more than
    that (say 1.5-2x), with cores left for the training process. If not: more data.num_workers (up to the free
    cores), a lower pixel budget (model.processor_kwargs), or images stored at their processed size.
Numbers depend on the CPU and its load: the table and the JSON (--out) record the core count and load average.

With --video the samples are a messages.jsonl of H.264 clips (default 640x360, 10 s at 30 fps, a moving shape over
a noisy background), each with a question and an answer; frames are sampled by data.video (default 2 fps: 20
frames), decoded with PyAV in the workers and processed by the video processor (the shipped Qwen2-VL one: 2-frame
temporal patches, its per-frame pixel budget). "row -> conversation" is then the video decode.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vlmtune.config import Recipe
    from vlmtune.encode import EncodedDataset, SampleEncoder

# The cord-v2 recipes' pixel budget for Qwen: at most 802816 pixels = 1024 image tokens per receipt.
QWEN_CORD_PIXELS = {"min_pixels": 3136, "max_pixels": 802816}
DEMO_MODEL_TYPE = "qwen2_5_vl"  # the family of the processor shipped in vlmtune/assets/qwen2-vl (as in the demo)
STAMP = "bench_data_path.json"


# ---------------------------------------------------------------------------------------------------------
# Inputs: receipts as photo-like JPEGs, written hub-style like vlmtune's synthetic cord-v2


def photo_jpeg(png: bytes, seed: int, quality: int = 90) -> bytes:
    """A drawn receipt made to look photographed (tinted paper, uneven light, sensor noise), JPEG-encoded: it
    decodes like a real cord-v2 photo, which a flat white PNG does not."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    pixels = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    light = np.linspace(1.0, rng.uniform(0.75, 0.9), height, dtype=np.float32)[:, None, None]
    tint = np.array([0.97, 0.94, 0.88], dtype=np.float32) * rng.uniform(0.9, 1.0)
    pixels = pixels * tint * light + rng.normal(0.0, 7.0, (height, width, 3)).astype(np.float32)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _to_jpeg_folder(png_folder: Path, folder: Path, seed: int) -> None:
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(png_folder / "data" / "train-00000-of-00001.parquet").to_pydict()
    images = [{"bytes": photo_jpeg(im["bytes"], seed * 1_000_003 + i),
               "path": str(Path(im["path"]).with_suffix(".jpg"))} for i, im in enumerate(table["image"])]
    features = datasets.Features({"image": datasets.Image(), "ground_truth": datasets.Value("string")})
    out = folder / "data" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "ground_truth": table["ground_truth"]},
                               features=features).to_parquet(str(out))


def make_receipts(workdir: Path, n: int, size: tuple[int, int], image_format: str, seed: int = 0) -> Path:
    """A hub-style cord-v2 folder of `n` training receipts of `size` (reused when already written)."""
    from vlmtune.data import synthetic

    png = synthetic.write_synthetic_cord(workdir / f"cord-png-{size[0]}x{size[1]}-{n}-s{seed}", n_train=n,
                                         n_validation=0, seed=seed, image_size=size)
    if image_format == "png":
        return png
    folder = workdir / f"cord-jpeg-{size[0]}x{size[1]}-{n}-s{seed}"
    args = {"source": str(png), "source_stamp": json.loads((png / synthetic.STAMP).read_text()), "seed": seed,
            "format": "jpeg-photo-v1"}
    stamp = folder / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == args:
        return folder
    stamp.unlink(missing_ok=True)
    _to_jpeg_folder(png, folder, seed)
    stamp.write_text(json.dumps(args))
    return folder


def _clip_frame(i: int, size: tuple[int, int], noise: Any) -> Any:
    import numpy as np

    width, height = size
    frame = noise.copy()
    x = (7 * i) % max(1, width - height // 4)
    frame[height // 3: height // 3 + height // 4, x: x + height // 4] = (230, 40, 40)
    return np.roll(frame, i % 8, axis=1)


def write_clip(path: Path, size: tuple[int, int], seconds: float, fps: int, seed: int) -> Path:
    """An H.264 clip (MPEG-4 Part 2 where PyAV lacks libx264) of a red square crossing a noisy background."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    noise = rng.integers(40, 120, (size[1], size[0], 3), dtype=np.uint8)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(round(seconds * fps)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_clip_frame(i, size, noise), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_clips(workdir: Path, n: int, size: tuple[int, int], seconds: float, fps: int) -> Path:
    """A messages.jsonl of `n` video questions over `n` clips (reused when already written)."""
    folder = workdir / f"clips-{size[0]}x{size[1]}-{seconds:g}s-{fps}fps-{n}"
    data = folder / "messages.jsonl"
    if data.is_file():
        return data
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        write_clip(folder / f"clip{i:03d}.mp4", size, seconds, fps, seed=i)
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "video", "video": f"clip{i:03d}.mp4"},
                                         {"type": "text", "text": "Where does the red square go?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"From left to right, clip {i}."}]}]}))
    data.write_text("\n".join(lines) + "\n")
    return data


# ---------------------------------------------------------------------------------------------------------
# The recipe, the processor and the training loader, through vlmtune's own code


def recipe_tree(model_dir: str, data_dir: Path, processor_kwargs: dict, workers: int, batch_size: int,
                max_length: int, device: str, seed: int = 0, video: dict | None = None) -> dict:
    train = ({"source": str(data_dir), "format": "messages"} if video is not None else
             {"source": str(data_dir), "format": "cord_v2", "split": "train"})
    return {"output_dir": str(data_dir.parent / "out"),
            "model": {"name_or_path": model_dir, "processor_kwargs": processor_kwargs},
            "data": {"train": train, "num_workers": workers, **({"video": video} if video is not None else {})},
            "train": {"max_steps": 1, "micro_batch_size": batch_size, "global_batch_size": batch_size,
                      "max_length": max_length, "seed": seed, "device": device}}


def load_encoder(recipe: Recipe, model_type: str | None) -> SampleEncoder:
    """The encoder train.py builds: the recipe's processor and the family of its model type."""
    from vlmtune.encode import make_encoder
    from vlmtune.families import family_for
    from vlmtune.model import load_config, load_processor

    model_type = model_type or load_config(recipe.model).model_type
    tcfg = recipe.train
    return make_encoder(load_processor(recipe.model), family_for(model_type), tcfg.max_length, tcfg.overlong)


# ---------------------------------------------------------------------------------------------------------
# Measurement 1: the training loader, per (num_workers, micro-batch size)


@dataclass
class Arrival:
    """One loader output (a micro-batch's samples) as the train loop receives it."""

    at: float  # perf_counter() when it arrived
    samples: int  # kept + skipped, as the loop counts them
    skipped: int
    tokens: int  # non-pad tokens (attention_mask.sum()), as metrics.jsonl's tokens_per_s counts them


def pad_id_of(encoder: SampleEncoder) -> int:
    tok = encoder.processor.tokenizer
    return tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id


def _arrival(items: list, pad_id: int) -> Arrival:
    """Count one loader output (a list of samples) and collate it, as the train loop does in the main process,
    on its own time: so it is timed here too."""
    from vlmtune.batching import collate
    from vlmtune.encode import Encoded

    kept = [x for x in items if isinstance(x, Encoded)]
    if kept:
        collate(kept, pad_id)
    return Arrival(time.perf_counter(), len(items), len(items) - len(kept), sum(e.length for e in kept))


def collect(loaded: Iterator[Any], n_samples: int, pad_id: int) -> list[Arrival]:
    """Loader outputs from `loaded` until `n_samples` samples arrived."""
    arrivals: list[Arrival] = []
    seen = 0
    while seen < n_samples:
        arrivals.append(_arrival(next(loaded), pad_id))
        seen += arrivals[-1].samples
    return arrivals


def summarize(arrivals: Sequence[Arrival], started: float, warmup: int) -> dict:
    """Start-up time and throughput after the first `warmup` batches (the warm-up)."""
    warm, timed = arrivals[:warmup], arrivals[warmup:]
    seconds = timed[-1].at - warm[-1].at if timed else float("nan")
    samples, tokens = sum(a.samples for a in timed), sum(a.tokens for a in timed)
    total = sum(a.samples for a in arrivals)
    kept = total - sum(a.skipped for a in arrivals)
    return {"samples": total, "skipped": total - kept, "batches": len(arrivals), "warmup_batches": len(warm),
            "measured_samples": samples, "measured_s": seconds, "startup_s": warm[0].at - started,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_sample": sum(a.tokens for a in arrivals) / max(kept, 1),
            "samples_per_s_with_startup": total / (arrivals[-1].at - started)}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children, e.g. DataLoader workers."""
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure_loader(recipe: Recipe, encoder: SampleEncoder, device: torch.device, epochs: int,
                   warmup_rounds: int) -> dict:
    import gc

    from vlmtune.encode import EncodedDataset
    from vlmtune.train import train_stream

    sampler, loaded = train_stream(EncodedDataset.of(recipe.data.train, encoder, "data.train",
                                                     video=recipe.data.video), recipe)
    warmup = warmup_rounds * max(1, recipe.data.num_workers)
    cpu_before = cpu_seconds()
    try:
        started = time.perf_counter()
        arrivals = collect(loaded, epochs * len(sampler), pad_id_of(encoder))
    finally:
        if callable(getattr(loaded, "close", None)):
            loaded.close()  # ends the current DataLoader iterator, which joins its workers
        gc.collect()
    cpu_ms = 1000 * (cpu_seconds() - cpu_before) / sum(a.samples for a in arrivals)
    if len(arrivals) <= warmup:
        raise ValueError(f"{len(arrivals)} batches leave nothing to time after {warmup} warm-up batch(es); raise "
                         "--samples or --epochs, or lower --warmup-rounds")
    return {"num_workers": recipe.data.num_workers, "micro_batch_size": recipe.train.micro_batch_size,
            **summarize(arrivals, started, warmup), "cpu_ms_per_sample": cpu_ms}


# ---------------------------------------------------------------------------------------------------------
# Measurement 2: where the time of one sample goes (single process)


class Clock:
    """Wall and CPU seconds (this process, all its threads) per named stage, summed over calls."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - wall
            self.cpu[name] += time.process_time() - cpu

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()


class Timed:
    """A callable that times each call of `target` under `name`; every attribute is the target's."""

    def __init__(self, target: Any, name: str, clock: Clock):
        self._target, self._name, self._clock = target, name, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._clock(self._name):
            return self._target(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)


def timed_encoder(encoder: SampleEncoder, clock: Clock) -> SampleEncoder:
    """`encoder`'s class, running its own code, with its render (chat template), processor call and labels timed."""
    from vlmtune.encode import SampleEncoder

    class TimedEncoder(SampleEncoder):
        def render(self, conversation: list[dict]) -> str:
            with clock("chat template"):
                return super().render(conversation)

        def labels(self, ids: list[int], conversation: list[dict], index: int) -> list[int]:
            with clock("labels (mark + self-check)"):
                return super().labels(ids, conversation, index)

    return TimedEncoder(Timed(encoder.processor, "processor", clock), encoder.family, encoder.max_length,
                        encoder.overlong)


@contextmanager
def timed_image_processor(processor: Any, clock: Clock) -> Iterator[None]:
    """Time the image and video processors inside the processor call (restored afterwards)."""
    parts = {a: getattr(processor, a) for a in ("image_processor", "video_processor") if hasattr(processor, a)}
    for attr, original in parts.items():
        setattr(processor, attr, Timed(original, attr.replace("_", " "), clock))
    try:
        yield
    finally:
        for attr, original in parts.items():
            setattr(processor, attr, original)


def _time_sample(ds: EncodedDataset, encoder: SampleEncoder, index: int, clock: Clock) -> Any:
    from vlmtune.data.formats import to_conversation
    from vlmtune.errors import SampleError

    convs = ds.conversations
    with clock("row"):
        row = convs.rows[index]
    with clock("conversation"):
        conversation = to_conversation(row, convs.format, convs.spec, convs.base_dir, index,
                                       video_sampling=convs.video)
    with clock("encode"):
        try:
            return encoder(conversation, index)
        except SampleError:
            return None


def _stages(s: dict[str, float], n: int) -> dict[str, float]:
    """Milliseconds per sample by stage from summed seconds `s`, nested stages taken out of their parents."""
    ms = {"row read + image decode (datasets Image feature)": s["row"],
          "row -> conversation (RGB, target text; video decode)": s["conversation"],
          "chat template": s["chat template"],
          "processor: image processor": s["image processor"],
          "processor: video processor": s["video processor"],
          "processor: text (tokenize, expand image tokens)": s["processor"] - s["image processor"]
          - s["video processor"],
          "labels (mark + self-check)": s["labels (mark + self-check)"],
          "encode: rest (tensors)": s["encode"] - s["chat template"] - s["processor"]
          - s["labels (mark + self-check)"],
          "collate": s["collate"]}
    return {k: 1000 * v / n for k, v in ms.items()}


def breakdown(recipe: Recipe, encoder: SampleEncoder, n: int, batch_size: int) -> dict:
    """Per-stage milliseconds per sample of the single-process path, over the first `n` samples (one untimed
    sample first), and the mean sample's token counts."""
    from vlmtune.batching import collate
    from vlmtune.encode import Encoded, EncodedDataset

    ds = EncodedDataset.of(recipe.data.train, encoder, "data.train", video=recipe.data.video)
    n = min(n, len(ds) - 1)
    clock = Clock()
    with timed_image_processor(encoder.processor, clock):
        probe = timed_encoder(encoder, clock)
        _time_sample(ds, probe, 0, clock)  # warm-up: first calls pay one-off costs
        clock.clear()
        samples = [_time_sample(ds, probe, i, clock) for i in range(1, n + 1)]
    kept = [s for s in samples if isinstance(s, Encoded)]
    for i in range(0, len(kept), batch_size):
        with clock("collate"):
            collate(kept[i : i + batch_size], pad_id_of(encoder))
    wall, cpu = _stages(clock.wall, n), _stages(clock.cpu, n)
    return {"samples": n, "kept": len(kept), "ms_per_sample": wall, "total_ms": sum(wall.values()),
            "cpu_ms_per_sample": cpu, "total_cpu_ms": sum(cpu.values()), **_token_counts(kept, encoder)}


def _token_counts(kept: Sequence[Any], encoder: SampleEncoder) -> dict:
    n = max(len(kept), 1)
    image = sum(int(sum(int(e.tensors["input_ids"].eq(t).sum()) for t in encoder.vision_token_ids)) for e in kept)
    return {"tokens_per_sample": sum(e.length for e in kept) / n, "image_tokens_per_sample": image / n,
            "supervised_tokens_per_sample": sum(e.supervised for e in kept) / n}


# ---------------------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": platform.processor() or platform.machine(), "usable_cores": cores, "loadavg_at_start": load,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def _load(m: dict) -> str:
    loads = [m[k][0] for k in ("loadavg_at_start", "loadavg_at_end") if m.get(k)]
    return " -> ".join(f"{x:.1f}" for x in loads) or "unknown"


def markdown(result: dict) -> str:
    inp, bd = result["inputs"], result["breakdown"]
    what = (f"{inp['samples']} clips {inp['video']}" if inp.get("video") else
            f"{inp['samples']} receipts {inp['image_size']} {inp['image_format']}")
    lines = [f"Data path: {what}, processor "
             f"{inp['processor']} {inp['processor_kwargs']}, {bd['tokens_per_sample']:.0f} tokens/sample "
             f"({bd['image_tokens_per_sample']:.0f} image, {bd['supervised_tokens_per_sample']:.0f} trained); "
             f"loader: {result['loader']}; {result['machine']['usable_cores']} cores, 1-min load average "
             f"{_load(result['machine'])}",
             "", "| workers | micro-batch | samples | start-up s | samples/s | tokens/s | samples/s incl. start-up "
                 "| CPU ms/sample |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["loader_runs"]:
        lines.append(f"| {r['num_workers']} | {r['micro_batch_size']} | {r['samples']} | {r['startup_s']:.2f} | "
                     f"{_fmt(r['samples_per_s'])} | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(r['samples_per_s_with_startup'])} | {r['cpu_ms_per_sample']:.0f} |")
    lines += ["", "CPU ms/sample: all processes, start-up included; on k idle cores, with k workers, expect about "
                  "k x 1000 / (CPU ms/sample) samples/s."]
    lines += ["", f"Single process, per sample (mean of {bd['samples']}):", "",
              "| stage | ms/sample | CPU ms/sample | share of CPU |", "|---|---:|---:|---:|"]
    for stage, ms in bd["ms_per_sample"].items():
        cpu = bd["cpu_ms_per_sample"][stage]
        stage = "collate (in the main process)" if stage == "collate" else stage
        lines.append(f"| {stage} | {ms:.1f} | {cpu:.1f} | {100 * cpu / bd['total_cpu_ms']:.0f}% |")
    lines.append(f"| **total** | **{bd['total_ms']:.1f}** (= {1000 / bd['total_ms']:.1f} samples/s) | "
                 f"**{bd['total_cpu_ms']:.1f}** | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=_ints, default=[0, 1, 2, 4], help="num_workers values (default 0,1,2,4)")
    p.add_argument("--batch-sizes", type=_ints, default=[2], help="micro-batch sizes (default 2)")
    p.add_argument("--samples", type=int, default=64, help="receipts in the dataset (one epoch each run)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (workers restart each epoch)")
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="rounds of one batch per worker excluded from samples/s (default 1)")
    p.add_argument("--image-size", type=_size, default=(800, 1200), help="WxH of the receipts (default 800x1200)")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                   help="jpeg: photo-like, as cord-v2; png: vlmtune's synthetic drawing as is")
    p.add_argument("--model", default=None, help="a local model folder: its processor and family "
                                                 "(default: the Qwen2-VL processor in vlmtune/assets)")
    p.add_argument("--model-type", default=None, help="family when the folder has no config.json")
    p.add_argument("--processor-kwargs", type=json.loads, default=None,
                   help=f"JSON for AutoProcessor.from_pretrained (default: {QWEN_CORD_PIXELS} for the shipped "
                        "processor, {} for --model)")
    p.add_argument("--max-length", type=int, default=2048, help="train.max_length (default 2048)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="train.device, passed to the loader builder (default auto)")
    p.add_argument("--breakdown-samples", type=int, default=16, help="samples timed per stage (default 16)")
    p.add_argument("--video", action="store_true", help="video clips instead of receipts (see above)")
    p.add_argument("--video-size", type=_size, default=(640, 360), help="WxH of the clips (default 640x360)")
    p.add_argument("--video-seconds", type=float, default=10.0, help="length of a clip (default 10)")
    p.add_argument("--video-source-fps", type=int, default=30, help="frame rate of the clips (default 30)")
    p.add_argument("--video-config", type=json.loads, default={"fps": 2.0},
                   help='data.video as JSON (default {"fps": 2.0})')
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-data-path"), help="where the receipts go")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _inputs(args: argparse.Namespace) -> tuple[str, str | None, dict]:
    """(model folder, model type or None = from its config, processor kwargs)."""
    from vlmtune.demo import ASSETS

    if args.model is None:
        kwargs = QWEN_CORD_PIXELS if args.processor_kwargs is None else args.processor_kwargs
        return str(ASSETS), args.model_type or DEMO_MODEL_TYPE, kwargs
    return args.model, args.model_type, args.processor_kwargs or {}


def loader_runs(args: argparse.Namespace, recipe_for: Callable[[int, int], Recipe], encoder: SampleEncoder,
                device: torch.device) -> list[dict]:
    runs = []
    for batch_size in args.batch_sizes:
        for workers in args.workers:
            runs.append(measure_loader(recipe_for(workers, batch_size), encoder, device, args.epochs,
                                       args.warmup_rounds))
            print(f"workers={workers} micro-batch={batch_size}: {runs[-1]['samples_per_s']:.2f} samples/s",
                  file=sys.stderr, flush=True)
    return runs


def run(args: argparse.Namespace) -> dict:
    from vlmtune.config import build_recipe
    from vlmtune.model import pick_device

    at_start = machine()
    model_dir, model_type, kwargs = _inputs(args)
    video = args.video_config if args.video else None
    data_dir = (make_clips(args.workdir, args.samples, args.video_size, args.video_seconds, args.video_source_fps)
                if args.video else make_receipts(args.workdir, args.samples, args.image_size, args.image_format))

    def recipe_for(workers: int, batch_size: int) -> Recipe:
        return build_recipe(recipe_tree(model_dir, data_dir, kwargs, workers, batch_size, args.max_length,
                                        args.device, video=video))

    base = recipe_for(0, args.batch_sizes[0])
    encoder, device = load_encoder(base, model_type), pick_device(base.train.device)
    runs = loader_runs(args, recipe_for, encoder, device)
    inputs = {"samples": args.samples, "image_size": "x".join(map(str, args.image_size)),
              "image_format": args.image_format, "data": str(data_dir), "processor": model_dir,
              "family": encoder.family.name, "processor_kwargs": kwargs, "max_length": args.max_length,
              "device": str(device), "epochs": args.epochs,
              **({"video": f"{'x'.join(map(str, args.video_size))} {args.video_seconds:g} s at "
                           f"{args.video_source_fps} fps, data.video {video}"} if args.video else {})}
    bd = breakdown(base, encoder, args.breakdown_samples, args.batch_sizes[0])
    end_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"inputs": inputs, "loader": "vlmtune.train.train_stream",
            "machine": {**at_start, "loadavg_at_end": end_load}, "loader_runs": runs, "breakdown": bd}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer ran: no warning
    result = run(args)
    print(markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
