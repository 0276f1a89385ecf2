"""HTTP: the FastAPI app, its request and response models, and the client SDK over it."""
