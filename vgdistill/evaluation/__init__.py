"""Evaluation: Acc@0.5 per split, exact under several processes."""
