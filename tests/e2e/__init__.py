"""End to end: the operator, the real training-operator and kwok GPU nodes on a real control plane."""
