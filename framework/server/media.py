"""What a server sends back: images encoded as PNG, JPEG or WebP, videos as MP4, and the files that
`response_format=url` responses (and finished video jobs) point to, kept for serve.url_ttl_s."""
from __future__ import annotations

import io
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..video import save_mp4

# output_format -> (Pillow's format name, media type)
IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
MAX_STORED_BYTES = 2 * 2 ** 30  # the oldest files go first past this, whatever their time left


def encode_image(image, output_format: str = "png", compression: int | None = None) -> bytes:
    """One PIL image in `output_format`; `compression` (OpenAI's output_compression, 0-100, default 100: its
    quality) for JPEG and WebP."""
    fmt, _ = IMAGE_FORMATS[output_format]
    out = io.BytesIO()
    options = {} if fmt == "PNG" else {"quality": max(1, 100 if compression is None else compression)}
    image.convert("RGB").save(out, format=fmt, **options)
    return out.getvalue()


def encode_video(frames: list, fps: int, meta: dict[str, str]) -> bytes:
    """A video (its frames as PIL images) as MP4 bytes."""
    array = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    with tempfile.TemporaryDirectory(prefix="diffstage-video-") as folder:
        path = save_mp4(array, Path(folder) / "video.mp4", meta, fps=fps)
        return path.read_bytes()


class FileStore:
    """Files served at /v1/files/{id}: made by the server, each kept for `ttl_s` (and within MAX_STORED_BYTES)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._files: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()  # id -> data, media type, expiry
        self._bytes = 0  # held in _files
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, suffix: str) -> str:
        file_id = f"file_{secrets.token_urlsafe(16)}{suffix}"  # unguessable: a URL is shared with no other name
        with self._lock:
            self._expire()
            self._files[file_id] = (data, media_type, time.monotonic() + self.ttl_s)
            self._bytes += len(data)
            while self._bytes > MAX_STORED_BYTES and len(self._files) > 1:
                self._bytes -= len(self._files.popitem(last=False)[1][0])
        return file_id

    def get(self, file_id: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._expire()
            entry = self._files.get(file_id)
        return None if entry is None else entry[:2]

    def _expire(self) -> None:
        now = time.monotonic()
        for file_id in [k for k, (_, _, expiry) in self._files.items() if expiry < now]:
            self._bytes -= len(self._files.pop(file_id)[0])
