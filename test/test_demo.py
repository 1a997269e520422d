"""`hiera-perception demo`: a short real run (camera and node subprocesses, DDS on localhost), and its summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import ros_helpers as rh

ROOT = Path(__file__).resolve().parent.parent
# The CLI when it has the command, else the module's own parser (the same add_arguments / main).
RUN_DEMO = """\
import argparse, logging, sys
from hiera_perception import cli, demo
if "demo" in cli.COMMANDS:
    sys.exit(cli.main(["demo", *sys.argv[1:]]))
logging.basicConfig(level=logging.INFO)
p = argparse.ArgumentParser()
demo.add_arguments(p)
sys.exit(demo.main(p.parse_args()))
"""
# time, true action, labels, encoder version, latency, mark (none: truth unknown), "~" (a change within the clip)
LINE = re.compile(r"^ *(\d+\.\d\d)s  true (\S+) +\| (.+?) +\| (\S+@\d+) \| +(\d+) ms  (ok|XX)?( ~)?$")
SUMMARY = re.compile(r"^summary: (\d+) clips in [\d.]+ s \(([\d.]+) clips/s\); top label = true action for "
                     r"([\d.]+)% of the (\d+) clips after the first second.*; latency p50 (\d+) ms, p95 (\d+) ms; "
                     r"camera ([\d.]+) fps; (\d+) of (\d+) frames dropped; (\d+) of (\d+) clips dropped$")


def test_summary_figures():
    from hiera_perception.demo import DemoStats, format_summary

    stats = DemoStats(received_s=[10.0, 10.5, 11.0, 11.5, 12.0], latencies_s=[0.05, 0.06, 0.07, 0.08, 0.5],
                      scored=[(True, True, True), (True, True, True), (True, False, False), (False, True, False)],
                      truth_stamps=31, truth_span_ns=(0, 10**9), versions=["m@0", "m@1", "m@2"])
    s = stats.summary()
    assert s == {"clips": 5, "seconds": 2.0, "clips_per_s": 2.0, "scored_clips": 4, "correct_share": 0.75,
                 "majority_correct_share": 0.5, "single_action_clips": 3, "single_action_correct_share": 0.6667,
                 "latency_p50_ms": 70.0,
                 "latency_p95_ms": 416.0, "latency_p99_ms": 483.2, "camera_fps": 30.0,
                 "encoder_versions": ["m@0", "m@1", "m@2"], "encoder_swaps": 2,
                 "camera_frames": None, "frames_dropped": None, "frames_dropped_share": None,
                 "clips_cut": None, "clips_dropped": None, "clips_dropped_share": None}
    assert format_summary(s) == (
        "summary: 5 clips in 2.0 s (2.00 clips/s); top label = true action for 75.0% of the 4 clips after the "
        "first second (66.7% of the 3 within one action; 50.0% counting only the majority action of a change); "
        "latency p50 70 ms, p95 416 ms; camera 30.0 fps")
    # The node's counters: 28 frames sent after its first report (which had counted 40), 66 received by its last
    # (after the camera stopped): 2 lost. 6 clips published since the first report, 1 dropped from the queue and
    # 1 failed: 2 of 8 (the 3 published before it, maybe before the printer listened, are not counted).
    stats.node_first = (10**9, {"frames_received": 40, "clips_published": 3, "queue_drops": 1, "inference_errors": 0})
    stats.node_last = {"frames_received": 66, "clips_published": 9, "queue_drops": 2, "inference_errors": 1}
    stats.frames_after_first = 28
    assert stats.drops()["frames_dropped"] is None  # not final: the camera may still be sending
    stats.final = True
    assert stats.drops() == {"camera_frames": 28, "frames_dropped": 2, "frames_dropped_share": 0.0714,
                             "clips_cut": 8, "clips_dropped": 2, "clips_dropped_share": 0.25}
    assert format_summary(stats.summary()).endswith("camera 30.0 fps; 2 of 28 frames dropped; 2 of 8 clips dropped")


@pytest.mark.ros
def test_demo_prints_a_line_per_clip_and_the_summary(tmp_path):
    from hiera_perception.checkpoint import DEFAULT_MODEL, MODELS_DIR

    embedded = (MODELS_DIR / DEFAULT_MODEL).is_file()
    args = ["--duration", "12"]
    if not embedded:  # until the embedded model ships: random weights with the synthetic action names
        import torch

        from hiera_perception.checkpoint import save_checkpoint
        from hiera_perception.config import get_config
        from hiera_perception.model import Hiera
        from hiera_perception.synth import ACTIONS

        torch.manual_seed(0)
        model = Hiera(get_config("hiera_tiny_8x64", num_classes=len(ACTIONS)))
        args += ["--model", str(save_checkpoint(tmp_path / "random.pt", model, labels=list(ACTIONS), model_id="rnd"))]
    # the module's own domain, as every ROS test module has: a random one could meet another module's nodes
    env = rh.ros_env(rh.domain_id(5))
    proc = subprocess.run([sys.executable, "-c", RUN_DEMO, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = proc.stdout.splitlines()
    lines = [LINE.match(line) for line in out[:-1]]
    assert all(lines), f"every line but the last is a clip: {out}"
    assert len(lines) >= 12, f"12 s of clips at the node's hop (0.5 s): {out}"
    times = [float(m.group(1)) for m in lines]
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:])), out
    summary = SUMMARY.match(out[-1])
    assert summary, out[-1]
    clips, clips_per_s, share, scored, p50, p95, camera_fps, lost, sent, dropped, cut = summary.groups()
    assert int(clips) == len(lines) and 0 < int(scored) < len(lines)
    assert float(clips_per_s) > 0 and int(p50) <= int(p95) and float(camera_fps) > 20
    # counted from the node's /diagnostics once the camera stopped (over 12 s at 30 fps): a node that keeps up
    # loses no clip, and at most a stray frame on localhost
    assert 20 * 11 < int(sent) < 31 * 20 and int(lost) <= 0.05 * int(sent)
    assert int(dropped) == 0 and 0.8 * int(clips) <= int(cut) <= int(clips)
    # scored: clips from the first second on whose true action is known (a clip whose truth message has not
    # arrived yet prints no mark and is not scored)
    marks = [m.group(6) for t, m in zip(times, lines) if t >= 1.0 and m.group(6)]
    assert len(marks) == int(scored)
    correct = marks.count("ok")
    assert float(share) == pytest.approx(100 * correct / int(scored), abs=0.06)
    assert len({m.group(4) for m in lines}) == 1, "one encoder version throughout"
    # a clip across a change of action prints both, in order, and is marked "~"; one within an action is not
    assert all((">" in m.group(2)) == bool(m.group(7)) for m in lines)
    if embedded:
        # The model's claim is on clips within one action (100% of 80 in a quiet 60 s run); across a change either
        # action it shows on a third of its frames counts. In a short run, how many clips straddle depends on
        # start-up timing, so the overall share has a floor under the 90% a minute gives. 12 s, not 8: with ~14
        # single-action clips two misses broke 90% (they came after executor stalls, since fixed in node.py).
        single = [m.group(6) for t, m in zip(times, lines) if t >= 1.0 and m.group(6) and not m.group(7)]
        assert len(single) >= 5 and single.count("ok") >= 0.9 * len(single), f"the embedded model names the actions: {out}"
        assert float(share) >= 80.0
    else:
        assert lines[0].group(4) == "rnd@0"


def test_bad_options_are_one_line_errors(monkeypatch):
    import argparse

    from hiera_perception import demo

    monkeypatch.setenv("ROS_DOMAIN_ID", str(rh.domain_id(5)))  # main sets a default one otherwise
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    cases = [(["--duration", "nan"], "--duration must be >= 0"),  # NaN ran the demo until killed
             (["--startup-timeout", "nan"], "--startup-timeout > 0"),
             (["--param", "top_k=["], r"--param 'top_k=\[': the value is not YAML"),  # was yaml's ScannerError
             (["--param", "adaptation=1", "--param", "adaptation.enabled=true"],
              "--param adaptation: not a parameter of the perception node"),  # was a TypeError traceback
             (["--param", ".=1"], "--param takes NAME=VALUE"),
             (["--param", "adaptation..enabled=1"], "--param takes NAME=VALUE"),
             (["--param", "top_kk=2"], "--param top_kk: not a parameter of the perception node \\(did you mean top_k"),
             (["--param", "adaptation.enable=true"], "did you mean adaptation.enabled")]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            demo.main(p.parse_args(argv))
    for name in ("top_k", "adaptation.enabled", "use_sim_time", "qos_overrides./action_features.publisher.depth"):
        demo._check_node_parameter(name)  # the node's own, and what rclpy declares on every node


def test_sigterm_stops_the_demo_like_ctrl_c(tmp_path):
    # `timeout`, systemd or `docker stop`: the summary is printed, the children stopped and the temporary folder
    # (parameter files, logs) removed; SIGTERM used to kill the demo outright and leave them.
    import signal
    import time

    env = {**rh.ros_env(rh.domain_id(5)), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", RUN_DEMO], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while len(lines) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if LINE.match(line.rstrip("\n")):
                lines.append(line)
        assert len(lines) == 3, proc.stderr.read() if proc.poll() is not None else "no clips in 180 s"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("hiera_demo_")], "the demo's folder exists"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1].startswith("summary: "), out[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hiera_demo_")], "its folder was removed"


def test_the_demo_says_which_taught_labels_the_model_serves(tmp_path, caplog, request):
    import json

    from hiera_perception import demo

    demo.log.addHandler(caplog.handler)  # launch_testing's logger class does not propagate to caplog's root
    request.addfinalizer(lambda: demo.log.removeHandler(caplog.handler))
    model = tmp_path / "robot.pt"
    demo._say_taught_labels(str(model))
    assert "taught" not in caplog.text
    (tmp_path / "robot.pt.prototypes.json").write_text(json.dumps({"dim": 4, "labels": {"retreat": {}, "clap": {}}}))
    demo._say_taught_labels(str(model))
    assert "the model also serves 2 taught label(s): retreat, clap" in caplog.text and "teach --forget" in caplog.text
