"""Video, end to end: a user's messages.jsonl with .mp4 files -> decoded, sampled frames -> each family's own video
processor -> trained tokens, through the CLI. The clips are written here with PyAV: a red square moving 4 px a frame
over a dark background, so which source frame a decoded frame is can be read off its pixels."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from tiny import all_specs

from conftest import cached_load_processor
from vlmtune.batching import collate
from vlmtune.cli import main
from vlmtune.config import DataSource, ModelConfig, VideoConfig, build_recipe
from vlmtune.data.formats import to_conversation
from vlmtune.data.video import Video, VideoSampling, load_video, resolve_sampling
from vlmtune.encode import EncodedDataset, SampleEncoder, Skipped, media_of
from vlmtune.errors import RecipeError, SampleError
from vlmtune.families import family_for
from vlmtune.model import load_model
from vlmtune.train import to_device
from vlmtune.views import trained_runs

SPECS = all_specs()
VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "smolvlm",
                  "llava_next_video", "llava_onevision", "internvl"]
STEP = 4  # px the square moves per frame
FPS = 6


def test_the_video_families_are_the_tiny_specs_marked_video():
    assert sorted(n for n, s in SPECS.items() if s.video) == sorted(VIDEO_FAMILIES)


def families(names=VIDEO_FAMILIES):
    return [pytest.param(n, marks=pytest.mark.xdist_group(f"video-{n}")) for n in names]


@pytest.fixture(scope="module", autouse=True)
def _shared(cached_processors):
    yield


def write_clip(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = FPS) -> Path:
    """An MPEG-4 clip of `frames` frames: frame i has a 12 x 12 red square at x = STEP * i."""
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            a = np.full((height, width, 3), (20, 20, 60), np.uint8)
            a[8:20, STEP * i:STEP * i + 12] = (250, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def square_x(frame: np.ndarray) -> int:
    """Where the red square starts in a decoded frame (codec noise aside)."""
    red = (frame[:, :, 0].astype(int) - frame[:, :, 2].astype(int) > 100).any(axis=0)
    return int(np.argmax(red))


def frame_index(frame: np.ndarray) -> int:
    return round(square_x(frame) / STEP)


# ---------------------------------------------------------------------------------------------------------
# Decoding and sampling


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {"short": write_clip(folder / "short.mp4"), "long": write_clip(folder / "long.mp4", frames=14),
            "folder": folder}


def test_decoded_frames_are_the_sampled_source_frames(clips):
    """Frame k of the decoded video shows the source frame its index says (read off the square's position)."""
    for sampling in (VideoSampling(num_frames=4), VideoSampling(fps=2.0), VideoSampling(num_frames=3, start=1.0),
                     VideoSampling(fps=6.0, max_frames=5), VideoSampling(num_frames=4, end=1.0)):
        video = load_video(clips["short"], None, 0, sampling)
        assert [frame_index(f) for f in video.frames] == video.indices, sampling
        assert video.total_frames == 12 and video.fps == pytest.approx(FPS)
    assert len(load_video(clips["short"], None, 0, VideoSampling(num_frames=4))) == 4
    assert len(load_video(clips["short"], None, 0, VideoSampling(fps=2.0))) == 4  # 2 s x 2 fps
    assert min(load_video(clips["short"], None, 0, VideoSampling(num_frames=3, start=1.0)).indices) >= 6
    assert max(load_video(clips["short"], None, 0, VideoSampling(num_frames=4, end=1.0)).indices) < 6
    assert len(load_video(clips["short"], None, 0, VideoSampling(fps=6.0, max_frames=5))) == 5


def test_frame_counts_respect_the_temporal_patch(clips):
    """Qwen's video processors put 2 frames in a patch: vlmtune takes an even number, so none is repeated."""
    assert len(load_video(clips["short"], None, 0, VideoSampling(num_frames=5, multiple=2))) == 4
    assert len(load_video(clips["short"], None, 0, VideoSampling(fps=1.5, multiple=2))) == 2  # 3 -> 2
    video = load_video(clips["short"], None, 0, VideoSampling(num_frames=8, multiple=2))
    assert len(video.fewer(5)) == 4 and [frame_index(f) for f in video.fewer(5).frames] == video.fewer(5).indices


def test_sampling_defaults_come_from_the_video_processor(tiny_model):
    """Unset data.video: the model's own settings (Qwen3-VL: 2 fps, 4..768 frames, patches of 2; SmolVLM2: 1 fps up
    to its num_frames), else 8 frames; the recipe wins where it says something."""
    def vp(name):
        return cached_load_processor(ModelConfig(name_or_path=str(tiny_model(name)))).video_processor

    qwen3 = resolve_sampling(None, vp("qwen3_vl"))
    assert (qwen3.fps, qwen3.num_frames, qwen3.min_frames, qwen3.max_frames, qwen3.multiple) == (2, None, 4, 768, 2)
    smol = resolve_sampling(None, vp("smolvlm"))
    assert (smol.fps, smol.max_frames, smol.multiple) == (1, vp("smolvlm").num_frames, 1)
    llava = resolve_sampling(None, vp("llava_next_video"))
    assert (llava.fps, llava.num_frames) == (None, 8)
    mine = resolve_sampling(VideoConfig(num_frames=6, start=1.5), vp("qwen3_vl"))
    assert (mine.fps, mine.num_frames, mine.start, mine.multiple) == (None, 6, 1.5, 2)


def test_frames_as_images_and_a_folder_of_frames(tmp_path):
    for i in range(5):
        PIL.Image.new("RGB", (32, 24), (10 * i, 0, 0)).save(tmp_path / f"f{i:02d}.png")
    folder = load_video(tmp_path, None, 0, VideoSampling(num_frames=5))
    assert len(folder) == 5 and [int(f[0, 0, 0]) for f in folder.frames] == [0, 10, 20, 30, 40]  # name order
    listed = load_video([str(tmp_path / "f03.png"), "f01.png"], tmp_path, 0, VideoSampling(num_frames=2), fps=2.0)
    assert [int(f[0, 0, 0]) for f in listed.frames] == [30, 10] and listed.fps == 2.0


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "missing", "url", "no_video_stream", "too_large",
                                  "empty_folder", "window"])
