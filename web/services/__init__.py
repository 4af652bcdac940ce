"""Request logic behind the API routes (the routes stay thin)."""
