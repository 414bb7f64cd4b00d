"""Runtimes (imported as `edgecpm.runtimes`): backends that run a bundle, and the one selector among them. None of
them imports torch."""

from edgecpm.runtimes.select import KERNELS, load_backend

__all__ = ["KERNELS", "load_backend"]
