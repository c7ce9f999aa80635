"""The kinds of child a stage attempt runs as; `..backend` is the interface they share."""
