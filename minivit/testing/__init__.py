"""Helpers for the test suite and the benchmarks, kept apart from the engine.

``minivit.testing.torch_reference`` is a plain PyTorch ViT with timm's names: it needs PyTorch, which minivit
itself never requires, so import it only where torch is installed.
"""
