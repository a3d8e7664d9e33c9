"""Unit tests: in-process, over socket pairs and fakes (tests/fakes.py); no root needed."""
