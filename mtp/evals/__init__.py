"""Evaluators: tiny classes whose `run(state)` yields `(name, value)` pairs."""
