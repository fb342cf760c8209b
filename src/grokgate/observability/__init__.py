"""Logs now; metrics plug in here."""
