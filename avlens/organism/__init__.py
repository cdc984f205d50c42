"""The model organism: a tiny audio-visual world and the model trained on it."""
