"""The HTTP layer: the only code that imports Starlette or uvicorn."""
