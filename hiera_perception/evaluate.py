"""`hiera-perception eval`: accuracy, per-class accuracy, confusion matrix and clips/s on a data folder (or on a
rosbag2 of one action, `--bag B --label NAME`).

Every clip goes through `Engine.infer`, the node's own path (crop_resize, normalise, the encoder, the
labeler), and is sampled on the video's timeline at the model's own `frame_stride_s` (as the node's clip
buffer samples a camera), so the figures are the node's. The prediction is the labeler's top-1 label. A
video gives `clips_per_video` clips, evenly placed (1: its middle). Throughput counts `Engine.infer` only
(decoding the video files is not what the node does), after one untimed warm-up batch.

`--json` prints one object (the `evaluate` report: the model card is rendered from it); the text form
is a per-class table and the confusion matrix (rows: true label, columns: predicted). `--plot PNG`
draws the matrix with OpenCV.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from hiera_perception.atomic import atomic_write_bytes

__all__ = ["evaluate", "format_report", "draw_confusion", "add_arguments", "main"]

log = logging.getLogger(__name__)


def evaluate(
    engine,
    folder: str | Path | None,
    batch: int = 8,
    frame_stride_s: float | None = None,
    clips_per_video: int = 1,
    progress: bool = False,
    bag: str | Path | None = None,
    topic: str | None = None,
    label: str | None = None,
) -> dict:
    """Score `engine` (an `engine.Engine`) on the labelled clips of a data folder, or on a rosbag2 whose clips all
    show `label` (a bag carries no labels: cut as the node cuts a camera, a new clip every half clip); returns the
    report dict."""
    from tqdm import tqdm

    from hiera_perception.dataset import ClipDataset

    if batch < 1 or clips_per_video < 1:
        raise ValueError(f"batch and clips_per_video must be >= 1, got batch={batch}, clips_per_video={clips_per_video}")
    names = engine.labeler.classes  # head classes, then taught labels
    if not names:
        raise ValueError(f"model {engine.encoder_version} has neither a classification head nor taught labels: "
                         "nothing to evaluate")
    if frame_stride_s is not None and not frame_stride_s > 0:
        raise ValueError(f"frame_stride_s must be > 0, got {frame_stride_s}")
    stride = float(frame_stride_s or engine.frame_stride_s)
    if bag is not None:
        from hiera_perception.bag import BagClips
        from hiera_perception.clip_buffer import half_clip_hop

        if label not in names:
            raise ValueError(f"a bag carries no labels: give the action all its clips show (--label), one of the "
                             f"classes of model {engine.encoder_version}: {names}" + (f"; got {label!r}" if label else ""))
        ds = BagClips(bag, topic, engine.num_frames, stride, engine.size, hop_s=half_clip_hop(engine.num_frames, stride))
        items, truth, source, videos = list(range(len(ds))), [names.index(label)] * len(ds), bag, 1
        if not items:
            raise ValueError(f"bag {bag} is too short for one clip of {engine.num_frames} frames every {stride:.3f} s")
    else:
        ds = ClipDataset(folder, engine.num_frames, stride, engine.size, clips_per_video=clips_per_video)
        unknown = sorted(set(ds.classes) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown} in {folder} are not classes of model {engine.encoder_version}: {names}")
        data_labels = ds.labels()  # indices into ds.classes, -1 = unlabelled
        items = [i for i, y in enumerate(data_labels) if y >= 0]
        if not items:
            raise ValueError(f"{folder}: labels.csv gives no labels; nothing to evaluate")
        truth = [names.index(ds.classes[data_labels[i]]) for i in items]
        source, videos = folder, len({ds.items[i // clips_per_video].path for i in items})

    K = len(names)
    confusion = np.zeros((K, K), np.int64)  # [true, predicted]
    infer_s = 0.0
    warm = False
    bar = tqdm(total=len(items), desc="eval", unit="clip", file=sys.stderr, disable=not progress)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        clips = [list(ds[i][0].numpy()) for i in chunk]  # each: num_frames uint8 [S, S, 3]
        if not warm:  # one-off costs (allocator, kernels) are not the steady state the node runs in
            engine.infer(clips)
            warm = True
        t0 = time.perf_counter()
        results = engine.infer(clips)
        infer_s += time.perf_counter() - t0
        for i, res in zip(range(start, start + len(chunk)), results):
            confusion[truth[i], names.index(res.labels[0])] += 1
        bar.update(len(chunk))
    bar.close()

    correct = int(np.trace(confusion))
    per_class = {}
    for k, name in enumerate(names):
        n = int(confusion[k].sum())
        if n:
            per_class[name] = {"clips": n, "correct": int(confusion[k, k]), "accuracy": int(confusion[k, k]) / n}
    cfg = engine.model.config
    return {
        "model_id": getattr(engine.model, "model_id", cfg.name),
        "encoder_version": engine.encoder_version,
        "config": cfg.name,
        "input_size": list(cfg.input_size),
        "data": str(source),
        "videos": videos,
        "clips": len(items),
        "clips_per_video": clips_per_video,
        "frame_stride_s": stride,
        "accuracy": correct / len(items),
        "correct": correct,
        "labels": names,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "clips_per_s": len(items) / infer_s if infer_s > 0 else None,
        "infer_s": infer_s,
        "batch": batch,
        "device": str(engine.device),
        "precision": engine.precision,
        "threads": torch.get_num_threads(),
    }


def format_report(report: dict) -> str:
    """The report as text: summary, per-class accuracy, confusion matrix (rows true, columns predicted)."""
    names = report["labels"]
    lines = [
        f"model {report['encoder_version']} ({report['config']}) on {report['data']}: {report['clips']} clips "
        f"from {report['videos']} videos, frame stride {report['frame_stride_s']:.4g} s",
        f"accuracy {report['accuracy']:.4f} ({report['correct']}/{report['clips']}), "
        f"{report['clips_per_s'] or 0:.1f} clips/s on {report['device']} ({report['precision']}, batch "
        f"{report['batch']}, {report['threads']} threads)",
        "",
        f"{'class':<{max(map(len, names))}}  accuracy  clips",
    ]
    for name, pc in report["per_class"].items():
        lines.append(f"{name:<{max(map(len, names))}}  {pc['accuracy']:8.4f}  {pc['clips']:5d}")
    rows = [i for i, n in enumerate(names) if n in report["per_class"]]
    w = max(5, max(len(str(v)) for row in report["confusion"] for v in row) + 1)
    pad = max(map(len, names))
    lines += ["", "confusion (rows: true, columns: predicted; columns numbered as the rows)",
              " " * (pad + 5) + "".join(f"{j:>{w}d}" for j in range(len(names)))]
    for i in rows:
        lines.append(f"{i:>2d} {names[i]:<{pad}}  " + "".join(f"{v:>{w}d}" for v in report["confusion"][i]))
    return "\n".join(lines)


def draw_confusion(report: dict, path: str | Path, cell: int = 44) -> Path:
    """Draw the confusion matrix as a PNG (colour = share of the true class's clips), written atomically."""
    names = report["labels"]
    m = np.asarray(report["confusion"], np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    K = len(names)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    label_w = max(cv2.getTextSize(n, font, scale, 1)[0][0] for n in names) + 12
    top = label_w + 30
    img = np.full((top + K * cell + 10, label_w + K * cell + 10, 3), 255, np.uint8)
    colours = cv2.applyColorMap(np.round(share * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)  # [K, K, 3] BGR
    for i in range(K):
        for j in range(K):
            x, y = label_w + j * cell, top + i * cell
            c = tuple(int(v) for v in colours[i, j])
            cv2.rectangle(img, (x, y), (x + cell - 1, y + cell - 1), c, -1)
            text = str(int(m[i, j]))
            (tw, th), _ = cv2.getTextSize(text, font, scale, 1)
            ink = (0, 0, 0) if share[i, j] > 0.6 else (255, 255, 255)  # viridis is light at the top end
            cv2.putText(img, text, (x + (cell - tw) // 2, y + (cell + th) // 2), font, scale, ink, 1, cv2.LINE_AA)
        (tw, th), _ = cv2.getTextSize(names[i], font, scale, 1)
        cv2.putText(img, names[i], (label_w - tw - 6, top + i * cell + (cell + th) // 2), font, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    # column names: drawn horizontally on a strip, then turned to read bottom-up above each column
    strip = np.full((K * cell, label_w, 3), 255, np.uint8)
    for j in range(K):
        (tw, th), _ = cv2.getTextSize(names[j], font, scale, 1)
        cv2.putText(strip, names[j], (6, j * cell + (cell + th) // 2), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    img[30 : 30 + label_w, label_w : label_w + K * cell] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    title = f"{report['encoder_version']}: accuracy {report['accuracy']:.3f} ({report['clips']} clips)"
    cv2.putText(img, title, (8, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"OpenCV could not encode the confusion matrix for {path}")
    atomic_write_bytes(path, png.tobytes())
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model file, our checkpoint or config (default: the embedded model)")
    p.add_argument("--arch", default=None, help="config name of an official .pth, e.g. hiera_base_16x224")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data folder (labels.csv beside the videos)")
    src.add_argument("--bag", help="rosbag2 folder (or its .db3/.mcap file) whose clips all show --label")
    p.add_argument("--topic", default=None, help="image topic in --bag (default: its only image topic)")
    p.add_argument("--label", default=None, help="with --bag: the action its clips show (a bag carries no labels)")
    p.add_argument("--batch", type=int, default=8, help="clips per forward pass (default 8)")
    p.add_argument("--clips-per-video", type=int, default=1, help="evenly placed clips per video (default 1: the middle)")
    p.add_argument("--frame-stride", type=float, default=None, help="seconds between a clip's frames "
                   "(default: what the model was trained with)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--prototypes", default=None, help="taught-labels file, as given to teach (default: where teach "
                   "keeps them for the model)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the confusion matrix to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from hiera_perception.atomic import atomic_write_text, check_writable
    from hiera_perception.checkpoint import load_model
    from hiera_perception.engine import Engine

    for path in (args.out, args.plot):  # a bad path found after scoring every clip would lose the work
        if path:
            check_writable(path)
    model = load_model(args.model, arch=args.arch, device=args.device)
    engine = Engine(model, args.device, args.precision, top_k=1, prototypes_file=args.prototypes)
    if args.data is not None and (args.label or args.topic):
        raise ValueError("--label and --topic go with --bag; a data folder's labels.csv names each clip's label")
    report = evaluate(engine, args.data, args.batch, args.frame_stride, args.clips_per_video,
                      progress=not args.no_progress, bag=args.bag, topic=args.topic, label=args.label)
    report["model"] = str(args.model) if args.model else "(embedded)"
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    if args.plot:
        draw_confusion(report, args.plot)
    return 0


if __name__ == "__main__":  # `python -m hiera_perception.evaluate ...`: `hiera-perception eval ...`, its errors too
    from hiera_perception.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