def test_bad_videos_are_sample_errors_with_a_reason(case, clips, tmp_path):
    data = clips["short"].read_bytes()
    path, reason, sampling, pixels = tmp_path / "v.mp4", "unreadable_video", VideoSampling(num_frames=4), 10 ** 8
    if case == "garbage":
        path.write_bytes(b"not a video " * 100)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "missing":
        path = tmp_path / "nope.mp4"
    elif case == "url":
        path = "https://example.com/clip.mp4"
    elif case == "no_video_stream":
        path = tmp_path / "a.wav"
        with av.open(str(path), "w") as out:
            out.add_stream("pcm_s16le", rate=8000)
    elif case == "too_large":
        path, reason, pixels = clips["short"], "video_too_large", 64 * 48 - 1
    elif case == "empty_folder":
        path = tmp_path / "frames"
        path.mkdir()
    elif case == "window":
        path, sampling = clips["short"], VideoSampling(num_frames=4, start=5.0)
    with pytest.raises(SampleError) as e:
        load_video(path, None, 7, sampling, pixels)
    assert e.value.reason == reason and "row 7" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Formats


def spec(**kw) -> DataSource:
    return DataSource(source="x.jsonl", **kw)


def video_part(value, **kw):
    return {"type": "video", "video": value, **kw}


def answer(text="A red square."):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def kinds(conv) -> list[str]:
    return [p["type"] for m in conv for p in m["content"] if p["type"] != "text"]


