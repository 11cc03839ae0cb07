"""Pallas kernels (one file per op: selective scan, SSD, gated delta rule, windowed flash
attention) and their dispatch (`dispatch.py`)."""
