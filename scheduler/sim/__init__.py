"""The trace-driven simulator: Philly traces replayed through the real queue policy and
placement."""