def test_video_in_every_chat_format(clips):
    root, s = clips["folder"], VideoSampling(num_frames=4)
    rows = {
        "messages": {"messages": [{"role": "user", "content": [video_part("short.mp4"), {"type": "text", "text": "Q"}]},
                                  answer()]},
        "messages_column": {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                                                      {"type": "text", "text": "Q"}]}, answer()],
                            "videos": ["short.mp4"], "images": ["x.png"]},
        "sharegpt": {"conversations": [{"from": "human", "value": "<video><image>Q"}, {"from": "gpt", "value": "A"}],
                     "videos": ["short.mp4"], "images": ["x.png"]},
        "llava_video": {"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
                        "video": "short.mp4"},
        "llava_video_token": {"conversations": [{"from": "human", "value": "<video>\nQ"},
                                                {"from": "gpt", "value": "A"}], "video": "short.mp4"},
    }
    PIL.Image.new("RGB", (8, 8), "blue").save(root / "x.png")
    fmts = {"messages": "messages", "messages_column": "messages", "sharegpt": "sharegpt", "llava_video": "llava",
            "llava_video_token": "llava"}
    for name, row in rows.items():
        conv = to_conversation(row, fmts[name], spec(), root, 0, video_sampling=s)
        videos = media_of(conv, "video")
        assert len(videos) == 1 and isinstance(videos[0], Video) and len(videos[0]) == 4, name
        assert kinds(conv) == (["video", "image"] if name in ("messages_column", "sharegpt") else ["video"]), name


def test_video_parts_as_frame_lists_folders_and_urls(tmp_path):
    for i in range(3):
        PIL.Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(tmp_path / f"{i}.png")
    user = lambda part: {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Q"}]},  # noqa: E731
                                      answer()]}
    s = VideoSampling(num_frames=3)
    listed = to_conversation(user(video_part(["0.png", "1.png", "2.png"], fps=3)), "messages", spec(), tmp_path, 0,
                             video_sampling=s)
    assert len(media_of(listed, "video")[0]) == 3 and media_of(listed, "video")[0].fps == 3
    folder = to_conversation(user({"type": "video", "path": str(tmp_path)}), "messages", spec(), None, 0,
                             video_sampling=s)
    assert len(media_of(folder, "video")[0]) == 3
    for part in (video_part("http://example.com/a.mp4"), {"type": "video_url", "video_url": {"url": "https://x/a.mp4"}}):
        with pytest.raises(SampleError) as e:
            to_conversation(user(part), "messages", spec(), tmp_path, 0, video_sampling=s)
        assert e.value.reason == "unreadable_video" and "remote URL" in str(e.value)


def test_video_placeholder_mismatch_is_counted(clips):
    row = {"conversations": [{"from": "human", "value": "<video><video>Q"}, {"from": "gpt", "value": "A"}],
           "videos": ["short.mp4"]}
    with pytest.raises(SampleError) as e:
        to_conversation(row, "sharegpt", spec(), clips["folder"], 0, video_sampling=VideoSampling(num_frames=2))
    assert e.value.reason == "placeholder_mismatch" and "2 video placeholder(s)" in str(e.value)


def test_data_video_section_is_validated():
    base = {"model": {"name_or_path": "m"}, "data": {"train": {"source": "a.jsonl"}}, "train": {"max_steps": 1}}
    for video, words in (({"fps": 1, "num_frames": 4}, "not both"), ({"start": 3, "end": 2}, "after start"),
                         ({"fps": 0}, "greater than 0"), ({"num_frames": 8, "max_frames": 4}, "below num_frames"),
                         ({"fsp": 2}, "did you mean 'data.video.fps'")):
        with pytest.raises(RecipeError, match=r"data\.video") as e:
            build_recipe({**base, "data": {**base["data"], "video": video}})
        assert words in str(e.value), video
    recipe = build_recipe({**base, "train": {"max_steps": 1, "overlong": "fewer_frames"}})
    assert recipe.train.overlong == "fewer_frames"


# ---------------------------------------------------------------------------------------------------------
# Per family: masking, a CLI training step from messages.jsonl, fewer frames, a corrupt video counted

QUESTION = "What moves, and where?"


def rows(n_frames_clip="short.mp4", spec_=None) -> list[dict]:
    """Video-only (two turns), image-only, image + video, and a corrupt video."""
    video_q = {"role": "user", "content": [video_part(n_frames_clip), {"type": "text", "text": QUESTION}]}
    return [
        {"messages": [video_q, answer("A red square, left to right."),
                      {"role": "user", "content": [{"type": "text", "text": "How fast?"}]}, answer("4 px a frame.")]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                   {"type": "text", "text": "Colour?"}]}, answer("Blue.")]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}, video_part(n_frames_clip),
                                                   {"type": "text", "text": "Same colour?"}]}, answer("No.")]},
        {"messages": [{"role": "user", "content": [video_part("broken.mp4"), {"type": "text", "text": "?"}]},
                      answer("Nothing.")]},
    ]


