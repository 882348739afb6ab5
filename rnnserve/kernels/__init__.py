"""Pure tensor operators, one folder per op (see README.md for layouts and the dispatch rule)."""
