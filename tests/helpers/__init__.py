"""Code that tests and benchmarks share: handwriting-like digits and synthetic photos."""
