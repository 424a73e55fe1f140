"""Tools built on the method: ablate, bench, demo and predict."""
