"""Engine: training, evaluation, teacher fitting, ablations, prediction and benchmarks."""
