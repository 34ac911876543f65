"""driftline.detectors: pure online drift tests and mergeable sketches (no I/O)."""
