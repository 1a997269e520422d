"""What every node of this package does the same way: parameter descriptors and declaration, and `main`.

ROS layer (imports rclpy). Nodes keep their parameters in a table `name -> (default, descriptor)`, declare it
with `declare_all` (a bad value becomes a ValueError naming the parameter), take run-time changes through
`on_parameters`, and their console scripts run through `spin_node`, the ros2/examples `main` shape: a bad
configuration exits 2 with one fatal line, Ctrl-C exits 0 without a traceback. Works on Humble and newer: where
an API differs (post-set callbacks since Iron, `rclpy.init` as a context manager since Kilted) this module uses
what Humble has.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException, NameValidationException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter

__all__ = ["describe", "declare_all", "on_parameters", "spin_node", "unknown_parameter", "warn_unknown_parameters"]

RCLPY_PARAMETERS = ("use_sim_time", "start_type_description_service")  # what rclpy declares on every node


def describe(description: str, lo: float | None = None, hi: float | None = None,
             read_only: bool = False) -> ParameterDescriptor:
    """A descriptor with an integer range when both bounds are ints, else a float range when bounds are given."""
    d = ParameterDescriptor(description=description, read_only=read_only)
    if isinstance(lo, int) and isinstance(hi, int):
        d.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=1)]
    elif lo is not None:
        d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
    return d


def declare_all(node: Node, table: dict[str, tuple[Any, ParameterDescriptor]],
                error: type[ValueError] = ValueError) -> dict[str, Any]:
    """Declare every parameter of `table` on `node`; returns name -> value. A value out of range or of the wrong
    type raises `error` naming the parameter (with a hint for the usual YAML slip, `1` for a float)."""
    for name, (default, descriptor) in table.items():
        try:
            node.declare_parameter(name, default, descriptor)
        except (InvalidParameterValueException, InvalidParameterTypeException) as e:
            slip = isinstance(default, float) and "'INTEGER'" in str(e)  # `1` where `1.0` was meant
            hint = " (write floats with a decimal point, e.g. 1.0)" if slip else ""
            raise error(f"parameter {name}: {e.args[0] if e.args else e}{hint}") from None
    return {name: node.get_parameter(name).value for name in table}


def unknown_parameter(name: str, known: Iterable[str], node: str = "this node") -> str | None:
    """None for a parameter of the node (its own, one rclpy declares on every node, a QoS override), else why it
    is not one, with the close matches: ROS ignores such a name silently, so a misspelling would go unnoticed."""
    known = list(known)
    if name in known or name in RCLPY_PARAMETERS or name.startswith("qos_overrides."):
        return None
    group, _, last = name.rpartition(".")  # `commands.jump` is compared with commands.* by what follows the dot
    siblings = {k[len(group) + 1:]: k for k in known if group and k.startswith(group + ".")}
    close = ([siblings[m] for m in difflib.get_close_matches(last, siblings, n=3)] if siblings
             else difflib.get_close_matches(name, known, n=3))
    return f"{name}: not a parameter of {node}" + (f" (did you mean {', '.join(close)}?)" if close else "")


def warn_unknown_parameters(node: Node) -> list[str]:
    """Log a warning for each parameter given to `node` (params file, `-p`, launch) that it never declared, and
    return them; call once everything is declared. rclpy keeps the given ones only in a private attribute."""
    declared = node.list_parameters([], 0).names
    problems = [p for name in sorted(getattr(node, "_parameter_overrides", {}))
                if (p := unknown_parameter(name, declared))]
    for p in problems:
        node.get_logger().warning(f"ignored parameter {p}")
    return problems


def _accept(params: list[Parameter]) -> SetParametersResult:
    return SetParametersResult(successful=True)


def on_parameters(node: Node, apply: Callable[[list[Parameter]], None],
                  validate: Callable[[list[Parameter]], SetParametersResult] | None = None) -> None:
    """Run-time parameter changes, split as in ros2/demos: `validate` (on-set, a reason when it refuses; the
    descriptors' ranges and read_only are checked before it) and `apply` (post-set). Humble has no post-set
    callbacks: there `apply` runs in the on-set callback, once `validate` accepted."""
    validate = validate or _accept
    if hasattr(node, "add_post_set_parameters_callback"):
        node.add_on_set_parameters_callback(validate)
        node.add_post_set_parameters_callback(apply)
        return

    def validate_then_apply(params: list[Parameter]) -> SetParametersResult:
        result = validate(params)
        if result.successful:
            apply(params)
        return result

    node.add_on_set_parameters_callback(validate_then_apply)


def spin_node(make_node: Callable[[], Node], name: str, args: list[str] | None = None,
              until: Callable[[Node], Any] | None = None) -> int:
    """rclpy.init, the node until Ctrl-C (or until the future `until(node)` completes); 0, or 2 with one fatal
    line when the ROS arguments do not parse (a bad `-p`, params file or remap) or the node refuses its
    parameters (ValueError) or names (a topic that is not a valid name)."""
    try:
        rclpy.init(args=args)  # not `with rclpy.init()`: a context manager only since Kilted
    except (_rclpy.RCLError, _rclpy.UnknownROSArgsError) as e:
        get_logger(name).fatal(f"bad ROS arguments: {' '.join(str(e).split())}")
        return 2
    try:
        try:
            node = make_node()
        except (ValueError, NameValidationException) as e:
            get_logger(name).fatal(" ".join(str(e).split()))
            return 2
        ex = SingleThreadedExecutor()
        ex.add_node(node)
        try:
            if until is None:
                ex.spin()
            else:
                ex.spin_until_future_complete(until(node))
        finally:
            ex.shutdown()
            node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except _rclpy.RCLError:
        # Ctrl-C shuts the context down from rclpy's signal thread; between the executor's check and its wait
        # set that surfaces as "failed to initialize wait set: the given context is not valid" (~1 in 20).
        if rclpy.ok():
            raise
    finally:
        rclpy.try_shutdown()
    return 0
