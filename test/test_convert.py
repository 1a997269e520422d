"""Message -> RGB conversion: every encoding against a known image, bad messages -> BadFrame(reason)."""

from __future__ import annotations

import importlib
import os
import random
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from hiera_perception.convert import (
    ENCODINGS,
    MAX_SIDE,
    REASONS,
    SEMIPLANAR,
    BadFrame,
    compressed_to_rgb,
    image_to_rgb,
)

H, W = 6, 8
RGB = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
LOW = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)  # low bytes of 16-bit data

# encoding -> the [H, W, C] pixels (uint8 or uint16) a camera would send for RGB
PIXELS = {
    "rgb8": RGB,
    "bgr8": RGB[..., ::-1],
    "8UC3": RGB[..., ::-1],
    "rgba8": np.dstack([RGB, np.full((H, W), 77, np.uint8)]),
    "bgra8": np.dstack([RGB[..., ::-1], np.full((H, W), 77, np.uint8)]),
    "8UC4": np.dstack([RGB[..., ::-1], np.full((H, W), 77, np.uint8)]),
    "rgb16": RGB.astype(np.uint16) << 8 | LOW,
    "bgr16": (RGB.astype(np.uint16) << 8 | LOW)[..., ::-1],
    "16UC3": (RGB.astype(np.uint16) << 8 | LOW)[..., ::-1],
    "rgba16": np.dstack([RGB.astype(np.uint16) << 8 | LOW, np.full((H, W), 9, np.uint16)]),
    "bgra16": np.dstack([(RGB.astype(np.uint16) << 8 | LOW)[..., ::-1], np.full((H, W), 9, np.uint16)]),
    "16UC4": np.dstack([(RGB.astype(np.uint16) << 8 | LOW)[..., ::-1], np.full((H, W), 9, np.uint16)]),
}
GREY = RGB[..., 1]
GREY_PIXELS = {
    "mono8": GREY[..., None],
    "8UC1": GREY[..., None],
    "mono16": (GREY.astype(np.uint16) << 8 | LOW[..., 0])[..., None],
    "16UC1": (GREY.astype(np.uint16) << 8 | LOW[..., 0])[..., None],
}


def make_raw(encoding, pixels, pad=0, big_endian=False, cls=None):
    """A message with `pixels` [H, W, C] laid out as ROS does, each row followed by `pad` junk bytes."""
    pixels = np.asarray(pixels)
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<"))
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1).view(np.uint8)  # [H, W*C] -> [H, row bytes]
    junk = np.full((h, pad), 0xA5, np.uint8)
    data = np.hstack([rows, junk]).tobytes()
    msg = cls() if cls is not None else SimpleNamespace()
    msg.encoding, msg.height, msg.width = encoding, h, w
    msg.step, msg.is_bigendian, msg.data = rows.shape[1] + pad, int(big_endian), data
    return msg


def make_compressed(fmt, data, cls=None):
    msg = cls() if cls is not None else SimpleNamespace()
    msg.format, msg.data = fmt, data
    return msg


def reason_of(fn, msg):
    with pytest.raises(BadFrame) as info:
        fn(msg)
    assert info.value.reason in REASONS
    return info.value.reason


def check_rgb(out, h=H, w=W):
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (h, w, 3)
    assert out.flags.c_contiguous and out.flags.writeable


