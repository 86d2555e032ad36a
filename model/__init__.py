"""MicroEmo model package."""
