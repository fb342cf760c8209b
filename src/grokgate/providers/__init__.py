"""Backends behind the public model names, one module each, created through one registry."""
