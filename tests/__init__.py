"""botline test suite."""
