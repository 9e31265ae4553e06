"""The reactive engine: workers, completion consumers and the maintenance loop."""
