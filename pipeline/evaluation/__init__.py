"""Evaluation protocols on trained encoders: probes, fine-tuning, segmentation, robustness, analyses."""
