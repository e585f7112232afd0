"""Scheduling: the types every scheduler shares (`interface`), and the production scheduler."""
