"""ROS image messages -> RGB uint8 [H, W, 3] frames, or `BadFrame(reason)`.

`image_to_rgb` reads a sensor_msgs/Image, `compressed_to_rgb` a sensor_msgs/CompressedImage. Both
work on any object with the messages' fields (duck typing): rclpy messages (`data` an
array.array), rosbags messages (`data` a numpy array), or plain stand-ins (bytes, lists), and
import no ROS package, so this module runs and is tested without ROS.

Design: a raw Image is read with one numpy view over `data`: [height, step] bytes, cut to the
row's width*channels*itemsize bytes (which drops any row padding, whatever `step` is), viewed as the
encoding's dtype with the message's byte order. This is what cv_bridge's `imgmsg_to_cv2` does too,
but it fails on big-endian messages under numpy 2 and misreads a `step` that is not a multiple of
channels x itemsize; routing around those bugs would need this same view, so cv_bridge is not used
at all (nor rosbags-image, which does the same): one code path gives identical results with and
without ROS, and cv_bridge serves the tests as an oracle instead. Colour conversions (BGR, alpha,
grey, YUV 4:2:2 and 4:2:0, Bayer) are cv2.cvtColor; compressed images are cv2.imdecode, as in cv_bridge.

16-bit images (mono16, 16UC1, rgb16, ...) become 8-bit by keeping the high byte (`>> 8`): exact,
cheap, and the same for raw and PNG input (cv_bridge rounds v * 255 / 65535 instead, at most 1
level apart). A depth image in millimetres is not a camera image and comes out nearly black; that
is expected. YUV 4:2:2 follows ROS's names: `yuv422` and `uyvy` are U Y0 V Y1, `yuv422_yuy2` and
`yuyv` are Y0 U Y1 V. The semi-planar `nv21` (4:2:0, V U), `nv12` (U V) and `nv24` (4:4:4, U V) are a Y
plane of `height` rows of `step` bytes followed by the interleaved chroma plane (`nv24`: rows of 2 x step
bytes), as V4L2 lays them out; cv_bridge reads none of them. Bayer names follow ROS (`bayer_rggb8` has R at
row 0, column 0). 8UC1, 8UC3 and 8UC4 read as mono8, bgr8 and bgra8 (OpenCV's order), 16UC* alike.
Encoding names are matched case-insensitively. `is_bigendian` matters only for 16-bit encodings.

Every problem with a message's content raises `BadFrame` (a ValueError) with a short `reason` from
`REASONS`, so the node can count per reason; nothing else escapes for bad content. Excess bytes
after step*height are ignored; fewer are `truncated`. Images over `MAX_SIDE` per side or
`MAX_PIXELS` in all are refused before anything is allocated (PNG and JPEG sizes are read from
their headers before decoding, against decompression bombs). The result is always a new
C-contiguous array that shares no memory with the message.
"""

from __future__ import annotations

import array
import operator
from typing import Any

import cv2
import numpy as np

__all__ = ["BadFrame", "REASONS", "ENCODINGS", "SEMIPLANAR", "MAX_SIDE", "MAX_PIXELS", "image_to_rgb",
           "compressed_to_rgb"]

MAX_SIDE = 16384
MAX_PIXELS = 1 << 26  # 67 Mpx, above 8K video (33 Mpx)

REASONS = (
    "unknown_encoding",  # encoding not in ENCODINGS
    "bad_field",  # a field missing or of the wrong type (height not an int, ...)
    "bad_data",  # `data` not bytes-like, or values outside 0..255
    "empty_image",  # width or height 0
    "too_large",  # beyond MAX_SIDE / MAX_PIXELS
    "step_too_small",  # step < width * channels * itemsize
    "truncated",  # fewer than step * height bytes; a JPEG without its end marker
    "odd_width",  # YUV 4:2:2 and 4:2:0 need an even width
    "odd_height",  # YUV 4:2:0 needs an even height
    "empty_data",  # a CompressedImage with no bytes
    "unsupported_format",  # compressedDepth, or a decoded type that is no camera image
    "undecodable",  # cv2.imdecode could not read it
    "conversion_error",  # anything else that failed; a bug here, worth reporting
)


