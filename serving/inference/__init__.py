"""Inference steps shared by every backend: image decoding, test-time geometry, prompt-box
location assignment and the one post-processing implementation (automatic and box-prompted)."""
