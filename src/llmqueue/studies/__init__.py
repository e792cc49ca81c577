"""Many runs: sweeps, SLO capacity, saturation, fits of batch-time models, validation against real engines."""
