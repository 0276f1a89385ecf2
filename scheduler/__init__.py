"""The jobworker control plane: specs, job store, state machine, loop, API, CLI."""
