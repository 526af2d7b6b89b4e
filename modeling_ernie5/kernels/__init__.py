"""Fast expert back-ends (registered on import)."""
