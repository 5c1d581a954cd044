"""Solutions to lesson 14."""

import importlib


def get_array_module(x):
    """-> numpy or cupy"""
    library = type(x).__module__.partition(".")[0]
    return importlib.import_module("cupy" if library == "cupy" else "numpy")
