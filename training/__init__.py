"""training code; imports serving, never imported by it."""
