"""Wrappers of existing linear RNN layers and models (installed as memplug.adapters)."""
