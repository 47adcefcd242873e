"""scaletune's own peft methods, registered through peft's public extension points on import."""

from .bottleneck import BottleneckConfig, BottleneckModel

__all__ = ["BottleneckConfig", "BottleneckModel"]
