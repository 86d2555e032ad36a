"""MicroEmo pipeline package."""
