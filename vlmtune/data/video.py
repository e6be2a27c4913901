"""Video references in a record -> decoded frames plus what a video processor needs to know about them.

**Library: PyAV** (``av`` on PyPI). Its wheels carry FFmpeg's libraries inside them, so ``pip install`` is all a
user needs on Linux, macOS and Windows. torchcodec was the other candidate; its wheels link against an FFmpeg the
user installs separately (system packages or conda), which a machine without FFmpeg (this one, many clusters)
does not have. torchvision's video reading is deprecated (removed in torchvision 0.26).

**vlmtune samples the frames, not the processor.** Only the chosen frames are converted to pixels, here in the
DataLoader worker; decoding every frame of a minute of 1080p video to let the processor pick 16 would take
gigabytes. The processor then gets those frames with ``do_sample_frames=False`` and the metadata of where they
came from (the source fps, the index of each frame in the source, the source's frame count), so what it computes
from time is right: Qwen3-VL's and SmolVLM's timestamps in the prompt, Qwen2.5-VL's seconds per temporal patch.

Sampling (``data.video``, :class:`VideoSampling`): within ``[start, end)`` seconds, ``num_frames`` frames spread
uniformly, or ``fps`` frames per second, at most ``max_frames``. Unset, the model's own video processor settings
apply (Qwen3-VL: 2 fps with 4 to 768 frames; SmolVLM2: 1 fps, at most 64), else 8 frames (the number Hugging Face's
examples use for LLaVA-NeXT-Video, LLaVA-OneVision and InternVL). Frame counts are kept a multiple of the
processor's temporal patch (Qwen: 2 frames per patch), so no frame is repeated to fill a patch.

A video is a path (absolute, ``file://``, or relative to the data file's folder / ``image_root``), a list of frame
images (paths, PIL images, bytes), or a folder of frame images (sorted by name). A remote URL is refused. A file
that cannot be decoded, has no video stream or no frames, or whose frames have more than ``max_pixels`` pixels,
is a :class:`SampleError` (``unreadable_video``, ``video_too_large``): the sample is skipped and counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmtune.data.media import DEFAULT_MAX_PIXELS, check_pixels, image_summary, load_image, local_path
from vlmtune.data.media import sample_error as _error
from vlmtune.errors import SampleError

FALLBACK_FRAMES = 8  # neither the recipe nor the model's video processor says how many
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FRAME_LIST_FPS = 1.0  # frames given as images: one per second unless the part says "fps"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video to decode; see the module docstring. ``multiple``: frame counts are multiples of
    it (the processor's temporal patch); ``min_frames``: fps sampling takes at least this many."""

    fps: float | None = None
    num_frames: int | None = None
    max_frames: int | None = None
    min_frames: int = 1
    start: float | None = None
    end: float | None = None
    multiple: int = 1

    def count(self, available: int, seconds: float) -> int:
        """How many frames to take from `available` frames spanning `seconds`."""
        if self.num_frames is not None:
            n = self.num_frames
        else:
            n = max(math.floor(seconds * self.fps + 1e-6), self.min_frames) if self.fps else FALLBACK_FRAMES
        n = min(n, available, self.max_frames or n)
        return fit_multiple(max(n, 1), self.multiple, available)


