"""Robustness suite: bad inputs across every command, killed processes, phrase fuzzing."""