@pytest.fixture(scope="module")
def data_file(clips):
    folder = clips["folder"]
    PIL.Image.new("RGB", (64, 48), "blue").save(folder / "x.png")
    (folder / "broken.mp4").write_bytes(clips["short"].read_bytes()[:300])
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return folder / "data.jsonl"


def encoder_for(name, tiny_model, max_length=4096, overlong="drop"):
    processor = cached_load_processor(ModelConfig(name_or_path=str(tiny_model(name))))
    return SampleEncoder(processor, family_for(SPECS[name].model_type), max_length, overlong)


def decoded_trained_spans(enc, item) -> list[str]:
    ids, labels = item.tensors["input_ids"].tolist(), item.tensors["labels"].tolist()
    return [enc.processor.tokenizer.decode(t).strip() for t, trained in trained_runs(ids, labels) if trained]


@pytest.mark.parametrize("name", families())
def test_video_masking_by_decoding(name, tiny_model, data_file):
    """A two-turn video conversation read from messages.jsonl: exactly the answers (and their end markers) are
    trained, no vision token is, and the video reaches the processor as 4 frames."""
    enc = encoder_for(name, tiny_model)
    ds = EncodedDataset.of(DataSource(source=str(data_file)), enc, "data.train", video=VideoConfig(num_frames=4))
    item = ds[0]
    assert not isinstance(item, Skipped), item
    end = enc.family.assistant_end
    assert decoded_trained_spans(enc, item) == [f"A red square, left to right.{end}", f"4 px a frame.{end}"]
    trained = item.tensors["input_ids"][item.tensors["labels"] != -100].tolist()
    assert not set(trained) & enc.vision_token_ids
    [video] = [m for m in item.media if m["type"] == "video"]
    assert video["frames"] == 4 and video["tokens"] > 0
    mixed = ds[2]
    if enc.family.no_images_with_video:
        assert isinstance(mixed, Skipped) and mixed.reason == "images_with_video"
    else:
        assert [m["type"] for m in mixed.media] == ["image", "video"]
    assert isinstance(ds[3], Skipped) and ds[3].reason == "unreadable_video"


