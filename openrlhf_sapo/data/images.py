"""Image references turned into PNG bytes: PIL images, encoded bytes, `datasets` image dicts, data URIs,
base64 and file paths (nothing is downloaded), and the rule by which OpenRLHF takes a string for base64.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re

# Modes PIL writes to PNG as they are; anything else (CMYK, YCbCr, F, ...) is converted to RGB(A).
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_BASE64_RE = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}")


class ImageError(Exception):
    """One image reference that cannot be decoded."""


def _png_bytes_from_encoded(data: bytes) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return png_bytes(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{type(e).__name__}: {e}") from e


def png_bytes(im) -> bytes:
    """Encode a PIL image as PNG (deterministic for the same pixels, mode and PIL version)."""
    if im.mode not in _PNG_MODES:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_to_png(ref, base_dir: str | None) -> bytes:
    """Decode one image reference fully and return it as PNG bytes; raise `ImageError` if impossible.

    Accepted: PIL images, raw encoded bytes, `{"bytes": ..., "path": ...}` dicts (how `datasets`
    stores an `Image` feature; bytes win), `data:image/...;base64,` strings, bare base64 strings,
    and file paths (relative ones are resolved against `base_dir`, the folder of the input file or
    saved dataset). URLs are refused: nothing is downloaded.
    """
    from PIL import Image

    if isinstance(ref, Image.Image):
        try:
            ref.load()
            return png_bytes(ref)
        except (OSError, ValueError) as e:
            raise ImageError(f"{type(e).__name__}: {e}") from e
    if isinstance(ref, (bytes, bytearray)):
        if not ref:
            raise ImageError("empty bytes")
        return _png_bytes_from_encoded(bytes(ref))
    if isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
        if isinstance(data, str) and data:
            return image_to_png(data, base_dir)
        if data:
            return _png_bytes_from_encoded(bytes(data))
        if path:
            return image_to_png(str(path), base_dir)
        raise ImageError("image entry has neither bytes nor a path")
    if isinstance(ref, str):
        s = ref.strip()
        if not s:
            raise ImageError("empty path")
        if s.startswith("data:"):
            header, _, payload = s.partition(",")
            if not header.endswith(";base64") or not payload:
                raise ImageError(f"not a base64 data URI: {s[:40]!r}...")
            try:
                return _png_bytes_from_encoded(base64.b64decode(payload, validate=True))
            except binascii.Error as e:
                raise ImageError(f"bad base64 in data URI: {e}") from e
        if s.startswith(("http://", "https://")):
            raise ImageError(f"URL {s!r} is not downloaded; give local files, bytes or base64")
        path = s if os.path.isabs(s) or base_dir is None else os.path.join(base_dir, s)
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageError(f"cannot read {path}: {e}") from e
            return _png_bytes_from_encoded(data)
        if len(s) > 256 and _BASE64_RE.fullmatch(s):
            try:
                return _png_bytes_from_encoded(base64.b64decode(s, validate=False))
            except (binascii.Error, ImageError):
                pass  # a long path that happens to use only base64 characters
        raise ImageError(f"file not found: {path}")
    raise ImageError(f"unsupported image value of type {type(ref).__name__}")


def as_image_list(value) -> list:
    """A row's image field as a list: None -> [], a single reference -> [it]."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def upstream_reads_as_base64(ref: str) -> bool:
    """Whether OpenRLHF's `load_images` would take this string for base64 instead of a path: it
    does so for strings over 256 characters whose first 512 use only base64 characters, which an
    absolute path of over 512 letters, digits and slashes does."""
    return len(ref) > 256 and _BASE64_RE.fullmatch(ref[:512]) is not None
