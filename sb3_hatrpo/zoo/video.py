"""Videos of ``enjoy --record-video``, written frame by frame as the episodes run.

mp4 goes through imageio's ffmpeg plugin (``imageio-ffmpeg``, in the ``zoo`` extra), which streams every frame to
an ffmpeg process: memory stays at one frame however long the video. A ``.gif`` (asked for, or without ffmpeg) is
encoded by Pillow at the end from frames spooled to a temporary file on disk; Pillow keeps them in palette form
(one byte per pixel) while encoding.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VideoWriter", "has_ffmpeg"]


def has_ffmpeg() -> bool:
    """Whether imageio can write mp4 (``imageio-ffmpeg`` is installed)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


class VideoWriter:
    """Append RGB frames to an mp4 or gif file.

    :param path: The video file; ``.mp4`` falls back to ``.gif`` (with a message) without ``imageio-ffmpeg``.
    :param fps: Frames per second.
    """

    def __init__(self, path: str | Path, fps: int = 30) -> None:
        self.path = Path(path)
        self.fps = fps
        self.n_frames = 0
        if self.path.suffix.lower() == ".mp4" and not has_ffmpeg():
            gif = self.path.with_suffix(".gif")
            print(
                f'Cannot write mp4 without imageio-ffmpeg (pip install "sb3_hatrpo[zoo]"): writing {gif}',
                file=sys.stderr,
            )
            self.path = gif
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: Any = None
        self._spool: Any = None
        self._shape: tuple[int, ...] | None = None

    def append(self, frame: np.ndarray) -> None:
        """Write one ``(height, width, 3)`` uint8 frame.

        :param frame: The frame.
        """
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self.path.suffix.lower() == ".mp4":
            if self._writer is None:
                import imageio.v2 as imageio

                # macro_block_size=2: H.264 needs even sizes; 16 (imageio's default) would rescale most frames
                self._writer = imageio.get_writer(self.path, fps=self.fps, macro_block_size=2)
            self._writer.append_data(frame)
        else:
            if self._spool is None:
                self._spool = tempfile.TemporaryFile()  # noqa: SIM115  (closed by close())
                self._shape = frame.shape
            if frame.shape != self._shape:
                raise ValueError(f"Frame {self.n_frames} has the shape {frame.shape}, the first had {self._shape}")
            self._spool.write(frame.tobytes())
        self.n_frames += 1

    def _spooled(self) -> Iterator[Any]:
        from PIL import Image

        assert self._spool is not None and self._shape is not None
        size = int(np.prod(self._shape))
        self._spool.seek(0)
        for _ in range(self.n_frames):
            data = np.frombuffer(self._spool.read(size), dtype=np.uint8).reshape(self._shape)
            yield Image.fromarray(data)

    def close(self) -> Path | None:
        """Finish the file.

        :return: The written file, or None if no frame was appended (no file then).
        """
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._spool is not None:
            frames = self._spooled()
            first = next(frames)
            first.save(self.path, save_all=True, append_images=frames, duration=1000 / self.fps, loop=0, optimize=False)
            self._spool.close()
            self._spool = None
        return self.path if self.n_frames else None
