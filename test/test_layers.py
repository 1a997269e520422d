"""The layering rule: the core imports neither rclpy nor any ROS message package (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROS_LAYER = {"node", "node_config", "camera", "consumer", "demo", "ros_params"}
CORE = sorted(p.stem for p in (ROOT / "hiera_perception").glob("*.py") if p.stem not in ROS_LAYER | {"__main__"})

PROBE = """
import importlib, sys
blocked = ("rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "diagnostic_msgs", "std_srvs",
           "hiera_perception_msgs", "cv_bridge", "launch", "launch_ros")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"core module imported ROS package {name}")
sys.meta_path.insert(0, Block())
for m in sys.argv[1:]:
    importlib.import_module("hiera_perception." + m)
print("ok", len(sys.argv) - 1)
"""


def test_core_modules_import_without_ros():
    assert len(CORE) >= 20, CORE  # the probe must really cover the core
    out = subprocess.run([sys.executable, "-c", PROBE, *CORE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"ok {len(CORE)}"


def test_the_probe_catches_a_ros_import():
    out = subprocess.run([sys.executable, "-c", PROBE, "node"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "imported ROS package" in out.stderr


def test_the_cli_and_the_package_exports_load_torch_only_when_used():
    # `hiera-perception --help`, the camera and the consumer need no torch: importing it cost 1.5 s and 200 MiB
    probe = ("import sys, hiera_perception, hiera_perception.cli, hiera_perception.synth\n"
             "assert 'torch' not in sys.modules, 'torch imported'\n"
             "assert hiera_perception.get_config('hiera_tiny_8x64').name == 'hiera_tiny_8x64'\n"
             "assert 'Hiera' in dir(hiera_perception) and hiera_perception.Hiera.__name__ == 'Hiera'\n"
             "print('ok')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
