"""tome-serve: the HTTP service around the tome library."""
