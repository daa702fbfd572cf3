"""What keeps the server safe and bounded: HTTP token and CORS, size limits, the train-request whitelist, worker
threads."""
