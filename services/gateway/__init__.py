"""The HTTP edge: checks keys in Redis, puts chat jobs on RabbitMQ, relays the answers."""
