"""distributed.training."""