class BadFrame(ValueError):
    """A message that cannot become a frame. `reason` is one of REASONS; `detail` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


_U8, _U16 = np.dtype(np.uint8), np.dtype(np.uint16)

# encoding -> (channels, dtype, cv2 conversion to RGB or None when already RGB)
ENCODINGS: dict[str, tuple[int, np.dtype, int | None]] = {
    "rgb8": (3, _U8, None),
    "bgr8": (3, _U8, cv2.COLOR_BGR2RGB),
    "8uc3": (3, _U8, cv2.COLOR_BGR2RGB),
    "rgba8": (4, _U8, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, _U8, cv2.COLOR_BGRA2RGB),
    "8uc4": (4, _U8, cv2.COLOR_BGRA2RGB),
    "mono8": (1, _U8, cv2.COLOR_GRAY2RGB),
    "8uc1": (1, _U8, cv2.COLOR_GRAY2RGB),
    "rgb16": (3, _U16, None),
    "bgr16": (3, _U16, cv2.COLOR_BGR2RGB),
    "16uc3": (3, _U16, cv2.COLOR_BGR2RGB),
    "rgba16": (4, _U16, cv2.COLOR_RGBA2RGB),
    "bgra16": (4, _U16, cv2.COLOR_BGRA2RGB),
    "16uc4": (4, _U16, cv2.COLOR_BGRA2RGB),
    "mono16": (1, _U16, cv2.COLOR_GRAY2RGB),
    "16uc1": (1, _U16, cv2.COLOR_GRAY2RGB),
    "yuv422": (2, _U8, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": (2, _U8, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, _U8, cv2.COLOR_YUV2RGB_YUYV),
    "yuyv": (2, _U8, cv2.COLOR_YUV2RGB_YUYV),
}
# OpenCV names a Bayer pattern by row 1, columns 1-2; ROS by row 0, columns 0-1.
for _ros, _cv in (("rggb", "BG"), ("bggr", "RG"), ("gbrg", "GR"), ("grbg", "GB")):
    _code = getattr(cv2, f"COLOR_Bayer{_cv}2RGB")
    ENCODINGS[f"bayer_{_ros}8"] = (1, _U8, _code)
    ENCODINGS[f"bayer_{_ros}16"] = (1, _U16, _code)
_YUV = {"yuv422", "uyvy", "yuv422_yuy2", "yuyv"}
# Semi-planar YUV (V4L2 layouts): a Y plane of `height` rows of `step` bytes, then one interleaved chroma plane.
# encoding -> (chroma subsampling per axis, cv2 conversion of the [H * 3/2, W] 4:2:0 layout, or None: 4:4:4)
SEMIPLANAR: dict[str, tuple[int, int | None]] = {
    "nv21": (2, cv2.COLOR_YUV2RGB_NV21),  # ROS standard: V U, half resolution both ways
    "nv12": (2, cv2.COLOR_YUV2RGB_NV12),  # not a ROS name, but what many drivers send: U V
    "nv24": (1, None),  # ROS standard: U V at full resolution, chroma rows of 2 x step bytes
}
for _name in SEMIPLANAR:
    ENCODINGS[_name] = (1, _U8, None)  # the Y plane's pixel; the chroma plane follows the image
# ITU-R BT.601 limited range, the matrix of OpenCV's NV12/NV21 conversions: [R G B] = M [Y U V 1]
_BT601 = np.array([[1.164, 0.0, 1.596], [1.164, -0.391, -0.813], [1.164, 2.018, 0.0]])
_BT601 = np.hstack([_BT601, -_BT601 @ np.array([[16.0], [128.0], [128.0]])])


def image_to_rgb(msg: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image (or look-alike) -> [height, width, 3] uint8 RGB. Raises BadFrame."""
    try:
        return _image_to_rgb(msg, max_pixels)
    except BadFrame:
        raise
    except Exception as e:  # the contract: message content never raises anything but BadFrame
        raise BadFrame("conversion_error", f"{type(e).__name__}: {e}") from e