def fit_multiple(n: int, multiple: int, available: int) -> int:
    """`n` rounded down to a multiple of `multiple` (at least one multiple, when that many frames exist)."""
    if multiple <= 1 or available < multiple:
        return n
    return max(n // multiple, 1) * multiple


def resolve_sampling(video: Any, video_processor: Any) -> VideoSampling:
    """The recipe's ``data.video`` (a config object or None) completed by the model's video processor settings."""
    vp = video_processor
    fps = getattr(video, "fps", None)
    num = getattr(video, "num_frames", None)
    vp_fps, vp_num = getattr(vp, "fps", None), getattr(vp, "num_frames", None)
    if fps is None and num is None:
        fps, num = (vp_fps, None) if vp_fps else (None, vp_num or FALLBACK_FRAMES)
    # SmolVLM2 samples at `fps` up to `num_frames`: there its num_frames is the cap.
    cap = getattr(video, "max_frames", None) or getattr(vp, "max_frames", None) or (vp_num if vp_fps else None)
    return VideoSampling(fps=fps, num_frames=num, max_frames=cap, min_frames=int(getattr(vp, "min_frames", 1) or 1),
                         start=getattr(video, "start", None), end=getattr(video, "end", None),
                         multiple=int(getattr(vp, "temporal_patch_size", 1) or 1))


@dataclass
class Video:
    """Decoded frames (T, H, W, 3) uint8 RGB and where they sit in their source."""

    frames: np.ndarray
    fps: float  # of the source
    indices: list[int]  # index in the source of each frame
    total_frames: int  # frames in the source
    multiple: int = 1  # frame counts stay multiples of this (the processor's temporal patch)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])  # width, height

    def metadata(self) -> dict:
        """transformers' VideoMetadata fields: timestamps are indices / fps."""
        width, height = self.size
        return {"total_num_frames": self.total_frames, "fps": self.fps, "duration": self.total_frames / self.fps,
                "frames_indices": list(self.indices), "width": width, "height": height, "video_backend": "pyav"}

    def fewer(self, n: int) -> Video:
        """The same video with `n` of its frames, spread uniformly (a multiple of `multiple` where possible)."""
        n = fit_multiple(min(n, len(self)), self.multiple, len(self))
        keep = uniform(len(self), n)
        return replace(self, frames=self.frames[keep], indices=[self.indices[i] for i in keep])


def uniform(available: int, n: int, offset: int = 0) -> list[int]:
    """`n` indices spread over ``range(offset, offset + available)``, each at the middle of its share."""
    return [offset + min(available - 1, int((i + 0.5) * available / n)) for i in range(n)]


def video_inputs(videos: Sequence[Any]) -> dict:
    """Processor keyword arguments for a sample's videos: the frames, and for decoded videos their metadata with
    ``do_sample_frames=False`` (vlmtune sampled them). Lists of PIL frames pass as they are."""
    if not videos:
        return {}
    if all(isinstance(v, Video) for v in videos):
        return {"videos": [v.frames for v in videos], "video_metadata": [v.metadata() for v in videos],
                "do_sample_frames": False}
    return {"videos": [v.frames if isinstance(v, Video) else v for v in videos]}


# ---------------------------------------------------------------------------------------------------------
# Decoding


def load_video(value: Any, root: Path | None, index: int, sampling: VideoSampling,
               max_pixels: int = DEFAULT_MAX_PIXELS, fps: float | None = None) -> Video:
    """Decode one video reference of row `index` with `sampling`; relative paths start at `root`.

    `fps`: the frame rate of a list or folder of frames (default one frame per second).
    """
    if isinstance(value, Video):
        return value
    if isinstance(value, dict) and value.get("path"):  # HF Video/Image-style storage (a path; bytes are not read)
        value = value["path"]
    if isinstance(value, list | tuple):
        return _from_frames(list(value), f"list of {len(value)} frames", root, index, sampling, max_pixels, fps)
    if isinstance(value, str | Path):
        path = _resolve(str(value), root, index)
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not frames:
                raise _error(index, "unreadable_video", f"video folder {str(value)!r} holds no frame images "
                                                        f"({', '.join(FRAME_SUFFIXES)}); fix or remove the record")
            return _from_frames(frames, str(value), root, index, sampling, max_pixels, fps)
        return _decode_file(path, str(value), index, sampling, max_pixels)
    if value is None:
        raise _error(index, "bad_record", "a video is missing (null); fix or remove the record")
    raise _error(index, "bad_record", f"video value of type {type(value).__name__} is not supported; use a path "
                                      "to a video file, a folder of frames, or a list of frame images")


def _resolve(ref: str, root: Path | None, index: int) -> Path:
    if _URL.match(ref) and not ref.startswith("file://"):
        raise _error(index, "unreadable_video", f"video {ref!r} is a remote URL; vlmtune does not fetch videos over "
                                                "the network: download them and use local paths")
    path = local_path(ref, root)
    if not path.exists():
        raise _error(index, "unreadable_video", f"video {ref!r} not found (looked at {str(path)!r}); fix the path "
                                                "or set the data source's image_root")
    return path


def _window(sampling: VideoSampling, total: int, fps: float) -> tuple[int, int]:
    """[first, last) source frame indices inside ``[start, end)`` seconds."""
    first = max(0, math.ceil((sampling.start or 0.0) * fps - 1e-6))
    last = total if sampling.end is None else min(total, math.ceil(sampling.end * fps - 1e-6))
    return first, last


def pick(sampling: VideoSampling, total: int, fps: float, label: str, index: int) -> list[int]:
    """The source frame indices `sampling` takes from a video of `total` frames at `fps`."""
    first, last = _window(sampling, total, fps)
    if last <= first:
        raise _error(index, "unreadable_video", f"video {label!r} has no frames in data.video start/end "
                                                f"[{sampling.start}, {sampling.end}) s (it lasts {total / fps:.2f} s)")
    available = last - first
    return uniform(available, sampling.count(available, available / fps), first)


def _decode_file(path: Path, label: str, index: int, sampling: VideoSampling, max_pixels: int) -> Video:
    import av  # heavy; only data with videos needs it

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _error(index, "unreadable_video", f"{label!r} has no video stream; fix or remove the record")
            stream = container.streams.video[0]
            check_pixels(stream.codec_context.width, stream.codec_context.height, "video", label, index, max_pixels)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
            total = stream.frames or _count_frames(container, stream)
            if total <= 0:
                raise _error(index, "unreadable_video", f"video {label!r} has no frames; fix or remove the record")
            wanted = pick(sampling, total, fps, label, index)
            container.seek(0)
            frames = _frames_at(container, stream, wanted)
    except (av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(index, "unreadable_video", f"video {label!r} could not be read ({reason}); fix or remove the "
                                                "file") from e
    if len(frames) < len(wanted):
        raise _error(index, "unreadable_video", f"video {label!r} ends after {len(frames)} of the frames its header "
                                                f"promises ({total}; truncated?); fix or remove the file")
    return Video(np.stack(frames), fps, wanted, total, sampling.multiple)


def _count_frames(container, stream) -> int:
    """Frames of a stream whose header does not say (some WebM / MKV): its packets, without decoding."""
    n = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return n


def _frames_at(container, stream, wanted: list[int]) -> list[np.ndarray]:
    """The frames at the sorted source indices `wanted`, in one decoding pass (only those become pixels)."""
    out: list[np.ndarray] = []
    targets = iter(wanted)
    target = next(targets, None)
    for i, frame in enumerate(container.decode(stream)):
        while target is not None and target == i:  # an index may repeat when few frames are spread wide
            out.append(frame.to_ndarray(format="rgb24"))
            target = next(targets, None)
        if target is None:
            break
    return out


def _from_frames(refs: list, label: str, root: Path | None, index: int, sampling: VideoSampling,
                 max_pixels: int, fps: float | None) -> Video:
    if not refs:
        raise _error(index, "unreadable_video", f"video {label!r} has no frames; fix or remove the record")
    fps = float(fps or FRAME_LIST_FPS)
    wanted = pick(sampling, len(refs), fps, label, index)
    try:
        images = [load_image(refs[i] if not isinstance(refs[i], Path) else str(refs[i]), root, index, max_pixels)
                  for i in wanted]
    except SampleError as e:  # a frame is an image; its problem is the video's
        reason = "video_too_large" if e.reason == "image_too_large" else "unreadable_video"
        raise _error(index, reason, f"video {label!r}: {str(e).removeprefix(f'row {index}: ')}") from e
    if len({im.size for im in images}) > 1:
        raise _error(index, "unreadable_video", f"video {label!r}: its frames differ in size "
                                                f"({sorted({im.size for im in images})}); make them one size")
    return Video(np.stack([np.asarray(im) for im in images]), fps, wanted, len(refs), sampling.multiple)


def video_summary(video: Any, thumbnail: int = 0) -> dict:
    """What a person checks of a decoded video: its frame count and size, where the frames come from in the source
    (indices and seconds), the mean of each channel over the frames (0-255) and, with `thumbnail` > 0, each frame as
    a PNG data: URI at most that wide."""
    if not isinstance(video, Video):  # a list of PIL frames
        frames = np.stack([np.asarray(f.convert("RGB")) for f in video])
        video = Video(frames, FRAME_LIST_FPS, list(range(len(frames))), len(frames))
    width, height = video.size
    means = video.frames.reshape(-1, 3).astype(np.float64).mean(0)
    return {"frames": len(video), "width": width, "height": height, "fps": round(video.fps, 3),
            "source_frames": video.total_frames, "indices": list(video.indices),
            "seconds": [round(i / video.fps, 3) for i in video.indices],
            "mean": [round(float(m), 2) for m in means],
            **({"thumbnails": [_thumbnail(f, thumbnail) for f in video.frames]} if thumbnail else {})}


def _thumbnail(frame: np.ndarray, width: int) -> str:
    import PIL.Image

    return image_summary(PIL.Image.fromarray(frame), width)["thumbnail"]
