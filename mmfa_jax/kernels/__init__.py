"""Pallas kernels only: pure functions of refs plus launchers that build the pallas_call."""
