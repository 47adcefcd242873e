"""scaletune's own peft methods, registered through peft's public extension points on import."""
