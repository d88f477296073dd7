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


def _escaped(text: str) -> str:
    """`text` as a value in an FFmpeg metadata file (its special characters take a backslash)."""
    return "".join("\\" + ch if ch in "=;#\\\n" else ch for ch in text)


def _remux_with_metadata(ffmpeg, video: str, meta: dict[str, str], out: str) -> None:
    """Copy the MP4 `video` into `out` with `meta` as its `comment` tag. The tag goes through an FFmpeg
    metadata file, not the command line: a long prompt (the config repeats it) would pass the kernel's
    limit on one argument (128 KiB) and fail with "Argument list too long"."""
    import subprocess

    info = Path(out + ".ffmetadata")
    info.write_text(";FFMETADATA1\ncomment=" + _escaped(json.dumps(meta)) + "\n", encoding="utf-8")
    try:
        done = subprocess.run([ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", video, "-f", "ffmetadata",
                               "-i", str(info), "-map", "0", "-map_metadata", "1", "-c", "copy", "-f", "mp4", out],
                              capture_output=True, text=True)
    finally:
        info.unlink(missing_ok=True)
    if done.returncode != 0:
        raise OutputError(f"ffmpeg could not add the metadata: {done.stderr.strip()[-500:]}")


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
        video = tmp + ".frames.mp4"
        try:
            writer = ffmpeg.write_frames(video, (w, h), fps=fps, codec="libx264", quality=8, macro_block_size=2,
                                         output_params=["-f", "mp4"])
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
            _remux_with_metadata(ffmpeg, video, meta, tmp)
        finally:
            Path(video).unlink(missing_ok=True)

    return write_new(path, write)


def read_mp4_metadata(path: str | Path) -> dict[str, str]:
    """The container's metadata tags of an MP4 (`comment` holds diffstage's JSON), read through FFmpeg."""
    import subprocess

    done = subprocess.run([_ffmpeg().get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, encoding="utf-8")
    if done.returncode != 0:
        raise OutputError(f"cannot read the metadata of '{path}': {done.stderr.strip()[-500:]}")
    tags: dict[str, str] = {}
    key, part, escape = None, [], False
    for ch in done.stdout.split("\n", 1)[1] + "\n":  # after the ";FFMETADATA1" header
        if escape:
            part.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch == "=" and key is None:
            key, part = "".join(part), []
        elif ch == "\n":
            if key is not None:
                tags[key] = "".join(part)
            key, part = None, []
        else:
            part.append(ch)
    return tags


def read_mp4(path: str | Path) -> tuple[np.ndarray, dict]:
    """Frames [F, H, W, 3] uint8 and the reader's metadata of an MP4 (for checks and tests)."""
    ffmpeg = _ffmpeg()
    reader = ffmpeg.read_frames(str(path))
    info = next(reader)
    w, h = info["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(h, w, 3) for frame in reader]
    return np.stack(frames), info
