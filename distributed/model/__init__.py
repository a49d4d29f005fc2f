"""distributed.model."""
