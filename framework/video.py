"""Write videos as MP4 (H.264, via imageio-ffmpeg's bundled ffmpeg), atomically, never over an existing file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import OutputError
from .output_files import write_new

FPS = 16  # a common frame rate of current video diffusion models


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise OutputError("writing MP4 needs the `video` extra: pip install 'diffstage[video]' "
                          "(or output_type=np from Python for the frames)") from None
    return imageio_ffmpeg


def save_mp4(frames: np.ndarray, path: str | Path, meta: dict[str, str], fps: int = FPS) -> Path:
    """Frames [F, H, W, 3] (floats in [0, 1] or uint8) to an MP4 at `path` (or `stem-N.mp4` beside it);
    `meta` goes into the container's `comment` tag as JSON. Returns the path written."""
    ffmpeg = _ffmpeg()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    f, h, w, _ = frames.shape

    def write(tmp: str) -> None:
        # yuv420p (what players expect) needs even sizes; quality 8 of 10 keeps the tiny test videos exact enough
        writer = ffmpeg.write_frames(tmp, (w, h), fps=fps, codec="libx264", quality=8, macro_block_size=2,
                                     output_params=["-metadata", f"comment={json.dumps(meta)}", "-f", "mp4"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    return write_new(path, write)


def read_mp4(path: str | Path) -> tuple[np.ndarray, dict]:
    """Frames [F, H, W, 3] uint8 and the reader's metadata of an MP4 (for checks and tests)."""
    ffmpeg = _ffmpeg()
    reader = ffmpeg.read_frames(str(path))
    info = next(reader)
    w, h = info["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(h, w, 3) for frame in reader]
    return np.stack(frames), info