@pytest.mark.parametrize("name", families())
def test_training_step_through_the_cli_from_messages_with_videos(name, tiny_model, data_file, tmp_path):
    """`vlmtune finetune` on the user's messages.jsonl: video-only, image-only and image + video samples in one
    micro-batch (2 steps of 3 from 4 rows: every row is drawn), the corrupt video skipped and counted (and the
    image + video sample, for a family whose processor cannot take both)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny_model(name))},
        "data": {"train": {"source": str(data_file)}, "video": {"num_frames": 4}},
        "train": {"max_steps": 2, "micro_batch_size": 3, "global_batch_size": 3, "lr": 1e-3, "max_length": 4096}}))
    assert main(["finetune", "-c", str(recipe)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    mixed_refused = {"images_with_video"} if family_for(SPECS[name].model_type).no_images_with_video else set()
    assert set(summary["skipped"]) == {"unreadable_video", *mixed_refused}
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(lines) == 2 and all(np.isfinite(x["loss"]) for x in lines)
    assert (tmp_path / "out" / "final" / "config.json").is_file()


@pytest.mark.parametrize("name", families())
def test_fewer_frames_until_it_fits(name, tiny_model, clips, tmp_path):
    """train.overlong=fewer_frames: a 14-frame video sampled at 8 frames is too long; the encoder keeps fewer frames
    (uniformly spread, a multiple of the temporal patch) until the sample fits, counts it as shortened, keeps the
    answer trained, and the model accepts it (its own check that video features and video tokens agree). With a
    budget no frame count meets, the sample is dropped as too_long."""
    row = {"messages": [{"role": "user", "content": [video_part("long.mp4"), {"type": "text", "text": QUESTION}]},
                        answer("A red square.")]}
    (tmp_path / "long.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "long.mp4").write_bytes(clips["long"].read_bytes())
    source = DataSource(source=str(tmp_path / "long.jsonl"))
    full = EncodedDataset.of(source, encoder_for(name, tiny_model), "d", video=VideoConfig(num_frames=8))[0]
    [span] = [m for m in full.media if m["type"] == "video"]
    budget = full.length - span["tokens"] // 3  # a third of the video's tokens too many
    enc = encoder_for(name, tiny_model, budget, "fewer_frames")
    ds = EncodedDataset.of(source, enc, "d", video=VideoConfig(num_frames=8))
    item = ds[0]
    assert not isinstance(item, Skipped), item
    [kept] = [m for m in item.media if m["type"] == "video"]
    multiple = getattr(enc.processor.video_processor, "temporal_patch_size", 1) or 1
    assert item.shortened == "fewer_frames" and item.length <= budget < full.length
    assert 1 <= kept["frames"] < 8 and kept["frames"] % multiple == 0
    assert decoded_trained_spans(enc, item) == [f"A red square.{enc.family.assistant_end}"]
    model, processor, family = load_model(ModelConfig(name_or_path=str(tiny_model(name))), torch.device("cpu"))
    batch = to_device(collate([item], processor.tokenizer.pad_token_id or 0), torch.device("cpu"), torch.float32,
                      family.cast_to_model_dtype)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    short = EncodedDataset.of(source, encoder_for(name, tiny_model, 12, "fewer_frames"), "d",
                              video=VideoConfig(num_frames=8))[0]
    assert isinstance(short, Skipped) and short.reason == "too_long"


def test_smolvlm_processor_still_drops_images_given_with_a_video(tiny_model, clips):
    """Why families.py says SmolVLM takes no images with a video: its processor returns the video's frames alone.
    When this fails, transformers keeps both: clear the family's no_images_with_video."""
    enc = encoder_for("smolvlm", tiny_model)
    video = load_video(clips["short"], None, 0, VideoSampling(num_frames=2))
    image = PIL.Image.new("RGB", (64, 48), "blue")
    text = enc.render([{"role": "user", "content": [{"type": "image", "image": image}, video_part(video),
                                                    {"type": "text", "text": "Q"}]}, answer("A.")])
    out = enc.processor(text=[text], images=[image], videos=[video.frames], video_metadata=[video.metadata()],
                        do_sample_frames=False, return_tensors="pt")
    blocks = int((out["input_ids"] == enc.processor.image_token_id).sum()) // enc.processor.image_seq_len
    assert blocks > 2 and out["pixel_values"].shape[1] == 2  # the image's tiles have tokens, but no pixels


# ---------------------------------------------------------------------------------------------------------
# What the processors get: time, and nothing but the chosen frames


def test_qwen3_vl_timestamps_are_the_sampled_frames_times(tiny_model, clips, tmp_path):
    """Qwen3-VL writes each temporal patch's time into the prompt: the mean of its two frames' source times."""
    enc = encoder_for("qwen3_vl", tiny_model)
    video = load_video(clips["short"], None, 0, VideoSampling(num_frames=4, multiple=2))
    conv = [{"role": "user", "content": [video_part(video), {"type": "text", "text": "Q"}]}, answer("A.")]
    text = enc.processor.tokenizer.decode(enc(conv, 0).tensors["input_ids"])
    times = [(video.indices[i] + video.indices[i + 1]) / 2 / FPS for i in (0, 2)]
    stamps = [f"<{t:.1f} seconds>" for t in times]
    assert all(stamp in text for stamp in stamps) and text.index(stamps[0]) < text.index(stamps[1])


