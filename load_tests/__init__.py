"""driftline load generators and benchmark harnesses (run as ``python -m load_tests.<name>``)."""
