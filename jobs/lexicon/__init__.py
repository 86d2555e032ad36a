"""Emotion lexicons shipped with MicroEmo (package data read by ``jobs.emer.Lexicon.load``)."""
