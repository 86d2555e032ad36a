"""MicroEmo jobs package."""
