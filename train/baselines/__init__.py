"""Post-training quantization baselines the paper compares against: min-max, DFQ, ZeroQ, real calibration."""
