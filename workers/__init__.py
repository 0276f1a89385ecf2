"""What runs on Ray nodes: GPU telemetry, the node agent, worker actors."""
