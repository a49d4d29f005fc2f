"""distributed.evaluation."""