def ros_module(name):
    """A ROS module, skipping where it is missing, except under `make test` / CI, where that fails."""
    if os.environ.get("HIERA_PERCEPTION_REQUIRE_ROS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(params=["standin", "ros"])
def msg_cls(request):
    if request.param == "ros":
        return ros_module("sensor_msgs.msg")
    return None


# ---------------------------------------------------------------- raw Image round trips


@pytest.mark.parametrize("encoding", sorted(PIXELS))
@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_round_trip(encoding, pad, msg_cls):
    msg = make_raw(encoding, PIXELS[encoding], pad=pad, cls=msg_cls and msg_cls.Image)
    out = image_to_rgb(msg)
    check_rgb(out)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", sorted(GREY_PIXELS))
@pytest.mark.parametrize("pad", [0, 1])
def test_grey_encodings_round_trip(encoding, pad, msg_cls):
    msg = make_raw(encoding, GREY_PIXELS[encoding], pad=pad, cls=msg_cls and msg_cls.Image)
    out = image_to_rgb(msg)
    check_rgb(out)
    np.testing.assert_array_equal(out, np.repeat(GREY[..., None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "rgb16", "bgra16"])
@pytest.mark.parametrize("pad", [0, 3])  # 3: a step that is not a multiple of the 2-byte item size
def test_big_endian_16bit(encoding, pad, msg_cls):
    pixels = {**PIXELS, **GREY_PIXELS}[encoding]
    little = image_to_rgb(make_raw(encoding, pixels, pad=pad, cls=msg_cls and msg_cls.Image))
    big = make_raw(encoding, pixels, pad=pad, big_endian=True, cls=msg_cls and msg_cls.Image)
    np.testing.assert_array_equal(image_to_rgb(big), little)
    # the same bytes read with the wrong flag give other pixels: the flag is honoured
    big.is_bigendian = 0
    assert not np.array_equal(image_to_rgb(big), little)


def test_16bit_keeps_high_byte():
    msg = make_raw("mono16", np.array([[[0x0000], [0x00FF], [0x0100], [0xFFFF], [0x80FF], [0x7F00]]], np.uint16))
    assert image_to_rgb(msg)[0, :, 0].tolist() == [0, 0, 1, 255, 128, 127]


@pytest.mark.parametrize("encoding,code", [
    ("yuv422", cv2.COLOR_RGB2YUV_UYVY), ("uyvy", cv2.COLOR_RGB2YUV_UYVY),
    ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUYV), ("yuyv", cv2.COLOR_RGB2YUV_YUYV),
])
def test_yuv422_round_trip(encoding, code, msg_cls):
    # each horizontal pair shares its colour, so 4:2:2 chroma subsampling loses nothing
    paired = np.repeat(RGB[:, ::2], 2, axis=1)
    packed = cv2.cvtColor(paired, code)  # [H, W, 2]
    out = image_to_rgb(make_raw(encoding, packed, pad=2, cls=msg_cls and msg_cls.Image))
    check_rgb(out)
    assert np.abs(out.astype(int) - paired).max() <= 4  # YUV rounding


@pytest.mark.parametrize("encoding,data", [
    ("yuv422", [128, 16, 128, 235]), ("uyvy", [128, 16, 128, 235]),  # U Y0 V Y1
    ("yuv422_yuy2", [16, 128, 235, 128]), ("yuyv", [16, 128, 235, 128]),  # Y0 U Y1 V
])
def test_yuv422_byte_order(encoding, data):
    # written by hand, independent of OpenCV's encoder: a black pixel then a white one
    msg = SimpleNamespace(encoding=encoding, height=1, width=2, step=4, is_bigendian=0, data=bytes(data))
    out = image_to_rgb(msg).astype(int)
    assert out[0, 0].max() < 40 and out[0, 1].min() > 215


def i420_planes(rgb):
    """OpenCV's YUV 4:2:0 of `rgb`: (Y [H, W], U [H/2, W/2], V [H/2, W/2]), and its conversion back to RGB."""
    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    flat, q = i420.ravel(), h * w // 4
    return i420[:h], flat[h * w : h * w + q].reshape(h // 2, w // 2), flat[h * w + q :].reshape(h // 2, w // 2), \
        cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)


def make_semiplanar(encoding, y, chroma, pad=0, cls=None):
    """A semi-planar message: the Y plane's rows, then the chroma plane's rows [rows, 2 * samples], each row
    padded as the Y rows are (a chroma row of nv24 holds two Y rows' worth of bytes, so twice the padding)."""
    h, w = y.shape
    rows = [np.hstack([y, np.full((h, pad), 0xA5, np.uint8)])]
    rows.append(np.hstack([chroma, np.full((chroma.shape[0], chroma.shape[1] // w * pad), 0x5A, np.uint8)]))
    msg = cls() if cls is not None else SimpleNamespace()
    msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian = encoding, h, w, w + pad, 0
    msg.data = b"".join(r.tobytes() for r in rows)
    return msg


@pytest.mark.parametrize("encoding,order", [("nv21", "vu"), ("NV12", "uv")])
@pytest.mark.parametrize("pad", [0, 3])
def test_yuv420_semiplanar_equals_opencv_i420(encoding, order, pad, msg_cls):
    # the same samples as OpenCV's planar I420, only interleaved: the same RGB to the last bit
    y, u, v, want = i420_planes(RGB)
    pairs = np.dstack([v, u] if order == "vu" else [u, v]).reshape(H // 2, W)
    out = image_to_rgb(make_semiplanar(encoding, y, pairs, pad, cls=msg_cls and msg_cls.Image))
    check_rgb(out)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("pad", [0, 3])
def test_nv24_is_full_resolution_chroma(pad, msg_cls):
    # chroma repeated over each 2 x 2 block is what 4:2:0 carries: OpenCV's result within rounding
    y, u, v, want = i420_planes(RGB)
    up = [np.repeat(np.repeat(c, 2, axis=0), 2, axis=1) for c in (u, v)]
    out = image_to_rgb(make_semiplanar("nv24", y, np.dstack(up).reshape(H, 2 * W), pad,
                                       cls=msg_cls and msg_cls.Image))
    check_rgb(out)
    assert np.abs(out.astype(int) - want).max() <= 1
    # and each pixel has its own colour: chroma alternating grey, red, grey, red along a row stays so
    chroma = np.tile(np.array([[128, 128, 90, 240]], np.uint8), (2, 2))
    out = image_to_rgb(make_semiplanar("nv24", np.full((2, 4), 81, np.uint8), chroma)).astype(int)
    grey, red = out[:, 0::2], out[:, 1::2]
    assert (grey.max(axis=-1) - grey.min(axis=-1) <= 1).all() and (red[..., 0] > 230).all() and (red[..., 2] < 30).all()


@pytest.mark.parametrize("encoding,chroma,red", [("nv21", [240, 90], True), ("nv12", [240, 90], False),
                                                 ("nv12", [90, 240], True), ("nv24", [90, 240] * 4, True)])
def test_semiplanar_byte_order(encoding, chroma, red):
    # written by hand, independent of OpenCV's encoder: BT.601 red is Y 81, U 90, V 240
    msg = SimpleNamespace(encoding=encoding, height=2, width=2, step=2, is_bigendian=0, data=bytes([81] * 4 + chroma))
    out = image_to_rgb(msg).astype(int)
    assert ((out[..., 0] > 230) & (out[..., 2] < 30)).all() == red, out[0, 0].tolist()


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_patterns(pattern, bits):
    colour = np.array([200, 100, 30])  # R G B, a flat image demosaics back to itself
    chan = {"r": 0, "g": 1, "b": 2}
    mosaic = np.zeros((8, 10), np.uint16)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = colour[chan[pattern[2 * dy + dx]]]
    if bits == 16:
        mosaic = mosaic << 8 | 0x5A
    else:
        mosaic = mosaic.astype(np.uint8)
    out = image_to_rgb(make_raw(f"bayer_{pattern}{bits}", mosaic[..., None]))
    check_rgb(out, 8, 10)
    np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to(colour, (4, 6, 3)))


def test_encoding_names_case_insensitive_and_every_table_entry_converts():
    assert image_to_rgb(make_raw("RGB8", RGB)).tolist() == RGB.tolist()
    for enc, (channels, dtype, _) in ENCODINGS.items():
        msg = make_raw(enc, np.zeros((4, 6, channels), dtype))
        if enc in SEMIPLANAR:  # the chroma plane follows the Y plane's rows
            msg.data += bytes(2 * 4 * 6 // SEMIPLANAR[enc][0] ** 2)
        check_rgb(image_to_rgb(msg), 4, 6)


def test_matches_cv_bridge_where_it_works():
    cv_bridge = pytest.importorskip("cv_bridge")
    msgs = ros_module("sensor_msgs.msg")
    bridge = cv_bridge.CvBridge()
    cases = {**PIXELS, **GREY_PIXELS}
    for enc in ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"]:
        msg = make_raw(enc, cases[enc], cls=msgs.Image)
        np.testing.assert_array_equal(image_to_rgb(msg), bridge.imgmsg_to_cv2(msg, "rgb8"), err_msg=enc)
    for enc in ["mono16", "rgb16", "bgra16"]:  # cv_bridge rounds v * 255 / 65535, we keep v >> 8
        msg = make_raw(enc, cases[enc], cls=msgs.Image)
        diff = image_to_rgb(msg).astype(int) - bridge.imgmsg_to_cv2(msg, "rgb8")
        assert np.abs(diff).max() <= 1, enc
    paired = np.repeat(RGB[:, ::2], 2, axis=1)
    for enc, code in [("yuv422", cv2.COLOR_RGB2YUV_UYVY), ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUYV)]:
        msg = make_raw(enc, cv2.cvtColor(paired, code), cls=msgs.Image)
        np.testing.assert_array_equal(image_to_rgb(msg), bridge.imgmsg_to_cv2(msg, "rgb8"), err_msg=enc)
    # and messages cv_bridge itself wrote
    for enc, img in [("bgr8", RGB[..., ::-1].copy()), ("mono16", GREY_PIXELS["mono16"][..., 0].copy())]:
        msg = bridge.cv2_to_imgmsg(img, enc)
        ref = RGB if enc == "bgr8" else np.repeat(GREY[..., None], 3, axis=2)
        np.testing.assert_array_equal(image_to_rgb(msg), ref)


def test_rosbags_message_with_numpy_data():
    typesys = pytest.importorskip("rosbags.typesys")
    store = typesys.get_typestore(typesys.Stores.ROS2_HUMBLE)
    Image = store.types["sensor_msgs/msg/Image"]
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    raw = make_raw("bgr8", PIXELS["bgr8"], pad=4)
    msg = Image(header=Header(stamp=Time(sec=1, nanosec=0), frame_id="cam"), height=raw.height,
                width=raw.width, encoding="bgr8", is_bigendian=0, step=raw.step,
                data=np.frombuffer(raw.data, np.uint8))
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


def test_result_shares_no_memory_with_message():
    data = bytearray(make_raw("rgb8", RGB).data)
    msg = SimpleNamespace(encoding="rgb8", height=H, width=W, step=W * 3, is_bigendian=0, data=data)
    out = image_to_rgb(msg)
    data[:] = bytes(len(data))
    np.testing.assert_array_equal(out, RGB)
    out[:] = 0  # writable


def test_data_as_list_and_excess_bytes():
    msg = make_raw("rgb8", RGB)
    msg.data = list(msg.data) + [1, 2, 3]  # extra bytes after step * height are ignored
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


# ------------------------------------------------------------------------ bad raw messages


def test_bad_raw_messages_reasons():
    good = lambda **kw: SimpleNamespace(**{**vars(make_raw("rgb8", RGB)), **kw})  # noqa: E731
    row = W * 3
    assert reason_of(image_to_rgb, good(encoding="32FC1")) == "unknown_encoding"
    assert reason_of(image_to_rgb, good(encoding="nonsense")) == "unknown_encoding"
    assert reason_of(image_to_rgb, good(width=0)) == "empty_image"
    assert reason_of(image_to_rgb, good(height=0, data=b"")) == "empty_image"
    assert reason_of(image_to_rgb, good(data=b"")) == "truncated"
    assert reason_of(image_to_rgb, good(data=bytes(row * H - 1))) == "truncated"
    assert reason_of(image_to_rgb, good(step=row - 1)) == "step_too_small"
    assert reason_of(image_to_rgb, good(step=row + 1)) == "truncated"  # a wrong step that overruns
    assert reason_of(image_to_rgb, good(width=MAX_SIDE + 1)) == "too_large"
    assert reason_of(image_to_rgb, good(width=10_000, height=10_000)) == "too_large"
    assert reason_of(image_to_rgb, good(height="6")) == "bad_field"
    assert reason_of(image_to_rgb, good(height=6.0)) == "bad_field"
    assert reason_of(image_to_rgb, good(encoding=None)) == "bad_field"
    assert reason_of(image_to_rgb, SimpleNamespace(encoding="rgb8", height=1, width=1, step=3)) == "bad_field"
    assert reason_of(image_to_rgb, good(data=3.5)) == "bad_data"
    assert reason_of(image_to_rgb, good(data=[300] * (row * H))) == "bad_data"
    assert reason_of(image_to_rgb, good(data=np.zeros(row * H, np.float32))) == "bad_data"
    yuv = make_raw("yuyv", np.zeros((2, 3, 2), np.uint8))
    assert reason_of(image_to_rgb, yuv) == "odd_width"
    semi = lambda enc, h, w, size: SimpleNamespace(encoding=enc, height=h, width=w, step=w, is_bigendian=0,  # noqa: E731
                                                   data=bytes(size))
    assert reason_of(image_to_rgb, semi("nv21", 3, 4, 18)) == "odd_height"
    assert reason_of(image_to_rgb, semi("nv12", 2, 3, 9)) == "odd_width"
    assert reason_of(image_to_rgb, semi("nv21", 2, 4, 11)) == "truncated"  # 8 Y + 4 chroma bytes needed
    assert reason_of(image_to_rgb, semi("nv24", 2, 4, 23)) == "truncated"  # 8 Y + 16 chroma bytes needed
    check_rgb(image_to_rgb(semi("nv24", 3, 3, 27)), 3, 3)  # 4:4:4 takes any size
    assert reason_of(image_to_rgb, None) == "bad_field"


def test_bad_raw_with_real_message_class():
    msgs = ros_module("sensor_msgs.msg")
    msg = make_raw("bgr8", PIXELS["bgr8"], cls=msgs.Image)
    msg.data = msg.data[: len(msg.data) // 2]
    assert reason_of(image_to_rgb, msg) == "truncated"
    msg.encoding = "weird"
    assert reason_of(image_to_rgb, msg) == "unknown_encoding"
    assert reason_of(image_to_rgb, msgs.Image()) == "unknown_encoding"  # default: empty encoding


# ---------------------------------------------------------------------- CompressedImage


def encode(ext, img, *params):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


SMOOTH = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_LINEAR)  # JPEG-friendly


def test_jpeg_round_trip(msg_cls):
    data = encode(".jpg", SMOOTH[..., ::-1], cv2.IMWRITE_JPEG_QUALITY, 98)
    out = compressed_to_rgb(make_compressed("jpeg", data, cls=msg_cls and msg_cls.CompressedImage))
    check_rgb(out, 48, 64)
    # exactly what OpenCV decodes, in RGB order, and close to the original
    np.testing.assert_array_equal(out, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
    assert np.abs(out.astype(int) - SMOOTH).mean() < 3


@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey", "grey16", "rgb16"])
def test_png_round_trip(kind, msg_cls):
    images = {
        "rgb": (RGB[..., ::-1], RGB),
        "rgba": (np.dstack([RGB[..., ::-1], np.full((H, W), 5, np.uint8)]), RGB),
        "grey": (GREY, np.repeat(GREY[..., None], 3, 2)),
        "grey16": (GREY_PIXELS["mono16"][..., 0], np.repeat(GREY[..., None], 3, 2)),
        "rgb16": (PIXELS["bgr16"], RGB),
    }
    img, want = images[kind]
    msg = make_compressed("png", encode(".png", np.ascontiguousarray(img)), cls=msg_cls and msg_cls.CompressedImage)
    np.testing.assert_array_equal(compressed_to_rgb(msg), want)


def test_compressed_from_cv_bridge():
    cv_bridge = pytest.importorskip("cv_bridge")
    ros_module("sensor_msgs.msg")
    bridge = cv_bridge.CvBridge()
    msg = bridge.cv2_to_compressed_imgmsg(np.ascontiguousarray(RGB[..., ::-1]), dst_format="png")
    np.testing.assert_array_equal(compressed_to_rgb(msg), RGB)
    msg = bridge.cv2_to_compressed_imgmsg(np.ascontiguousarray(SMOOTH[..., ::-1]), dst_format="jpg")
    np.testing.assert_array_equal(compressed_to_rgb(msg), bridge.compressed_imgmsg_to_cv2(msg, "rgb8"))


def test_bad_compressed_reasons(msg_cls):
    cls = msg_cls and msg_cls.CompressedImage
    jpeg = encode(".jpg", SMOOTH)
    png = encode(".png", RGB)
    assert reason_of(compressed_to_rgb, make_compressed("jpeg", b"", cls)) == "empty_data"
    assert reason_of(compressed_to_rgb, make_compressed("jpeg", jpeg[: len(jpeg) // 2], cls)) == "truncated"
    # an MJPEG camera's padding after the end marker is no truncation, however long (past 4 kB it was called one)
    for fill in (bytes(100), bytes(4000), bytes(8192), b"\xff" * 5000, bytes(200_000)):
        padded = compressed_to_rgb(make_compressed("jpeg", jpeg + fill, cls))
        np.testing.assert_array_equal(padded, compressed_to_rgb(make_compressed("jpeg", jpeg, cls)))
    assert reason_of(compressed_to_rgb, make_compressed("jpeg", jpeg[: len(jpeg) // 2] + bytes(8192), cls)) == \
        "truncated"  # a cut frame in a zeroed buffer
    corrupt = jpeg[:2] + bytes(random.Random(0).randrange(256) for _ in range(len(jpeg) - 4)) + jpeg[-2:]
    assert reason_of(compressed_to_rgb, make_compressed("jpeg", corrupt, cls)) == "undecodable"
    assert reason_of(compressed_to_rgb, make_compressed("jpeg", b"not an image at all", cls)) == "undecodable"
    assert reason_of(compressed_to_rgb, make_compressed("png", png[:-30], cls)) == "undecodable"
    depth = make_compressed("16UC1; compressedDepth png", bytes(12) + png, cls)
    assert reason_of(compressed_to_rgb, depth) == "unsupported_format"
    # headers claiming huge images are refused before decoding
    huge_png = png[:16] + (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big") + png[24:]
    assert reason_of(compressed_to_rgb, make_compressed("png", huge_png, cls)) == "too_large"
    sof = jpeg.index(b"\xff\xc0")
    huge_jpeg = jpeg[: sof + 5] + (60_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big") + jpeg[sof + 9:]
    assert reason_of(compressed_to_rgb, make_compressed("jpeg", huge_jpeg, cls)) == "too_large"
    assert reason_of(compressed_to_rgb, SimpleNamespace(format="jpeg")) == "bad_field"


# --------------------------------------------------------------------------------- fuzz


def reference_plain(msg, channels, dtype):
    """Row by row, no views: the pixels of a plain (non-YUV, non-Bayer) encoding, as RGB."""
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    data = bytes(msg.data)
    rows = []
    for r in range(msg.height):
        chunk = data[r * msg.step : r * msg.step + msg.width * channels * dt.itemsize]
        rows.append(np.frombuffer(chunk, dt).reshape(msg.width, channels))
    px = (np.stack(rows).astype(np.uint32) >> (8 * (dt.itemsize - 1))).astype(np.uint8)
    enc = msg.encoding.lower()
    if channels == 1:
        return np.repeat(px, 3, axis=2)
    order = [2, 1, 0] if enc.startswith("bgr") or enc in ("8uc3", "8uc4", "16uc3", "16uc4") else [0, 1, 2]
    return px[..., order]


def test_fuzz_raw_messages():
    rng = random.Random(1234)
    encodings = list(ENCODINGS) + ["32FC1", "", "jpeg", "RGB8", "Mono16", "bayer_xyzw8"]
    counts = {"ok": 0}
    for _ in range(400):
        enc = rng.choice(encodings)
        channels, dtype, _ = ENCODINGS.get(enc.lower(), (3, np.dtype(np.uint8), None))
        h, w = rng.choice([0, 1, 2, 3, 7]), rng.choice([0, 1, 2, 4, 5, 9])
        row = w * channels * np.dtype(dtype).itemsize
        step = max(0, row + rng.choice([-3, -1, 0, 0, 0, 1, 2, 5]))
        size = step * h + rng.choice([-7, -1, 0, 0, 0, 0, 4])
        data = bytes(rng.randrange(256) for _ in range(max(0, size)))
        msg = SimpleNamespace(encoding=enc, height=h, width=w, step=step, is_bigendian=rng.randrange(2), data=data)
        try:
            out = image_to_rgb(msg)
        except BadFrame as e:
            assert e.reason in REASONS and e.reason != "conversion_error", e
            counts[e.reason] = counts.get(e.reason, 0) + 1
            continue
        check_rgb(out, h, w)
        counts["ok"] += 1
        if not any(k in enc.lower() for k in ("yuv", "uyvy", "yuyv", "bayer", *SEMIPLANAR)):  # a plain layout
            np.testing.assert_array_equal(out, reference_plain(msg, channels, dtype), err_msg=repr(msg))
    # the loop really exercised both sides
    assert counts["ok"] > 50 and {"truncated", "step_too_small", "empty_image", "unknown_encoding"} <= set(counts)


def test_fuzz_compressed_messages():
    rng = random.Random(99)
    seeds = [encode(".jpg", SMOOTH), encode(".png", RGB), encode(".png", GREY_PIXELS["mono16"][..., 0])]
    ok = bad = 0
    for _ in range(200):
        data = bytearray(rng.choice(seeds))
        action = rng.randrange(4)
        if action == 0:  # flip some bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif action == 1:  # cut
            data = data[: rng.randrange(len(data))]
        elif action == 2:  # junk
            data = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        try:
            out = compressed_to_rgb(SimpleNamespace(format=rng.choice(["jpeg", "png", ""]), data=bytes(data)))
        except BadFrame as e:
            assert e.reason in REASONS and e.reason != "conversion_error", e
            bad += 1
            continue
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.shape[:2] in ((48, 64), (H, W))
        ok += 1
    assert ok > 40 and bad > 40
