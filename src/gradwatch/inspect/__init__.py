"""The backprop inspector: one forward and backward pass, step by step."""
