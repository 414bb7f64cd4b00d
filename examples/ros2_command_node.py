"""A ROS 2-style node: an operator's sentence in, one JSON robot command out, valid for a schema, on time.

    python examples/ros2_command_node.py bundles/smollm2-135m          # reads sentences from stdin
    (with rclpy installed it subscribes to /operator_text and publishes /robot_command instead)

The command is decoded under a JSON schema (response_format), so it always parses and validates; the
callback bounds each answer with a deadline (max_time) and a token budget, and a newer sentence cancels
the one still being answered, as a robot should act on the latest order only.
"""

from __future__ import annotations

import json
import sys
import threading

import edgecpm
from edgecpm.control import CancelToken

COMMAND_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["action", "target", "speed"],
    "properties": {"action": {"enum": ["pick", "place", "move", "stop"]},
                   "target": {"type": "string", "maxLength": 30},
                   "speed": {"type": "integer", "minimum": 1, "maximum": 10}},
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "robot_command", "schema": COMMAND_SCHEMA}}
SYSTEM = "You turn an operator's request into one robot command."


class CommandNode:
    """The callback shape of an rclpy node: on_text(sentence) -> publish(command dict or None)."""

    def __init__(self, engine: edgecpm.Engine, publish, *, max_time: float = 5.0):
        self.engine, self.publish, self.max_time = engine, publish, max_time
        self._current = CancelToken()
        self._lock = threading.Lock()

    def on_text(self, sentence: str) -> None:
        with self._lock:  # the latest order wins: the answer still running for an older one is cancelled
            self._current.cancel()
            self._current = token = CancelToken()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence}]
        reply = self.engine.respond(messages, response_format=FORMAT, max_new_tokens=64, max_time=self.max_time, cancel=token)
        if reply.finish_reason == "stop":
            self.publish(json.loads(reply.content))
        else:  # "time", "cancelled" or "length": nothing half-formed reaches the robot
            print(f"no command ({reply.finish_reason})", file=sys.stderr)


def main(bundle: str) -> None:
    engine = edgecpm.load(bundle)
    try:
        import rclpy
        from std_msgs.msg import String
    except ImportError:
        node = CommandNode(engine, lambda command: print(json.dumps(command), flush=True))
        for line in sys.stdin:
            if line.strip():
                node.on_text(line.strip())
        return
    rclpy.init()
    ros_node = rclpy.create_node("edgecpm_commands")
    publisher = ros_node.create_publisher(String, "robot_command", 10)
    node = CommandNode(engine, lambda command: publisher.publish(String(data=json.dumps(command))))
    ros_node.create_subscription(String, "operator_text", lambda message: node.on_text(message.data), 10)
    rclpy.spin(ros_node)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} BUNDLE")
    main(sys.argv[1])
