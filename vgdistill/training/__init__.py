"""Training: one fit loop, the student, detector and teacher stages, optimiser and run folder."""
