"""Runtimes (imported as `edgecpm.runtimes`): backends that run a bundle. None of them imports torch."""
