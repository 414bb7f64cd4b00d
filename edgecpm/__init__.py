"""edgecpm: MiniCPM checkpoints to fast text generation on edge devices."""

__version__ = "0.1.0"