def test_qwen2_5_vl_seconds_per_temporal_patch(tiny_model, clips):
    """Qwen2.5-VL's mRoPE time axis: second_per_grid_ts = temporal patch / sampled fps, from the real source fps."""
    enc = encoder_for("qwen2_5_vl", tiny_model)
    video = load_video(clips["short"], None, 0, VideoSampling(num_frames=4, multiple=2))
    conv = [{"role": "user", "content": [video_part(video), {"type": "text", "text": "Q"}]}, answer("A.")]
    sampled_fps = 4 / 12 * FPS
    assert enc(conv, 0).tensors["second_per_grid_ts"].tolist() == pytest.approx([2 / sampled_fps])


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_videos_give_the_padded_loss(name, tiny_model, clips):
    """train.packing with videos of 4 and 6 frames in one row: each keeps its own mRoPE time positions (Qwen2.5-VL:
    from second_per_grid_ts), so the loss equals the padded batch's."""
    from vlmtune.batching import pack, rope_index_module
    from vlmtune.loss import loss_sum

    model, processor, family = load_model(ModelConfig(name_or_path=str(tiny_model(name))), torch.device("cpu"))
    enc = SampleEncoder(processor, family, 4096)
    items = [enc([{"role": "user", "content": [video_part(load_video(clips["short"], None, 0, VideoSampling(
        num_frames=n, multiple=2))), {"type": "text", "text": "Q"}]}, answer("A red square.")], 0) for n in (4, 6)]
    batch = collate(items, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        padded = loss_sum(model.eval(), batch, None)
        packed = loss_sum(model, pack(batch, rope_index_module(model)), None)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# inspect and generate


def test_inspect_shows_the_video_span_and_trained_tokens(tiny_model, data_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny_model("llava_next_video"))},
        "data": {"train": {"source": str(data_file)}, "video": {"num_frames": 4}}, "train": {"max_steps": 1}}))
    assert main(["inspect", "-c", str(recipe), "--format", "json"]) == 0
    view = json.loads(capsys.readouterr().out)
    [video] = view["videos"]
    assert video["frames"] == 4 and video["source_frames"] == 12
    assert video["seconds"] == pytest.approx([i / FPS for i in video["indices"]], abs=1e-3)
    [span] = view["media"]
    video_id = 32000  # LLaVA-NeXT-Video's <video>
    assert span == {"type": "video", "frames": 4, "tokens": view["input_ids"].count(video_id)}
    assert view["trained_spans"][0].strip().startswith("A red square")
    assert main(["inspect", "-c", str(recipe)]) == 0
    assert f"video 0: 4 frames x 64x48 -> {span['tokens']} tokens" in capsys.readouterr().out
    assert main(["inspect", "-c", str(recipe), "--format", "html", "--out", str(tmp_path / "i.html")]) == 0
    page = (tmp_path / "i.html").read_text()
    assert page.count('alt="video 0 frame') == 4 and f"-&gt; {span['tokens']} tokens" in page


def test_generate_answers_about_a_video(tiny_model, clips, capsys):
    args = ["generate", "--model", str(tiny_model("qwen2_vl")), "--video", str(clips["short"]), "--prompt", "What?",
            "--max-new-tokens", "3"]
    assert main(args) == 0
    assert main([*args[:3], "--video", str(clips["folder"] / "missing.mp4"), *args[5:]]) == 2
    assert "--video" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llava_next_video", "llava_onevision"])
def test_videos_of_different_lengths_never_share_a_micro_batch_where_padding_would_be_read(name, tiny_model, clips):
    """LLaVA-NeXT-Video / OneVision read a zero-padded frame as a frame (Family.uniform_media): the batcher puts
    videos of 4 and 6 frames into separate micro-batches, and each runs; Qwen, which skips no padding it has not,
    is unaffected (one micro-batch)."""
    from vlmtune.batching import Batcher
    from vlmtune.loss import loss_sum

    model, processor, family = load_model(ModelConfig(name_or_path=str(tiny_model(name))), torch.device("cpu"))
    enc = SampleEncoder(processor, family, 4096)
    items = [enc([{"role": "user", "content": [video_part(load_video(clips["short"], None, 0, VideoSampling(
        num_frames=n))), {"type": "text", "text": "Q"}]}, answer("A red square.")], i) for i, n in enumerate((4, 6, 4))]
    batches = Batcher(processor.tokenizer.pad_token_id, 3, None, False, None, None, family.uniform_media)(items)
    assert sorted(b.indices for b in batches) == [[0, 2], [1]]
    with torch.no_grad():
        for b in batches:
            assert torch.isfinite(loss_sum(model.eval(), b.tensors, None))
    assert len(Batcher(processor.tokenizer.pad_token_id, 3, None, False, None, None, ())(items)) == 1
