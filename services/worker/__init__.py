"""The model side: takes chat jobs from RabbitMQ, calls model endpoints, streams deltas back."""