def compressed_to_rgb(msg: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG, PNG, or anything cv2.imdecode reads) -> [H, W, 3] uint8 RGB.

    Raises BadFrame.
    """
    try:
        return _compressed_to_rgb(msg, max_pixels)
    except BadFrame:
        raise
    except Exception as e:
        raise BadFrame("conversion_error", f"{type(e).__name__}: {e}") from e


def _image_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    encoding = _field(msg, "encoding", str)
    key = encoding.strip().lower()
    spec = ENCODINGS.get(key)
    if spec is None:
        raise BadFrame("unknown_encoding", repr(encoding[:40]))
    channels, dtype, code = spec
    height = _int_field(msg, "height")
    width = _int_field(msg, "width")
    step = _int_field(msg, "step")
    big_endian = bool(_field(msg, "is_bigendian", (int, bool, np.integer)))
    if height <= 0 or width <= 0:
        raise BadFrame("empty_image", f"{width}x{height}")
    _check_size(width, height, max_pixels)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise BadFrame("step_too_small", f"step {step} < {row_bytes} bytes per row ({width} px {encoding})")
    sub = SEMIPLANAR[key][0] if key in SEMIPLANAR else 0  # chroma subsampling; 0: no chroma plane
    if (key in _YUV or sub == 2) and width % 2:
        raise BadFrame("odd_width", f"{encoding} needs an even width, got {width}")
    if sub == 2 and height % 2:
        raise BadFrame("odd_height", f"{encoding} needs an even height, got {height}")
    data = _as_bytes(_field(msg, "data", object))
    chroma = 2 * step * height // sub**2 if sub else 0  # bytes of the chroma plane after the rows
    if data.size < step * height + chroma:
        raise BadFrame("truncated", f"{data.size} bytes < {step * height + chroma} (step {step}, height {height}, "
                                    f"{encoding})")
    if sub:
        return _semiplanar_to_rgb(data, key, width, height, step)

    rows = data[: step * height].reshape(height, step)[:, :row_bytes]  # [H, step] -> [H, row_bytes]
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if big_endian else "<")
    # [H, row_bytes] uint8 -> [H, W, C] of the encoding's dtype; padded rows are copied together first
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    if dtype.itemsize > 1:
        pixels = (pixels >> 8).astype(np.uint8)  # high byte; byte order resolved by numpy
    if code is None:
        return np.array(pixels, dtype=np.uint8, order="C", copy=True)
    if channels == 1:
        pixels = pixels[:, :, 0]  # Bayer demosaicing wants [H, W]
    return np.ascontiguousarray(cv2.cvtColor(pixels, code))


def _semiplanar_to_rgb(data: np.ndarray, key: str, width: int, height: int, step: int) -> np.ndarray:
    sub, code = SEMIPLANAR[key]
    y = data[: step * height].reshape(height, step)[:, :width]
    # chroma: height/sub rows of 2*step/sub bytes, each 2*width/sub bytes of (U, V) or (V, U) pairs
    c = data[step * height : step * height + 2 * step * height // sub**2].reshape(height // sub, 2 * step // sub)
    c = c[:, : 2 * width // sub]
    if code is not None:  # 4:2:0: OpenCV reads the two planes stacked, [H * 3/2, W]
        return np.ascontiguousarray(cv2.cvtColor(np.vstack([y, c]), code))
    yuv = np.dstack([y, c.reshape(height, width, 2)])  # [H, W, 3]: Y U V
    return np.ascontiguousarray(cv2.transform(yuv, _BT601))  # [H, W, 3], saturated and rounded to uint8


def _compressed_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    fmt = _field(msg, "format", str).lower()
    if "compresseddepth" in fmt:
        raise BadFrame("unsupported_format", f"{fmt!r} (depth, not a camera image)")
    data = _as_bytes(_field(msg, "data", object))
    if data.size == 0:
        raise BadFrame("empty_data")
    head = data[: 1 << 17].tobytes()  # headers (and JPEG APP segments before SOF) are near the start
    size = _png_size(head) if head.startswith(b"\x89PNG\r\n\x1a\n") else None
    if head.startswith(b"\xff\xd8"):
        size = _jpeg_size(head)
        # libjpeg returns a grey-filled image with only a warning for a cut file. Cameras may pad after the end
        # marker (0x00 or 0xFF fill, any amount: a driver may hand over its whole MJPEG buffer); entropy-coded data
        # never holds one (0xFF is stuffed), only an EXIF thumbnail near the start does
        if b"\xff\xd9" not in data.tobytes().rstrip(b"\x00\xff")[-4096:]:
            raise BadFrame("truncated", "JPEG without its end marker")
    if size is not None:
        if size[0] <= 0 or size[1] <= 0:
            raise BadFrame("empty_image", f"{size[0]}x{size[1]} in the header")
        _check_size(size[0], size[1], max_pixels)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise BadFrame("undecodable", f"{data.size} bytes, format {fmt!r}")
    _check_size(img.shape[1], img.shape[0], max_pixels)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # 16-bit PNG: high byte
    elif img.dtype != np.uint8:
        raise BadFrame("unsupported_format", f"decoded {img.dtype} image")
    channels = 1 if img.ndim == 2 else img.shape[2]
    code = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}.get(channels)
    if code is None:
        raise BadFrame("unsupported_format", f"decoded image with {channels} channels")
    return np.ascontiguousarray(cv2.cvtColor(img, code))


def _field(msg: Any, name: str, types: type | tuple[type, ...]) -> Any:
    try:
        value = getattr(msg, name)
    except AttributeError:
        raise BadFrame("bad_field", f"no field {name!r} on {type(msg).__name__}") from None
    if not isinstance(value, types):
        raise BadFrame("bad_field", f"{name} is a {type(value).__name__}")
    return value


def _int_field(msg: Any, name: str) -> int:
    value = _field(msg, name, object)
    if isinstance(value, bool):
        raise BadFrame("bad_field", f"{name} is a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise BadFrame("bad_field", f"{name} is a {type(value).__name__}, not an integer") from None


def _as_bytes(data: Any) -> np.ndarray:
    """`data` as a 1-D uint8 array without copying when it is a buffer (bytes, array.array, ndarray)."""
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.uint8, np.int8):
            raise BadFrame("bad_data", f"data is a {data.dtype} array")
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        view = memoryview(data)
        if not view.c_contiguous:
            raise BadFrame("bad_data", "data is not a contiguous buffer")
        return np.frombuffer(view.cast("B"), dtype=np.uint8)
    if isinstance(data, (list, tuple)):
        values = np.asarray(data)
        if values.size == 0:
            return np.zeros(0, np.uint8)
        if values.ndim != 1 or values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
            raise BadFrame("bad_data", "data list is not byte values 0..255")
        return values.astype(np.uint8)
    raise BadFrame("bad_data", f"data is a {type(data).__name__}")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE or width * height > max_pixels:
        raise BadFrame("too_large", f"{width}x{height} (limits: {MAX_SIDE} per side, {max_pixels} pixels)")


def _png_size(head: bytes) -> tuple[int, int] | None:
    # signature (8), chunk length (4), b"IHDR", width (4, big-endian), height (4)
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, or None when not found in `head`."""
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > len(head):
                return None
            # FF Cx, length (2), precision (1), height (2), width (2)
            return int.from_bytes(head[i + 7 : i + 9], "big"), int.from_bytes(head[i + 5 : i + 7], "big")
        if marker in (0xDA, 0xD9):  # scan data or end before any frame header
            return None
        i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    return None
