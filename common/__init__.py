"""Code shared by the web and worker processes: settings, schemas, images, models, the token bus."""
