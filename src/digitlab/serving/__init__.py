"""Serving a trained model: the local page and its JSON API, and export to ONNX."""
