"""Put the venv's prefix on AMENT_PREFIX_PATH for every Python process of the venv.

ament_index_python (and so `ros2 run`, `ros2 launch`, launch_ros, rosidl typesupport lookup) finds packages only
through AMENT_PREFIX_PATH, and the ROS 2 wheels install their share/ folders into the venv prefix. A one-line
`.pth` file in site-packages prepends `sys.prefix` when it is missing, so nothing needs sourcing.
Run with the venv's Python: `.venv/bin/python tools/ament_prefix_pth.py`.
"""

import os
import sys
import sysconfig

PTH_NAME = "hiera_perception_ament_prefix.pth"
# .pth lines starting with `import` are executed at start-up; the rest of the line must stay on it.
PTH_LINE = (
    "import os, sys; _app = os.environ.get('AMENT_PREFIX_PATH', ''); "
    "sys.prefix in _app.split(os.pathsep) or os.environ.__setitem__("
    "'AMENT_PREFIX_PATH', os.pathsep.join(p for p in [sys.prefix, _app] if p))\n"
)


def main() -> int:
    if sys.prefix == sys.base_prefix:
        print(f"refusing to write {PTH_NAME} outside a virtualenv (sys.prefix={sys.prefix})", file=sys.stderr)
        return 1
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(PTH_LINE)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
