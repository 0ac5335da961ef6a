"""What an encoded image file is, read from its header in microseconds, before any decoder sees it.

The GPU loaders need each image's size before decoding (to draw its crop box with
``augment.sample_resized_crop``) and must keep broken files away from decoders that abort a whole
batch on one bad file (DALI, nvJPEG). ``read_header`` walks JPEG markers by hand (PIL's lazy open
costs ~40 us per file, too slow for thousands of images per second on one Python thread) and
falls back to PIL for the other formats. It rejects: empty and non-image files, files whose
header is cut short, JPEGs with no end-of-image marker (truncated downloads), and images PIL would
refuse as decompression bombs (more than twice ``Image.MAX_IMAGE_PIXELS``). Damage inside
the compressed data passes this check; the loaders handle that when decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the size: baseline, extended, progressive, lossless, arithmetic.
JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
# An end-of-image marker must sit near the end; encoders may pad or append a little after it.
JPEG_EOI_SEARCH_BYTES = 4096


class BadImageError(ValueError):
    """An encoded image that no decoder should be given; the message says why."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg", "png", or PIL's format name for the rest
    width: int
    height: int
    channels: int  # JPEG components: 1 grayscale, 3 YCbCr/RGB, 4 CMYK/YCCK; other formats: bands


def read_header(data: bytes | memoryview) -> ImageHeader:
    """The format and size of an encoded image; BadImageError if it is not a usable image."""
    data = bytes(data) if isinstance(data, memoryview) else data
    if len(data) == 0:
        raise BadImageError("empty file")
    if data.startswith(JPEG_MAGIC):
        return _read_jpeg_header(data)
    if data.startswith(PNG_MAGIC):
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise BadImageError("PNG without an IHDR chunk (cut short?)")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return _checked(ImageHeader("png", width, height, channels=3))
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _checked(ImageHeader(image.format.lower(), image.width, image.height, len(image.getbands())))
    except Image.DecompressionBombError as error:  # an Exception, not an OSError
        raise BadImageError(str(error)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadImageError(f"not an image file (starts with {data[:8]!r})") from None


def _read_jpeg_header(data: bytes) -> ImageHeader:
    if data.rfind(b"\xff\xd9", max(0, len(data) - JPEG_EOI_SEARCH_BYTES)) < 0:
        raise BadImageError("JPEG without an end-of-image marker (truncated file)")
    position = 2
    end = len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            raise BadImageError(f"JPEG marker expected at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            raise BadImageError("JPEG without a frame header")
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in JPEG_SOF_MARKERS:
            if position + 10 > end:
                break
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return _checked(ImageHeader("jpeg", width, height, channels=data[position + 9]))
        if length < 2:
            raise BadImageError(f"JPEG segment of length {length} at byte {position}")
        position += 2 + length
    raise BadImageError("JPEG header cut short before its frame header")


def _checked(header: ImageHeader) -> ImageHeader:
    if header.width <= 0 or header.height <= 0:
        raise BadImageError(f"{header.format} of size {header.width}x{header.height}")
    # the size at which PIL, and so the CPU loaders, refuse to decode: every loader passes over the same files
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and header.width * header.height > 2 * limit:
        raise BadImageError(f"{header.format} of {header.width}x{header.height} = {header.width * header.height} "
                            f"pixels, more than twice PIL's decompression-bomb limit of {limit}")
    return header
